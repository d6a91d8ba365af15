"""StoreClient: a local replica of (a subtree of) the Clone store, kept current by a background agent.

The agent thread owns every socket (zguide's clone agent): a SUB and a DEALER to the server in use, and a
PUSH to each server's collector. The API talks to it through a command queue and an inproc PAIR that
only wakes it, and reads the replica under a lock, so any thread may call any method.

Consistency, in short (docs/store.md has the details):

* ``set``/``delete`` apply to the local replica at once (read-your-writes), then go to the server(s). Until
  the server echoes our update back, later updates of that key from others are ignored: they were
  numbered before ours. The echo "acknowledges" the update; unacknowledged updates are resent after a
  resync or failover, and servers drop the duplicates by uuid.
* Keys outside ``subtree`` can be written but are not mirrored (we would never see their echo); recent
  ones are resent after a failover too.
* The client resyncs (new snapshot, watchers told of the differences) on a gap in sequence numbers (only
  detectable with the whole tree, ``subtree="/"``), a server restart (new epoch in ``HUGZ``), or a
  server silent for three heartbeats; with a ``backup`` it then tries the other server.
* After a server restart that lost the state, the client re-publishes the keys whose latest value it wrote.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import zmq

from stemstream.config import Settings, get_settings
from stemstream.errors import StoreError, StoreUnavailable, WaitTimeout
from stemstream.log import RateLimitedLog
from stemstream.store.kvmsg import (
    HUGZ,
    ICANHAZ,
    KTHXBAI,
    KVMsg,
    KVMsgError,
    check_path,
    decode_value,
    encode_value,
    format_ttl,
    new_uuid,
)
from stemstream.store.server import PUB_HWM, endpoint, split_address
from stemstream.transport.security import curve_security
from stemstream.transport.sockets import make_socket

logger = logging.getLogger(__name__)

# A server silent for this many heartbeats is dead (its peer gives up after two: it is ready by then).
SILENCE_HEARTBEATS = 3
# An update not echoed within max(10 heartbeats, this) is given up (the server rejected or lost it).
ACK_TIMEOUT_MIN_S = 5.0
_SYNCING, _ACTIVE = "syncing", "active"

Watcher = Callable[[str, Any], None]


def store_addresses(settings: Settings) -> tuple[str, str | None]:
    """The store's address and its backup's (None without STEMSTREAM_STORE_BACKUP_HOST) from settings."""
    host, port = settings.store_backup_host, settings.store_backup_port
    return settings.store_address, (endpoint(host, port) if host else None)


@dataclass(slots=True)
class _Entry:
    body: bytes
    uuid: bytes
    sequence: int
    properties: dict[str, str]
    mine: bool = False  # our write is the latest value: we re-publish it if a restarted server lost it


@dataclass(slots=True)
class _Pending:
    msg: KVMsg
    since: float  # monotonic time it was (re)sent to a server we believed live


class StoreClient:
    """A replica of the Clone store at ``address`` (and ``backup``), restricted to ``subtree``.

    ``start()`` waits up to ``timeout`` seconds for the first snapshot. Values are anything msgpack can
    encode (tuples come back as lists); values written by non-msgpack clients come back as bytes.
    """

    def __init__(
        self,
        address: str,
        *,
        backup: str | None = None,
        subtree: str = "/",
        timeout: float = 5.0,
        settings: Settings | None = None,
    ) -> None:
        hosts = [split_address(address)[0]]  # fail early on a malformed address
        if backup is not None:
            hosts.append(split_address(backup)[0])
        self._servers = [address] if backup is None else [address, backup]
        self._subtree = subtree
        self._timeout = timeout
        self._settings: Settings = settings or get_settings()
        # CURVE: decided (and the client keys read) here, so a missing key is a one-line error now.
        self._security = curve_security(self._settings, hosts=tuple(hosts))
        if self._security is not None:
            self._security.check("client")
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._version = 0
        self._replica: dict[str, _Entry] = {}
        self._pending: dict[str, _Pending] = {}  # our unacknowledged writes in the subtree, latest per key
        self._watchers: dict[int, tuple[str, Watcher]] = {}
        self._next_watcher = 0
        self._commands: collections.deque[tuple[Any, ...]] = collections.deque()
        self._wake_lock = threading.Lock()
        self._wake_sent = False
        self._ctx: zmq.Context | None = None
        self._pipe: zmq.Socket | None = None
        self._thread: threading.Thread | None = None
        self._synced = threading.Event()
        self._error: BaseException | None = None
        self._closed = False
        self._connected = False
        self._server = address

    @classmethod
    def from_settings(
        cls, settings: Settings | None = None, *, subtree: str = "/", timeout: float = 5.0
    ) -> StoreClient:
        """A client of the store named by STEMSTREAM_STORE_HOST/PORT (and STORE_BACKUP_HOST/PORT, if set)."""
        settings = settings or get_settings()
        address, backup = store_addresses(settings)
        return cls(address, backup=backup, subtree=subtree, timeout=timeout, settings=settings)

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> StoreClient:
        """Connect and wait for the first snapshot; raises StoreUnavailable if none comes within timeout."""
        if self._thread is not None:
            raise StoreError("the store client is already started")
        self._ctx = zmq.Context()
        url = f"inproc://store-client-{id(self):x}"
        self._pipe = self._ctx.socket(zmq.PAIR)
        self._pipe.linger = 0
        self._pipe.bind(url)
        agent_pipe = self._ctx.socket(zmq.PAIR)
        agent_pipe.linger = 0
        agent_pipe.connect(url)
        agent = _Agent(self, self._ctx, agent_pipe)
        self._thread = threading.Thread(target=agent.run, name="store-client", daemon=True)
        self._thread.start()
        if not self._synced.wait(self._timeout) or self._error is not None:
            error = self._error
            self.close()
            if error is not None:
                raise StoreError(f"store client failed: {error}") from error
            where = " or ".join(self._servers)
            if self._security is None:
                hint = "; if it uses CURVE, set STEMSTREAM_KEYS_DIR"
            else:
                hint = f"; with CURVE on, client key {self._security.key_name!r} must be authorised there"
            raise StoreUnavailable(
                f"no Clone store answered at {where}; start one with `stemstream store serve` "
                f"or set STEMSTREAM_STORE_HOST/PORT{hint}"
            )
        return self

    def close(self) -> None:
        """Stop the agent (after it has handed queued updates to ZeroMQ) and release the sockets."""
        if self._closed:
            return
        self._closed = True
        if self._thread is not None:
            self._commands.append(("stop",))
            self._wake(force=True)
            self._thread.join(self._settings.linger_ms / 1000 + 5.0)
            if self._thread.is_alive():
                logger.error("store client agent did not stop; leaving its sockets open")
                return
        if self._pipe is not None:
            self._pipe.close()
        if self._ctx is not None:
            self._ctx.term()

    def __enter__(self) -> StoreClient:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "connected" if self._connected else "not connected"
        return f"StoreClient({self._server}, subtree={self._subtree!r}, {state}, {len(self._replica)} keys)"

    @property
    def connected(self) -> bool:
        """True while synced with a live server."""
        return self._connected

    @property
    def server(self) -> str:
        """Address of the server in use (or being tried)."""
        return self._server

    @property
    def subtree(self) -> str:
        return self._subtree

    # ------------------------------------------------------------------ writes

    def set(self, key: str, value: Any, ttl: float | None = None) -> None:
        """Set ``key`` to ``value``; with ``ttl`` (seconds) it is ephemeral: re-set it before it expires."""
        body = encode_value(value, key=key)
        props: dict[str, str] = {}
        if ttl is not None:
            try:
                props["ttl"] = format_ttl(ttl)
            except KVMsgError as exc:
                raise StoreError(f"ttl for {key!r}: {exc}") from None
        self._submit(KVMsg(key, 0, body, props))

    def delete(self, key: str) -> None:
        self._submit(KVMsg(key))

    def _submit(self, msg: KVMsg) -> None:
        self._check_usable()
        try:
            check_path(msg.key)
        except KVMsgError as exc:
            raise StoreError(str(exc)) from None
        tracked = msg.key.startswith(self._subtree)
        changed = False
        with self._lock:
            if tracked:
                old = self._replica.get(msg.key)
                if msg.body:
                    seq = old.sequence if old else 0
                    self._replica[msg.key] = _Entry(msg.body, msg.uuid, seq, msg.properties, mine=True)
                    changed = old is None or old.body != msg.body
                else:
                    changed = self._replica.pop(msg.key, None) is not None
                self._pending.pop(msg.key, None)  # re-inserted last: pending keeps write order
                self._pending[msg.key] = _Pending(msg, time.monotonic())
                if changed:
                    self._bump()
            self._commands.append(("send", msg, tracked, changed))
        self._wake()

    # ------------------------------------------------------------------ reads

    def get(self, key: str, default: Any = None) -> Any:
        """The value of ``key`` in the local replica (no round trip), or ``default``."""
        with self._lock:
            entry = self._replica.get(key)
        return default if entry is None else decode_value(entry.body)

    def items(self, prefix: str = "/") -> dict[str, Any]:
        """A copy of the replica under ``prefix``, decoded (changing it changes nothing in the store)."""
        with self._lock:
            raw = [(k, e.body) for k, e in self._replica.items() if k.startswith(prefix)]
        return {k: decode_value(body) for k, body in raw}

    def watch(self, callback: Watcher, prefix: str = "/") -> Callable[[], None]:
        """Call ``callback(key, value)`` from the agent thread on every change under ``prefix``.

        ``value`` is None when the key was deleted or expired. Keep callbacks short: they delay the agent.
        Returns a function that unsubscribes.
        """
        with self._lock:
            token = self._next_watcher
            self._next_watcher += 1
            self._watchers[token] = (prefix, callback)

        def unsubscribe() -> None:
            with self._lock:
                self._watchers.pop(token, None)

        return unsubscribe

    def wait_for(
        self, predicate: Callable[[dict[str, Any]], bool], prefix: str = "/", timeout: float = 10.0
    ) -> dict[str, Any]:
        """Block until ``predicate(items(prefix))`` is true and return those items; raises TimeoutError.

        The predicate is re-evaluated on every change of the replica and whenever the connection is lost
        or (re)established, so it may also look at :attr:`connected` and :attr:`server`.
        """
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                version = self._version
            snapshot = self.items(prefix)
            if predicate(snapshot):
                return snapshot
            with self._lock:
                while self._version == version:
                    if self._error is not None:
                        raise StoreError(f"store client agent died: {self._error}")
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise WaitTimeout(f"store: condition on {prefix!r} not met within {timeout:g} s")
                    self._changed.wait(remaining)

    # ------------------------------------------------------------------ internals

    def _check_usable(self) -> None:
        if self._error is not None:
            raise StoreError(f"store client agent died: {self._error}")
        if self._closed:
            raise StoreError("the store client is closed")
        if self._thread is None:
            raise StoreError("the store client is not started; call start() or use it in a with block")

    def _bump(self) -> None:
        """Caller holds the lock: the replica changed, wake wait_for()."""
        self._version += 1
        self._changed.notify_all()

    def _wake(self, force: bool = False) -> None:
        # One wake-up in flight is enough: the agent drains the whole queue when it wakes.
        with self._wake_lock:
            if (self._wake_sent and not force) or self._pipe is None:
                return
            self._wake_sent = True
            with contextlib.suppress(zmq.Again):  # the pipe is full of wake-ups already
                self._pipe.send(b"", zmq.NOBLOCK)

    def _fire(self, changes: Iterable[tuple[str, bytes | None]], rlog: RateLimitedLog) -> None:
        """Agent thread: tell the watchers about ``changes`` (key, body or None)."""
        with self._lock:
            watchers = list(self._watchers.values())
        if not watchers:
            return
        for key, body in changes:
            for prefix, callback in watchers:
                if key.startswith(prefix):
                    try:
                        callback(key, None if body is None else decode_value(body))
                    except Exception as exc:  # a watcher's bug must not kill the agent
                        rlog.warning("callback", "store watch %r raised on %s: %r", callback, key, exc)


class _Link:
    """The sockets to one server: its updates (SUB) and a snapshot request (DEALER)."""

    def __init__(self, ctx: zmq.Context, settings: Settings, address: str, subtree: str) -> None:
        host, port = split_address(address)
        self.address = address
        self.sub = make_socket(ctx, zmq.SUB, settings=settings, rcvhwm=PUB_HWM, role="client")
        self.sub.setsockopt(zmq.SUBSCRIBE, subtree.encode())
        if subtree:
            self.sub.setsockopt(zmq.SUBSCRIBE, HUGZ.encode())
        self.sub.connect(endpoint(host, port + 1))
        self.dealer = make_socket(ctx, zmq.DEALER, settings=settings, role="client")
        self.dealer.connect(endpoint(host, port))

    def close(self) -> None:
        self.sub.close(linger=0)
        self.dealer.close(linger=0)


class _Agent:
    """The client's background half: owns the sockets, keeps the replica in step with the server."""

    def __init__(self, client: StoreClient, ctx: zmq.Context, pipe: zmq.Socket) -> None:
        self.c = client
        self.ctx = ctx
        self.pipe = pipe
        self.settings = client._settings
        self.subtree = client._subtree
        self.full_tree = client._subtree in ("", "/")
        self.servers = client._servers
        self.rlog = RateLimitedLog(logger)
        self.hb = self.settings.store_heartbeat_s
        self.cur = 0
        self.state = _SYNCING
        self.link: _Link | None = None
        self.pushes: list[zmq.Socket] = []
        self.poller = zmq.Poller()
        self.sequence = 0
        self.epoch: str | None = None
        self.synced_once = False
        self.synced_at = 0.0
        self.last_heard = 0.0
        # Sync attempt state.
        self.snapshot: dict[str, KVMsg] = {}
        self.backlog: list[KVMsg] = []
        self.ready = False
        self.requested = False
        self.ask_by = 0.0
        self.give_up_at = 0.0
        # Outbound.
        self.unsent: collections.deque[KVMsg] = collections.deque()
        self.recent_outside: collections.deque[tuple[float, KVMsg]] = collections.deque(maxlen=1000)
        self.next_ack_check = 0.0

    # ------------------------------------------------------------------ loop

    def run(self) -> None:
        try:
            for address in self.servers:
                host, port = split_address(address)
                push = make_socket(self.ctx, zmq.PUSH, settings=self.settings, role="client")
                push.connect(endpoint(host, port + 2))
                self.pushes.append(push)
            self._begin_sync(None)
            while self._step():
                pass
        except Exception as exc:
            logger.exception("store client agent died")
            self.c._error = exc
        finally:
            self.c._connected = False
            if self.link is not None:
                self.link.close()
            for push in self.pushes:
                push.close()  # with the settings' linger: queued updates still go out
            self.pipe.close()
            self.c._synced.set()  # wake start() if it is still waiting
            with self.c._lock:
                self.c._bump()

    def _step(self) -> bool:
        now = time.monotonic()
        events = dict(self.poller.poll(self._timeout_ms(now)))
        if self.pipe in events:
            while True:
                try:
                    self.pipe.recv(zmq.NOBLOCK)
                except zmq.Again:
                    break
            with self.c._wake_lock:
                self.c._wake_sent = False
            if not self._do_commands():
                self._flush_unsent()  # last chance for updates held back by a busy server
                return False
        link = self.link
        assert link is not None
        if link.sub in events:
            self._read_sub(link)
        if self.link is link and link.dealer in events:
            self._read_dealer(link)
        self._check_timers(time.monotonic())
        self._flush_unsent()
        return True

    def _timeout_ms(self, now: float) -> int:
        deadlines = [now + 0.25]
        if self.state == _SYNCING:
            deadlines.append(self.give_up_at)
            if not self.requested:
                deadlines.append(self.ask_by)
        else:
            deadlines.append(self.last_heard + SILENCE_HEARTBEATS * self.hb)
        if self.unsent:
            deadlines.append(now + 0.005)
        return max(0, int(1000 * (min(deadlines) - now)) + 1)

    def _do_commands(self) -> bool:
        commands = self.c._commands
        while True:
            try:
                command = commands.popleft()
            except IndexError:
                return True
            if command[0] == "stop":
                return False
            _, msg, tracked, changed = command
            self._push(msg)
            if not tracked:
                self.recent_outside.append((time.monotonic(), msg))
            if changed:
                self.c._fire([(msg.key, msg.body or None)], self.rlog)

    # ------------------------------------------------------------------ outbound

    def _push(self, msg: KVMsg) -> None:
        """Send to the server in use (queued if it is busy) and, best effort, to the other one."""
        for i, push in enumerate(self.pushes):
            if i == self.cur and self.state == _ACTIVE and self.unsent:
                self.unsent.append(msg)  # keep order behind what is already waiting
                continue
            try:
                msg.send(push, zmq.NOBLOCK)
            except zmq.Again:
                # Server busy (HWM) or not connected. Only the one in use matters: a passive server's copy
                # is a spare, and whatever we send while syncing is resent once synced.
                if i == self.cur and self.state == _ACTIVE:
                    self.unsent.append(msg)

    def _flush_unsent(self) -> None:
        push = self.pushes[self.cur]
        while self.unsent:
            try:
                self.unsent[0].send(push, zmq.NOBLOCK)
            except zmq.Again:
                return
            self.unsent.popleft()

    def _resend(self, now: float) -> None:
        """After a sync: resend what the server has not acknowledged (it drops what it already has)."""
        with self.c._lock:
            pending = list(self.c._pending.values())
            for p in pending:
                p.since = now
        window = max(10 * self.hb, 2.0)
        outside = [msg for t, msg in self.recent_outside if now - t < window]
        for msg in [p.msg for p in pending] + outside:
            self._push(msg)

    # ------------------------------------------------------------------ sync

    def _begin_sync(self, why: str | None, *, next_server: bool = False) -> None:
        if next_server:
            self.cur = (self.cur + 1) % len(self.servers)
        address = self.servers[self.cur]
        if why is not None and not self.synced_once:
            logger.debug("store client: %s; syncing with %s", why, address)  # start() reports failure
        elif why is not None:
            self.rlog.warning(f"sync-{address}", "store client: %s; syncing with %s", why, address)
        if self.link is not None:
            self.link.close()
        self.link = _Link(self.ctx, self.settings, address, self.subtree)
        self.poller = zmq.Poller()
        for sock in (self.pipe, self.link.sub, self.link.dealer):
            self.poller.register(sock, zmq.POLLIN)
        self.state = _SYNCING
        with self.c._lock:
            self.c._connected = False
            self.c._server = address
            self.c._bump()
        self.snapshot, self.backlog = {}, []
        self.ready = self.requested = False
        self.unsent.clear()  # everything in it is resent after the sync
        now = time.monotonic()
        attempt = min(max(SILENCE_HEARTBEATS * self.hb, 0.5), max(0.5, self.c._timeout / 2))
        self.ask_by = now + min(self.hb, attempt / 2)
        self.give_up_at = now + attempt

    def _read_sub(self, link: _Link) -> None:
        for _ in range(1000):
            try:
                frames = link.sub.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                msg = KVMsg.from_frames(frames, max_body=None)
            except KVMsgError as exc:
                self.rlog.warning(exc.kind, "store client: bad update from %s: %s", link.address, exc)
                continue
            self.last_heard = time.monotonic()
            if self.state == _SYNCING:
                self.backlog.append(msg)
                self.ready = True
                self._learn_heartbeat(msg)
                continue
            self._on_update(msg)
            if self.link is not link:
                return  # it asked for a resync

    def _read_dealer(self, link: _Link) -> None:
        for _ in range(10000):
            try:
                frames = link.dealer.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if self.state != _SYNCING:
                continue  # late parts of an abandoned snapshot
            try:
                msg = KVMsg.from_frames(frames, max_body=None)
            except KVMsgError as exc:
                self.rlog.warning(exc.kind, "store client: bad snapshot part from %s: %s", link.address, exc)
                continue
            now = time.monotonic()
            self.last_heard = now
            self.give_up_at = max(self.give_up_at, now + max(SILENCE_HEARTBEATS * self.hb, 0.5))
            if msg.key != KTHXBAI:
                if msg.body:  # a snapshot never holds deletions; be lenient with servers that send them
                    self.snapshot[msg.key] = msg
            elif msg.body == self.subtree.encode():
                self._finish_sync(msg)
                return

    def _learn_heartbeat(self, msg: KVMsg) -> None:
        if msg.key != HUGZ:
            return
        try:
            hb = float(msg.properties.get("heartbeat", ""))
        except ValueError:
            return
        if 0.001 <= hb <= 60:
            self.hb = hb

    def _finish_sync(self, done: KVMsg) -> None:
        now = time.monotonic()
        c = self.c
        restarted = self.synced_once and done.sequence < self.sequence
        new = {k: _Entry(m.body, m.uuid, m.sequence, m.properties) for k, m in self.snapshot.items()}
        self.snapshot = {}
        with c._lock:
            old = c._replica
            for key, entry in new.items():
                before = old.get(key)
                if before is not None and before.mine and before.uuid == entry.uuid:
                    entry.mine = True
            for key, p in list(c._pending.items()):
                entry = new.get(key)
                if entry is not None and entry.uuid == p.msg.uuid:
                    del c._pending[key]  # the server has it: acknowledged
                    entry.mine = True
            if restarted:
                # The server lost its state: put back the keys we wrote last (with their TTL).
                for key, before in old.items():
                    if before.mine and key not in new and key not in c._pending:
                        msg = KVMsg(key, 0, before.body, dict(before.properties), new_uuid())
                        c._pending[key] = _Pending(msg, now)
                        new[key] = _Entry(msg.body, msg.uuid, 0, msg.properties, mine=True)
            for key, p in c._pending.items():  # our unacknowledged writes win until acknowledged
                if p.msg.body:
                    new[key] = _Entry(p.msg.body, p.msg.uuid, 0, p.msg.properties, mine=True)
                else:
                    new.pop(key, None)
            c._replica = new
            c._connected = True
            changes = _diff(old, new)
            c._bump()  # even without changes: wait_for() predicates may look at connected/server
        self.sequence = done.sequence
        self.epoch = done.properties.get("epoch")
        self._learn_heartbeat(KVMsg(HUGZ, 0, b"", done.properties))
        first = not self.synced_once
        self.state = _ACTIVE
        self.synced_once = True
        self.synced_at = self.last_heard = now
        c._connected = True
        logger.log(
            logging.DEBUG if first else logging.INFO,
            "store client: synced %d keys at sequence %d from %s%s",
            len(new),
            done.sequence,
            self.servers[self.cur],
            " (server restarted: re-publishing our keys)" if restarted else "",
        )
        c._synced.set()
        c._fire(changes, self.rlog)
        backlog, self.backlog = self.backlog, []
        link = self.link
        for msg in backlog:
            if msg.key != HUGZ:  # old heartbeats say nothing now
                self._on_update(msg)
            if self.link is not link:
                return
        self._resend(now)

    # ------------------------------------------------------------------ updates

    def _on_update(self, msg: KVMsg) -> None:
        if msg.key == HUGZ:
            self._on_hugz(msg)
            return
        if msg.sequence <= self.sequence:
            return  # queued before our snapshot, or a duplicate
        if self.full_tree and msg.sequence != self.sequence + 1:
            self._begin_sync(f"missed updates {self.sequence + 1}..{msg.sequence - 1}")
            return
        self.sequence = msg.sequence
        change = self._apply(msg)
        if change is not None:
            self.c._fire([change], self.rlog)

    def _on_hugz(self, msg: KVMsg) -> None:
        self._learn_heartbeat(msg)
        # No rule on the "state" property: a HUGZ the server sent while still passive can be read after its
        # snapshot as the new active one. A server that stops being active stops its HUGZ: silence tells.
        epoch = msg.properties.get("epoch")
        if epoch is not None and self.epoch is not None and epoch != self.epoch:
            self._begin_sync(f"server {self.servers[self.cur]} restarted")
        elif epoch is None and msg.sequence < self.sequence and time.monotonic() - self.synced_at > self.hb:
            self._begin_sync("server sequence went backwards (restarted)")
        elif self.full_tree and msg.sequence > self.sequence:
            self._begin_sync(f"missed updates {self.sequence + 1}..{msg.sequence}")

    def _apply(self, msg: KVMsg) -> tuple[str, bytes | None] | None:
        """Apply a server update to the replica; the change to tell watchers about, if any."""
        c = self.c
        with c._lock:
            pending = c._pending.get(msg.key)
            if pending is not None:
                if pending.msg.uuid == msg.uuid:
                    del c._pending[msg.key]  # our write, acknowledged; the replica already has it
                    entry = c._replica.get(msg.key)
                    if entry is not None:
                        entry.sequence = msg.sequence
                return None  # else numbered before our newer write: ours wins once echoed
            old = c._replica.get(msg.key)
            if msg.body:
                c._replica[msg.key] = _Entry(msg.body, msg.uuid, msg.sequence, msg.properties)
                if old is not None and old.body == msg.body:
                    return None
            else:
                if c._replica.pop(msg.key, None) is None:
                    return None
            c._bump()
        return msg.key, msg.body or None

    def _check_timers(self, now: float) -> None:
        if self.state == _SYNCING:
            if not self.requested and (self.ready or now >= self.ask_by):
                assert self.link is not None
                try:
                    self.link.dealer.send_multipart([ICANHAZ, self.subtree.encode()], zmq.NOBLOCK)
                    self.requested = True
                except zmq.Again:
                    pass  # not connected yet: the next turn tries again
            if now >= self.give_up_at:
                others = len(self.servers) > 1
                why = f"no snapshot from {self.servers[self.cur]}" + (", trying the other" if others else "")
                self._begin_sync(why, next_server=others)
            return
        silent = now - self.last_heard
        if silent > SILENCE_HEARTBEATS * self.hb:
            self._begin_sync(
                f"server {self.servers[self.cur]} silent for {silent:.2f} s",
                next_server=len(self.servers) > 1,
            )
            return
        if now >= self.next_ack_check:
            self.next_ack_check = now + 0.25
            self._check_acks(now)

    def _check_acks(self, now: float) -> None:
        """Drop writes the server never echoed (it rejected them, or lost them) and resync to its truth."""
        # Lenient: a server working through a burst echoes late, and a resync would only add to its load.
        limit = max(10 * self.hb, ACK_TIMEOUT_MIN_S)
        with self.c._lock:
            stale = [key for key, p in self.c._pending.items() if now - p.since > limit]
            for key in stale:
                del self.c._pending[key]
        if stale:
            self.rlog.warning(
                "unacknowledged",
                "store client: %d update(s) not acknowledged within %.1f s (e.g. %s); resyncing",
                len(stale),
                limit,
                stale[0],
            )
            self._begin_sync(None)


def _diff(old: dict[str, _Entry], new: dict[str, _Entry]) -> list[tuple[str, bytes | None]]:
    changes: list[tuple[str, bytes | None]] = [(k, None) for k in old if k not in new]
    for key, entry in new.items():
        before = old.get(key)
        if before is None or before.body != entry.body:
            changes.append((key, entry.body))
    return changes

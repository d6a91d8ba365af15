"""The Clone store server (zguide chapter 5, model six): full state in memory, sequenced updates, Binary Star.

Its ports, from a base port P (the address ``tcp://host:P``), are :mod:`stemstream.store.ports`.

With a peer (``role="backup"`` requires one) the pair runs Binary Star (:mod:`stemstream.store.bstar`): the
passive server follows the active one's updates, holds the updates clients send it directly on a pending
list, and applies that list when it takes over (:mod:`stemstream.store.peer`). The keys, the sequence and
the TTLs are a :class:`~stemstream.store.table.Table`. See docs/store.md for the wire protocol and the
failover timing.

Bad input never stops the server: it is rejected, counted in :attr:`StoreServer.stats` (by kind, also
published as ``/store/<role>/stats``) and logged once per kind per interval. So is a write its writer may not
make: the server knows each writer (the CURVE key's name and role, or what a client declared without CURVE)
and asks its write policy (:mod:`stemstream.store.policy`) and the writer's quota before applying anything;
refused writes are counted as ``denied`` and by kind, never applied. See docs/store.md (Limits) for what a
client may cost the server.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any, NamedTuple

import msgpack
import zmq

from stemstream.config import Settings, get_settings
from stemstream.errors import StoreError
from stemstream.log import RateLimitedLog
from stemstream.store.bstar import BinaryStar, Event, State
from stemstream.store.gate import QUOTA_BYTES, QUOTA_KEYS, Gate
from stemstream.store.kvmsg import (
    DEFAULT_MAX_BODY,
    HUGZ,
    LAST,
    PREV,
    KVMsg,
    KVMsgError,
    decode_peer_state,
    decode_request,
    decode_subscription,
    format_last,
    format_ttl,
)
from stemstream.store.link import (
    control_pipe,
    endpoint,
    split_address,
    waiting,
)
from stemstream.store.peer import Follower, PendingList
from stemstream.store.policy import ROLE, STORE, WRITER, AllowAll, WritePolicy, Writer
from stemstream.store.ports import WILDCARD_HOSTS, bind_server_sockets
from stemstream.store.snapshots import Snapshots, snapshot_parts
from stemstream.store.table import Table
from stemstream.transport.security import curve_security
from stemstream.transport.sockets import make_socket, term_context

logger = logging.getLogger(__name__)

# endpoint and split_address live in link.py; they are imported from here too.
__all__ = ["ROLES", "StoreServer", "endpoint", "split_address"]

ROLES = ("primary", "backup")
# How many messages to take from one socket before looking at the others (fairness under floods).
_BATCH = 500
# At most this many bytes of ``last`` (segment -> last sequence) in a HUGZ.
_LAST_BYTES = 2048


class _Handler(NamedTuple):
    """What the loop does with a socket's messages: decode (bad input is rejected, counted), then handle."""

    decode: Callable[[list[bytes]], Any]
    where: str  # names the port in the reject log line
    handle: Callable[[Any], None]


class StoreServer:
    """A Clone store server; ``start()`` runs it in a background thread, ``stop()`` ends it.

    ``port=None`` picks free consecutive ports (read :attr:`address` after ``start()``). ``peer`` is the
    other server's address for Binary Star. ``stats_interval_s`` is how often ``/store/<role>/stats`` is
    published (with a TTL of three intervals, so a dead server's stats disappear).
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int | None = None,
        *,
        role: str = "primary",
        peer: str | None = None,
        heartbeat_s: float | None = None,
        max_body: int = DEFAULT_MAX_BODY,
        stats_interval_s: float = 5.0,
        max_pending: int = 100_000,
        policy: WritePolicy | None = None,
        quota_keys: int = QUOTA_KEYS,
        quota_bytes: int = QUOTA_BYTES,
        settings: Settings | None = None,
    ) -> None:
        if role not in ROLES:
            raise StoreError(f"store role {role!r}: expected one of {', '.join(ROLES)}")
        if role == "backup" and peer is None:
            raise StoreError("a backup store server needs the primary's address (peer)")
        self._settings = settings or get_settings()
        self.host = host
        self.role = role
        self.peer = peer
        self._peer_host, self._peer_port = split_address(peer) if peer else ("", 0)
        # CURVE: decided (and its keys read) here, on the caller's thread, so a problem is a one-line error.
        self._security = curve_security(self._settings, hosts=(host, self._peer_host or None))
        if self._security is not None:
            self._security.check("server")
        # Who writes: with CURVE the key's name (ZAP User-Id) and its role in authorized/ (re-read at most
        # once a second, so a revoked or re-roled key counts at once); without, what clients declare.
        identities = self._security.identities(min_interval_s=1.0) if self._security else None
        self._gate = Gate(identities, policy or AllowAll(), quota_keys, quota_bytes, max_body)
        self.heartbeat_s = heartbeat_s or self._settings.store_heartbeat_s
        self.max_body = max_body
        self.stats_interval_s = stats_interval_s
        self.max_pending = max_pending
        self.epoch = secrets.token_hex(8)  # tells clients a restarted server from the one they synced with
        self._requested_port = port
        self._port: int | None = None
        self._rlog = RateLimitedLog(logger)
        self._stats: Counter[str] = Counter()
        self._stats_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._ctx: zmq.Context | None = None
        self._pipe: zmq.Socket | None = None
        self._bstar = BinaryStar(role == "primary", self.heartbeat_s) if peer else None
        # State below is owned by the server thread.
        self._table = Table()
        self._pending = PendingList(max_pending)  # passive: updates clients sent us directly
        self._sockets: dict[str, zmq.Socket] = {}
        self._poller_stale = True
        self._hugz_due = False
        self._follower: Follower | None = None  # passive: following the active peer
        self._advertised: dict[str, str] = {}  # extra endpoints in the stats record (e.g. metrics)
        self._snapshots: Snapshots | None = None
        self._publishers: list[zmq.Socket] = []  # P+1, and P+4 with a peer: every update goes to both

    # ------------------------------------------------------------------ public, any thread

    @property
    def port(self) -> int:
        if self._port is None:
            raise StoreError("the store server is not started")
        return self._port

    @property
    def address(self) -> str:
        host = socket.gethostname() if self.host in WILDCARD_HOSTS else self.host
        return endpoint(host, self.port)

    @property
    def state(self) -> str:
        """``active``, ``passive``, or ``primary`` / ``backup`` while waiting for the peer."""
        return self._state().name.lower()

    @property
    def sequence(self) -> int:
        return self._table.sequence

    @property
    def stats(self) -> dict[str, int]:
        """Counters by kind: updates, snapshots, expired, duplicates, and one per kind of rejected input."""
        with self._stats_lock:
            return dict(self._stats)

    @property
    def peer_alive(self) -> bool | None:
        """Whether the Binary Star peer was heard within two heartbeats; None without a peer."""
        return None if self._bstar is None else self._bstar.peer_alive

    def advertise(self, name: str, endpoint: str) -> None:
        """Add ``name: endpoint`` (e.g. ``metrics``) to the ``endpoints`` of ``/store/<role>/stats``."""
        self._advertised[name] = endpoint

    def status(self) -> dict[str, Any]:
        """What ``/store/<role>/stats`` says: role, state, sequence, keys, pending, the peer, counters."""
        return {
            "role": self.role,
            "state": self.state,
            "address": self.address,
            "pid": os.getpid(),
            "epoch": self.epoch,
            "sequence": self._table.sequence,
            "keys": len(self._table.kvmap),
            "pending": len(self._pending),
            "peer": self.peer,
            "peer_alive": self.peer_alive,
            "endpoints": dict(self._advertised),
            "counters": self.stats,
        }

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self, timeout: float = 10.0) -> StoreServer:
        """Bind and start serving in a background thread; raises StoreError if binding fails."""
        if self._thread is not None:
            raise StoreError("the store server is already started")
        self._ctx = zmq.Context()
        self._pipe, loop_end = control_pipe(self._ctx, f"store-server-{id(self):x}")
        name = f"store-{self.role}"
        self._thread = threading.Thread(target=self._main, args=(loop_end,), name=name, daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            self.stop()
            raise StoreError(f"the store server did not start within {timeout} s")
        if self._error is not None:
            error = self._error
            self.stop()
            raise StoreError(f"store server: {error}") from error
        logger.info("store %s serving at %s (heartbeat %g s)", self.role, self.address, self.heartbeat_s)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop serving and release the ports; safe to call twice."""
        if self._pipe is not None:
            with contextlib.suppress(zmq.ZMQError):  # the loop has already gone
                self._pipe.send(b"TERMINATE", zmq.NOBLOCK)
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                logger.error("store server thread did not stop within %s s", timeout)
                return
        if self._pipe is not None:
            self._pipe.close()
            self._pipe = None
        if self._ctx is not None:
            term_context(self._ctx)
            self._ctx = None

    def maybe_raise(self) -> None:
        """Re-raise, on the caller's thread, what ended the server thread, if anything did."""
        if self._error is not None:
            raise StoreError(f"store server died: {self._error}") from self._error

    def __enter__(self) -> StoreServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        where = self.address if self._port is not None else "not started"
        return f"StoreServer({self.role}, {where}, {self.state}, seq={self.sequence})"

    # ------------------------------------------------------------------ server thread

    def _main(self, pipe: zmq.Socket) -> None:
        try:
            self._bind()
        except Exception as exc:
            self._error = exc
            pipe.close()
            self._ready.set()
            return
        self._ready.set()
        try:
            self._loop(pipe)
        except Exception as exc:
            logger.exception("store server %s died", self.role)
            self._error = exc
        finally:
            pipe.close()
            self._close_sockets()

    def _bind(self) -> None:
        assert self._ctx is not None
        peer = (self._peer_host, self._peer_port) if self.peer else None
        self._port, self._sockets = bind_server_sockets(
            self._ctx, self._settings, self.host, self._requested_port, peer, self.max_body
        )
        self._publishers = [self._sockets[n] for n in ("publisher", "peerpub") if n in self._sockets]
        self._snapshots = Snapshots(self._sockets["router"])

    def _close_sockets(self) -> None:
        if self._follower is not None:
            self._follower.close()
            self._follower = None
        for sock in self._sockets.values():
            sock.close(linger=0)
        self._sockets, self._publishers, self._snapshots = {}, [], None

    def _state(self) -> State:
        return self._bstar.state if self._bstar else State.ACTIVE

    def _loop(self, pipe: zmq.Socket) -> None:
        now = time.monotonic()
        timers = {"hugz": now, "state": now, "stats": now + self.stats_interval_s}
        poller = zmq.Poller()
        handlers: dict[zmq.Socket, _Handler] = {}
        while True:
            if self._poller_stale:
                poller, handlers = self._make_poller(pipe)
            timeout = self._next_timeout(timers, time.monotonic())
            events = dict(poller.poll(timeout))
            if pipe in events:
                return  # TERMINATE is the only message
            for sock in events:
                handler = handlers[sock]
                # With CURVE the collector's frames stay zmq.Frames: the first carries the writer's User-Id.
                frames_as_is = sock is self._sockets["collector"] and self._gate.identities is not None
                for frames in waiting(sock, _BATCH, copy=not frames_as_is):
                    try:
                        message = handler.decode(frames)
                    except KVMsgError as exc:
                        self._reject(exc.kind, handler.where, exc)
                        continue
                    handler.handle(message)
                    if self._poller_stale:
                        break  # a state change replaced sockets: poll again before reading more
                if self._poller_stale:
                    break
            self._tick(timers, time.monotonic())

    def _make_poller(self, pipe: zmq.Socket) -> tuple[zmq.Poller, dict[zmq.Socket, _Handler]]:
        handlers = {
            self._sockets["router"]: _Handler(decode_request, "snapshot port", self._on_request),
            self._sockets["publisher"]: _Handler(decode_subscription, "update port", self._on_subscription),
            self._sockets["collector"]: _Handler(self._gate.decode, "collector", self._on_collect),
        }
        if "peerpub" in self._sockets:
            peerpub = self._sockets["peerpub"]
            handlers[peerpub] = _Handler(decode_subscription, "peer update port", self._on_subscription)
        if "statesub" in self._sockets:
            handlers[self._sockets["statesub"]] = _Handler(decode_peer_state, "peer state port", self._on_peer_state)
        if self._follower is not None:
            link = self._follower.link
            handlers[link.sub] = _Handler(_decode_peer, "peer's update port", self._on_peer_update)
            handlers[link.dealer] = _Handler(_decode_peer, "peer's snapshot port", self._on_peer_snapshot)
        poller = zmq.Poller()
        poller.register(pipe, zmq.POLLIN)
        for sock in handlers:
            poller.register(sock, zmq.POLLIN)
        self._poller_stale = False
        return poller, handlers

    def _next_timeout(self, timers: dict[str, float], now: float) -> int:
        deadlines = [now + 1.0, timers["stats"]]
        if self._state() is State.ACTIVE:
            deadlines.append(timers["hugz"])
            expiry = self._table.next_expiry()
            if expiry is not None:
                deadlines.append(expiry)
        if self._bstar:
            deadlines.append(timers["state"])
        if self._follower is not None:
            deadlines.append(self._follower.next_deadline(now))
        if self._hugz_due:
            deadlines.append(now)
        if self._snapshots is not None and (retry := self._snapshots.next_deadline()) is not None:
            deadlines.append(retry)
        return max(0, int(1000 * (min(deadlines) - now)) + 1)

    def _tick(self, timers: dict[str, float], now: float) -> None:
        if self._snapshots is not None and len(self._snapshots):
            done, given_up = self._snapshots.pump(now)
            self._count("snapshots", done)
            if given_up:
                self._snapshot_aborted(given_up, "client not reading, or gone; it will ask again")
        active = self._state() is State.ACTIVE
        if self._hugz_due or (active and now >= timers["hugz"]):
            self._send_hugz()
            timers["hugz"] = now + self.heartbeat_s
        if active:
            self._expire(now)
        if self._bstar and now >= timers["state"]:
            self._sockets["statepub"].send_string(str(int(self._bstar.state)))
            timers["state"] = now + self.heartbeat_s
        if self._follower is not None and not self._follower.tick(now):
            logger.warning("store %s: no snapshot from the active %s; asking again", self.role, self.peer)
            self._start_peer_sync()
        if now >= timers["stats"]:
            self._publish_stats()
            timers["stats"] = now + self.stats_interval_s

    # ------------------------------------------------------------------ handlers

    def _count(self, kind: str, n: int = 1) -> None:
        with self._stats_lock:
            self._stats[kind] += n

    def _reject(self, kind: str, where: str, why: object) -> None:
        """Bad input: counted under ``kind`` and in ``rejected`` (the total), logged once per kind per 10 s."""
        with self._stats_lock:
            self._stats[kind] += 1
            self._stats["rejected"] += 1
        self._rlog.warning(kind, "store %s: rejected input on the %s (%s): %s", self.role, where, kind, why)

    def _on_request(self, request: tuple[bytes, tuple[str, ...]]) -> None:
        identity, subtrees = request
        if self._bstar is not None and not self._vote():
            self._count("refused")  # passive, or not sure yet: the client will try the other server
            return
        self._send_snapshot(identity, subtrees)

    def _vote(self) -> bool:
        assert self._bstar is not None
        before = self._bstar.state
        accept = self._bstar.handle(Event.CLIENT_REQUEST)
        if self._bstar.state is not before:
            self._on_state_change(before)
        return accept

    def _send_snapshot(self, identity: bytes, subtrees: tuple[str, ...]) -> None:
        """Take the snapshot now (references to the stored updates); the loop sends it as the client reads."""
        assert self._snapshots is not None
        parts = snapshot_parts(self._table, subtrees, self._control_properties())
        ended = self._snapshots.start(identity, parts, time.monotonic())
        if ended:
            self._snapshot_aborted(ended, "a newer request, or more snapshots in progress than allowed")
        done, given_up = self._snapshots.pump(time.monotonic())  # most snapshots go out at once
        self._count("snapshots", done)
        if given_up:
            self._snapshot_aborted(given_up, "the client went away")

    def _snapshot_aborted(self, n: int, why: str) -> None:
        """Not bad input: counted, and logged like it, but not "rejected"."""
        self._count("snapshot_aborted", n)
        self._rlog.warning("snapshot_aborted", "store %s: %d snapshot(s) abandoned: %s", self.role, n, why)

    def _on_subscription(self, subscription: tuple[bool, bytes]) -> None:
        subscribe, _ = subscription
        if subscribe:
            self._hugz_due = True  # coalesced: at most one HUGZ per loop iteration

    def _on_collect(self, update: tuple[KVMsg, Writer]) -> None:
        msg, writer = update
        if self._table.seen(msg.uuid):
            self._count("duplicates")  # a client resending after failover what we already applied
            return
        if self._state() is State.ACTIVE:
            self._apply_from(msg, writer)
        elif msg.uuid:
            # Passive (or not sure yet): hold it until the active server publishes it, or we take over.
            if not self._pending.add(msg, self._table.sequence, writer):
                self._count("pending_dropped")
        else:
            self._count("unmatchable")  # no uuid: a passive server could never match it to the active's copy

    def _apply_from(self, msg: KVMsg, writer: Writer) -> bool:
        """Active: apply a client's update if its writer may make it (policy, then quota); else deny it."""
        denial = self._gate.admit(msg, writer, self._table)
        if denial is not None:
            with self._stats_lock:
                self._stats["denied"] += 1
                self._stats[f"denied_{denial.kind}"] += 1
            self._rlog.warning(f"denied_{denial.kind}", "store %s: denied a write (%s): %s", self.role,
                               denial.kind, denial.why)  # fmt: skip
            return False
        if writer.name:
            msg.properties[WRITER] = writer.name
        self._apply(msg)
        return True

    def _on_peer_state(self, state: int) -> None:
        assert self._bstar is not None
        before = self._bstar.state
        self._bstar.peer_state(state)
        if self._bstar.state is not before:
            self._on_state_change(before)

    def _on_peer_update(self, msg: KVMsg) -> None:
        assert self._follower is not None
        why = self._follower.on_update(msg)
        if why is not None:
            self._resync(why)

    def _on_peer_snapshot(self, msg: KVMsg) -> None:
        assert self._follower is not None
        why = self._follower.on_snapshot(msg)
        if why is not None:
            self._resync(why)

    def _resync(self, why: str) -> None:
        logger.warning("store %s: resyncing from %s: %s", self.role, self.peer, why)
        self._count("resyncs")
        self._start_peer_sync()

    # ------------------------------------------------------------------ state

    def _apply(self, msg: KVMsg, *, count: bool = True) -> None:
        """Active: number the update, stamp its segment's previous sequence (clients of a subtree see gaps
        by it), apply it, publish it."""
        self._table.sequence += 1
        msg.sequence = self._table.sequence
        msg.properties[PREV] = str(self._table.published(msg))
        self._table.put(msg, time.monotonic())
        for sock in self._publishers:
            msg.send(sock)
        if count:
            self._count("deletes" if msg.is_delete else "updates")

    def _expire(self, now: float) -> None:
        for key in self._table.expired(now):
            self._apply(KVMsg(key), count=False)
            self._count("expired")

    def _send_hugz(self) -> None:
        self._hugz_due = False
        props = self._control_properties()
        last = format_last(dict(reversed(self._table.segments.items())), max_bytes=_LAST_BYTES)
        if last:
            props[LAST] = last  # the most recently written segments' last sequences
        hugz = KVMsg(HUGZ, self._table.sequence, b"", props, b"")
        for sock in self._publishers:
            hugz.send(sock)

    def _control_properties(self) -> dict[str, str]:
        return {"epoch": self.epoch, "heartbeat": repr(self.heartbeat_s), "state": self.state}

    def _on_state_change(self, before: State) -> None:
        after = self._state()
        self._count("state_changes")
        if before is State.PASSIVE and after is State.ACTIVE:
            self._count("failovers")  # this server took over from its peer
        if after is State.ACTIVE:
            if self._follower is not None:
                if not self._follower.synced:
                    logger.warning("store %s: taking over before the state sync finished", self.role)
                self._follower.close()
                self._follower = None
                self._poller_stale = True
            self._take_over()
        elif after is State.PASSIVE:
            self._start_peer_sync()
        logger.info("store %s: %s -> %s at sequence %d", self.role, before.name, after.name, self.sequence)

    def _take_over(self) -> None:
        """Apply the pending list: updates clients sent us that the old active never published."""
        applied = superseded = 0
        for msg, our_sequence, writer in self._pending.take():
            current = self._table.kvmap.get(msg.key)
            if current is not None and current.sequence > our_sequence:
                superseded += 1  # the key changed after this arrived: it is older than what we hold
                continue
            applied += self._apply_from(msg, writer)
        if applied or superseded:
            logger.info("store %s: applied %d pending updates, %d superseded", self.role, applied, superseded)
        self._hugz_due = True

    def _start_peer_sync(self) -> None:
        """Passive: drop our state and take the active peer's (snapshot, then its update stream)."""
        if self._follower is not None:
            self._follower.close()
        self._table.reset()
        assert self._ctx is not None and self.peer is not None
        self._follower = Follower(
            self._ctx,
            self._settings,
            self.peer,
            self.heartbeat_s,
            self._table,
            self._pending,
            self._count,
            self.role,
        )
        self._poller_stale = True

    def _publish_stats(self) -> None:
        record = {**self.status(), "time": time.time()}
        ttl = format_ttl(round(3 * self.stats_interval_s, 3))
        msg = KVMsg(f"/store/{self.role}/stats", 0, msgpack.packb(record), {"ttl": ttl})
        if self._state() is State.ACTIVE:
            self._apply(msg, count=False)
        elif self._bstar is not None and self._bstar.state is State.PASSIVE:
            # Only the active server numbers updates: a passive one hands its stats to it like a client, of
            # role "store" (declared for sites without CURVE; with CURVE its key says so).
            msg.properties.update({WRITER: f"store-{self.role}", ROLE: STORE})
            if "peer_push" not in self._sockets:
                push = make_socket(self._ctx, zmq.PUSH, settings=self._settings, role="peer")  # type: ignore[arg-type]
                push.connect(endpoint(self._peer_host, self._peer_port + 2))
                self._sockets["peer_push"] = push
            with contextlib.suppress(zmq.Again):  # the active server is not there: nobody to tell
                msg.send(self._sockets["peer_push"], zmq.NOBLOCK)


def _decode_peer(frames: list[bytes]) -> KVMsg:
    """An update or snapshot part from the active peer: it checked the bodies against its own limit."""
    return KVMsg.from_frames(frames, max_body=None)

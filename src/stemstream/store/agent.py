"""A store client's background agent (the zguide's clone agent): it owns every socket of the client.

It keeps the :class:`~stemstream.store.replica.Replica` in step with the server in use: a :class:`Link` and a
:class:`SnapshotSync` to it, and a PUSH to each server's collector. The API threads hand it their writes as
:class:`Commands`. It resyncs on a sequence gap (the whole tree: the global sequence; subtrees that are whole
top-level segments: each update's ``prev`` and the ``last`` of ``HUGZ``), a new epoch, a server silent for
:data:`SILENCE_HEARTBEATS` heartbeats (then with a backup: the other server), and writes never echoed.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import threading
import time
from collections.abc import Iterator

import zmq

from stemstream.config import Settings
from stemstream.log import RateLimitedLog
from stemstream.store.kvmsg import HUGZ, LAST, PREV, KVMsg, KVMsgError, parse_last, segment_of
from stemstream.store.link import Link, SnapshotSync, endpoint, split_address, waiting
from stemstream.store.replica import Replica
from stemstream.transport.sockets import make_socket

logger = logging.getLogger(__name__)

# A server silent for this many heartbeats is dead (its peer gives up after two: it is ready by then).
SILENCE_HEARTBEATS = 3
# An update not echoed within max(10 heartbeats, this) is given up (the server rejected or lost it).
ACK_TIMEOUT_MIN_S = 5.0

# ("send", msg, tracked, changed): a write, in the subtree or not, that changed the replica or not; ("stop",).
Command = tuple


class Commands:
    """The API threads' commands to the agent: a queue, and at most one wake-up in flight on the pipe."""

    def __init__(self, pipe: zmq.Socket) -> None:
        self._queue: collections.deque[Command] = collections.deque()
        self._lock = threading.Lock()
        self._wake_sent = False
        self._pipe: zmq.Socket | None = pipe

    def put(self, command: Command) -> None:
        self._queue.append(command)

    def wake(self, force: bool = False) -> None:
        # One wake-up in flight is enough: the agent drains the whole queue when it wakes.
        with self._lock:
            if (self._wake_sent and not force) or self._pipe is None:
                return
            self._wake_sent = True
            with contextlib.suppress(zmq.Again):  # the pipe is full of wake-ups already
                self._pipe.send(b"", zmq.NOBLOCK)

    def take(self) -> Iterator[Command]:
        """The agent, woken: the next put needs a new wake-up; the queued commands, in order."""
        with self._lock:
            self._wake_sent = False
        while self._queue:
            yield self._queue.popleft()

    def close(self) -> None:
        with self._lock:
            if self._pipe is not None:
                self._pipe.close()
                self._pipe = None


class Agent:
    """The client's background half: owns the sockets, keeps the replica in step with the server."""

    def __init__(
        self,
        replica: Replica,
        commands: Commands,
        ctx: zmq.Context,
        pipe: zmq.Socket,
        *,
        settings: Settings,
        servers: list[str],
        subtrees: tuple[str, ...],
        timeout: float,
        declared: dict[str, str] | None = None,
    ) -> None:
        self.replica, self.commands = replica, commands
        self.ctx, self.pipe = ctx, pipe  # the pipe: commands from the application thread
        self.settings = settings
        self.servers = servers
        self.subtrees = subtrees
        self.full_tree = subtrees == ("/",)
        # Subtrees that are whole top-level segments ("/scans/"): their updates chain by ``prev``, so a
        # dropped one shows. Deeper subtrees ("/scans/7/") see only some of their segment: not checked.
        self.chained = frozenset(t for t in subtrees if len(t) > 1 and segment_of(t) == t and t.endswith("/"))
        self.seg_last: dict[str, int] = {}
        self.declared = declared or {}
        self.timeout = timeout
        self.rlog = RateLimitedLog(logger)
        self.hb = settings.store_heartbeat_s
        self.cur = 0
        self.link: Link | None = None
        self.sync: SnapshotSync | None = None  # None once synced: following the server's stream
        self.pushes: list[zmq.Socket] = []
        self.poller = zmq.Poller()
        self.sequence = 0
        self.epoch: str | None = None
        self.synced_with = ""  # the server the epoch is of
        self.synced_once = False
        self.synced_at = 0.0
        self.last_heard = 0.0
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
            self.replica.error = exc
        finally:
            self.replica.connected = False
            if self.link is not None:
                self.link.close()
            for push in self.pushes:
                push.close()  # with the settings' linger: queued updates still go out
            self.pipe.close()
            self.replica.synced.set()  # wake start() if it is still waiting
            with self.replica.lock:
                self.replica.bump()

    def _step(self) -> bool:
        now = time.monotonic()
        events = dict(self.poller.poll(self._timeout_ms(now)))
        if self.pipe in events:
            while True:
                try:
                    self.pipe.recv(zmq.NOBLOCK)
                except zmq.Again:
                    break
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
        if self.sync is not None:
            deadlines.append(self.sync.deadline())
        else:
            deadlines.append(self.last_heard + SILENCE_HEARTBEATS * self.hb)
        if self.unsent:
            deadlines.append(now + 0.005)
        return max(0, int(1000 * (min(deadlines) - now)) + 1)

    def _do_commands(self) -> bool:
        for command in self.commands.take():
            if command[0] == "stop":
                return False
            _, msg, tracked, changed = command
            self._push(msg)
            if not tracked:
                self.recent_outside.append((time.monotonic(), msg))
            if changed:
                self.replica.fire([(msg.key, msg.body or None)], self.rlog)
        return True

    # ------------------------------------------------------------------ outbound

    def _push(self, msg: KVMsg) -> None:
        """Send to the server in use (queued if it is busy) and, best effort, to the other one."""
        msg.properties.update(self.declared)  # also on re-published keys, whose properties are the server's
        following = self.sync is None
        for i, push in enumerate(self.pushes):
            if i == self.cur and following and self.unsent:
                self.unsent.append(msg)  # keep order behind what is already waiting
                continue
            try:
                msg.send(push, zmq.NOBLOCK)
            except zmq.Again:
                # Server busy (HWM) or not connected. Only the one in use matters: a passive server's copy
                # is a spare, and whatever we send while syncing is resent once synced.
                if i == self.cur and following:
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
        pending = self.replica.unacknowledged(now)
        window = max(10 * self.hb, 2.0)
        outside = [msg for t, msg in self.recent_outside if now - t < window]
        for msg in pending + outside:
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
        topics = [t.encode() for t in self.subtrees] + [HUGZ.encode()]
        self.link = Link(self.ctx, self.settings, address, topics, "client")
        self.poller = zmq.Poller()
        for sock in (self.pipe, self.link.sub, self.link.dealer):
            self.poller.register(sock, zmq.POLLIN)
        self.replica.begin_sync(address)
        self.unsent.clear()  # everything in it is resent after the sync
        now = time.monotonic()
        attempt = min(max(SILENCE_HEARTBEATS * self.hb, 0.5), max(0.5, self.timeout / 2))
        self.sync = SnapshotSync(
            self.link,
            self.subtrees,
            ask_by=now + min(self.hb, attempt / 2),
            give_up_at=now + attempt,
            patience=self._patience(),
        )

    def _patience(self) -> float:
        """How long a snapshot may pause between parts."""
        return max(SILENCE_HEARTBEATS * self.hb, 0.5)

    def _receive(self, link: Link, sock: zmq.Socket, limit: int, what: str) -> Iterator[KVMsg]:
        """Up to ``limit`` kvmsgs waiting on ``sock``; malformed ones are logged (rate-limited) and skipped."""
        for frames in waiting(sock, limit):
            try:
                msg = KVMsg.from_frames(frames, max_body=None)
            except KVMsgError as exc:
                self.rlog.warning(exc.kind, "store client: bad %s from %s: %s", what, link.address, exc)
                continue
            yield msg

    def _read_sub(self, link: Link) -> None:
        for msg in self._receive(link, link.sub, 1000, "update"):
            self.last_heard = time.monotonic()
            if self.sync is not None:
                self.sync.hold(msg)
                self._learn_heartbeat(msg)
                continue
            self._on_update(msg)
            if self.link is not link:
                return  # it asked for a resync

    def _read_dealer(self, link: Link) -> None:
        for msg in self._receive(link, link.dealer, 10000, "snapshot part"):
            sync = self.sync
            if sync is None:
                continue  # late parts of an abandoned snapshot
            now = time.monotonic()
            self.last_heard = now
            if sync.add_part(msg, now):
                self._finish_sync(msg, sync)
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
            if self.sync is not None:
                self.sync.patience = self._patience()

    def _finish_sync(self, done: KVMsg, sync: SnapshotSync) -> None:
        now = time.monotonic()
        # The server lost its state: its sequence went back, or the same server came back as a new process (a
        # store keeps nothing on disk). The other server of a pair with another epoch holds the same state.
        epoch, server = done.properties.get("epoch"), self.servers[self.cur]
        new_process = epoch is not None and self.epoch is not None and epoch != self.epoch
        restarted = self.synced_once and (done.sequence < self.sequence or (new_process and server == self.synced_with))
        changes = self.replica.install(sync.snapshot, restarted=restarted, now=now)
        self.sequence = done.sequence
        self.epoch, self.synced_with = epoch, server
        last = parse_last(done.properties.get(LAST, ""))
        self.seg_last = {seg: last.get(seg, 0) for seg in self.chained}
        self._learn_heartbeat(KVMsg(HUGZ, 0, b"", done.properties))
        first = not self.synced_once
        self.sync = None
        self.synced_once = True
        self.synced_at = self.last_heard = now
        logger.log(
            logging.DEBUG if first else logging.INFO,
            "store client: synced %d keys at sequence %d from %s%s",
            len(self.replica),
            done.sequence,
            self.servers[self.cur],
            " (server restarted: re-publishing our keys)" if restarted else "",
        )
        self.replica.synced.set()
        self.replica.fire(changes, self.rlog)
        if restarted:
            for msg in self.replica.outside_writes():  # keys we wrote but do not mirror
                self._push(msg)
        link = self.link
        for msg in sync.backlog:
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
        segment = segment_of(msg.key)
        if segment in self.seg_last:
            prev = _int(msg.properties.get(PREV))
            if prev > self.seg_last[segment]:
                self._begin_sync(f"missed updates of {segment} ({self.seg_last[segment]} -> {prev})")
                return
            self.seg_last[segment] = msg.sequence
        self.sequence = msg.sequence
        change = self.replica.apply(msg)
        if change is not None:
            self.replica.fire([change], self.rlog)

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
        elif self.seg_last:
            last = parse_last(msg.properties.get(LAST, ""))
            for segment, seen in self.seg_last.items():
                if last.get(segment, 0) > seen:
                    self._begin_sync(f"missed updates of {segment} ({seen} -> {last[segment]})")
                    return

    def _check_timers(self, now: float) -> None:
        if self.sync is not None:
            if not self.sync.tick(now):
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
        stale = self.replica.drop_unacknowledged(now, limit)
        if stale:
            self.rlog.warning(
                "unacknowledged",
                "store client: %d update(s) not acknowledged within %.1f s (e.g. %s); resyncing",
                len(stale),
                limit,
                stale[0],
            )
            self._begin_sync(None)


def _int(text: str | None) -> int:
    """A sequence property as an int (0 when absent or malformed: nothing to compare)."""
    return int(text) if text is not None and text.isdigit() and len(text) < 20 else 0

"""Snapshots sent as fast as each client reads them, never faster: what a client that asks and never reads
can cost a server is bounded (docs/store.md, Limits).

A request takes a consistent copy of the list of matching entries (references to the stored updates, not
their bytes) and the ``KTHXBAI`` that ends it. The server's loop then pushes parts onto the ROUTER until the
client's pipe is full (ZeroMQ's send HWM, :data:`SNAPSHOT_HWM` parts), and tries again a little later. At
most :data:`MAX_IN_PROGRESS` snapshots are in progress; one more ends the one that has waited longest for
its client, and a snapshot whose client read nothing for :data:`STALL_S` seconds is given up (the client asks
again if it still wants one). Bodies go zero-copy, so a queued part holds a reference to a stored value, not
a copy of it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import zmq

from stemstream.store.kvmsg import KTHXBAI, LAST, KVMsg, format_last, segment_of, snapshot_tag
from stemstream.store.table import Table

# Parts queued per client on the snapshot port; the rest waits in the server as references.
SNAPSHOT_HWM = 1000
MAX_IN_PROGRESS = 64
STALL_S = 10.0
_RETRY_MIN_S, _RETRY_MAX_S = 0.001, 0.05


@dataclass(eq=False)
class _Send:
    identity: bytes
    parts: list[KVMsg]  # the entries, then the KTHXBAI
    progress_at: float
    pos: int = 0
    retry_at: float = 0.0
    backoff: float = field(default=_RETRY_MIN_S)


class Snapshots:
    """The snapshots in progress on one ROUTER; owned by the server thread."""

    def __init__(self, router: zmq.Socket, *, max_in_progress: int = MAX_IN_PROGRESS, stall_s: float = STALL_S):
        self.router = router
        self.max_in_progress = max_in_progress
        self.stall_s = stall_s
        self._sends: dict[bytes, _Send] = {}

    def __len__(self) -> int:
        return len(self._sends)

    def start(self, identity: bytes, parts: list[KVMsg], now: float) -> int:
        """Begin sending ``parts`` (ending with ``KTHXBAI``) to ``identity``; how many snapshots this ended
        (the same client's previous one, or the longest-waiting one to stay within the cap)."""
        ended = 1 if self._sends.pop(identity, None) is not None else 0
        if len(self._sends) >= self.max_in_progress:
            stalest = min(self._sends.values(), key=lambda s: s.progress_at)
            del self._sends[stalest.identity]
            ended += 1
        self._sends[identity] = _Send(identity, parts, progress_at=now)
        return ended

    def pump(self, now: float) -> tuple[int, int]:
        """Send what the clients' pipes take; (snapshots completed, snapshots given up)."""
        done = given_up = 0
        for send in list(self._sends.values()):
            if now < send.retry_at:
                continue
            outcome = self._push(send, now)
            if outcome is None:
                if now - send.progress_at > self.stall_s:
                    del self._sends[send.identity]
                    given_up += 1
                continue
            del self._sends[send.identity]
            if outcome:
                done += 1
            else:
                given_up += 1
        return done, given_up

    def next_deadline(self) -> float | None:
        return min((s.retry_at for s in self._sends.values()), default=None)

    def _push(self, send: _Send, now: float) -> bool | None:
        """True: all sent; False: the client went away; None: its pipe is full, try again later."""
        prefix = (send.identity,)
        start = send.pos
        try:
            while send.pos < len(send.parts):
                send.parts[send.pos].send(self.router, zmq.NOBLOCK, prefix, copy=False)
                send.pos += 1
        except zmq.Again:
            if send.pos > start:
                send.progress_at, send.backoff = now, _RETRY_MIN_S
            else:
                send.backoff = min(2 * send.backoff, _RETRY_MAX_S)
            send.retry_at = now + send.backoff
            return None
        except zmq.ZMQError as exc:
            if exc.errno != zmq.EHOSTUNREACH:
                raise
            return False
        return True


def snapshot_parts(table: Table, subtrees: tuple[str, ...], props: dict[str, str]) -> list[KVMsg]:
    """A snapshot of ``subtrees``: references to the stored updates, then ``KTHXBAI`` with the sequence (and,
    for whole segments, each segment's last sequence, so a client can tell a later loss)."""
    parts = [msg for key, msg in table.kvmap.items() if key.startswith(subtrees)]
    segments = {t for t in subtrees if segment_of(t) == t and t.endswith("/") and len(t) > 1}
    last = {seg: seq for seg, seq in table.segments.items() if seg in segments}
    if last:
        props = {**props, LAST: format_last(last, max_bytes=1 << 12)}
    parts.append(KVMsg(KTHXBAI, table.sequence, snapshot_tag(subtrees), props, b""))
    return parts

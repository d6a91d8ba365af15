"""What a store server holds: the latest update of each key, the sequence, TTL deadlines, the uuids applied,
and what each writer holds (keys and bytes, for quotas) and the last sequence of each top-level segment."""

from __future__ import annotations

import heapq
from collections import Counter, OrderedDict
from collections.abc import Iterator

from stemstream.store.kvmsg import KVMsg, KVMsgError, segment_of
from stemstream.store.policy import owner_of

# uuids of applied updates remembered to drop duplicates (clients resend unacknowledged updates).
SEEN_UUIDS = 100_000
# Top-level segments whose last sequence is remembered (and listed in HUGZ: at most SEGMENTS_LISTED).
SEGMENTS_KEPT = 4096


def entry_bytes(msg: KVMsg) -> int:
    """What a stored update counts against its writer's quota: its key and its body."""
    return len(msg.key) + len(msg.body)


class Table:
    """The state of one server, active or passive. Owned by the server thread: no lock."""

    def __init__(self) -> None:
        self.kvmap: dict[str, KVMsg] = {}
        self.sequence = 0
        self._expiries: list[tuple[float, str, bytes]] = []  # heap of (deadline, key, uuid)
        self._seen: OrderedDict[bytes, None] = OrderedDict()
        self.keys_of: Counter[str] = Counter()  # writer name ("" nobody) -> keys held
        self.bytes_of: Counter[str] = Counter()  # writer name -> bytes held
        self.segments: OrderedDict[str, int] = OrderedDict()  # "/scans" -> last sequence, most recent last

    def reset(self, sequence: int = 0) -> None:
        """Forget every key (a passive server taking the active one's state); the uuids seen stay."""
        self.kvmap, self._expiries, self.sequence = {}, [], sequence
        self.keys_of, self.bytes_of, self.segments = Counter(), Counter(), OrderedDict()

    def get(self, key: str) -> KVMsg | None:
        return self.kvmap.get(key)

    def usage(self, writer: str) -> tuple[int, int]:
        """(keys, bytes) that ``writer``'s name is stamped on."""
        return self.keys_of[writer], self.bytes_of[writer]

    def put(self, msg: KVMsg, now: float) -> None:
        """Store an update (or delete its key) and remember its uuid; an ephemeral key expires ``ttl`` from now."""
        old = self.kvmap.pop(msg.key, None) if msg.is_delete else self.kvmap.get(msg.key)
        if old is not None:
            self._count(old, -1)
        if not msg.is_delete:
            self.kvmap[msg.key] = msg
            self._count(msg, 1)
            try:
                ttl = msg.ttl
            except KVMsgError:
                ttl = None  # only reachable for updates from the peer, which validated them already
            if ttl is not None:
                heapq.heappush(self._expiries, (now + ttl, msg.key, msg.uuid))
        if msg.uuid:
            self._seen[msg.uuid] = None
            if len(self._seen) > SEEN_UUIDS:
                self._seen.popitem(last=False)

    def published(self, msg: KVMsg) -> int:
        """Note that ``msg`` (numbered) went out; the sequence of the previous update of its segment (0: none
        remembered)."""
        segment = segment_of(msg.key)
        previous = self.segments.pop(segment, 0)
        self.segments[segment] = msg.sequence
        if len(self.segments) > SEGMENTS_KEPT:
            self.segments.popitem(last=False)
        return previous

    def _count(self, msg: KVMsg, sign: int) -> None:
        who = owner_of(msg) or ""
        self.keys_of[who] += sign
        self.bytes_of[who] += sign * entry_bytes(msg)
        if self.keys_of[who] <= 0:
            del self.keys_of[who]
            self.bytes_of.pop(who, None)

    def seen(self, uuid: bytes) -> bool:
        """An update with this uuid was applied (among the last :data:`SEEN_UUIDS`)."""
        return bool(uuid) and uuid in self._seen

    def next_expiry(self) -> float | None:
        return self._expiries[0][0] if self._expiries else None

    def expired(self, now: float) -> Iterator[str]:
        """The keys whose TTL has run out by ``now`` (not those set again since), one at a time: the caller
        deletes each before asking for the next."""
        while self._expiries and self._expiries[0][0] <= now:
            _, key, uuid = heapq.heappop(self._expiries)
            current = self.kvmap.get(key)
            if current is not None and current.uuid == uuid:  # else it was re-set since: not expired
                yield key

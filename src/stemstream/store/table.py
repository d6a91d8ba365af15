"""What a store server holds: the latest update of each key, the sequence, TTL deadlines, the uuids applied."""

from __future__ import annotations

import heapq
from collections import OrderedDict
from collections.abc import Iterator

from stemstream.store.kvmsg import KVMsg, KVMsgError

# uuids of applied updates remembered to drop duplicates (clients resend unacknowledged updates).
SEEN_UUIDS = 100_000


class Table:
    """The state of one server, active or passive. Owned by the server thread: no lock."""

    def __init__(self) -> None:
        self.kvmap: dict[str, KVMsg] = {}
        self.sequence = 0
        self._expiries: list[tuple[float, str, bytes]] = []  # heap of (deadline, key, uuid)
        self._seen: OrderedDict[bytes, None] = OrderedDict()

    def reset(self, sequence: int = 0) -> None:
        """Forget every key (a passive server taking the active one's state); the uuids seen stay."""
        self.kvmap, self._expiries, self.sequence = {}, [], sequence

    def put(self, msg: KVMsg, now: float) -> None:
        """Store an update (or delete its key) and remember its uuid; an ephemeral key expires ``ttl`` from now."""
        if msg.is_delete:
            self.kvmap.pop(msg.key, None)
        else:
            self.kvmap[msg.key] = msg
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

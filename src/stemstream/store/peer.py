"""A passive server's side of Binary Star: following the active server, and the pending list.

A passive server drops its state and takes the active one's (docs/store.md, Binary Star failover): its
snapshot, then its update stream, applied in sequence order (:class:`Follower`). Updates that clients send
the passive server directly wait on the :class:`PendingList` until the active server publishes them, or
until this server takes over and applies what is left.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable

import zmq

from stemstream.config import Settings
from stemstream.store.kvmsg import HUGZ, KVMsg
from stemstream.store.link import PEER_UPDATES_PORT, Link, SnapshotSync
from stemstream.store.policy import Writer
from stemstream.store.table import Table

logger = logging.getLogger(__name__)


class PendingList:
    """Updates clients sent a passive server directly, by uuid in arrival order, each with our sequence then
    and who sent it (the write policy is applied at takeover, to the state then)."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self._entries: OrderedDict[bytes, tuple[KVMsg, int, Writer]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def add(self, msg: KVMsg, sequence: int, writer: Writer) -> bool:
        """Hold ``msg`` (it has a uuid); False if the list was full and its oldest entry was dropped."""
        self._entries[msg.uuid] = (msg, sequence, writer)
        if len(self._entries) > self.cap:
            self._entries.popitem(last=False)
            return False
        return True

    def discard(self, uuid: bytes) -> None:
        """The active server published this update: it needs no applying at takeover."""
        self._entries.pop(uuid, None)

    def take(self) -> list[tuple[KVMsg, int, Writer]]:
        """Empty the list: its entries, oldest first."""
        entries, self._entries = list(self._entries.values()), OrderedDict()
        return entries


class Follower:
    """A passive server's link to the active ``peer``: its snapshot, then its update stream, into ``table``.

    The handlers return why the server must start over (a gap in the sequence, a ``HUGZ`` ahead of us), or
    None. ``count`` counts ``peer_syncs`` (snapshots completed) and ``followed`` (stream updates applied).
    """

    def __init__(
        self,
        ctx: zmq.Context,
        settings: Settings,
        peer: str,
        heartbeat_s: float,
        table: Table,
        pending: PendingList,
        count: Callable[[str], None],
        role: str,
    ) -> None:
        self.link = Link(ctx, settings, peer, [b""], "peer", updates_port=PEER_UPDATES_PORT)
        now = time.monotonic()
        patience = max(10 * heartbeat_s, 2.0)
        self.sync: SnapshotSync | None = SnapshotSync(
            self.link,
            ("",),
            ask_by=now + 2 * heartbeat_s,  # ask anyway after this, even if the stream is silent
            give_up_at=now + patience,
            patience=patience,
            renew_on_request=True,
        )
        self.table = table
        self.pending = pending
        self._count = count
        self._role = role

    @property
    def synced(self) -> bool:
        return self.sync is None

    def next_deadline(self, now: float) -> float:
        return now + 1.0 if self.sync is None else self.sync.deadline()

    def tick(self, now: float) -> bool:
        """Ask for the snapshot when it is time; False if the active server never sent it (start over)."""
        return self.sync is None or self.sync.tick(now)

    def on_update(self, msg: KVMsg) -> str | None:
        """A message on the active server's update stream."""
        if self.sync is not None:
            self.sync.hold(msg)
            return None
        return self._follow(msg)

    def on_snapshot(self, msg: KVMsg) -> str | None:
        """A message on the snapshot port; at ``KTHXBAI``, take the snapshot, then what the stream held back."""
        sync = self.sync
        now = time.monotonic()
        if sync is None or not sync.add_part(msg, now):
            return None
        self.table.reset()
        for entry in sync.snapshot.values():
            self.table.put(entry, now)
            self.pending.discard(entry.uuid)
        self.table.sequence = msg.sequence
        self.sync = None
        self._count("peer_syncs")
        logger.info(
            "store %s: synced %d keys at sequence %d from %s",
            self._role,
            len(self.table.kvmap),
            msg.sequence,
            self.link.address,
        )
        for update in sync.backlog:
            why = self._follow(update)
            if why is not None:
                return why
        return None

    def _follow(self, msg: KVMsg) -> str | None:
        """Apply an update the active server published."""
        table = self.table
        if msg.key == HUGZ:
            return "the active server is ahead of us (missed updates)" if msg.sequence > table.sequence else None
        if msg.sequence <= table.sequence:
            return None
        if msg.sequence != table.sequence + 1:
            return f"gap in the active server's updates ({table.sequence} -> {msg.sequence})"
        table.sequence = msg.sequence
        table.put(msg, time.monotonic())
        self.pending.discard(msg.uuid)
        self._count("followed")
        return None

    def close(self) -> None:
        self.link.close()

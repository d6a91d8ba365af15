"""A store client's replica: its copy of the store (or a subtree), its unacknowledged writes, its watchers.

Shared by the API threads, which read it and write to it, and the client's agent, which applies what the
server sends. Every method takes the lock. The consistency rules of docs/store.md (Client behaviour) live
here: our writes are visible at once and win over updates of the same key from others until the server
echoes them; a snapshot replaces the copy but not our unacknowledged writes; after a server restart that
lost the state, the keys whose latest value we wrote are put back.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from stemstream.log import RateLimitedLog
from stemstream.store.kvmsg import KVMsg, decode_value, new_uuid

Watcher = Callable[[str, Any], None]
Change = tuple[str, bytes | None]  # a key and its new body, None when deleted


@dataclass(slots=True)
class Entry:
    body: bytes
    uuid: bytes
    sequence: int
    properties: dict[str, str]
    mine: bool = False  # our write is the latest value: we re-publish it if a restarted server lost it


@dataclass(slots=True)
class Pending:
    msg: KVMsg
    since: float  # monotonic time it was (re)sent to a server we believed live


class Replica:
    """The keys of one client, its pending writes (latest per key, in write order) and its state.

    :attr:`changed` is notified on every change of the keys and of :attr:`connected` / :attr:`server`
    (:meth:`bump`); :attr:`error` is what ended the agent, :attr:`synced` is set by the first snapshot.
    """

    def __init__(self, server: str) -> None:
        self.lock = threading.RLock()
        self.changed = threading.Condition(self.lock)
        self.version = 0
        self.entries: dict[str, Entry] = {}
        self.pending: dict[str, Pending] = {}
        # Our latest write of each key outside the subtrees we mirror (we never see those keys change):
        # put back if a restarted server lost them, like the mirrored keys we wrote last.
        self.outside: dict[str, KVMsg] = {}
        self.connected = False
        self.server = server
        self.error: BaseException | None = None
        self.synced = threading.Event()
        self._watchers: dict[int, tuple[str, Watcher]] = {}
        self._next_watcher = 0

    def __len__(self) -> int:
        return len(self.entries)

    def bump(self) -> None:
        """Caller holds the lock: the replica changed, wake the waiters."""
        self.version += 1
        self.changed.notify_all()

    # ------------------------------------------------------------------ API threads

    def get(self, key: str) -> bytes | None:
        with self.lock:
            entry = self.entries.get(key)
        return None if entry is None else entry.body

    def bodies(self, prefix: str) -> list[tuple[str, bytes]]:
        with self.lock:
            return [(k, e.body) for k, e in self.entries.items() if k.startswith(prefix)]

    def watch(self, prefix: str, callback: Watcher) -> Callable[[], None]:
        with self.lock:
            token = self._next_watcher
            self._next_watcher += 1
            self._watchers[token] = (prefix, callback)

        def unsubscribe() -> None:
            with self.lock:
                self._watchers.pop(token, None)

        return unsubscribe

    def write_outside(self, msg: KVMsg) -> None:
        """Our write of a key we do not mirror: remembered (its latest value) to re-publish after a restart."""
        with self.lock:
            if msg.body:
                self.outside[msg.key] = msg
            else:
                self.outside.pop(msg.key, None)

    def outside_writes(self) -> list[KVMsg]:
        """Our latest writes of keys we do not mirror, as new updates (a restarted server lost them)."""
        with self.lock:
            return [KVMsg(m.key, 0, m.body, dict(m.properties), new_uuid()) for m in self.outside.values()]

    def write(self, msg: KVMsg, now: float) -> bool:
        """Our write of a key in the subtree: visible at once, pending until echoed; True if the value changed."""
        with self.lock:
            old = self.entries.get(msg.key)
            if msg.body:
                seq = old.sequence if old else 0
                self.entries[msg.key] = Entry(msg.body, msg.uuid, seq, msg.properties, mine=True)
                changed = old is None or old.body != msg.body
            else:
                changed = self.entries.pop(msg.key, None) is not None
            self.pending.pop(msg.key, None)  # re-inserted last: pending keeps write order
            self.pending[msg.key] = Pending(msg, now)
            if changed:
                self.bump()
            return changed

    # ------------------------------------------------------------------ the agent

    def fire(self, changes: Iterable[Change], rlog: RateLimitedLog) -> None:
        """Tell the watchers about ``changes``, from the agent thread."""
        with self.lock:
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

    def begin_sync(self, server: str) -> None:
        """A sync with ``server`` begins: not connected until it completes."""
        with self.lock:
            self.connected = False
            self.server = server
            self.bump()

    def install(self, snapshot: dict[str, KVMsg], *, restarted: bool, now: float) -> list[Change]:
        """A complete snapshot replaces the keys, under our unacknowledged writes; the changes.

        ``restarted``: the server lost its state, so the keys whose latest value we wrote go back to it.
        """
        new = {k: Entry(m.body, m.uuid, m.sequence, m.properties) for k, m in snapshot.items()}
        with self.lock:
            old = self.entries
            for key, entry in new.items():
                before = old.get(key)
                if before is not None and before.mine and before.uuid == entry.uuid:
                    entry.mine = True
            for key, p in list(self.pending.items()):
                entry = new.get(key)
                if entry is not None and entry.uuid == p.msg.uuid:
                    del self.pending[key]  # the server has it: acknowledged
                    entry.mine = True
            if restarted:
                # The server lost its state: put back the keys we wrote last (with their TTL).
                for key, before in old.items():
                    if before.mine and key not in new and key not in self.pending:
                        msg = KVMsg(key, 0, before.body, dict(before.properties), new_uuid())
                        self.pending[key] = Pending(msg, now)
                        new[key] = Entry(msg.body, msg.uuid, 0, msg.properties, mine=True)
            for key, p in self.pending.items():  # our unacknowledged writes win until acknowledged
                if p.msg.body:
                    new[key] = Entry(p.msg.body, p.msg.uuid, 0, p.msg.properties, mine=True)
                else:
                    new.pop(key, None)
            self.entries = new
            self.connected = True
            self.bump()  # even without changes: wait_for() predicates may look at connected/server
        return _diff(old, new)

    def apply(self, msg: KVMsg) -> Change | None:
        """A server update; the change to tell watchers about, if any."""
        with self.lock:
            pending = self.pending.get(msg.key)
            if pending is not None:
                if pending.msg.uuid == msg.uuid:
                    del self.pending[msg.key]  # our write, acknowledged; the replica already has it
                    entry = self.entries.get(msg.key)
                    if entry is not None:
                        entry.sequence = msg.sequence
                return None  # else numbered before our newer write: ours wins once echoed
            old = self.entries.get(msg.key)
            if msg.body:
                self.entries[msg.key] = Entry(msg.body, msg.uuid, msg.sequence, msg.properties)
                if old is not None and old.body == msg.body:
                    return None
            elif self.entries.pop(msg.key, None) is None:
                return None
            self.bump()
        return msg.key, msg.body or None

    def unacknowledged(self, now: float) -> list[KVMsg]:
        """Our writes the server has not echoed, oldest first, marked as sent ``now``: to send again."""
        with self.lock:
            for p in self.pending.values():
                p.since = now
            return [p.msg for p in self.pending.values()]

    def drop_unacknowledged(self, now: float, limit: float) -> list[str]:
        """Give up the writes not echoed within ``limit`` seconds of their sending; their keys."""
        with self.lock:
            stale = [key for key, p in self.pending.items() if now - p.since > limit]
            for key in stale:
                del self.pending[key]
        return stale


def _diff(old: dict[str, Entry], new: dict[str, Entry]) -> list[Change]:
    changes: list[Change] = [(k, None) for k in old if k not in new]
    for key, entry in new.items():
        before = old.get(key)
        if before is None or before.body != entry.body:
            changes.append((key, entry.body))
    return changes

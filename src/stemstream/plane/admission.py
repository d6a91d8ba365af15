"""What an aggregator's router thread lets one message cost it (issue 17): member resolution that never waits on
the router thread, a cap on the scans open at once and on the bytes of their expects, and room in the buffer of
data waiting for its expect made by dropping data that no expect names.

Kept apart from the routing loop (plane.router) so that the hot path stays as it is.

* :class:`MemberResolver`: an ``expect`` may name NodeGroups whose registry records this aggregator's store
  replica does not hold yet (they registered a moment ago, or never: a typo, a forgery). The router thread used
  to wait for them in the store (``resolve_timeout``, 10 s) while every other scan of its sector stood still. Now
  the scan waits, inactive, and the router thread asks :meth:`MemberResolver.ready` on each turn of its loop,
  which reads the local replica only; past ``resolve_timeout`` the scan is activated with what is known (the
  missing members' data is rejected as ``no_route``).
* :class:`OpenScans`: at most ``Settings.max_open_scans`` scans per sector thread, holding at most
  ``Settings.max_expect_bytes`` of expect messages (encoded size; about 10x that decoded); more is rejected
  (``too_many_scans``). 30 large expects held 320 MB for 60 s before.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable, Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from stemstream.plane.router import Router


_CHECK_EVERY_S = 0.05


class MemberResolver:
    """Scans waiting for their members' registry records, checked against the local store replica only."""

    def __init__(self, registered: Callable[[], set[str]], timeout_s: float) -> None:
        self._registered = registered  # the NodeGroup uids in the local replica (never a round trip)
        self._timeout_s = timeout_s
        self._waiting: dict[Hashable, tuple[tuple[str, ...], float]] = {}
        self._checked = -float("inf")

    def known(self, members: Iterable[str]) -> bool:
        """Whether every member has a registry record in the replica."""
        registered = self._registered()
        return all(uid in registered for uid in members)

    def wait(self, key: Hashable, members: tuple[str, ...]) -> None:
        """Scan ``key`` waits for ``members`` (from now, at most ``timeout_s``)."""
        self._waiting.setdefault(key, (members, time.monotonic() + self._timeout_s))

    def waiting(self, key: Hashable) -> bool:
        return key in self._waiting

    def forget(self, key: Hashable) -> None:
        self._waiting.pop(key, None)

    def ready(self, now: float | None = None) -> list[Any]:
        """The waiting scans whose members are all known now, or whose wait is over; no longer waiting."""
        if not self._waiting:
            return []
        now = time.monotonic() if now is None else now
        if now - self._checked < _CHECK_EVERY_S:
            return []  # the registry's records are read (decoded) at most every 50 ms
        self._checked = now
        registered = self._registered()
        done = [k for k, (members, deadline) in self._waiting.items() if now >= deadline or set(members) <= registered]
        for k in done:
            del self._waiting[k]
        return done

    def __len__(self) -> int:
        return len(self._waiting)


class OpenScans:
    """The open scans of one router thread and the bytes of the expects they hold."""

    def __init__(self, max_scans: int, max_bytes: int) -> None:
        self.max_scans = max_scans
        self.max_bytes = max_bytes
        self._bytes: dict[Hashable, int] = {}
        self.total = 0

    def admit(self, key: Hashable, nbytes: int) -> str | None:
        """Count an expect of ``nbytes`` for scan ``key`` (a new scan if not open); None, or why not."""
        if key not in self._bytes and len(self._bytes) >= self.max_scans:
            return f"{len(self._bytes)} scans open, the most a sector takes (STEMSTREAM_MAX_OPEN_SCANS)"
        if self.total + nbytes > self.max_bytes:
            return (
                f"open scans hold {self.total} bytes of expects, {nbytes} more is over {self.max_bytes} "
                "(STEMSTREAM_MAX_EXPECT_BYTES)"
            )
        self._bytes[key] = self._bytes.get(key, 0) + nbytes
        self.total += nbytes
        return None

    def close(self, key: Hashable) -> None:
        self.total -= self._bytes.pop(key, 0)

    def __len__(self) -> int:
        return len(self._bytes)


def admit_expect(router: Router, msg: Any, key: Hashable, size: int, new: bool) -> tuple[str, str] | None:
    """Whether ``router`` takes an expect (of ``size`` bytes): a scan no larger than ``max_scan_frames``, within
    the caps on open scans and their expects' bytes; None, or (kind, why) to reject it with."""
    limit = router.agg.settings.max_scan_frames
    if new and msg.scan_shape[0] * msg.scan_shape[1] > limit:
        shape = f"{msg.scan_shape[0]}x{msg.scan_shape[1]}"
        return "too_large", f"{shape} frames, over {limit} (STEMSTREAM_MAX_SCAN_FRAMES)"
    why = router.open.admit(key, size)
    return ("too_many_scans", why) if why is not None else None


def make_room(router: Router) -> bool:
    """Whether ``router`` may read data: its buffer of data waiting for an expect is not full, or room was made
    by dropping (rejecting, counting) the oldest data of a scan that waits for its members' registry records, or
    of a scan that no expect names other than the scan of the newest data (which waits, as before, at most
    ``expect_grace_s``: its expect may be just behind). Before, a flood of data of unknown scan numbers filled
    the buffer and held the sector's honest data behind it for minutes; data of a scan naming a NodeGroup that
    never registers must not hold it either (an honest member's record is late by milliseconds, not a buffer)."""
    if len(router.pending) < router.agg.pending_limit:
        return True
    newest = router.pending[-1][1]  # the scan streaming into the buffer now: honest data ahead of its expect
    for i, entry in enumerate(router.pending):
        key = router._key(*entry[1])
        if router.resolver.waiting(key) or (entry[1] != newest and key not in router.scans):
            del router.pending[i]
            what = "data for scan %s dropped: the buffer of data waiting for expects or members is full"
            router._reject(None, "pending_full", what, f"{entry[1][0]}")
            return True
    return False

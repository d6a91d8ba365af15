"""The aggregator: one router thread per detector sector between the producers and the NodeGroups.

Thread ``m`` binds a data PULL and an info PULL (registry endpoints ``data_<m>`` and ``info_<m>``) that
the ``T`` sender threads of sector ``m``'s producer connect to. Per scan it

1. collects the ``T`` ``expect`` messages, sums their NodeGroup UID -> count maps, connects a PUSH to
   each member NodeGroup's ``data_<m>`` (and one to its ``info``), and forwards the combined ``expect``;
2. runs a tight pull -> peek -> push loop: the frame number is read from the header (no payload decode,
   no copy) and the two frames go to ``members[frame % len(members)]``;
3. once all ``T`` ``end`` messages are in and everything they report sent is routed, forwards the
   combined ``end`` and writes ``/scans/<n>/aggregator/<m>``.

Info and data travel on different sockets, so data can overtake its ``expect``: such messages wait in a
bounded buffer (``pending_limit``); when it is full the thread stops reading data until the expects are in.
Data of a scan that no ``expect`` has named waits at most ``expect_grace_s`` (counted from the first such
message of that scan number; later ones are rejected at once), so unknown scan numbers cannot hold a sector.
Bad messages are rejected, counted per kind (registry counts ``rejected.<kind>``) and logged, rate-limited
(one line per kind per 10 s). A header that is its scan's template byte for byte but the frame number and
timestamp is routed on the fast path (wire/fastpath.py; the template comes from the scan's first header the
full decoder passed); every other header is fully decoded. A frame is routed at most once per scan (the
scan closes when as many messages are routed as the producers say they sent, so a duplicate routed would
close it early).
"""

from __future__ import annotations

import logging
import os
import socket as _socket
import threading
import time
from collections.abc import Sequence
from typing import Any

from stemstream.config import Settings
from stemstream.errors import ConfigError, WaitTimeout
from stemstream.plane.receiver import Receiver
from stemstream.plane.router import FINISHED_KEPT, Router
from stemstream.store.registry import role_prefix
from stemstream.wire.protocol import N_SECTORS, SECTOR_SHAPE

logger = logging.getLogger(__name__)


class Aggregator(Receiver):
    """The central router: one router thread per sector it serves (``serve``; default all ``n_sectors``),
    registered as ``/aggregators/<uid>`` with the endpoints of those sectors only. Several aggregators (one per
    process, ``stemstream aggregator --processes N``) share a scan's sectors; the plan says which serves which."""

    role = "aggregator"

    def __init__(
        self,
        store: Any,
        *,
        n_sectors: int = N_SECTORS,
        serve: Sequence[int] | None = None,
        uid: str | None = None,
        registry: Any = None,
        host: str | None = None,
        settings: Settings | None = None,
        sector_nbytes: int | None = None,
        pending_limit: int = 64,
        scan_timeout_s: float | None = None,
        expect_grace_s: float | None = None,
        resolve_timeout: float = 10.0,
        publish_interval: float = 0.5,
    ) -> None:
        super().__init__(
            store,
            uid=uid or f"aggregator-{_socket.gethostname()}-{os.getpid()}",
            registry=registry,
            host=host,
            settings=settings,
            n_sectors=n_sectors,
            curve_roles=("server", "client"),
            publish_interval=publish_interval,
            n_receiving=len(set(range(n_sectors) if serve is None else serve)),
        )
        self.sector_nbytes = sector_nbytes or SECTOR_SHAPE[0] * SECTOR_SHAPE[1] * 2
        self.pending_limit = pending_limit
        self.scan_timeout_s = scan_timeout_s or self.settings.scan_timeout_s
        # Data of a scan no expect has named waits this long (its expect may be a little behind on the wire).
        self.expect_grace_s = expect_grace_s or min(10.0, self.scan_timeout_s)
        self.resolve_timeout = resolve_timeout
        self.served = tuple(sorted(set(range(n_sectors) if serve is None else serve)))
        if not self.served or not all(0 <= m < n_sectors for m in self.served):
            raise ConfigError(f"aggregator: serve sectors among 0..{n_sectors - 1}, got {list(serve or [])}")
        self._routers = [Router(self, m) for m in self.served]
        self._done: dict[tuple[int, str], set[int]] = {}  # (scan, acquisition) -> sectors done
        self._done_cond = threading.Condition()
        self._unwatch: Any = None
        self._nodegroup_status: dict[str, str] = {}  # last status seen per NodeGroup record (watch thread)
        self._nodegroups_lost = 0  # records that went without saying "stopping" first: died, expired

    def _on_started(self) -> None:
        self._unwatch = self.store.watch(self._on_nodegroup_change, prefix=role_prefix("nodegroup"))

    def _on_nodegroup_change(self, key: str, value: Any) -> None:
        """A NodeGroup's record went (it stopped, or died and expired): stop waiting on it."""
        uid = key.rsplit("/", 1)[-1]
        if value is not None:
            self._nodegroup_status[uid] = value.get("status", "") if isinstance(value, dict) else ""
            return
        if self._nodegroup_status.pop(uid, "stopping") != "stopping":
            self._nodegroups_lost += 1
            logger.warning("NodeGroup %s left the registry without stopping (died, or lost the store)", uid)
        for router in self._routers:
            peer = router.peers.get(uid)
            if peer is not None and not peer.abort.is_set():
                logger.warning("sector %d: NodeGroup %s left the registry; no more sends to it", router.m, uid)
                peer.abort.set()

    def counts(self) -> dict[str, int]:
        """Totals over the sector threads: received, routed, routed.<uid>, rejected, rejected.<kind>, ..."""
        out: dict[str, int] = {"received": 0, "routed": 0, "rejected": 0, "pending": 0, "scans_done": 0}
        more = dict.fromkeys(("received_bytes", "routed_bytes", "blocked_sends", "blocked_us", "scans_open"), 0)
        for r in self._routers:
            out["received"] += r.received
            out["pending"] += len(r.pending)
            more["received_bytes"] += r.received_bytes
            more["routed_bytes"] += r.meter.bytes
            more["blocked_sends"] += r.meter.blocked
            more["blocked_us"] += int(r.meter.blocked_s * 1e6)
            more["scans_open"] += len(r.scans)
            routed = dict(r.routed)  # closed scans, plus the scans being routed:
            for scan in list(r.scans.values()):
                for uid, n in zip(scan.members, list(scan.routed), strict=False):
                    routed[uid] = routed.get(uid, 0) + n
            for uid, n in routed.items():
                out["routed"] += n
                out[f"routed.{uid}"] = out.get(f"routed.{uid}", 0) + n
            for kind, n in dict(r.rejected).items():
                out["rejected"] += n
                out[f"rejected.{kind}"] = out.get(f"rejected.{kind}", 0) + n
        with self._done_cond:
            out["scans_done"] = sum(1 for s in self._done.values() if len(s) == len(self.served))
        out.update(more, nodegroups_lost=self._nodegroups_lost)
        return out

    def _sector_done(self, scan_number: int, start: str, sector: int) -> None:
        with self._done_cond:
            done = self._done.setdefault((scan_number, start), set())
            done.add(sector)
            while len(self._done) > FINISHED_KEPT:
                del self._done[next(iter(self._done))]
            self._done_cond.notify_all()
            complete = len(done) == len(self.served)
        if complete:
            self._publisher.put("", None)  # refresh the registry counts now

    def wait_scan(self, scan_number: int, timeout: float, start: str | None = None) -> None:
        """Block until every router thread of this aggregator has closed ``scan_number`` (an acquisition of it;
        ``start``: that one) (raises TimeoutError)."""
        deadline = time.monotonic() + timeout

        def closed() -> bool:
            return any(
                n == scan_number and (start is None or s == start) and len(sectors) >= len(self.served)
                for (n, s), sectors in self._done.items()
            )

        with self._done_cond:
            while not closed():
                self.maybe_raise()
                left = deadline - time.monotonic()
                if left <= 0:
                    raise WaitTimeout(f"aggregator: scan {scan_number} not routed within {timeout:.0f} s")
                self._done_cond.wait(min(left, 0.2))

    def _before_join(self) -> None:
        if self._unwatch is not None:
            self._unwatch()
        for r in self._routers:
            for peer in list(r.peers.values()):
                peer.abort.set()

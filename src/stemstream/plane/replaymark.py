"""The leader producer's last step of a replay: once every sector's replay record (and the scan's closing
record) is in, the scan is marked ``on_disk`` (replayed), which is what the session counts from its files."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from typing import Any

from stemstream.errors import StemstreamError
from stemstream.scans import keys
from stemstream.scans.plan import KeyValue
from stemstream.scans.records import ReplayRecord, ScanPlan, replayed_scan_record

logger = logging.getLogger(__name__)


def scan_items(store: KeyValue, n: int) -> dict[str, Any]:
    """``/scans/<n>`` and its sub-records (a prefix of ``/scans/<n>`` alone would match scan n0 too)."""
    items = store.items(keys.scan(n) + "/")
    record = store.get(keys.scan(n))
    if record is not None:
        items[keys.scan(n)] = record
    return items


def store_set(store: KeyValue, key: str, value: Any) -> bool:
    """Write ``key``; False (and logged) when the store is away, to be retried."""
    try:
        store.set(key, value)
        return True
    except StemstreamError as exc:
        logger.warning("store write of %s failed (retrying): %s", key, exc)
        return False


class ReplayMarker:
    """Replayed scans waiting to be marked, by (scan number, acquisition)."""

    def __init__(self, store: KeyValue, n_sectors: int, ack_timeout_s: float) -> None:
        self.store = store
        self.n_sectors = n_sectors
        self.ack_timeout_s = ack_timeout_s
        self._lock = threading.Lock()
        self._todo: dict[tuple[int, str], tuple[ScanPlan, str, float]] = {}

    def __bool__(self) -> bool:
        with self._lock:
            return bool(self._todo)

    def add(self, plan: ScanPlan, reason: str) -> None:
        with self._lock:
            self._todo[(plan.scan_number, plan.start)] = (plan, reason, time.monotonic())

    def run(self, shutting_down: bool = False) -> None:
        """Mark what is complete (or overdue). ``shutting_down``: without the closing record (the closer
        thread goes with the process)."""
        with self._lock:
            todo = dict(self._todo)
        for mark, (plan, reason, since) in todo.items():
            n = plan.scan_number
            items = scan_items(self.store, n)
            replays = [ReplayRecord.parse(items.get(keys.replay(n, m))) for m in range(self.n_sectors)]
            replays = [r if r is not None and r.start == plan.start else None for r in replays]
            key = keys.scan(n)
            record = items.get(key)
            if not isinstance(record, Mapping) or (record.get("start") or "") != plan.start:
                # A newer acquisition of the number took /scans/<n> over: this one's record is kept apart.
                key = keys.acquisition(n, plan.start or "earlier")
                record = self.store.get(key)
            closed = shutting_down or (isinstance(record, Mapping) and "closed_at" in record)
            late = time.monotonic() - since > self.ack_timeout_s
            if not (all(r is not None for r in replays) and closed) and not late:
                continue
            paths = sorted(p for r in replays if r is not None for p in r.paths)
            current = record if isinstance(record, Mapping) else plan.to_record()
            if store_set(self.store, key, replayed_scan_record(current, reason, paths, time.time())):
                with self._lock:
                    self._todo.pop(mark, None)
                logger.warning("scan %d replayed to disk (%s): %d files", n, reason, len(paths))

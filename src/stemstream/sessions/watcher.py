"""Watching a session's scans in the store: each scan reported once when counted or landed on disk, and the
live state of the others."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from stemstream.scans import keys
from stemstream.scans.records import ROUTE_STREAM, CountedRecord, ScanRecord, preview_image
from stemstream.store.registry import role_prefix

# What a session (and an experiment) reads in the store: the scans, the sessions, the control requests and the
# data plane's registry records (NodeGroups' readiness and live view; the members its metrics report). A client
# mirrors only these, not "/" (docs/store.md).
SESSION_SUBTREES = (
    keys.SCANS,
    keys.SESSIONS,
    keys.CONTROL,
    *(role_prefix(role) for role in ("nodegroup", "producer", "aggregator")),
)


@dataclass
class ScanView:
    """What the store says about one scan, for the flows."""

    number: int
    record: ScanRecord  # /scans/<n>
    counted: CountedRecord | None  # /scans/<n>/counted
    preview: tuple[np.ndarray | None, int, int] = (None, 0, 0)  # image so far, frames counted, frames

    @property
    def route(self) -> str:
        return self.record.route

    @property
    def on_disk(self) -> bool:
        """Landed on disk: a disk-route scan, or a streamed one the producers replayed to disk because it
        could not be counted (a NodeGroup died, the counted file is partial: docs/reliability.md)."""
        return self.record.landed_on_disk

    @property
    def n_frames(self) -> int:
        return self.record.n_frames


@dataclass
class ScanWatcher:
    """Reports each scan once when it is counted (or landed on disk), and the live state of the others."""

    client: Any
    since: float = field(default_factory=time.time)
    seen_counted: set[int] = field(default_factory=set)
    seen_disk: set[int] = field(default_factory=set)

    def poll(self) -> tuple[list[ScanView], list[ScanView], list[ScanView]]:
        """(newly counted, newly on disk, still streaming) scans decided after ``since``."""
        items = self.client.items(keys.SCANS)
        counted, disk, live = [], [], []
        for key, value in items.items():
            n = keys.scan_number_of(key)
            record = ScanRecord.parse(value) if n is not None else None
            if n is None or record is None or record.decided_at < self.since:
                continue
            view = ScanView(n, record, CountedRecord.parse(items.get(keys.counted(n))))
            if view.on_disk and record.replayed:  # its counted file, if any, is partial: count again
                if n not in self.seen_disk:
                    self.seen_disk.add(n)
                    disk.append(view)
            elif view.counted is not None:
                if n not in self.seen_counted:
                    self.seen_counted.add(n)
                    counted.append(view)
            elif view.on_disk:
                if n not in self.seen_disk:
                    self.seen_disk.add(n)
                    disk.append(view)
            elif view.route == ROUTE_STREAM:
                view.preview = preview_image(items, n)
                live.append(view)
        return sorted(counted, key=_num), sorted(disk, key=_num), sorted(live, key=_num)


def _num(view: ScanView) -> int:
    return view.number


def live_view_url(client: Any) -> str | None:
    """The live view's address (docs/analyses.md): rank 0 of the counting job puts it in its NodeGroups'
    registry records; None while none is registered (no view, or the NodeGroups are not up)."""
    from stemstream.store import Registry

    for record in Registry(client).members("nodegroup"):
        url = record.extra.get("view")
        if isinstance(url, str) and url.startswith("http"):
            return url
    return None

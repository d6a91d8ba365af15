"""What one rank holds of a scan while it counts it, and the message that gathers its events on rank 0."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from stemstream.counting import Thresholds
from stemstream.nodes.batches import Batch

__all__ = ["LocalScan", "ScanKey", "events_message", "frames_and_events"]

ScanKey = tuple[int, str]  # (scan number, acquisition id): a scan number may be acquired again


@dataclass
class LocalScan:
    """What one rank holds of a scan (one acquisition of a scan number)."""

    number: int
    start: str
    members: tuple[str, ...]
    scan_shape: tuple[int, int]
    local_uids: set[str]
    candidates: frozenset[int]  # the frames that may be in the threshold sample (counting.sample_candidates)
    ended: set[str] = field(default_factory=set)
    summaries: dict[str, dict[str, Any]] = field(default_factory=dict)
    thresholds: Thresholds | None = None
    halves: list[list[float]] | None = None  # the stability figure (counting.half_thresholds)
    failed: str | None = None
    events: dict[int, np.ndarray] = field(default_factory=dict)
    incomplete: dict[int, tuple[int, ...]] = field(default_factory=dict)
    batches: set[Batch] = field(default_factory=set)  # holding slots of this scan
    queue: deque[Batch] = field(default_factory=deque)  # batches with ready slots, oldest first
    outstanding: int = 0  # slots handed out and not yet done
    counted: int = 0
    engine_s: float = 0.0  # seconds inside the engine
    first_count: float | None = None  # time.time() of the first and last engine call
    last_count: float | None = None
    share: int = 0  # frames of this scan routed to this rank's NodeGroups
    reported: bool = False
    all_ended_at: float | None = None
    bf: np.ndarray | None = None  # bright-field events per frame (uint16), for the preview
    preview_dirty: bool = False

    @property
    def n_frames(self) -> int:
        return self.scan_shape[0] * self.scan_shape[1]

    @property
    def key(self) -> ScanKey:
        return (self.number, self.start)

    def message(self, kind: str, rank: int, **fields: Any) -> dict[str, Any]:
        """A message to rank 0 about this scan."""
        return {"kind": kind, "rank": rank, "scan": self.number, "start": self.start, **fields}

    @property
    def all_ended(self) -> bool:
        return self.local_uids <= self.ended


def frames_and_events(b: Batch, results: list[tuple[int, list[np.ndarray]]]) -> tuple[list[int], list[np.ndarray]]:
    frames, events = [], []
    for i, ev in results:
        for k, e in enumerate(ev, start=i):
            frames.append(int(b.frames[k]))
            events.append(e)
    return frames, events


def events_message(ls: LocalScan, rank: int) -> dict[str, Any]:
    """The rank's ``events`` message of a scan to rank 0: every counted frame's events, packed, and what is
    incomplete (``nodes.coordinator`` gathers them into the file)."""
    frames = np.fromiter(sorted(ls.events), np.uint32, count=len(ls.events))
    arrays = [ls.events[int(f)] for f in frames]
    lengths = np.fromiter((a.size for a in arrays), np.uint32, count=len(arrays))
    flat = np.concatenate(arrays).astype(np.uint32, copy=False) if arrays else np.zeros(0, np.uint32)
    return {
        "kind": "events",
        "rank": rank,
        "scan": ls.number,
        "start": ls.start,
        "frames": frames.tobytes(),
        "lengths": lengths.tobytes(),
        "events": flat.tobytes(),
        "incomplete": [[f, list(m)] for f, m in sorted(ls.incomplete.items())],
        "summaries": ls.summaries,
        "failed": ls.failed,
        "counted_at": time.time(),
        "engine_s": ls.engine_s,
        "first_count": ls.first_count,
        "last_count": ls.last_count,
    }

"""What a NodeGroup hands assembled frames to: the :class:`FrameConsumer` protocol and simple consumers.

A NodeGroup asks its consumer for a destination buffer per frame (:meth:`FrameConsumer.frame_buffer`),
copies each sector payload once straight into it, and calls :meth:`FrameConsumer.frame_ready` when the
frame is whole. Frames with sectors lost upstream are handed over after every expected message of the
scan is in, with their missing rows zero-filled and the missing sector indices named.

Consumers here: :class:`CollectingConsumer` (keeps every frame; tests), :class:`ChecksumConsumer` (keeps a
CRC-32 per frame, recycles buffers; benchmarks and process tests), :class:`NullConsumer` (keeps nothing)
and :class:`SlowConsumer` (adds a per-frame delay to another consumer; back-pressure tests).

Calls arrive from several NodeGroup threads at once (one per sector): consumers must be thread-safe.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from stemstream.errors import WaitTimeout
from stemstream.wire.protocol import FRAME_SHAPE

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScanInfo:
    """What a NodeGroup knows about a scan when it begins: geometry and its place in the membership."""

    scan_number: int
    scan_shape: tuple[int, int]  # (height, width) in probe positions
    frame_shape: tuple[int, int]  # (rows, cols) of an assembled frame
    n_sectors: int
    members: tuple[str, ...]  # NodeGroup UIDs, fixed for the scan; frame f goes to members[f % len]
    my_index: int  # this NodeGroup's position in ``members``
    # The acquisition ("" when its producers named none). A scan number may be acquired again (a DAQ restart
    # resets the counter); a NodeGroup ends one acquisition of a number before it begins the next.
    start: str = ""

    @property
    def n_frames(self) -> int:
        return self.scan_shape[0] * self.scan_shape[1]

    @property
    def my_frames(self) -> range:
        """The frame numbers routed to this NodeGroup."""
        return range(self.my_index, self.n_frames, len(self.members))


@dataclass
class ScanSummary:
    """A NodeGroup's account of one scan (its share of the frames only)."""

    expected: int  # data messages announced for this NodeGroup (all sectors)
    received: int  # data messages accepted into frames
    frames_complete: int
    frames_incomplete: int
    incomplete: list[tuple[int, tuple[int, ...]]] = field(default_factory=list)  # (frame, missing sectors)
    # Frames no sector of which arrived, beyond as many as did arrive: counted in frames_incomplete, never handed
    # over (plane.nodelife: work follows the data, not a declared scan shape).
    absent: int = 0
    lost_upstream: int = 0  # sectors of this NodeGroup's frames that never entered the pipeline
    rejected: dict[str, int] = field(default_factory=dict)  # per kind, messages attributable to this scan
    first_ts: float | None = None  # time.time() of the first and last accepted data message
    last_ts: float | None = None
    status: str = "received"  # "received", or "timeout" when the scan was closed by the watchdog

    @property
    def n_rejected(self) -> int:
        return sum(self.rejected.values())

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["incomplete"] = [[f, list(m)] for f, m in self.incomplete]
        return d


@runtime_checkable
class FrameConsumer(Protocol):
    """Receives a NodeGroup's assembled frames; all methods may be called from several threads.

    A consumer may set ``acknowledges = "counted"`` when it writes a counted file per scan: producers then
    hold a scan until that file is reported (``plane.retention``); by default a scan is acknowledged
    once the NodeGroups have received it.
    """

    def begin_scan(self, scan: ScanInfo) -> None:
        """A scan starts: called once, before any other call for ``scan.scan_number``."""

    def frame_buffer(self, scan_number: int, frame_number: int) -> np.ndarray:
        """A writable ``frame_shape`` uint16 C-contiguous buffer for this frame; may block (back-pressure).

        A consumer with a bounded pool must be able to give out the NodeGroup's ``max_lag`` plus the
        producers' ``max_skew`` plus the scan's incomplete frames before it blocks: only complete frames
        come back through ``frame_ready`` before the scan's end.
        """
        ...

    def frame_ready(self, scan_number: int, frame_number: int, missing_sectors: tuple[int, ...]) -> None:
        """The frame's buffer is filled (missing sectors' rows zero-filled) and the consumer's again."""

    def end_scan(self, scan_number: int, summary: ScanSummary) -> None:
        """Every frame of the scan has been handed over; no more calls for ``scan_number``."""


class _BufferPool:
    """The frame buffers lent to a NodeGroup, and a free list of returned ones, so that a consumer that does
    not keep frames does not allocate per frame."""

    def __init__(self, frame_shape: tuple[int, int] = FRAME_SHAPE, keep: int = 16) -> None:
        self._shape = frame_shape
        self._keep = keep
        self._free: list[np.ndarray] = []
        self._lent: dict[tuple[int, int], np.ndarray] = {}
        self._lock = threading.Lock()

    def lend(
        self, scan_number: int, frame_number: int, shape: tuple[int, int] | None = None, fresh: bool = False
    ) -> np.ndarray:
        """A buffer for the frame: a recycled one, or (``fresh``, for consumers that keep frames) a new one."""
        shape = shape or self._shape
        with self._lock:
            buf = self._free.pop() if self._free and not fresh and self._free[-1].shape == shape else None
        if buf is None:
            buf = np.empty(shape, dtype=np.uint16)
        with self._lock:
            self._lent[(scan_number, frame_number)] = buf
        return buf

    def returned(self, scan_number: int, frame_number: int) -> np.ndarray:
        """The frame's buffer, back from the NodeGroup (the consumer's until it recycles it)."""
        with self._lock:
            return self._lent.pop((scan_number, frame_number))

    def recycle(self, buf: np.ndarray) -> None:
        """A buffer the consumer is done with, for :meth:`lend` to hand out again."""
        with self._lock:
            if len(self._free) < self._keep:
                self._free.append(buf)


class NullConsumer:
    """Keeps nothing: buffers are recycled, frames only counted. Measures the data plane alone."""

    def __init__(self) -> None:
        self._pool = _BufferPool()
        self._lock = threading.Lock()
        self.frames = 0
        self.summaries: dict[int, ScanSummary] = {}

    def begin_scan(self, scan: ScanInfo) -> None:
        pass

    def frame_buffer(self, scan_number: int, frame_number: int) -> np.ndarray:
        return self._pool.lend(scan_number, frame_number)

    def frame_ready(self, scan_number: int, frame_number: int, missing_sectors: tuple[int, ...]) -> None:
        self._pool.recycle(self._pool.returned(scan_number, frame_number))
        with self._lock:
            self.frames += 1

    def end_scan(self, scan_number: int, summary: ScanSummary) -> None:
        self.summaries[scan_number] = summary


@dataclass
class ScanResults:
    """What :class:`ChecksumConsumer` and :class:`CollectingConsumer` record per scan."""

    info: ScanInfo
    checksums: dict[int, int] = field(default_factory=dict)  # frame -> CRC-32 of the assembled frame
    order: list[int] = field(default_factory=list)  # frames in the order they were handed over
    missing: dict[int, tuple[int, ...]] = field(default_factory=dict)  # incomplete frames only
    summary: ScanSummary | None = None
    begun_ts: float = field(default_factory=time.time)
    ended_ts: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "scan": self.info.scan_number,
            "info": {**asdict(self.info), "members": list(self.info.members)},
            "checksums": {str(k): v for k, v in self.checksums.items()},
            "order": self.order,
            "missing": {str(k): list(v) for k, v in self.missing.items()},
            "summary": self.summary.to_dict() if self.summary else None,
            "begun_ts": self.begun_ts,
            "ended_ts": self.ended_ts,
        }


def frame_checksum(frame: np.ndarray) -> int:
    """CRC-32 of a frame's bytes (C order); what :class:`ChecksumConsumer` records."""
    return zlib.crc32(memoryview(np.ascontiguousarray(frame)).cast("B"))


class ChecksumConsumer:
    """Keeps no frames: records a CRC-32 per frame and the hand-over order, recycles buffers.

    With ``results_dir``, each scan's :class:`ScanResults` is written at ``end_scan`` as
    ``<results_dir>/<name>_scan<N>.json`` (what the process tests read).
    """

    def __init__(self, *, results_dir: Path | None = None, name: str = "nodegroup", checksum: bool = True):
        self._pool = _BufferPool()
        self._keeps_frames = False
        self._lock = threading.Lock()
        self._results_dir = results_dir
        self._checksum = checksum
        self.name = name
        self.scans: dict[int, ScanResults] = {}

    def begin_scan(self, scan: ScanInfo) -> None:
        with self._lock:
            self.scans[scan.scan_number] = ScanResults(scan)

    def frame_buffer(self, scan_number: int, frame_number: int) -> np.ndarray:
        shape = self.scans[scan_number].info.frame_shape
        return self._pool.lend(scan_number, frame_number, shape, fresh=self._keeps_frames)

    def frame_ready(self, scan_number: int, frame_number: int, missing_sectors: tuple[int, ...]) -> None:
        buf = self._pool.returned(scan_number, frame_number)
        crc = frame_checksum(buf) if self._checksum else 0
        with self._lock:
            results = self.scans[scan_number]
            results.checksums[frame_number] = crc
            results.order.append(frame_number)
            if missing_sectors:
                results.missing[frame_number] = missing_sectors
            if self._keeps_frames:
                self.frames[scan_number][frame_number] = buf
        if not self._keeps_frames:
            self._pool.recycle(buf)

    def end_scan(self, scan_number: int, summary: ScanSummary) -> None:
        with self._lock:
            results = self.scans[scan_number]
            results.summary = summary
            results.ended_ts = time.time()
        if self._results_dir is not None:
            write_results(self._results_dir / f"{self.name}_scan{scan_number}.json", results)


def write_results(path: Path, results: ScanResults) -> None:
    """Write ``results`` as JSON atomically (a reader never sees half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(results.to_dict()))
    tmp.replace(path)


class CollectingConsumer(ChecksumConsumer):
    """Keeps every frame (``frames[scan][frame]``) besides the checksums: for tests of small scans."""

    def __init__(self, *, results_dir: Path | None = None, name: str = "nodegroup") -> None:
        super().__init__(results_dir=results_dir, name=name)
        self._keeps_frames = True
        self._pool = _BufferPool(keep=0)
        self.frames: dict[int, dict[int, np.ndarray]] = {}
        self._ended: dict[int, threading.Event] = {}

    def begin_scan(self, scan: ScanInfo) -> None:
        super().begin_scan(scan)
        with self._lock:
            self.frames[scan.scan_number] = {}
            self._ended.setdefault(scan.scan_number, threading.Event())

    def end_scan(self, scan_number: int, summary: ScanSummary) -> None:
        super().end_scan(scan_number, summary)
        with self._lock:
            event = self._ended.setdefault(scan_number, threading.Event())
        event.set()

    def wait_scan(self, scan_number: int, timeout: float) -> ScanResults:
        """Block until ``end_scan`` for ``scan_number``; raises TimeoutError."""
        with self._lock:
            event = self._ended.setdefault(scan_number, threading.Event())
        if not event.wait(timeout):
            raise WaitTimeout(f"scan {scan_number} did not end within {timeout:.1f} s")
        return self.scans[scan_number]


class SlowConsumer:
    """Wraps a consumer and spends ``delay_s`` per frame in ``frame_ready``, one frame at a time (a single
    worker): a stand-in for slow counting, at most ``1 / delay_s`` frames per second."""

    def __init__(self, inner: FrameConsumer, delay_s: float, *, sleep: Callable[[float], None] = time.sleep):
        self.inner = inner
        self.delay_s = delay_s
        self._sleep = sleep
        self._worker = threading.Lock()

    def begin_scan(self, scan: ScanInfo) -> None:
        self.inner.begin_scan(scan)

    def frame_buffer(self, scan_number: int, frame_number: int) -> np.ndarray:
        return self.inner.frame_buffer(scan_number, frame_number)

    def frame_ready(self, scan_number: int, frame_number: int, missing_sectors: tuple[int, ...]) -> None:
        with self._worker:
            self._sleep(self.delay_s)  # simulated processing cost, not a wait for anything
        self.inner.frame_ready(scan_number, frame_number, missing_sectors)

    def end_scan(self, scan_number: int, summary: ScanSummary) -> None:
        self.inner.end_scan(scan_number, summary)

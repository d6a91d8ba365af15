"""Where every sector of a scan ended up, proven from the events and the bytes, not from counters or metadata.

The promise (docs/reliability.md): every sector that entered the system is counted (in the scan's
counted HDF5 file) or on disk (in the scan's raw files). :func:`audit_scan` checks it for one scan against
the ground truth of what entered: the DAQ's knowledge, here the simulator, which regenerates every sector
it sent (seeded) and knows which it lost upstream.

* **On disk** means: a record of the raw files holds that sector, and its 165,888 bytes are exactly the
  sector that entered (the record header agreeing on scan, frame and position).
* **Counted** means: the counted file's events for the sector's frame are exactly stempy's
  ``electron_count_frame`` of that frame as it entered (sectors lost upstream zero, as stempy's reader
  fills them) at the thresholds and options the file records, and the file does not list the sector as
  missing. The file's own ``missing_sectors`` can only take sectors away, never vouch for one: a file that
  dropped a frame's events, or counted a frame without one of its sectors, does not count that frame. (A
  frame without any event in truth and in the file cannot tell a count from no count; it is taken as
  counted unless the file lists it missing.)

    entered = counted + on_disk + unaccounted    (unaccounted must be 0)
    n_frames x n_sectors = entered + lost_upstream

A sector both counted and on disk (a scan replayed to disk after a partial count) is reported on disk.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from stemstream.errors import StemstreamError
from stemstream.wire.protocol import N_SECTORS

logger = logging.getLogger(__name__)


class AuditError(StemstreamError):
    """A scan cannot be audited as asked (e.g. counted with a dark reference the audit was not given)."""


class GroundTruth(Protocol):
    """What entered, sector by sector (``stemstream.sim.FourDCameraSim`` is one)."""

    n_frames: int
    n_sectors: int
    scan_shape: tuple[int, int]

    def frame(self, i: int) -> np.ndarray: ...
    def sector(self, i: int, m: int) -> np.ndarray: ...
    def lost_sectors(self) -> set[tuple[int, int]]: ...


@dataclass
class ScanAudit:
    """The accounting of one scan, in sectors, and what the checks found."""

    scan_number: int
    n_frames: int
    n_sectors: int
    entered: int
    counted: int
    on_disk: int
    lost_upstream: int
    unaccounted: int
    examples: list[tuple[int, int]] = field(default_factory=list)  # a few unaccounted (frame, sector)
    frames_checked: int = 0  # frames of the counted file compared with stempy
    frames_differ: list[int] = field(default_factory=list)  # frames whose events are not stempy's (first 20)
    n_frames_differ: int = 0  # of which the file lists some sector missing (an incomplete frame): expected
    n_frames_wrong: int = 0  # ... and of which it lists none: a frame the file claims whole, counted wrong
    records_checked: int = 0  # raw-file records compared with what entered
    corrupt: int = 0  # records whose bytes or header are not what entered
    duplicates: int = 0  # records of a sector seen before
    partial_sectors: list[int] = field(default_factory=list)  # sectors whose raw-file sidecar says "writing"
    counted_start: str | None = None  # the acquisition the counted file names

    def line(self) -> str:
        checks = (
            f"{self.frames_checked} counted frames against stempy ({self.n_frames_differ} differ, "
            f"{self.n_frames_wrong} of them claimed whole), "
            f"{self.records_checked} raw records byte for byte ({self.corrupt} corrupt, {self.duplicates} twice)"
        )
        return (
            f"scan {self.scan_number}: {self.entered} sectors entered = {self.counted} counted + "
            f"{self.on_disk} on disk + {self.unaccounted} unaccounted; {self.lost_upstream} lost upstream; "
            f"checked {checks}"
        )

    @property
    def clean(self) -> bool:
        """Nothing unaccounted, nothing corrupt or doubled on disk, no frame claimed whole and counted wrong."""
        return self.unaccounted == 0 and self.corrupt == 0 and self.duplicates == 0 and self.n_frames_wrong == 0


def entered_mask(truth: GroundTruth) -> np.ndarray:
    """(n_frames, n_sectors) bool: the sectors the producers had (all but those lost upstream)."""
    entered = np.ones((int(truth.n_frames), int(getattr(truth, "n_sectors", N_SECTORS))), bool)
    for f, m in truth.lost_sectors():
        entered[f, m] = False
    return entered


def entered_from_sim(sim: Any) -> np.ndarray:
    """The sectors a simulated scan's producers had (kept for callers of the counters-only audit)."""
    return entered_mask(sim)


def _entered_frame(truth: GroundTruth, f: int, entered: np.ndarray) -> np.ndarray:
    """Frame ``f`` as it entered: sectors that never did are zero (stempy's reader and the NodeGroups fill
    them so)."""
    frame = np.array(truth.frame(f), dtype=np.uint16, copy=True)
    rows = frame.shape[0] // entered.shape[1]
    for m in np.flatnonzero(~entered[f]):
        frame[m * rows : (m + 1) * rows] = 0
    return frame


def stempy_events(
    frame: np.ndarray, thresholds: Any, dark: np.ndarray | None, gain: np.ndarray | None, row_dark: str = "none"
) -> np.ndarray:
    """stempy's own ``electron_count_frame`` of one frame: the reference every counted file is held to (with
    row-dark, which that function lacks, stempy's whole-scan counter, through the stempy engine)."""
    import stempy.image as simage

    if row_dark != "none":
        from stemstream.counting import get_engine

        return get_engine("stempy").count(frame[None], thresholds, dark=dark, gain=gain, row_dark=row_dark)[0]

    counted = simage.electron_count_frame(
        frame,
        darkreference=dark,
        background_threshold=thresholds.background,
        xray_threshold=thresholds.xray,
        gain=gain,
    )
    return np.asarray(counted.data[0, 0], dtype=np.uint32)


def disk_check(
    paths: Sequence[Path], truth: GroundTruth, scan_number: int, entered: np.ndarray
) -> tuple[np.ndarray, int, int, int]:
    """(on-disk mask, records checked, corrupt, duplicates): every record of ``paths`` against what entered."""
    from stemstream.wire.rawfile import read_sectors

    disk = np.zeros_like(entered)
    checked = corrupt = duplicates = 0
    paths = [Path(p) for p in paths if Path(p).stat().st_size > 0]
    if not paths:
        return disk, 0, 0, 0
    height, width = (int(x) for x in truth.scan_shape)
    for record in read_sectors(paths):
        checked += 1
        f, m = record.frame_number, record.sector
        good = (
            record.scan_number == scan_number & 0xFFFFFFFF
            and record.scan_shape == (height, width)
            and 0 <= f < entered.shape[0]
            and 0 <= m < entered.shape[1]
            and entered[f, m]
            and np.array_equal(record.data, truth.sector(f, m))
        )
        if not good:
            corrupt += 1
            logger.error("scan %d: raw record of frame %d sector %d is not what entered", scan_number, f, m)
        elif disk[f, m]:
            duplicates += 1
        else:
            disk[f, m] = True
    return disk, checked, corrupt, duplicates


def counted_check(
    path: Path,
    truth: GroundTruth,
    entered: np.ndarray,
    *,
    dark: np.ndarray | None = None,
    gain: np.ndarray | None = None,
) -> tuple[np.ndarray, list[int], int, str, int]:
    """(counted mask, frames whose events differ from stempy's, frames checked, the file's acquisition, frames
    that differ although the file lists none of their sectors missing)."""
    from stemstream.counting.output import read_counted

    sparse, meta = read_counted(path)
    n_frames, n_sectors = entered.shape
    counted = np.zeros_like(entered)
    options = meta.get("counting_options") or {}
    if options.get("dark_reference") and dark is None:
        raise AuditError(f"{path} was counted with a dark reference: give the audit the same dark")
    if options.get("gain") and gain is None:
        raise AuditError(f"{path} was counted with a gain: give the audit the same gain")
    row_dark = "none"
    if options.get("apply_row_dark_subtraction"):
        row_dark = "mean" if options.get("apply_row_dark_use_mean") else "median"
    thresholds = meta.get("thresholds")
    data = np.asarray(sparse.data)
    shape = tuple(int(x) for x in sparse.scan_shape)
    if thresholds is None or shape != tuple(truth.scan_shape) or data.size != n_frames:
        logger.error("%s: no thresholds, or not a %s scan of one frame per position", path, truth.scan_shape)
        return counted, list(range(n_frames)), 0, str(meta.get("start") or ""), 0
    events = data.reshape(-1)
    differ: list[int] = []
    checked = 0
    for f in range(n_frames):
        ours = np.asarray(events[f], dtype=np.uint32)
        if not entered[f].any():  # nothing of it entered: stempy has no frame, no events
            if ours.size:
                differ.append(f)
            continue
        checked += 1
        theirs = stempy_events(_entered_frame(truth, f, entered), thresholds, dark, gain, row_dark)
        if np.array_equal(np.sort(ours), np.sort(theirs)):
            counted[f] = entered[f]
        else:
            differ.append(f)
    missing = np.asarray(meta.get("missing_sectors", np.zeros((0, 2))), np.int64).reshape(-1, 2)
    inside = (missing[:, 0] >= 0) & (missing[:, 0] < n_frames) & (missing[:, 1] >= 0) & (missing[:, 1] < n_sectors)
    counted[missing[inside, 0], missing[inside, 1]] = False
    listed = set(missing[inside, 0].tolist())
    wrong = sum(1 for f in differ if f not in listed)
    return counted, differ, checked, str(meta.get("start") or ""), wrong


def audit_scan(
    scan_number: int,
    truth: GroundTruth,
    *,
    counted_file: Path | None = None,
    raw_files: Sequence[Path] = (),
    start: str | None = None,
    dark: np.ndarray | None = None,
    gain: np.ndarray | None = None,
) -> ScanAudit:
    """Account for every sector that entered scan ``scan_number`` (``truth``), from the counted file's events
    and the raw files' bytes. ``start``: the acquisition the counted file must name (a reused scan number's
    other acquisitions count nothing here)."""
    from stemstream.wire.rawfile import partial_sectors

    entered = entered_mask(truth)
    n_frames, n_sectors = entered.shape
    disk, records, corrupt, duplicates = disk_check(list(raw_files), truth, scan_number, entered)
    counted = np.zeros_like(entered)
    differ: list[int] = []
    checked = wrong = 0
    file_start = None
    if counted_file is not None and Path(counted_file).exists():
        counted, differ, checked, file_start, wrong = counted_check(
            Path(counted_file), truth, entered, dark=dark, gain=gain
        )
        if start is not None and file_start != start:
            logger.error("%s holds acquisition %r, not %r: nothing of this scan is counted there",
                         counted_file, file_start, start)  # fmt: skip
            counted[:] = False
    on_disk = entered & disk
    counted_only = entered & counted & ~disk
    missing = entered & ~counted & ~disk
    frames, sectors = np.nonzero(missing)
    return ScanAudit(
        scan_number=scan_number,
        n_frames=n_frames,
        n_sectors=n_sectors,
        entered=int(entered.sum()),
        counted=int(counted_only.sum()),
        on_disk=int(on_disk.sum()),
        lost_upstream=int((~entered).sum()),
        unaccounted=int(missing.sum()),
        examples=[(int(f), int(s)) for f, s in zip(frames[:10], sectors[:10], strict=True)],
        frames_checked=checked,
        frames_differ=differ[:20],
        n_frames_differ=len(differ),
        n_frames_wrong=wrong,
        records_checked=records,
        corrupt=corrupt,
        duplicates=duplicates,
        partial_sectors=partial_sectors(list(raw_files)),
        counted_start=file_start,
    )

"""Where every sector of a scan ended up, read from the files themselves, not from counters.

The promise (docs/reliability.md): every sector that entered the system is counted (in the scan's
counted HDF5 file, with that sector present) or on disk (in the scan's raw files). :func:`audit_scan`
checks it for one scan, given which sectors entered (the DAQ's knowledge; the simulator's ground truth
in tests and the soak benchmark):

    entered = counted + on_disk + unaccounted    (unaccounted must be 0)
    n_frames x n_sectors = entered + lost_upstream

A sector both counted and on disk (a scan replayed to disk after a partial count) is reported on disk.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from stemstream.wire.protocol import N_SECTORS

logger = logging.getLogger(__name__)


@dataclass
class ScanAudit:
    """The accounting of one scan, in sectors."""

    scan_number: int
    n_frames: int
    n_sectors: int
    entered: int
    counted: int
    on_disk: int
    lost_upstream: int
    unaccounted: int
    examples: list[tuple[int, int]] = field(default_factory=list)  # a few unaccounted (frame, sector)

    def line(self) -> str:
        return (
            f"scan {self.scan_number}: {self.entered} sectors entered = {self.counted} counted + "
            f"{self.on_disk} on disk + {self.unaccounted} unaccounted; {self.lost_upstream} lost upstream"
        )


def counted_mask(path: Path, n_frames: int, n_sectors: int = N_SECTORS) -> np.ndarray:
    """(n_frames, n_sectors) bool: the sectors a counted file says it counted (all but ``missing_sectors``)."""
    from stemstream.counting.output import read_counted

    sparse, meta = read_counted(path)
    frames = int(np.prod(sparse.scan_shape))
    mask = np.zeros((n_frames, n_sectors), bool)
    mask[: min(frames, n_frames)] = True
    missing = np.asarray(meta.get("missing_sectors", np.zeros((0, 2))), np.int64).reshape(-1, 2)
    inside = (missing[:, 0] < n_frames) & (missing[:, 1] < n_sectors)
    mask[missing[inside, 0], missing[inside, 1]] = False
    return mask


def disk_mask(paths: Sequence[Path], n_frames: int, n_sectors: int = N_SECTORS) -> np.ndarray:
    """(n_frames, n_sectors) bool: the sectors present in raw files (headers only are read)."""
    from stemstream.counting.files import index_raw_files

    mask = np.zeros((n_frames, n_sectors), bool)
    paths = [Path(p) for p in paths if Path(p).stat().st_size > 0]
    if not paths:
        return mask
    index = index_raw_files(paths)
    positions = min(index.n_frames, n_frames)
    mask[:positions] = True
    missing = index.missing[(index.missing[:, 0] < positions) & (index.missing[:, 1] < n_sectors)]
    mask[missing[:, 0], missing[:, 1]] = False
    return mask


def audit_scan(
    scan_number: int,
    entered: np.ndarray,
    *,
    counted_file: Path | None = None,
    raw_files: Sequence[Path] = (),
) -> ScanAudit:
    """Account for every sector of ``entered`` ((n_frames, n_sectors) bool: sectors the producers had)."""
    entered = np.asarray(entered, bool)
    n_frames, n_sectors = entered.shape
    counted = np.zeros_like(entered)
    if counted_file is not None and Path(counted_file).exists():
        counted = counted_mask(Path(counted_file), n_frames, n_sectors)
    disk = disk_mask(raw_files, n_frames, n_sectors)
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
    )


def entered_from_sim(sim: object) -> np.ndarray:
    """The sectors a simulated scan's producers had: all but the simulator's lost ones."""
    n_frames = int(sim.n_frames)  # type: ignore[attr-defined]
    n_sectors = int(getattr(sim, "n_sectors", N_SECTORS))
    entered = np.ones((n_frames, n_sectors), bool)
    for f, m in sim.lost_sectors():  # type: ignore[attr-defined]
        entered[f, m] = False
    return entered

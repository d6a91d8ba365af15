"""Count a scan from 4D Camera raw files (version 5) into a counted HDF5 file.

stempy reads the files (``stempy.io.reader(..., backend="multi-pass")``; the "thread" backend segfaults
in ``electron_count``) and assembles the frames; the engine (stempy's ``electron_count_frame`` for
``engine="stempy"``, or ours) counts them with thresholds from :func:`compute_thresholds` (stempy's
``calculate_thresholds``) on the sample that streaming takes too (:func:`sample_candidates`, seeded: not
stempy's unseeded draw). The thresholds used, the sample's frames and its stability figure are recorded,
and the output layout is :func:`write_counted`'s.

This module reads the 16-byte record headers itself (a strided memory map: 16 bytes per 166 kB record)
to learn which sectors are missing, which stempy does not report. Like all of ``stemstream.counting`` it
imports nothing above it (docs/architecture.md).
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from stemstream.counting.engines import CountingEngine, get_engine
from stemstream.counting.output import write_counted
from stemstream.counting.params import CountingParams
from stemstream.counting.thresholds import (
    Thresholds,
    choose_sample,
    halves_array,
    sample_candidates,
    sample_thresholds,
)
from stemstream.errors import CountingError
from stemstream.wire.rawfile import find_acquisitions, partial_sectors, read_sidecar, sector_of_path, sidecar_name

logger = logging.getLogger(__name__)

FRAME_SHAPE = (576, 576)
N_SECTORS = 4
_SECTOR_PIXELS = 144 * 576
_HEADER = np.dtype(
    [
        ("scan_number", "<u4"),
        ("frame_number", "<u4"),
        ("scan_width", "<u2"),
        ("scan_height", "<u2"),
        ("x", "<u2"),
        ("y", "<u2"),
    ]
)
_RECORD_BYTES = _HEADER.itemsize + 2 * _SECTOR_PIXELS
_MODULE_RE = re.compile(r".*module(\d+).*\.data")  # stempy's own pattern for the sector index
_BATCH = 64  # frames per engine call
_NAME_RE = re.compile(r"^data_scan(\d+)_module(\d+)_\d+\.data$")  # the receiving servers' names
_ACQUISITION_DIR_RE = re.compile(r"^scan_(\d+)_[A-Za-z0-9._-]+$")  # a reused number's acquisition
# More incomplete frames than this share is worth a warning, in the log and in the counted file.
MANY_INCOMPLETE = 0.01


@dataclass
class RawScanIndex:
    """What the record headers say: scan size, frames per position, and which sectors never arrived."""

    scan_shape: tuple[int, int]  # (rows, cols) = (scan_height, scan_width)
    scan_number: int
    frames_per_position: int
    n_records: int
    complete: np.ndarray  # (positions * frames_per_position,) bool, frame order
    frames_at: np.ndarray  # (positions,) frames present at each position (with at least one sector)
    missing: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), np.int64))  # (frame, sector) pairs

    @property
    def n_frames(self) -> int:
        return int(self.complete.size)


def index_raw_files(paths: Sequence[Path]) -> RawScanIndex:
    """Read every record header of ``paths`` and index the scan's frames and missing sectors."""
    records = []
    for path in paths:
        match = _MODULE_RE.match(path.name)
        if match is None:
            raise CountingError(f"{path}: not a 4D Camera raw file name (no 'module<N>' before '.data')")
        sector = int(match.group(1))
        if sector >= N_SECTORS:
            raise CountingError(f"{path}: module {sector} outside 0..{N_SECTORS - 1}")
        size = path.stat().st_size
        if size % _RECORD_BYTES:
            raise CountingError(f"{path}: {size} bytes is not a whole number of {_RECORD_BYTES}-byte records")
        if size == 0:
            continue
        raw = np.memmap(path, dtype=np.uint8, mode="r")
        headers = np.ndarray((size // _RECORD_BYTES,), dtype=_HEADER, buffer=raw, strides=(_RECORD_BYTES,))
        records.append((sector, np.array(headers)))  # copy: only the headers, then drop the map
        del raw
    if not records:
        raise CountingError("no records in the raw files")
    first = records[0][1][0]
    width, height = int(first["scan_width"]), int(first["scan_height"])
    scan_number = int(first["scan_number"])
    sectors = np.concatenate([np.full(h.size, s, np.int64) for s, h in records])
    headers = np.concatenate([h for _, h in records])
    if (headers["scan_width"] != width).any() or (headers["scan_height"] != height).any():
        sizes = sorted({(int(w), int(h)) for w, h in zip(headers["scan_width"], headers["scan_height"], strict=True)})
        shown = ", ".join(f"{h}x{w}" for w, h in sizes[:4])  # rows x cols, as scan_shape
        raise CountingError(
            f"the raw files mix scan sizes ({shown}): give one scan's files (or the directory and --scan N)"
        )
    if (headers["x"] >= width).any() or (headers["y"] >= height).any():
        raise CountingError(f"raw files hold positions outside the {width}x{height} scan")
    if (headers["scan_number"] != scan_number).any():
        numbers = ", ".join(str(n) for n in np.unique(headers["scan_number"]).tolist())
        raise CountingError(f"the raw files mix scans {numbers}: give one scan's files (or the directory and --scan N)")
    position = headers["y"].astype(np.int64) * width + headers["x"]
    # stempy keys a frame by (position, frame_number) and counts a position's frames in frame-number order.
    pairs = np.stack([position, headers["frame_number"].astype(np.int64)])
    keys, frame_id = np.unique(pairs, axis=1, return_inverse=True)
    frame_id = frame_id.ravel()
    per_position = np.bincount(keys[0], minlength=width * height)
    k = max(int(per_position.max()), 1)
    rank = np.arange(keys.shape[1]) - np.searchsorted(keys[0], keys[0])  # rank of each frame at its position
    slot_of_key = keys[0] * k + rank
    present = np.zeros((width * height * k, N_SECTORS), bool)
    present[slot_of_key[frame_id], sectors] = True
    complete = present.all(axis=1)
    frame, sector = np.nonzero(~present)
    return RawScanIndex(
        scan_shape=(height, width),
        scan_number=scan_number,
        frames_per_position=k,
        n_records=int(headers.size),
        complete=complete,
        frames_at=per_position,
        missing=np.stack([frame, sector], axis=1).astype(np.int64),
    )


def scans_in(directory: Path) -> list[int]:
    """The scan numbers of the raw files in ``directory`` (by their names) and of its acquisition directories."""
    found: set[int] = set()
    try:
        entries = list(Path(directory).iterdir())
    except OSError as exc:
        raise CountingError(f"cannot list {directory} ({exc.strerror or exc})") from None
    for entry in entries:
        match = _NAME_RE.match(entry.name) if entry.is_file() else _ACQUISITION_DIR_RE.match(entry.name)
        if match is not None:
            found.add(int(match.group(1)))
    return sorted(found)


def select_scan_files(directory: Path, scan_number: int, start: str | None = None) -> tuple[list[Path], str]:
    """The raw files of one acquisition of ``scan_number`` in ``directory`` (a fallback directory holds many
    scans): ``start``'s, or the newest. Refuses, in one line, a number or acquisition that is not there and a
    scan with a module (sector) none of whose files are there, naming it."""
    directory = Path(directory)
    found = find_acquisitions(directory, scan_number)
    if not found:
        present = ", ".join(str(n) for n in scans_in(directory)) or "none"
        raise CountingError(f"no raw files of scan {scan_number} in {directory} (scans there: {present})")
    chosen = [a for a in found if start is None or a.start == start]
    if not chosen:
        have = ", ".join(a.start or "(no id)" for a in found)
        raise CountingError(f"scan {scan_number}: no acquisition {start} in {directory} (there: {have})")
    acquisition = chosen[-1]
    if len(found) > 1:
        logger.warning("scan %d was acquired %d times in %s; counting acquisition %s (--start to choose)",
                       scan_number, len(found), directory, acquisition.start or "(no id)")  # fmt: skip
    modules = {sector_of_path(p) for p in acquisition.paths}
    missing = [m for m in range(N_SECTORS) if m not in modules]
    if missing:
        names = ", ".join(f"data_scan{scan_number:010d}_module{m}_*.data" for m in missing)
        raise CountingError(
            f"scan {scan_number}: no file of module {', '.join(map(str, missing))} in {acquisition.directory} "
            f"({names}); copy it there, or give the files to count explicitly"
        )
    return list(acquisition.paths), acquisition.start


def _as_paths(paths: Sequence[str | os.PathLike[str]] | str | os.PathLike[str]) -> list[Path]:
    if isinstance(paths, (str, os.PathLike)):
        candidate = Path(paths)
        found = sorted(candidate.glob("*.data")) if candidate.is_dir() else [candidate]
    else:
        found = [Path(p) for p in paths]
    if not found:
        raise CountingError(f"no raw files given ({paths!r})")
    for path in found:
        if not path.is_file():
            raise CountingError(f"raw file {path} does not exist")
    return found


def _frames_of(reader: Any, position: int) -> list[np.ndarray]:
    return [np.asarray(block.data).reshape(FRAME_SHAPE) for block in reader.read_frames(position)]


def _sample_frames(reader: Any, index: RawScanIndex, params: CountingParams) -> tuple[list[int], np.ndarray]:
    """The scan's threshold sample (the same frames as streaming takes: ``sample_candidates``), as
    (frame numbers in candidate order, the frames in frame-number order)."""
    samples = params.threshold_samples
    candidates = sample_candidates(index.n_frames, samples, params.threshold_window)
    chosen = choose_sample(candidates, lambda f: bool(index.complete[f]), samples)
    if not chosen:
        raise CountingError(
            f"no complete frame among the {candidates.size} sample candidates of the raw files: "
            "nothing to compute thresholds from"
        )
    k = index.frames_per_position
    return chosen, np.stack([_frames_of(reader, f // k)[f % k] for f in sorted(chosen)])


def _open_reader(paths: list[Path], threads: int | None) -> Any:
    import stempy.io as sio

    try:
        names = [str(p) for p in paths]
        return sio.reader(names, version=sio.FileVersion.VERSION5, backend="multi-pass", threads=threads or 0)
    except Exception as exc:
        raise CountingError(f"stempy cannot open the raw files: {exc}") from None


def _count_with_engine(
    reader: Any,
    index: RawScanIndex,
    engine: CountingEngine,
    thresholds: Thresholds,
    dark32: np.ndarray | None,
    gain32: np.ndarray | None,
    progress: bool,
    row_dark: str = "none",
) -> list[np.ndarray]:
    rows, cols = index.scan_shape
    k = index.frames_per_position
    n_positions = rows * cols
    events: list[np.ndarray] = [np.zeros(0, np.uint32)] * index.n_frames
    batch = np.empty((_BATCH, *FRAME_SHAPE), np.uint16)
    where: list[int] = []  # frame index of each batch slot

    def flush() -> None:
        if where:
            counted = engine.count(batch[: len(where)], thresholds, dark=dark32, gain=gain32, row_dark=row_dark)
            for f, e in zip(where, counted, strict=True):
                events[f] = e
            where.clear()

    bar = _progress_bar(n_positions, progress)
    for position in range(n_positions):
        if not index.frames_at[position]:
            continue  # no sector of this position arrived: no frame, empty events (as stempy gives)
        for j, frame in enumerate(_frames_of(reader, position)):
            batch[len(where)] = frame
            where.append(position * k + j)
            if len(where) == _BATCH:
                flush()
        if bar is not None:
            bar.update(1)
    flush()
    if bar is not None:
        bar.close()
    return events


def _progress_bar(total: int, enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="position", desc="counting")


def count_raw_files(
    paths: Sequence[str | os.PathLike[str]] | str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    scan_number: int,
    params: CountingParams | None = None,
    counter: CountingEngine | None = None,
    threads: int | None = None,
    progress: bool = False,
    start: str | None = None,
) -> Path:
    """Count the raw files of one scan (a list of files, or their directory) into ``output``; return it.

    ``params`` (default: the site's settings) say how: thresholds, engine, dark and gain references.
    The threshold sample is the first ``threshold_samples`` complete frames of :func:`sample_candidates`
    (spread over the first ``threshold_window`` frames, seeded), each used once by :func:`compute_thresholds`,
    for every engine. ``counter``: an engine already made, to reuse (its name replaces
    ``params.engine``). ``threads``: stempy reader threads (default: all cores) and cpu engine threads.

    ``start``: the acquisition the files hold (recorded in the file; default: what their sidecars say). Files
    whose sidecar says they were never finished (a writer that died, a disk that never took the rest) are
    counted as they are, with a warning and their sectors listed as ``partial_sectors``.
    """
    params = params or CountingParams()
    started = time.time()
    raw_paths = _as_paths(paths)
    index = index_raw_files(raw_paths)
    modules = {int(m.group(1)) for m in (_MODULE_RE.match(p.name) for p in raw_paths) if m is not None}
    if missing_modules := [m for m in range(N_SECTORS) if m not in modules]:
        # No frame can be complete, so there are no thresholds: say which file is absent, not that.
        names = ", ".join(f"data_scan{index.scan_number:010d}_module{m}_*.data" for m in missing_modules)
        raise CountingError(
            f"scan {scan_number}: no file of module {', '.join(map(str, missing_modules))} among the raw files "
            f"({names}); every frame lacks its sectors"
        )
    partial = partial_sectors(raw_paths)
    if partial:
        logger.warning(
            "scan %d: the raw files of sector(s) %s were never finished (partial scan)", scan_number, partial
        )
    if start is None:
        sides = [read_sidecar(p.parent / sidecar_name(index.scan_number, sector_of_path(p))) for p in raw_paths]
        starts = {str(x.get("start") or "") for x in sides if x is not None}
        start = starts.pop() if len(starts) == 1 else ""
    if index.scan_number != scan_number:
        logger.warning("raw files say scan %d, counting it as scan %d", index.scan_number, scan_number)
    dark, gain = params.load_dark(), params.load_gain()
    background_n_sigma, xray_n_sigma = params.background_n_sigma, params.xray_n_sigma
    # float32 before anything else: stempy's wrapper and our engines then invert the same gain values.
    dark32 = None if dark is None else np.asarray(dark, dtype=np.float32)
    gain32 = None if gain is None else np.asarray(gain, dtype=np.float32)
    reader = _open_reader(raw_paths, threads)
    # One sample for every engine, stempy's too (not its electron_count's unseeded draw): the frames streaming
    # would take, so that the same scan gives the same thresholds and events either way (docs/counting.md).
    chosen, sample = _sample_frames(reader, index, params)
    thresholds, halves = sample_thresholds(
        sample, chosen, dark=dark32, gain=gain32, background_n_sigma=background_n_sigma, xray_n_sigma=xray_n_sigma
    )
    first_frame = time.time()
    counter = counter or get_engine(params.engine, threads=threads)
    engine_name = counter.name
    events = _count_with_engine(reader, index, counter, thresholds, dark32, gain32, progress, params.row_dark)
    last_frame = time.time()
    incomplete = int((~index.complete).sum())
    warnings = []
    if incomplete > MANY_INCOMPLETE * index.n_frames:
        warnings.append(
            f"{incomplete} of {index.n_frames} frames ({100 * incomplete / index.n_frames:.1f}%) are incomplete: "
            "their missing sectors count as zeros (missing_sectors lists them)"
        )
        logger.warning("scan %d: %s", scan_number, warnings[-1])
    metadata: dict[str, Any] = {
        "engine": engine_name,
        "source": "raw_files",
        "scan_number": int(scan_number),
        "start": start,
        "raw_scan_number": index.scan_number,
        "partial_sectors": partial,
        "raw_files": [p.name for p in raw_paths],
        "thresholds": thresholds,
        "background_n_sigma": background_n_sigma,
        "xray_n_sigma": xray_n_sigma,
        "threshold_sample_frames": chosen,
        "threshold_halves": halves_array(halves),
        "row_dark": params.row_dark,
        **params.dark_record(),
        "warnings": warnings,
        "frames_incomplete": incomplete,
        "missing_sectors": index.missing,
        "messages": {"sectors_received": index.n_records, "sectors_expected": index.n_frames * N_SECTORS},
        "timings": {"started": started, "first_frame": first_frame, "last_frame": last_frame},
    }
    path = write_counted(output, events, scan_shape=index.scan_shape, metadata=metadata)
    rate = index.n_frames / max(last_frame - first_frame, 1e-9)
    logger.info(
        "scan %d: %d frames counted by %s at %.0f frames/s -> %s",
        scan_number,
        index.n_frames,
        engine_name,
        rate,
        path,
    )
    return path

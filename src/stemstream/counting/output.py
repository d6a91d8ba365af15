"""The counted-data file: stempy's electron-counts HDF5 layout plus our metadata in ``/stemstream``.

Written with ``stempy.io.save_electron_counts`` so ``stempy.io.load_electron_counts`` opens it, always
through a temporary file renamed into place, so a reader never sees half a file. Layout in
docs/counting.md.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from stemstream.counting.thresholds import Thresholds
from stemstream.errors import CountingError

logger = logging.getLogger(__name__)

GROUP = "stemstream"
FORMAT_VERSION = 1
FRAME_SHAPE = (576, 576)

__all__ = [
    "counted_path",
    "counted_path_for",
    "counted_start",
    "read_counted",
    "save_png",
    "virtual_bright_field",
    "write_counted",
]


def counted_path(output_dir: str | os.PathLike[str], scan_number: int, start: str | None = None) -> Path:
    """Where a scan's counted file goes: ``<output_dir>/scan_<n>_counted.h5``; with ``start`` (an acquisition
    of a reused scan number), ``<output_dir>/scan_<n>_<start>_counted.h5``."""
    if start:
        return Path(output_dir) / f"scan_{scan_number}_{start}_counted.h5"
    return Path(output_dir) / f"scan_{scan_number}_counted.h5"


def counted_start(path: str | os.PathLike[str]) -> str | None:
    """The acquisition a counted file holds (its ``/stemstream`` ``start``; "" when it names none), None when
    there is no readable counted file there."""
    try:
        with h5py.File(path, "r") as f:
            group = f.get(GROUP)
            return str(_to_python(group.attrs.get("start", ""))) if group is not None else ""
    except (OSError, KeyError):
        return None


def counted_path_for(output_dir: str | os.PathLike[str], scan_number: int, start: str) -> Path:
    """The counted file of acquisition ``start`` of a scan number: ``scan_<n>_counted.h5`` unless a file of
    another acquisition of the number is there (the number was reused), then ``scan_<n>_<start>_counted.h5``."""
    plain = counted_path(output_dir, scan_number)
    held = counted_start(plain)
    if held is None or held == start or not start:
        return plain
    return counted_path(output_dir, scan_number, start)


def _frames_array(events: Sequence[np.ndarray], n_positions: int, n_pixels: int) -> np.ndarray:
    """Per-frame events as stempy's (positions, frames per position) object array of uint32 arrays."""
    n = len(events)
    if n == 0 or n % n_positions:
        raise CountingError(f"{n} frames of events do not fill a scan of {n_positions} positions")
    data = np.empty(n, dtype=object)
    for i, frame_events in enumerate(events):
        arr = np.asarray(frame_events)
        if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
            raise CountingError(f"events of frame {i}: need a 1-D integer array, got {arr.dtype} {arr.shape}")
        data[i] = arr.astype(np.uint32, copy=False)
    sizes = np.fromiter((a.size for a in data), np.int64, count=n)
    if sizes.sum():
        every = np.concatenate(list(data))
        low, high = int(every.min()), int(every.max())
        if low < 0 or high >= n_pixels:
            raise CountingError(f"event index outside the frame: {low}..{high} (frame has {n_pixels} pixels)")
    return data.reshape(n_positions, n // n_positions)


def _all_same_length(data: np.ndarray) -> bool:
    sizes = {a.size for a in data.ravel()}
    return len(sizes) == 1


def _save_sparse(path: Path, sparse: Any) -> None:
    """``stempy.io.save_electron_counts``, finishing its job when every frame has the same number of events.

    stempy writes the frames with ``dataset[...] = object_array``; when all arrays have one length, h5py
    turns that into a 2-D array and fails ("Can't broadcast (n, k) -> (n,)"), after stempy has written
    everything but the frames and its /metadata group. We then write those two ourselves, as stempy would.
    """
    import stempy.io as sio
    from stempy.io.sparse_array import save_dict_to_h5

    try:
        sio.save_electron_counts(str(path), sparse)
        return
    except TypeError:
        if not _all_same_length(sparse.data):
            raise
    with h5py.File(path, "a") as f:
        frames = f["electron_events/frames"]
        flat = np.empty(sparse.data.size, dtype=object)
        flat[:] = list(sparse.data.ravel())
        # The low-level write takes the object array as it is: no shape guessing.
        frames.id.write(h5py.h5s.ALL, h5py.h5s.ALL, flat, mtype=h5py.h5t.py_create(frames.dtype))
        save_dict_to_h5(sparse.metadata, f.require_group("metadata"))


def _stempy_metadata(thresholds: Thresholds | None) -> dict[str, Any]:
    """The ``electron_counting`` block stempy's own electron_count stores, for stempy users."""
    if thresholds is None:
        return {}
    return {
        "electron_counting": {
            "threshold_calculated": True,
            "background_threshold": thresholds.background,
            "x_ray_threshold": thresholds.xray,
            "number_of_samples": thresholds.n_samples,
            "background_threshold_n_sigma": thresholds.n_sigma_background,
            "x_ray_threshold_n_sigma": thresholds.n_sigma_xray,
            "optimized_mean": thresholds.mean,
            "optimized_std_dev": thresholds.std_dev,
        }
    }


def _is_numeric_sequence(value: Any) -> bool:
    if isinstance(value, np.ndarray):
        return True
    if isinstance(value, (list, tuple)) and value:
        return all(isinstance(v, (int, float, np.number, list, tuple, np.ndarray)) for v in value)
    return False


def _write_mapping(group: h5py.Group, data: Mapping[str, Any]) -> None:
    """Nested dicts become groups, arrays and numeric lists datasets, scalars and strings attributes."""
    for key, value in data.items():
        if value is None:
            continue
        if isinstance(value, Thresholds):
            value = value.to_dict()
        if isinstance(value, Mapping):
            _write_mapping(group.require_group(key), value)
        elif isinstance(value, (str, bool, int, float, np.number, np.bool_)):
            group.attrs[key] = value
        elif _is_numeric_sequence(value):
            group.create_dataset(key, data=np.asarray(value))
        elif isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            group.attrs[key] = list(value)
        else:
            raise CountingError(f"metadata {key!r}: cannot store a {type(value).__name__} in HDF5")


def _missing_sectors(metadata: Mapping[str, Any]) -> np.ndarray:
    raw = metadata.get("missing_sectors")
    pairs = np.zeros((0, 2), np.int64) if raw is None or len(raw) == 0 else np.asarray(raw, dtype=np.int64)
    if pairs.ndim != 2 or pairs.shape[1] != 2:
        raise CountingError(f"metadata missing_sectors: need (frame, sector) pairs, got shape {pairs.shape}")
    return pairs


def write_counted(
    path: str | os.PathLike[str],
    events: Sequence[np.ndarray],
    *,
    scan_shape: tuple[int, int],
    frame_shape: tuple[int, int] = FRAME_SHAPE,
    metadata: Mapping[str, Any] | None = None,
    extra: Callable[[h5py.File], None] | None = None,
) -> Path:
    """Write per-frame events (frame order, position-major) as a stempy electron-counts file; return its path.

    ``metadata`` goes to ``/stemstream`` (see docs/counting.md). Keys with a meaning: ``thresholds``
    (:class:`Thresholds` or its dict), ``engine``, ``scan_number``, ``frames_incomplete``,
    ``missing_sectors`` ((frame, sector) pairs, always written, (0, 2) when none), ``messages`` (counts),
    ``timings`` (unix seconds; ``file_written`` is added here). Any other key is stored as it is.
    ``extra(f)`` may add groups of its own to the open file before it is renamed into place (the analyses'
    ``/analyses``, docs/analyses.md).
    """
    import stempy.io as sio

    path = Path(path)
    rows, cols = (int(x) for x in scan_shape)
    frame_rows, frame_cols = (int(x) for x in frame_shape)
    if rows < 1 or cols < 1 or frame_rows < 1 or frame_cols < 1:
        raise CountingError(f"bad shapes: scan {scan_shape}, frame {frame_shape}")
    meta = dict(metadata or {})
    thresholds = meta.get("thresholds")
    if isinstance(thresholds, Mapping):
        thresholds = Thresholds.from_dict(thresholds)
    if thresholds is not None and not isinstance(thresholds, Thresholds):
        kind = type(thresholds).__name__
        raise CountingError(f"metadata thresholds: expected Thresholds or a dict, got {kind}")
    data = _frames_array(events, rows * cols, frame_rows * frame_cols)
    missing = _missing_sectors(meta)
    meta["missing_sectors"] = missing
    meta.setdefault("frames_incomplete", int(np.unique(missing[:, 0]).size))
    meta["thresholds"] = thresholds
    meta["timings"] = {**dict(meta.get("timings") or {}), "file_written": time.time()}

    sparse = sio.SparseArray(
        data,
        scan_shape=(rows, cols),
        frame_shape=(frame_rows, frame_cols),
        metadata=_stempy_metadata(thresholds),
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        _save_sparse(tmp, sparse)
        with h5py.File(tmp, "a") as f:
            group = f.require_group(GROUP)
            group.attrs["format_version"] = FORMAT_VERSION
            group.attrs["scan_shape"] = (rows, cols)
            group.attrs["frame_shape"] = (frame_rows, frame_cols)
            group.attrs["n_frames"] = int(data.size)
            _write_mapping(group, meta)
            if extra is not None:
                extra(f)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)  # the data must be on disk before the name points at it
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    logger.info("wrote %s: %d frames, scan %dx%d", path, data.size, rows, cols)
    return path


def _to_python(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist() if value.ndim <= 1 and value.dtype.kind in "iufbUSO" else value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, bytes):
        return value.decode()
    return value


def _read_group(group: h5py.Group) -> dict[str, Any]:
    out: dict[str, Any] = {k: _to_python(v) for k, v in group.attrs.items()}
    for key, item in group.items():
        out[key] = _read_group(item) if isinstance(item, h5py.Group) else item[()]
    return out


def read_counted(path: str | os.PathLike[str]) -> tuple[Any, dict[str, Any]]:
    """Open a counted file: ``(stempy SparseArray, /stemstream metadata as a dict)``.

    ``thresholds`` comes back as a :class:`Thresholds`, ``missing_sectors`` as an (n, 2) int64 array.
    """
    import stempy.io as sio

    path = Path(path)
    try:
        sparse = sio.load_electron_counts(str(path))
        with h5py.File(path, "r") as f:
            meta = _read_group(f[GROUP]) if GROUP in f else {}
    except (OSError, KeyError) as exc:
        raise CountingError(f"{path}: not a readable counted file ({exc})") from None
    if isinstance(meta.get("thresholds"), dict):
        meta["thresholds"] = Thresholds.from_dict(meta["thresholds"])
    if "missing_sectors" in meta:
        meta["missing_sectors"] = np.asarray(meta["missing_sectors"], dtype=np.int64).reshape(-1, 2)
    return sparse, meta


def virtual_bright_field(
    sparse: Any,
    radius: float = 60.0,
    *,
    center: tuple[float, float] | None = None,
) -> np.ndarray:
    """Events within ``radius`` pixels of ``center`` (default: the frame centre) per probe position.

    Returns a float64 image of ``sparse.scan_shape``; frames at the same position are summed.
    """
    frame_rows, frame_cols = (int(x) for x in sparse.frame_shape[-2:])
    cy, cx = center if center is not None else ((frame_rows - 1) / 2, (frame_cols - 1) / 2)
    yy, xx = np.mgrid[0:frame_rows, 0:frame_cols]
    inside = ((yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2).ravel()
    data = np.asarray(sparse.data)
    flat = data.ravel()
    lengths = np.fromiter((len(a) for a in flat), np.int64, count=flat.size)
    per_frame = np.zeros(flat.size, np.int64)
    if lengths.sum():
        every = np.concatenate([np.asarray(a, dtype=np.int64) for a in flat])
        frame_of = np.repeat(np.arange(flat.size), lengths)
        per_frame = np.bincount(frame_of[inside[every]], minlength=flat.size)
    per_position = per_frame.reshape(data.shape[0], -1).sum(axis=1)
    return per_position.reshape(tuple(int(x) for x in sparse.scan_shape)).astype(np.float64)


def save_png(image: np.ndarray, path: str | os.PathLike[str], title: str = "") -> Path:
    """Save a 2-D image as a PNG with a colour bar (matplotlib's Agg canvas: no display, no pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    fig = Figure(figsize=(5, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    shown = ax.imshow(np.asarray(image), cmap="gray", interpolation="nearest")
    fig.colorbar(shown, ax=ax)
    if title:
        ax.set_title(title)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path

"""Analysis results in the scan's counted HDF5 file, and as PNGs beside it.

Layout (docs/analyses.md), a group stempy's loader never reads (it opens ``electron_events`` and
``metadata`` only)::

    /analyses                     attrs: format_version, settings_history (JSON list, live scans)
    /analyses/<name>              attrs: params (canonical JSON), how (merged | recomputed | offline),
                                         computed_at (unix s), error (when it failed)
    /analyses/<name>/<result>     one dataset per result (e.g. /analyses/virtual/bf, /analyses/com/com)

PNGs: ``<dir>/<name>.<result>.png`` for every 2-D result (``com`` as ``com.com_col`` and ``com.com_row``),
``<dir>`` being ``scan_<n>_analyses/`` beside ``scan_<n>_counted.h5``.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from stemstream.analyses import png
from stemstream.analyses.base import ScanGeometry
from stemstream.analyses.runner import Outcome, analyse_events, canonical, specs_for
from stemstream.errors import AnalysisError, CountingError

logger = logging.getLogger(__name__)

GROUP = "analyses"
FORMAT_VERSION = 1
_COMPRESS_ABOVE = 4096  # elements: larger results are stored gzip-compressed (level 1)


def write_results(
    f: h5py.File, outcomes: Mapping[str, Outcome], *, history: Sequence[Mapping[str, Any]] | None = None
) -> None:
    """Write ``outcomes`` into ``/analyses`` of an open file (replacing those analyses' groups)."""
    group = f.require_group(GROUP)
    group.attrs["format_version"] = FORMAT_VERSION
    if history is not None:
        group.attrs["settings_history"] = json.dumps(list(history))
    now = time.time()
    for name, outcome in outcomes.items():
        if name in group:
            del group[name]
        sub = group.create_group(name)
        sub.attrs["params"] = canonical(outcome.params)
        sub.attrs["how"] = outcome.how
        sub.attrs["computed_at"] = now
        if outcome.error:
            sub.attrs["error"] = outcome.error
        for key, value in outcome.results.items():
            value = np.asarray(value)
            big = value.size > _COMPRESS_ABOVE
            options: dict[str, Any] = {"compression": "gzip", "compression_opts": 1} if big else {}
            sub.create_dataset(key, data=value, **options)


def read_results(path: str | os.PathLike[str]) -> tuple[dict[str, Outcome], list[dict[str, Any]]]:
    """The analyses stored in a counted file, and its settings history (both empty when none)."""
    try:
        with h5py.File(path, "r") as f:
            if GROUP not in f:
                return {}, []
            group = f[GROUP]
            history = json.loads(group.attrs.get("settings_history", "[]"))
            out = {}
            for name, sub in group.items():
                out[name] = Outcome(
                    name,
                    json.loads(sub.attrs.get("params", "{}")),
                    {k: v[()] for k, v in sub.items()},
                    error=sub.attrs.get("error"),
                    how=str(sub.attrs.get("how", "")),
                )
            return out, history
    except OSError as exc:
        raise AnalysisError(f"{path}: cannot read its analyses ({exc})") from None


def images(outcome: Outcome) -> Iterator[tuple[str, np.ndarray]]:
    """The 2-D images of an outcome by result name (``com`` split into its column and row parts)."""
    for key, value in outcome.results.items():
        if value.ndim == 2 and min(value.shape) > 0:
            yield key, value
        elif key == "com" and value.ndim == 3 and value.shape[0] == 2:
            yield "com_col", value[0]
            yield "com_row", value[1]


def png_dir(path: str | os.PathLike[str]) -> Path:
    """Where a counted file's PNGs go: ``scan_<n>_analyses/`` beside ``scan_<n>_counted.h5``."""
    path = Path(path)
    stem = path.name.removesuffix(".h5").removesuffix("_counted")
    return path.with_name(f"{stem}_analyses")


def save_pngs(outcomes: Mapping[str, Outcome], directory: str | os.PathLike[str]) -> list[Path]:
    """Every 2-D result as ``<directory>/<analysis>.<result>.png``; their paths."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, outcome in outcomes.items():
        for key, image in images(outcome):
            cmap, log = png.style(key)
            target = directory / f"{name}.{key}.png"
            target.write_bytes(png.image_png(image, cmap, log=log))
            written.append(target)
    return written


def load_events(path: str | os.PathLike[str]) -> tuple[list[np.ndarray], ScanGeometry]:
    """Every probe position's events of a counted file (frames at one position joined), and its shape."""
    from stemstream.counting import read_counted

    try:
        sparse, _meta = read_counted(path)
    except CountingError as exc:
        raise AnalysisError(str(exc)) from None
    data = np.asarray(sparse.data)
    data = data.reshape(data.shape[0], -1)
    events = [
        np.asarray(row[0], np.uint32) if row.size == 1 else np.concatenate([np.asarray(a, np.uint32) for a in row])
        for row in data
    ]
    scan = ScanGeometry(
        tuple(int(x) for x in sparse.scan_shape),  # type: ignore[arg-type]
        tuple(int(x) for x in sparse.frame_shape[-2:]),  # type: ignore[arg-type]
    )
    return events, scan


def analyse_file(
    path: str | os.PathLike[str],
    names: Sequence[str],
    params: Mapping[str, Mapping[str, Any]] | None = None,
    *,
    write: bool = True,
    pngs: str | os.PathLike[str] | bool | None = True,
) -> tuple[dict[str, Outcome], list[Path]]:
    """Run analyses over a counted file's events (the offline path): their outcomes, written into the file's
    ``/analyses`` group when ``write``, and the PNGs written (to ``pngs``, or :func:`png_dir` when True)."""
    events, scan = load_events(path)
    outcomes = analyse_events(specs_for(names, params), events, scan)
    if write:
        with h5py.File(path, "a") as f:
            write_results(f, outcomes)
    written: list[Path] = []
    if pngs:
        written = save_pngs(outcomes, png_dir(path) if pngs is True else Path(pngs))
    return outcomes, written

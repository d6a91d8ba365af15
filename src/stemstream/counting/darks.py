"""Dark references: made from a dark scan's raw files (``stemstream dark``), found, and checked.

A dark reference is a ``.npy`` of one float32 frame, the per-pixel mean of a scan taken with the beam
blanked: stempy's ``calculate_average`` over the scan's raw files. Every dark a count uses lies under the
site's dark directory (``STEMSTREAM_DARK_DIR``): a relative path is taken from there, a path that leads
out of it (``..``, a symbolic link, an absolute path elsewhere) is refused, and ``latest`` names the
newest dark that ``stemstream dark`` wrote there (it leaves a ``<name>.json`` beside each, with where
the dark came from). The counted file records which dark was used: its path and its SHA-256.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from stemstream.errors import CountingError
from stemstream.wire.paths import UnsafePath, under_roots
from stemstream.wire.rawfile import read_sidecar

logger = logging.getLogger(__name__)

LATEST = "latest"
SIDECAR_FORMAT = "stemstream-dark"


def resolve_dark(value: Path | str, dark_dir: Path) -> Path:
    """The dark reference ``value`` names: a path under ``dark_dir`` (relative ones are taken from it), or
    the newest dark there for "latest". A path outside ``dark_dir`` is a one-line CountingError."""
    if str(value) == LATEST:
        return latest_dark(Path(dark_dir).resolve())
    try:
        return under_roots(value, [dark_dir], "dark reference")
    except UnsafePath:
        raise CountingError(
            f"dark reference {str(value)[:200]} is outside the dark directory {Path(dark_dir).resolve()}: put it "
            "there (stemstream dark ... -o NAME.npy) or set STEMSTREAM_DARK_DIR"
        ) from None


def latest_dark(dark_dir: Path) -> Path:
    """The newest dark ``stemstream dark`` wrote in ``dark_dir`` (by the time in its sidecar)."""
    found: list[tuple[float, str, Path]] = []
    for side in Path(dark_dir).glob("*.json"):
        info = read_sidecar(side, SIDECAR_FORMAT)
        npy = side.with_suffix(".npy")
        if info is not None and npy.is_file():
            found.append((float(info.get("made_at", 0.0)), npy.name, npy))
    if not found:
        raise CountingError(
            f"no dark made by `stemstream dark` in {dark_dir}: make one (stemstream dark RAWDIR --scan N) "
            "or give the dark's path"
        )
    return max(found)[2]


def file_sha256(path: Path) -> str:
    """The SHA-256 of the file's bytes, as recorded in counted files (``dark_sha256``)."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    except OSError as exc:
        raise CountingError(f"cannot read the dark reference {path} ({exc.strerror or exc})") from None
    return digest.hexdigest()


def average_raw_files(paths: Sequence[Path]) -> np.ndarray:
    """stempy's ``calculate_average`` of the frames in ``paths`` (raw 4D Camera files), as float32."""
    import stempy.image as simage
    import stempy.io as sio

    try:
        reader = sio.reader([str(p) for p in paths], version=sio.FileVersion.VERSION5)
        average = np.asarray(simage.calculate_average(reader), dtype=np.float64)
    except Exception as exc:  # stempy raises its own types (and RuntimeError) for unreadable files
        raise CountingError(f"stempy cannot average the raw files: {exc}") from None
    # stempy averages in double; counting uses the dark as float32 (its wrapper refuses a lossy cast later).
    return average.astype(np.float32)


def write_dark(dark: np.ndarray, output: Path, source: dict[str, Any]) -> Path:
    """Write ``dark`` to ``output`` (.npy) and its sidecar ``<output>.json`` (``source``: where it came from),
    each atomically (a reader never sees half a dark)."""
    output = Path(output)
    if output.suffix != ".npy":
        raise CountingError(f"{output}: a dark reference is written as .npy")
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        tmp = output.with_name(f".{output.name}.tmp")
        with open(tmp, "wb") as f:
            np.save(f, np.ascontiguousarray(dark, dtype=np.float32), allow_pickle=False)
        os.replace(tmp, output)
        info = {"format": SIDECAR_FORMAT, "made_at": time.time(), "sha256": file_sha256(output), **source}
        side = output.with_suffix(".json")
        tmp = side.with_name(f".{side.name}.tmp")
        tmp.write_text(json.dumps(info, indent=1))
        os.replace(tmp, side)
    except OSError as exc:
        raise CountingError(f"cannot write the dark reference {output} ({exc.strerror or exc})") from None
    logger.info("dark reference %s (%s)", output, info["sha256"][:12])
    return output

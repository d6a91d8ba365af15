"""Images as small palette PNGs, fast: one byte per pixel through a colour map, zlib, no plotting library on
the hot path (a 576 x 576 pattern encodes in a few milliseconds). Used for the result PNGs beside a scan's
file and for every image the live view pushes."""

from __future__ import annotations

import struct
import zlib
from functools import cache

import numpy as np

_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@cache
def palette(cmap: str) -> bytes:
    """256 RGB entries: black for index 0 (no value), then 255 of a matplotlib colour map (``gray``,
    ``magma``, ``viridis``, ``twilight`` ...)."""
    if cmap == "gray":
        rgb = np.linspace(0, 1, 255)[:, None].repeat(3, axis=1)
    else:
        from matplotlib import colormaps

        rgb = colormaps[cmap](np.linspace(0, 1, 255))[:, :3]
    return bytes(3) + bytes(np.round(rgb * 255).astype(np.uint8).ravel())


def to_bytes(image: np.ndarray, *, log: bool = False) -> np.ndarray:
    """A 2-D array as colour-map indices: 1..255 between its finite minimum and maximum, 0 for values that
    are not finite (frames not counted yet, frames without events: drawn black); ``log`` scales ``log1p`` of
    the values (diffraction patterns). In float32: a 576 x 576 pattern takes a few milliseconds."""
    values = np.asarray(image, dtype=np.float32)
    if log:
        values = np.log1p(np.maximum(values, 0))
    finite = np.isfinite(values)
    every = bool(finite.all())
    if not every and not finite.any():
        return np.zeros(values.shape, np.uint8)
    shown = values if every else values[finite]
    low, high = float(shown.min()), float(shown.max())
    if not high > low:
        return np.where(finite, 128, 0).astype(np.uint8)
    scaled = values - np.float32(low)
    scaled *= np.float32(254.0 / (high - low))
    scaled += np.float32(1.0)
    if not every:
        scaled[~finite] = 0
    np.clip(scaled, 0, 255, out=scaled)
    return scaled.astype(np.uint8)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def encode(indices: np.ndarray, cmap: str = "gray", level: int = 1) -> bytes:
    """A palette PNG of a 2-D uint8 array of colour-map indices."""
    indices = np.ascontiguousarray(indices, dtype=np.uint8)
    if indices.ndim != 2 or 0 in indices.shape:
        raise ValueError(f"need a non-empty 2-D image, got shape {indices.shape}")
    rows, cols = indices.shape
    raw = np.zeros((rows, cols + 1), np.uint8)  # filter byte 0 (none) before each row
    raw[:, 1:] = indices
    header = struct.pack(">IIBBBBB", cols, rows, 8, 3, 0, 0, 0)
    return b"".join(
        (
            _SIGNATURE,
            _chunk(b"IHDR", header),
            _chunk(b"PLTE", palette(cmap)),
            _chunk(b"IDAT", zlib.compress(raw.tobytes(), level)),
            _chunk(b"IEND", b""),
        )
    )


def image_png(image: np.ndarray, cmap: str = "gray", *, log: bool = False) -> bytes:
    """Scale and encode a 2-D array (:func:`to_bytes`, :func:`encode`)."""
    return encode(to_bytes(image, log=log), cmap)


def style(name: str) -> tuple[str, bool]:
    """How a result is drawn, by its name: (colour map, log scale)."""
    if name in ("pattern",):
        return "magma", True
    if name.endswith("angle"):
        return "twilight", False
    if name.startswith("com") or name.startswith("dpc"):
        return "viridis", False
    return "gray", False

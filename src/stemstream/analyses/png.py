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
    """256 RGB entries of a matplotlib colour map (``gray``, ``magma``, ``viridis``, ``twilight`` ...)."""
    if cmap == "gray":
        return bytes(np.repeat(np.arange(256, dtype=np.uint8), 3))
    from matplotlib import colormaps

    rgb = colormaps[cmap](np.linspace(0, 1, 256))[:, :3]
    return bytes(np.round(rgb * 255).astype(np.uint8).ravel())


def to_bytes(image: np.ndarray, *, log: bool = False, lo: float | None = None, hi: float | None = None) -> np.ndarray:
    """A 2-D array scaled to 0..255 (uint8) between its finite minimum and maximum (or ``lo``, ``hi``);
    ``log`` scales ``log1p`` of the values (diffraction patterns). Non-finite values are 0."""
    values = np.asarray(image, dtype=np.float64)
    if log:
        values = np.log1p(np.maximum(values, 0))
    finite = np.isfinite(values)
    if not finite.any():
        return np.zeros(values.shape, np.uint8)
    low = float(values[finite].min()) if lo is None else (np.log1p(lo) if log else lo)
    high = float(values[finite].max()) if hi is None else (np.log1p(hi) if log else hi)
    if not high > low:
        return np.where(finite, 128, 0).astype(np.uint8)
    scaled = (np.where(finite, values, low) - low) * (255.0 / (high - low))
    return np.clip(scaled, 0, 255).astype(np.uint8)


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

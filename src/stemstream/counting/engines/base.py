"""What every counting engine shares: the Protocol, batch validation, and dark/gain preparation."""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Protocol, get_args, runtime_checkable

import numpy as np

from stemstream.config import RowDark
from stemstream.counting.thresholds import Thresholds, dark_as_uint16, prepare_dark, prepare_gain
from stemstream.errors import CountingError

# Row-dark correction, as stempy's whole-scan ``electron_count(..., apply_row_dark=True,
# apply_row_dark_use_mean=...)`` offers it: none, or each half-row scaled by optimized_mean / its mean or median.
ROW_DARK_MODES: tuple[str, ...] = get_args(RowDark)


@runtime_checkable
class CountingEngine(Protocol):
    """Turns a batch of raw frames into electron events, exactly as stempy's ``electron_count_frame``."""

    name: str

    def count(
        self,
        frames: np.ndarray,
        thresholds: Thresholds,
        *,
        dark: np.ndarray | None = None,
        gain: np.ndarray | None = None,
        row_dark: RowDark = "none",
    ) -> list[np.ndarray]:
        """frames: (B, rows, cols) uint16 C-contiguous batch (read-only for the engine); returns one uint32
        array of flat event indices (row * cols + col, ascending, as stempy gives) per frame. ``row_dark``
        "mean"/"median": stempy's row-dark correction with ``thresholds.mean`` as its optimized mean."""
        ...


def as_batch(frames: np.ndarray) -> np.ndarray:
    """Validate a batch and return it C-contiguous (no copy when it already is)."""
    if not isinstance(frames, np.ndarray):
        raise CountingError(f"frames must be a numpy array, got {type(frames).__name__}")
    if frames.ndim != 3 or frames.shape[1] == 0 or frames.shape[2] == 0:
        raise CountingError(f"frames must have shape (batch, rows, cols), got {frames.shape}")
    if frames.dtype != np.uint16:
        raise CountingError(f"frames must be uint16, got {frames.dtype}")
    return np.ascontiguousarray(frames)


def check_thresholds(thresholds: Thresholds) -> tuple[float, float]:
    if not isinstance(thresholds, Thresholds):
        raise CountingError(f"thresholds must be a Thresholds, got {type(thresholds).__name__}")
    return float(thresholds.background), float(thresholds.xray)


def max_events(rows: int, cols: int) -> int:
    """Most strict local maxima a frame can hold: no two may touch, so one per 2x2 block."""
    return ((rows + 1) // 2) * ((cols + 1) // 2)


def integer_window(background: float, xray: float) -> tuple[int, int]:
    """The integer values v with ``not (v <= background or v >= xray)``, as an inclusive [lo, hi] in 0..65535.

    A NaN threshold makes its comparison false, so it removes nothing (as in stempy's C++).
    """
    if math.isnan(background) or background == -math.inf:
        lo = 0
    elif background == math.inf:
        lo = 65536
    else:
        lo = min(max(math.floor(background) + 1, 0), 65536)
    if math.isnan(xray) or xray == math.inf:
        hi = 65535
    elif xray == -math.inf:
        hi = -1
    else:
        hi = max(min(math.ceil(xray) - 1, 65535), -1)
    return lo, hi


@dataclass(frozen=True)
class Corrections:
    """Dark and gain in the forms the kernels use; ``gain32`` is the multiplier (stempy's inverted gain)."""

    dark32: np.ndarray | None
    gain32: np.ndarray | None
    dark16: np.ndarray | None  # only for the integer (no gain) path


class CorrectionCache:
    """Prepare dark/gain once per distinct content: engines see the same arrays batch after batch."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._key: tuple[np.ndarray | None, np.ndarray | None] | None = None
        self._value: Corrections | None = None

    @staticmethod
    def _same(a: np.ndarray | None, b: np.ndarray | None) -> bool:
        if a is None or b is None:
            return a is b
        return a.shape == b.shape and a.dtype == b.dtype and np.array_equal(a, b)

    def get(self, dark: np.ndarray | None, gain: np.ndarray | None, shape: tuple[int, int]) -> Corrections:
        dark_in = None if dark is None else np.asarray(dark)
        gain_in = None if gain is None else np.asarray(gain)
        with self._lock:
            # Compare contents, not identity: a caller may refill the same buffer with a new dark.
            key, value = self._key, self._value
            if (
                key is not None
                and value is not None
                and self._same(key[0], dark_in)
                and self._same(key[1], gain_in)
                and (dark_in is None or dark_in.shape == shape)
                and (gain_in is None or gain_in.shape == shape)
            ):
                return value
        dark32 = prepare_dark(dark_in, shape)
        gain32 = prepare_gain(gain_in, shape)
        dark16 = dark_as_uint16(dark32) if (dark32 is not None and gain32 is None) else None
        value = Corrections(dark32=dark32, gain32=gain32, dark16=dark16)
        with self._lock:
            self._key = (
                None if dark_in is None else dark_in.copy(),
                None if gain_in is None else gain_in.copy(),
            )
            self._value = value
        return value


class EngineBase:
    """The part of :meth:`CountingEngine.count` every engine shares: the batch and thresholds checked, dark
    and gain prepared once per distinct content. Engines implement :meth:`_count`."""

    name = ""

    def __init__(self) -> None:
        self._cache = CorrectionCache()

    def count(
        self,
        frames: np.ndarray,
        thresholds: Thresholds,
        *,
        dark: np.ndarray | None = None,
        gain: np.ndarray | None = None,
        row_dark: RowDark = "none",
    ) -> list[np.ndarray]:
        batch = as_batch(frames)
        background, xray = check_thresholds(thresholds)
        if row_dark not in ROW_DARK_MODES:
            raise CountingError(f"row_dark must be one of {', '.join(ROW_DARK_MODES)}, got {row_dark!r}")
        if batch.shape[0] == 0:
            return []
        corr = self._cache.get(dark, gain, (batch.shape[1], batch.shape[2]))
        if row_dark == "none":
            return self._count(batch, background, xray, corr)
        if batch.shape[1] < 2:  # a half-row of no value: stempy's median reads past it (and crashes)
            raise CountingError(f"row dark needs frames of at least 2 rows, got {batch.shape[1:]}")
        # stempy hands its C++ the optimized mean as a float: round it once here for every engine.
        mean32 = np.float32(thresholds.mean)
        return self._count_row_dark(batch, background, xray, corr, mean32, row_dark == "mean")

    def _count(self, batch: np.ndarray, background: float, xray: float, corr: Corrections) -> list[np.ndarray]:
        """Events of each frame of a checked, non-empty, C-contiguous batch."""
        raise NotImplementedError

    def _count_row_dark(
        self, batch: np.ndarray, background: float, xray: float, corr: Corrections, mean32: np.float32, use_mean: bool
    ) -> list[np.ndarray]:
        """As :meth:`_count`, with stempy's row-dark correction (docs/counting.md, Row-dark)."""
        raise NotImplementedError

"""The CPU engine: stempy's per-frame algorithm as a numba kernel, parallel over the frames of a batch.

Per frame (see docs/counting.md for the stempy source it mirrors):

1. integer path (no gain): ``v = (raw - uint16(dark)) mod 2**16``; with a gain: ``v = (float32(raw) -
   float32(dark)) * float32(1 / gain)`` in float32;
2. ``v = 0`` where ``v <= background`` or ``v >= xray``;
3. a pixel is an event when it is strictly greater than each of its existing 8 neighbours (border
   pixels included, neighbours outside the frame ignored; equal maxima are never events).

Each frame is swept once, row by row, through a ring of three preprocessed rows padded with a value
below anything a real pixel can hold, so the neighbour test has no border branches.
"""

from __future__ import annotations

import logging
import threading

import numba
import numpy as np
from numba import njit, prange

from stemstream.counting.engines.base import (
    CorrectionCache,
    Corrections,
    as_batch,
    check_thresholds,
    integer_window,
    max_events,
)
from stemstream.counting.thresholds import Thresholds
from stemstream.errors import CountingError

logger = logging.getLogger(__name__)

# Events per frame the first pass makes room for; frames with more are counted again with room for all.
_FIRST_CAPACITY = 2048


# The kernels are plain numba functions, not meant to be called from Python.
# Two drivers per path: the serial one needs no threading layer, so several Python threads may run it
# at once (nogil); the parallel one spreads a batch over numba's threads. They must be distinct Python
# functions: numba's on-disk cache keys a function by its bytecode, not by its compile options, so one
# function compiled both ways would load whichever build was cached first.


@njit(nogil=True, cache=True, inline="always")
def _fill_u16(frames, dark16, b, r, lo, hi, dst):  # pragma: no cover - compiled by numba
    """Preprocess row r of frame b into dst[1:-1]; returns the row's largest value (0: nothing to scan)."""
    cols = frames.shape[2]
    top = 0
    for c in range(cols):
        v = (np.int32(frames[b, r, c]) - np.int32(dark16[r, c])) & 0xFFFF
        v = v if (v >= lo and v <= hi) else 0
        dst[c + 1] = v
        top = max(top, v)
    return top


@njit(nogil=True, cache=True, inline="always")
def _fill_f32(frames, dark32, gain32, b, r, background, xray, dst):  # pragma: no cover - compiled by numba
    """Preprocess row r of frame b into dst[1:-1]; returns how many values are > 0."""
    cols = frames.shape[2]
    positive = 0
    for c in range(cols):
        v = (np.float32(frames[b, r, c]) - dark32[r, c]) * gain32[r, c]
        x = np.float64(v)
        v = np.float32(0.0) if (x <= background or x >= xray) else v
        dst[c + 1] = v
        positive += 1 if v > 0 else 0
    return positive


@njit(nogil=True, cache=True)
def _frame_u16(frames, dark16, b, lo, hi, out, counts):  # pragma: no cover - compiled by numba
    """Count frame b (integer path) into out[b], counts[b]."""
    _, rows, cols = frames.shape
    capacity = out.shape[1]
    single_pixel = rows * cols == 1
    # -1 stands for "no neighbour": below every preprocessed value (0..65535).
    ring = np.full((3, cols + 2), -1, np.int32)
    edge = np.full(cols + 2, -1, np.int32)
    top = np.zeros(3, np.int32)  # largest value of each ring row
    n = 0
    top[0] = _fill_u16(frames, dark16, b, 0, lo, hi, ring[0])
    for r in range(rows):
        if r + 1 < rows:
            top[(r + 1) % 3] = _fill_u16(frames, dark16, b, r + 1, lo, hi, ring[(r + 1) % 3])
        if top[r % 3] == 0 and not single_pixel:
            continue  # an all-zero row holds no event
        cur = ring[r % 3]
        up = ring[(r + 2) % 3] if r > 0 else edge
        down = ring[(r + 1) % 3] if r + 1 < rows else edge
        for c in range(1, cols + 1):
            v = cur[c]
            # A zeroed pixel always has a neighbour >= 0 to tie with (except in a 1x1 frame).
            if v == 0 and not single_pixel:
                continue
            if (
                v > cur[c - 1]
                and v > cur[c + 1]
                and v > up[c - 1]
                and v > up[c]
                and v > up[c + 1]
                and v > down[c - 1]
                and v > down[c]
                and v > down[c + 1]
            ):
                if n < capacity:
                    out[b, n] = r * cols + (c - 1)
                n += 1
    counts[b] = n


@njit(nogil=True, cache=True)
def _frame_f32(frames, dark32, gain32, b, background, xray, skip, out, counts):  # pragma: no cover
    """Count frame b (float path, with a gain) into out[b], counts[b]."""
    _, rows, cols = frames.shape
    capacity = out.shape[1]
    single_pixel = rows * cols == 1
    ring = np.full((3, cols + 2), -np.inf, np.float32)
    edge = np.full(cols + 2, -np.inf, np.float32)
    positive = np.zeros(3, np.int64)  # values > 0 in each ring row
    n = 0
    positive[0] = _fill_f32(frames, dark32, gain32, b, 0, background, xray, ring[0])
    for r in range(rows):
        if r + 1 < rows:
            nxt = (r + 1) % 3
            positive[nxt] = _fill_f32(frames, dark32, gain32, b, r + 1, background, xray, ring[nxt])
        if skip and positive[r % 3] == 0 and not single_pixel:
            continue  # no value > 0 in this row: no event
        cur = ring[r % 3]
        up = ring[(r + 2) % 3] if r > 0 else edge
        down = ring[(r + 1) % 3] if r + 1 < rows else edge
        for c in range(1, cols + 1):
            v = cur[c]
            # With background >= 0 every kept value is > 0, so a pixel <= 0 (or NaN) cannot win.
            if skip and not (v > 0) and not single_pixel:
                continue
            if single_pixel or (
                v > cur[c - 1]
                and v > cur[c + 1]
                and v > up[c - 1]
                and v > up[c]
                and v > up[c + 1]
                and v > down[c - 1]
                and v > down[c]
                and v > down[c + 1]
            ):
                if n < capacity:
                    out[b, n] = r * cols + (c - 1)
                n += 1
    counts[b] = n


@njit(nogil=True, cache=True)
def _batch_u16_serial(frames, dark16, lo, hi, out, counts):  # pragma: no cover - compiled by numba
    for b in range(frames.shape[0]):
        _frame_u16(frames, dark16, b, lo, hi, out, counts)


@njit(nogil=True, cache=True, parallel=True)
def _batch_u16_parallel(frames, dark16, lo, hi, out, counts):  # pragma: no cover - compiled by numba
    for b in prange(frames.shape[0]):
        _frame_u16(frames, dark16, b, lo, hi, out, counts)


@njit(nogil=True, cache=True)
def _batch_f32_serial(frames, dark32, gain32, background, xray, skip, out, counts):  # pragma: no cover
    for b in range(frames.shape[0]):
        _frame_f32(frames, dark32, gain32, b, background, xray, skip, out, counts)


@njit(nogil=True, cache=True, parallel=True)
def _batch_f32_parallel(frames, dark32, gain32, background, xray, skip, out, counts):  # pragma: no cover
    for b in prange(frames.shape[0]):
        _frame_f32(frames, dark32, gain32, b, background, xray, skip, out, counts)


_KERNELS = {
    ("u16", False): _batch_u16_serial,
    ("u16", True): _batch_u16_parallel,
    ("f32", False): _batch_f32_serial,
    ("f32", True): _batch_f32_parallel,
}
# numba's portable "workqueue" threading layer must not be entered from two threads at once.
_PARALLEL_LOCK = threading.Lock()


class CpuEngine:
    """stempy's algorithm, bit for bit, compiled by numba; ``threads`` cores per batch (default: all)."""

    name = "cpu"

    def __init__(self, *, threads: int | None = None) -> None:
        available = numba.config.NUMBA_NUM_THREADS
        if threads is not None and threads < 1:
            raise CountingError(f"cpu engine: threads must be >= 1, got {threads}")
        self.threads = min(threads or available, available)
        self._cache = CorrectionCache()

    def _run(
        self,
        batch: np.ndarray,
        corr: Corrections,
        background: float,
        xray: float,
        capacity: int,
    ) -> tuple[np.ndarray, np.ndarray]:
        n_frames, rows, cols = batch.shape
        out = np.empty((n_frames, capacity), np.uint32)
        counts = np.zeros(n_frames, np.int64)
        parallel = self.threads > 1 and n_frames > 1
        # Inputs go in as read-only views: one numba specialisation whether or not the caller's are writable.
        frames = _readonly(batch)
        if corr.gain32 is None:
            lo, hi = integer_window(background, xray)
            dark16 = _readonly(corr.dark16 if corr.dark16 is not None else np.zeros((rows, cols), np.uint16))
            kind, args = "u16", (frames, dark16, lo, hi, out, counts)
        else:
            dark32 = _readonly(corr.dark32 if corr.dark32 is not None else np.zeros((rows, cols), np.float32))
            skip = not (background < 0.0) and background == background  # a NaN background keeps negatives
            kind, args = "f32", (frames, dark32, _readonly(corr.gain32), background, xray, skip, out, counts)
        kernel = _KERNELS[(kind, parallel)]
        if parallel:
            with _PARALLEL_LOCK:
                numba.set_num_threads(self.threads)
                kernel(*args)
        else:
            kernel(*args)
        return out, counts

    def count(
        self,
        frames: np.ndarray,
        thresholds: Thresholds,
        *,
        dark: np.ndarray | None = None,
        gain: np.ndarray | None = None,
    ) -> list[np.ndarray]:
        batch = as_batch(frames)
        background, xray = check_thresholds(thresholds)
        n_frames, rows, cols = batch.shape
        if n_frames == 0:
            return []
        corr = self._cache.get(dark, gain, (rows, cols))
        capacity = min(_FIRST_CAPACITY, max_events(rows, cols))
        out, counts = self._run(batch, corr, background, xray, capacity)
        crowded = np.flatnonzero(counts > capacity)
        if crowded.size:
            # Rare (noise-dominated frames): recount just those frames with room for every possible event.
            logger.debug("cpu engine: %d frame(s) over %d events, recounting", crowded.size, capacity)
            full = max_events(rows, cols)
            out2, counts2 = self._run(np.ascontiguousarray(batch[crowded]), corr, background, xray, full)
            return _split(out, counts, {int(i): out2[k, : counts2[k]] for k, i in enumerate(crowded)})
        return _split(out, counts, {})


def _readonly(arr: np.ndarray) -> np.ndarray:
    view = arr.view()
    view.flags.writeable = False
    return view


def _split(out: np.ndarray, counts: np.ndarray, replaced: dict[int, np.ndarray]) -> list[np.ndarray]:
    """Compact the (frames, capacity) buffer into one array and hand out per-frame views of it."""
    capacity = out.shape[1]
    kept = np.minimum(counts, capacity)
    flat = out[np.arange(capacity) < kept[:, None]]
    frames = np.split(flat, np.cumsum(kept)[:-1])
    for i, events in replaced.items():
        frames[i] = events.copy()
    return frames

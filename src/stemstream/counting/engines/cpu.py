"""The CPU engine: stempy's per-frame algorithm as a numba kernel, parallel over the frames of a batch.

Per frame (see docs/counting.md for the stempy source it mirrors):

1. integer path (no gain): ``v = (raw - uint16(dark)) mod 2**16``; with a gain: ``v = (float32(raw) -
   float32(dark)) * float32(1 / gain)`` in float32;
2. ``v = 0`` where ``v <= background`` or ``v >= xray``, compared in double as stempy does (the integer
   path turns the two double thresholds into the exact integer window ``lo <= v <= hi`` once per batch);
3. a pixel is an event when it is strictly greater than each of its existing 8 neighbours (border
   pixels included, neighbours outside the frame ignored; equal maxima are never events).

Each frame is swept once, row by row, through a ring of three preprocessed rows padded with a value that
no pixel can beat by being next to it (0 on the integer path, where a zeroed pixel is never an event;
-inf on the float path). The candidate pass has no branches: for every pixel of a row it takes the
largest of its 8 neighbours (NaN-propagating on the float path, since a NaN neighbour blocks an event)
and compares once, so the compiler vectorises it and dense frames cost no branch mispredictions. Rows
whose values are all zero are skipped without that pass (they hold no event). A frame holds at most one
event per 2x2 block, so each frame's output has room for all of them and is never counted twice.
"""

from __future__ import annotations

import logging
import threading

import numba
import numpy as np
from numba import njit, prange

from stemstream.counting.engines.base import (
    Corrections,
    EngineBase,
    integer_window,
    max_events,
)
from stemstream.errors import CountingError

logger = logging.getLogger(__name__)

# Frames per kernel call: bounds the per-frame output buffers (room for every possible event, ~330 KB
# per 576 x 576 frame, only the part written is touched) to ~21 MB per call.
_CHUNK = 64


# The kernels are plain numba functions, not meant to be called from Python.
# Two drivers per path: the serial one needs no threading layer, so several Python threads may run it
# at once (nogil); the parallel one spreads a batch over numba's threads. They must be distinct Python
# functions: numba's on-disk cache keys a function by its bytecode, not by its compile options, so one
# function compiled both ways would load whichever build was cached first.


@njit(nogil=True, cache=True, inline="always")
def _fill_u16(frames, dark16, b, r, lo, span, dst):  # pragma: no cover - compiled by numba
    """Preprocess row r of frame b into dst[1:-1]; returns non-zero when any value is.

    Kept: lo <= v <= lo + span, tested as one unsigned 16-bit compare ``(v - lo) mod 2**16 <= span``, so the
    whole row runs in 16-bit vector lanes.
    """
    cols = frames.shape[2]
    acc = np.uint16(0)
    for c in range(cols):
        v = np.uint16((np.int32(frames[b, r, c]) - np.int32(dark16[r, c])) & 0xFFFF)
        v = v if np.uint16((np.int32(v) - np.int32(lo)) & 0xFFFF) <= span else np.uint16(0)
        dst[c + 1] = v
        acc |= v
    return acc


@njit(nogil=True, cache=True, inline="always")
def _fill_f32(frames, dark32, gain32, b, r, background, xray, dst):  # pragma: no cover - compiled by numba
    """Preprocess row r of frame b into dst[1:-1] (float32); returns how many values are > 0."""
    cols = frames.shape[2]
    positive = 0
    for c in range(cols):
        v = (np.float32(frames[b, r, c]) - dark32[r, c]) * gain32[r, c]
        x = np.float64(v)  # stempy compares the float32 value with the double thresholds in double
        v = np.float32(0.0) if (x <= background) | (x >= xray) else v
        dst[c + 1] = v
        positive += v > 0
    return positive


@njit(nogil=True, cache=True, inline="always")
def _max_u16(a, b):  # pragma: no cover - compiled by numba
    return a if a > b else b


@njit(nogil=True, cache=True, inline="always")
def _max_nan(a, b):  # pragma: no cover - compiled by numba
    """max that propagates NaN: a NaN neighbour makes ``v > max`` false, as ``v > NaN`` is in stempy."""
    return a if (a > b) | (a != a) else b


@njit(nogil=True, cache=True, inline="always")
def _maxima_u16(up, cur, down, cols, flags):  # pragma: no cover - compiled by numba
    """flags[c] = cur[c+1] beats its 8 neighbours (padded rows); returns how many do. Branch-free."""
    n = 0
    for c in range(1, cols + 1):
        m = _max_u16(
            _max_u16(_max_u16(up[c - 1], up[c]), _max_u16(up[c + 1], cur[c - 1])),
            _max_u16(_max_u16(cur[c + 1], down[c - 1]), _max_u16(down[c], down[c + 1])),
        )
        e = np.uint8(cur[c] > m)
        flags[c - 1] = e
        n += e
    return n


@njit(nogil=True, cache=True, inline="always")
def _maxima_f32(up, cur, down, cols, flags):  # pragma: no cover - compiled by numba
    """As _maxima_u16 on float32 rows padded with -inf; NaN is never an event and blocks its neighbours."""
    n = 0
    for c in range(1, cols + 1):
        m = _max_nan(
            _max_nan(_max_nan(up[c - 1], up[c]), _max_nan(up[c + 1], cur[c - 1])),
            _max_nan(_max_nan(cur[c + 1], down[c - 1]), _max_nan(down[c], down[c + 1])),
        )
        e = np.uint8(cur[c] > m)
        flags[c - 1] = e
        n += e
    return n


@njit(nogil=True, cache=True, inline="always")
def _append(flags, cols, base, out, b, n, slots):  # pragma: no cover - compiled by numba
    """Append base + c for every flagged c to out[b, n:]; returns the new n. Branch-free."""
    k = 0
    for c in range(cols):
        slots[k] = base + c
        k += flags[c]
    for j in range(k):
        out[b, n + j] = slots[j]
    return n + k


@njit(nogil=True, cache=True)
def _frame_u16(frames, dark16, b, lo, span, out, counts):  # pragma: no cover - compiled by numba
    """Count frame b (integer path) into out[b], counts[b]."""
    _, rows, cols = frames.shape
    ring = np.zeros((3, cols + 2), np.uint16)
    zero = np.zeros(cols + 2, np.uint16)
    flags = np.zeros(cols, np.uint8)
    slots = np.empty(cols, np.uint32)
    nonzero = np.zeros(3, np.uint16)
    n = 0
    if rows * cols == 1:  # no neighbour at all: always an event (stempy), even at 0
        out[b, 0] = 0
        counts[b] = 1
        return
    nonzero[0] = _fill_u16(frames, dark16, b, 0, lo, span, ring[0])
    for r in range(rows):
        if r + 1 < rows:
            nonzero[(r + 1) % 3] = _fill_u16(frames, dark16, b, r + 1, lo, span, ring[(r + 1) % 3])
        if nonzero[r % 3] == 0:
            continue  # an all-zero row holds no event
        up = ring[(r + 2) % 3] if r > 0 else zero
        down = ring[(r + 1) % 3] if r + 1 < rows else zero
        if _maxima_u16(up, ring[r % 3], down, cols, flags):
            n = _append(flags, cols, np.uint32(r * cols), out, b, n, slots)
    counts[b] = n


@njit(nogil=True, cache=True)
def _frame_f32(frames, dark32, gain32, b, background, xray, skip, out, counts):  # pragma: no cover
    """Count frame b (float path, with a gain) into out[b], counts[b]."""
    _, rows, cols = frames.shape
    ring = np.full((3, cols + 2), -np.inf, np.float32)
    edge = np.full(cols + 2, -np.inf, np.float32)
    flags = np.zeros(cols, np.uint8)
    slots = np.empty(cols, np.uint32)
    positive = np.zeros(3, np.int64)  # values > 0 in each ring row
    n = 0
    if rows * cols == 1:  # no neighbour at all: always an event (stempy)
        out[b, 0] = 0
        counts[b] = 1
        return
    positive[0] = _fill_f32(frames, dark32, gain32, b, 0, background, xray, ring[0])
    for r in range(rows):
        if r + 1 < rows:
            nxt = (r + 1) % 3
            positive[nxt] = _fill_f32(frames, dark32, gain32, b, r + 1, background, xray, ring[nxt])
        # With background >= 0 every kept value is > 0 and a pixel <= 0 (or NaN) cannot win: a row
        # without a positive value holds no event.
        if skip and positive[r % 3] == 0:
            continue
        up = ring[(r + 2) % 3] if r > 0 else edge
        down = ring[(r + 1) % 3] if r + 1 < rows else edge
        if _maxima_f32(up, ring[r % 3], down, cols, flags):
            n = _append(flags, cols, np.uint32(r * cols), out, b, n, slots)
    counts[b] = n


@njit(nogil=True, cache=True, inline="always")
def _to_u16(x):  # pragma: no cover - compiled by numba
    """float32 -> uint16 as stempy's x86-64 build converts: truncate to int32 (cvttss2si), keep the low 16 bits;
    NaN or out of int32 range gives 0 (the "integer indefinite" 0x80000000)."""
    d = np.float64(x)
    d = d if (d > -2147483649.0) & (d < 2147483648.0) else 0.0  # a select, not a branch: vectorises
    return np.uint16(np.int64(d) & 0xFFFF)


@njit(nogil=True, cache=True, error_model="numpy")
def _half_row_stat(flat, start, stop, use_mean, tmp):  # pragma: no cover - compiled by numba
    """stempy's row-dark statistic of the raw values flat[start:stop]: the mean summed one value at a time in
    float32, or the median (the two middle values averaged in float32 when the count is even)."""
    n = stop - start
    if use_mean:
        acc = np.float32(0.0)
        for i in range(start, stop):
            acc = np.float32(acc + np.float32(flat[i]))
        return np.float32(acc / np.float32(n))
    for i in range(n):
        tmp[i] = flat[start + i]
    m = n // 2
    v = np.partition(tmp[:n], m)  # as std::nth_element: v[m] in place, v[:m] all <= it
    if n & 1:
        return np.float32(v[m])
    return np.float32(np.float32(np.int64(v[:m].max()) + np.int64(v[m])) / np.float32(2.0))


@njit(nogil=True, cache=True, error_model="numpy")
def _frame_row_dark(
    frames, dark32, gain32, use_gain, b, mean32, background, xray, use_mean, out, counts
):  # pragma: no cover
    """Count frame b with stempy's applyRowDark preprocessing (docs/counting.md, Row-dark) into out[b], counts[b].

    stempy walks the frame as ``cols`` runs of ``rows`` values (its frame dimensions are (cols, rows); for the
    square 4D Camera frame these are the rows), each split into a left half of rows // 2 and the rest. Each
    half is scaled by ``mean32 / stat`` (stat of its raw values), after the dark and before the gain; the
    integer path (no gain) converts to uint16 after each step, as stempy's uint16 frame does.
    """
    _, rows, cols = frames.shape
    if rows * cols == 1:  # no neighbour at all: always an event (stempy)
        out[b, 0] = 0
        counts[b] = 1
        return
    flat = frames[b].reshape(rows * cols)
    dark = dark32.reshape(rows * cols)
    gain = gain32.reshape(rows * cols)
    pad = np.full((rows + 2, cols + 2), -np.inf, np.float32)
    pre = np.empty(rows * cols, np.float32)  # the preprocessed frame, flat (stempy's own walk)
    tmp = np.empty(rows, np.uint16)
    left = rows // 2
    for run in range(cols):
        base = run * rows
        for h in range(2):
            start = base if h == 0 else base + left
            stop = base + left if h == 0 else base + rows
            if stop == start:
                continue
            ratio = np.float32(mean32 / _half_row_stat(flat, start, stop, use_mean, tmp))
            # Contiguous and branch-free per path (the path chosen outside the loop), so the loop vectorises.
            if use_gain:
                for i in range(start, stop):
                    v = np.float32(np.float32(np.float32(flat[i]) - dark[i]) * ratio)
                    v = np.float32(v * gain[i])
                    x = np.float64(v)
                    pre[i] = np.float32(0.0) if (x <= background) | (x >= xray) else v
            else:
                for i in range(start, stop):
                    u = _to_u16(np.float32(np.float32(flat[i]) - dark[i]))
                    v = np.float32(_to_u16(np.float32(np.float32(u) * ratio)))
                    x = np.float64(v)
                    pre[i] = np.float32(0.0) if (x <= background) | (x >= xray) else v
    for r in range(rows):
        pad[r + 1, 1 : cols + 1] = pre[r * cols : (r + 1) * cols]
    flags = np.zeros(cols, np.uint8)
    slots = np.empty(cols, np.uint32)
    n = 0
    for r in range(rows):
        if _maxima_f32(pad[r], pad[r + 1], pad[r + 2], cols, flags):
            n = _append(flags, cols, np.uint32(r * cols), out, b, n, slots)
    counts[b] = n


@njit(nogil=True, cache=True)
def _batch_row_dark_serial(
    frames, dark32, gain32, use_gain, mean32, background, xray, use_mean, out, counts
):  # pragma: no cover
    for b in range(frames.shape[0]):
        _frame_row_dark(frames, dark32, gain32, use_gain, b, mean32, background, xray, use_mean, out, counts)


@njit(nogil=True, cache=True, parallel=True)
def _batch_row_dark_parallel(
    frames, dark32, gain32, use_gain, mean32, background, xray, use_mean, out, counts
):  # pragma: no cover
    for b in prange(frames.shape[0]):
        _frame_row_dark(frames, dark32, gain32, use_gain, b, mean32, background, xray, use_mean, out, counts)


@njit(nogil=True, cache=True)
def _batch_u16_serial(frames, dark16, lo, span, out, counts):  # pragma: no cover - compiled by numba
    for b in range(frames.shape[0]):
        _frame_u16(frames, dark16, b, lo, span, out, counts)


@njit(nogil=True, cache=True, parallel=True)
def _batch_u16_parallel(frames, dark16, lo, span, out, counts):  # pragma: no cover - compiled by numba
    for b in prange(frames.shape[0]):
        _frame_u16(frames, dark16, b, lo, span, out, counts)


@njit(nogil=True, cache=True)
def _batch_f32_serial(frames, dark32, gain32, background, xray, skip, out, counts):  # pragma: no cover
    for b in range(frames.shape[0]):
        _frame_f32(frames, dark32, gain32, b, background, xray, skip, out, counts)


@njit(nogil=True, cache=True, parallel=True)
def _batch_f32_parallel(frames, dark32, gain32, background, xray, skip, out, counts):  # pragma: no cover
    for b in prange(frames.shape[0]):
        _frame_f32(frames, dark32, gain32, b, background, xray, skip, out, counts)


@njit(nogil=True, cache=True)
def _compact(out, counts, flat, start):  # pragma: no cover - compiled by numba
    """Copy out[b, :counts[b]] for every b, one after the other, into flat[start:]; returns the end."""
    k = start
    for b in range(out.shape[0]):
        flat[k : k + counts[b]] = out[b, : counts[b]]
        k += counts[b]
    return k


_KERNELS = {
    ("u16", False): _batch_u16_serial,
    ("u16", True): _batch_u16_parallel,
    ("f32", False): _batch_f32_serial,
    ("f32", True): _batch_f32_parallel,
    ("row_dark", False): _batch_row_dark_serial,
    ("row_dark", True): _batch_row_dark_parallel,
}
# numba's portable "workqueue" threading layer must not be entered from two threads at once.
_PARALLEL_LOCK = threading.Lock()


class CpuEngine(EngineBase):
    """stempy's algorithm, bit for bit, compiled by numba; ``threads`` cores per batch (default: all)."""

    name = "cpu"

    def __init__(self, *, threads: int | None = None) -> None:
        available = numba.config.NUMBA_NUM_THREADS
        if threads is not None and threads < 1:
            raise CountingError(f"cpu engine: threads must be >= 1, got {threads}")
        self.threads = min(threads or available, available)
        super().__init__()

    def _run(
        self,
        chunk: np.ndarray,
        corr: Corrections,
        background: float,
        xray: float,
        out: np.ndarray,
        row_dark: tuple[np.float32, bool] | None = None,
    ) -> np.ndarray:
        """Count ``chunk`` into ``out[:len(chunk)]``; returns the events per frame. ``row_dark``: (optimized
        mean, use the mean) for stempy's row-dark correction."""
        n_frames, rows, cols = chunk.shape
        counts = np.zeros(n_frames, np.int64)
        parallel = self.threads > 1 and n_frames > 1
        # Inputs go in as read-only views: one numba specialisation whether or not the caller's are writable.
        frames = _readonly(chunk)
        if row_dark is not None:
            # A zero dark subtracts nothing (stempy skips it); the gain of ones is never read (use_gain false).
            dark32 = _readonly(corr.dark32 if corr.dark32 is not None else np.zeros((rows, cols), np.float32))
            use_gain = corr.gain32 is not None
            gain32 = _readonly(corr.gain32 if use_gain else np.ones((rows, cols), np.float32))
            mean32, use_mean = row_dark
            args = (frames, dark32, gain32, use_gain, np.float32(mean32), background, xray, use_mean, out, counts)
            kind = "row_dark"
        elif corr.gain32 is None:
            lo, hi = integer_window(background, xray)
            if lo > hi:  # no value survives: every pixel is 0, an event only where it has no neighbour
                counts[:] = 1 if rows * cols == 1 else 0
                out[:n_frames, :1] = 0
                return counts
            dark16 = _readonly(corr.dark16 if corr.dark16 is not None else np.zeros((rows, cols), np.uint16))
            kind, args = "u16", (frames, dark16, np.uint16(lo), np.uint16(hi - lo), out, counts)
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
        return counts

    def _count(self, batch: np.ndarray, background: float, xray: float, corr: Corrections) -> list[np.ndarray]:
        return self._count_chunks(batch, background, xray, corr, None)

    def _count_row_dark(
        self, batch: np.ndarray, background: float, xray: float, corr: Corrections, mean32: np.float32, use_mean: bool
    ) -> list[np.ndarray]:
        return self._count_chunks(batch, background, xray, corr, (mean32, use_mean))

    def _count_chunks(
        self,
        batch: np.ndarray,
        background: float,
        xray: float,
        corr: Corrections,
        row_dark: tuple[np.float32, bool] | None,
    ) -> list[np.ndarray]:
        n_frames, rows, cols = batch.shape
        # Room for every event a frame can hold: nothing is ever counted twice, however dense the frame.
        out = np.empty((min(n_frames, _CHUNK), max_events(rows, cols)), np.uint32)
        parts: list[tuple[np.ndarray, np.ndarray]] = []
        for start in range(0, n_frames, _CHUNK):
            chunk = batch[start : start + _CHUNK]
            counts = self._run(chunk, corr, background, xray, out, row_dark)
            flat = np.empty(int(counts.sum()), np.uint32)
            _compact(out[: len(chunk)], counts, flat, 0)
            parts.append((flat, counts))
        flat = parts[0][0] if len(parts) == 1 else np.concatenate([p[0] for p in parts])
        counts = parts[0][1] if len(parts) == 1 else np.concatenate([p[1] for p in parts])
        # Per-frame views of one array: the caller owns it (nothing here keeps or reuses it).
        return np.split(flat, np.cumsum(counts)[:-1])


def _readonly(arr: np.ndarray) -> np.ndarray:
    view = arr.view()
    view.flags.writeable = False
    return view

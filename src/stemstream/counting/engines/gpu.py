"""The GPU engine: stempy's per-frame algorithm as a CuPy RawKernel, one thread per pixel.

CuPy is optional and imported lazily (it is not a dependency of stemstream: install the wheel that
matches the node's CUDA, e.g. ``pip install cupy-cuda12x``). A batch is cut into chunks; each chunk goes
through one of several CUDA streams: host copy into a pinned buffer, asynchronous H2D copy, kernel,
device-side sort of the event keys, D2H copy. While chunk k is finalised on the host, chunk k+1 is
already copying and counting on the other stream.

Events are compacted with one atomic counter per chunk as keys ``frame * rows * cols + pixel`` and
sorted on the device, which restores stempy's order (frame by frame, ascending pixel index).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from stemstream.counting.engines.base import (
    Corrections,
    EngineBase,
    integer_window,
)
from stemstream.errors import CountingError

logger = logging.getLogger(__name__)

# --fmad=false: keep (raw - dark) * gain as two IEEE float32 operations, as in stempy's C++.
_NVCC_OPTIONS = ("--fmad=false",)
_EVENTS_PER_FRAME = 4096  # first-pass room per frame; a chunk with more is counted again with room for all
_BLOCK = (32, 8, 1)

_KERNEL_SOURCE = r"""
__device__ __forceinline__ int pre_u16(const unsigned short* frame, const unsigned short* dark16,
                                       const int idx, const int lo, const int hi)
{
    const int v = ((int)frame[idx] - (int)dark16[idx]) & 0xFFFF;
    return (v >= lo && v <= hi) ? v : 0;
}

__device__ __forceinline__ float pre_f32(const unsigned short* frame, const float* dark32,
                                         const float* gain32, const int idx, const double background,
                                         const double xray)
{
    const float v = ((float)frame[idx] - dark32[idx]) * gain32[idx];
    const double x = (double)v;
    return (x <= background || x >= xray) ? 0.0f : v;
}

extern "C" __global__ void count_u16(
    const unsigned short* __restrict__ frames, const unsigned short* __restrict__ dark16,
    const int n_frames, const int rows, const int cols, const int lo, const int hi,
    unsigned int* __restrict__ keys, unsigned int* __restrict__ n_keys, const unsigned int capacity)
{
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    const int r = blockIdx.y * blockDim.y + threadIdx.y;
    const int f = blockIdx.z;
    if (c >= cols || r >= rows || f >= n_frames) return;
    const unsigned int npix = (unsigned int)rows * (unsigned int)cols;
    const unsigned short* frame = frames + (size_t)f * npix;
    const int v = pre_u16(frame, dark16, r * cols + c, lo, hi);
    bool event = true;
    if (npix > 1) {
        if (v == 0) return;  /* a zeroed pixel always ties with a neighbour >= 0 */
        for (int dr = -1; dr <= 1 && event; ++dr) {
            const int rr = r + dr;
            if (rr < 0 || rr >= rows) continue;  /* missing neighbours are ignored, as in stempy */
            for (int dc = -1; dc <= 1; ++dc) {
                const int cc = c + dc;
                if ((dr == 0 && dc == 0) || cc < 0 || cc >= cols) continue;
                if (!(v > pre_u16(frame, dark16, rr * cols + cc, lo, hi))) { event = false; break; }
            }
        }
    }
    if (event) {
        const unsigned int slot = atomicAdd(n_keys, 1u);
        if (slot < capacity) keys[slot] = (unsigned int)f * npix + (unsigned int)(r * cols + c);
    }
}

extern "C" __global__ void count_f32(
    const unsigned short* __restrict__ frames, const float* __restrict__ dark32,
    const float* __restrict__ gain32, const int n_frames, const int rows, const int cols,
    const double background, const double xray, const int skip_nonpositive,
    unsigned int* __restrict__ keys, unsigned int* __restrict__ n_keys, const unsigned int capacity)
{
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    const int r = blockIdx.y * blockDim.y + threadIdx.y;
    const int f = blockIdx.z;
    if (c >= cols || r >= rows || f >= n_frames) return;
    const unsigned int npix = (unsigned int)rows * (unsigned int)cols;
    const unsigned short* frame = frames + (size_t)f * npix;
    const float v = pre_f32(frame, dark32, gain32, r * cols + c, background, xray);
    bool event = true;
    if (npix > 1) {
        if (skip_nonpositive && !(v > 0.0f)) return;
        for (int dr = -1; dr <= 1 && event; ++dr) {
            const int rr = r + dr;
            if (rr < 0 || rr >= rows) continue;
            for (int dc = -1; dc <= 1; ++dc) {
                const int cc = c + dc;
                if ((dr == 0 && dc == 0) || cc < 0 || cc >= cols) continue;
                if (!(v > pre_f32(frame, dark32, gain32, rr * cols + cc, background, xray))) {
                    event = false;
                    break;
                }
            }
        }
    }
    if (event) {
        const unsigned int slot = atomicAdd(n_keys, 1u);
        if (slot < capacity) keys[slot] = (unsigned int)f * npix + (unsigned int)(r * cols + c);
    }
}

/* Row dark (stempy's applyRowDark; docs/counting.md, Row-dark). rowdark_pre: one thread per half-run of a
   frame (stempy walks a frame as cols runs of rows values, each split at rows / 2) writes the preprocessed
   values as float32 (exact for the integer path's uint16 values); maxima_f32 then finds the events. */
__device__ __forceinline__ unsigned int to_u16(const float x)
{
    /* float -> uint16 as stempy's x86-64 build converts (cvttss2si, low 16 bits); CUDA's own cast saturates */
    const double d = (double)x;
    if (!(d > -2147483649.0 && d < 2147483648.0)) return 0u;
    return ((unsigned int)(int)d) & 0xFFFFu;
}

extern "C" __global__ void rowdark_pre(
    const unsigned short* __restrict__ frames, const float* __restrict__ dark32,
    const float* __restrict__ gain32, const int n_frames, const int rows, const int cols,
    const float mean32, const double background, const double xray, const int use_mean, const int use_gain,
    float* __restrict__ pre)
{
    const int h = blockIdx.x * blockDim.x + threadIdx.x;  /* half-run: run h / 2, left (0) or right (1) */
    const int f = blockIdx.z;
    if (h >= 2 * cols || f >= n_frames) return;
    const unsigned int npix = (unsigned int)rows * (unsigned int)cols;
    const unsigned short* frame = frames + (size_t)f * npix;
    float* out = pre + (size_t)f * npix;
    const int left = rows / 2;
    const int start = (h / 2) * rows + ((h & 1) ? left : 0);
    const int stop = (h / 2) * rows + ((h & 1) ? rows : left);
    const int n = stop - start;
    if (n <= 0) return;
    float stat;
    if (use_mean) {
        float acc = 0.0f;
        for (int i = start; i < stop; ++i) acc = acc + (float)frame[i];  /* in order, as std::accumulate */
        stat = acc / (float)n;
    } else {
        /* the order statistics m - 1 and m (m = n / 2) by rank, without a scratch copy */
        const int m = n / 2;
        int lower = 0, upper = 0;
        for (int i = start; i < stop; ++i) {
            const int v = frame[i];
            int lt = 0, le = 0;
            for (int j = start; j < stop; ++j) {
                lt += (int)frame[j] < v;
                le += (int)frame[j] <= v;
            }
            if (lt <= m && m < le) upper = v;
            if (lt <= m - 1 && m - 1 < le) lower = v;
        }
        stat = (n & 1) ? (float)upper : (float)(lower + upper) / 2.0f;
    }
    const float ratio = mean32 / stat;
    for (int i = start; i < stop; ++i) {
        float v;
        if (use_gain) {
            v = ((float)frame[i] - dark32[i]) * ratio;
            v = v * gain32[i];
        } else {
            const unsigned int u = to_u16((float)frame[i] - dark32[i]);
            v = (float)to_u16((float)u * ratio);
        }
        const double x = (double)v;
        out[i] = (x <= background || x >= xray) ? 0.0f : v;
    }
}

extern "C" __global__ void maxima_f32(
    const float* __restrict__ pre, const int n_frames, const int rows, const int cols,
    unsigned int* __restrict__ keys, unsigned int* __restrict__ n_keys, const unsigned int capacity)
{
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    const int r = blockIdx.y * blockDim.y + threadIdx.y;
    const int f = blockIdx.z;
    if (c >= cols || r >= rows || f >= n_frames) return;
    const unsigned int npix = (unsigned int)rows * (unsigned int)cols;
    const float* frame = pre + (size_t)f * npix;
    const float v = frame[r * cols + c];
    bool event = true;
    if (npix > 1) {
        for (int dr = -1; dr <= 1 && event; ++dr) {
            const int rr = r + dr;
            if (rr < 0 || rr >= rows) continue;
            for (int dc = -1; dc <= 1; ++dc) {
                const int cc = c + dc;
                if ((dr == 0 && dc == 0) || cc < 0 || cc >= cols) continue;
                if (!(v > frame[rr * cols + cc])) { event = false; break; }
            }
        }
    }
    if (event) {
        const unsigned int slot = atomicAdd(n_keys, 1u);
        if (slot < capacity) keys[slot] = (unsigned int)f * npix + (unsigned int)(r * cols + c);
    }
}
"""


def _import_cupy() -> Any:
    try:
        import cupy
    except Exception as exc:  # ImportError, or a CUDA library that fails to load
        raise CountingError(
            f"gpu engine unavailable: cupy cannot be imported ({type(exc).__name__}: {exc}); "
            "install the wheel matching the node's CUDA, e.g. pip install cupy-cuda12x"
        ) from None
    return cupy


def _import_cupyx() -> Any:
    try:
        import cupyx
    except Exception as exc:  # shipped with cupy: a broken install
        raise CountingError(f"gpu engine unavailable: cupyx cannot be imported ({exc})") from None
    return cupyx


def gpu_available() -> bool:
    """True when cupy imports and sees at least one CUDA device."""
    try:
        cupy = _import_cupy()
        return int(cupy.cuda.runtime.getDeviceCount()) > 0
    except Exception:  # no driver, no device, broken install: all mean "no"
        return False


@dataclass
class _Slot:
    """One stream with its own pinned host buffer and device buffers, reused chunk after chunk."""

    stream: Any
    pinned: np.ndarray  # (chunk, rows, cols) uint16, page-locked
    d_frames: Any
    d_count: Any
    h_count: np.ndarray  # (1,) uint32, page-locked
    d_keys: Any
    d_pre: Any = None  # (chunk * rows * cols,) float32: row-dark preprocessed frames, made on first use


class GpuEngine(EngineBase):
    """stempy's algorithm on one CUDA device with CuPy; ``streams`` >= 2 overlap copies with counting."""

    name = "gpu"

    def __init__(self, *, chunk_frames: int = 128, streams: int = 2, device: int = 0) -> None:
        cupy = _import_cupy()
        try:
            n_devices = int(cupy.cuda.runtime.getDeviceCount())
        except Exception as exc:
            raise CountingError(f"gpu engine unavailable: no usable CUDA device ({exc})") from None
        if n_devices <= device:
            raise CountingError(f"gpu engine unavailable: no CUDA device {device} ({n_devices} present)")
        if chunk_frames < 1 or streams < 1:
            raise CountingError("gpu engine: chunk_frames and streams must be >= 1")
        self._cp = cupy
        self._cpx = _import_cupyx()
        self._device = cupy.cuda.Device(device)
        self.chunk_frames = chunk_frames
        self.n_streams = streams
        super().__init__()
        self._slots: list[_Slot] = []
        self._slot_shape: tuple[int, int] | None = None
        self._device_corr: tuple[Corrections, Any, Any, Any] | None = None
        try:
            with self._device:
                module = cupy.RawModule(code=_KERNEL_SOURCE, options=_NVCC_OPTIONS)
                self._k_u16 = module.get_function("count_u16")  # compiles (NVRTC) on first access
                self._k_f32 = module.get_function("count_f32")
                self._k_rowdark = module.get_function("rowdark_pre")
                self._k_maxima = module.get_function("maxima_f32")
        except Exception as exc:  # CUDA driver, NVRTC or compile errors, all of cupy's own types
            raise CountingError(f"gpu engine unavailable: cannot build the CUDA kernels ({exc})") from None

    # -- buffers ---------------------------------------------------------------------------------------

    def _pinned(self, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        return self._cpx.empty_pinned(shape, dtype=dtype)  # a numpy array in page-locked memory

    def _ensure_slots(self, rows: int, cols: int) -> None:
        if self._slot_shape == (rows, cols):
            return
        cp = self._cp
        self._slots = []
        for _ in range(self.n_streams):
            # Nothing is written here (empty, not zeros: cupy's zeros would fill on the default stream, which
            # nothing orders before this slot's stream); _launch clears the count on the slot's stream.
            self._slots.append(
                _Slot(
                    stream=cp.cuda.Stream(non_blocking=True),
                    pinned=self._pinned((self.chunk_frames, rows, cols), np.uint16),
                    d_frames=cp.empty((self.chunk_frames, rows, cols), dtype=cp.uint16),
                    d_count=cp.empty(1, dtype=cp.uint32),
                    h_count=self._pinned((1,), np.uint32),
                    d_keys=cp.empty(self.chunk_frames * _EVENTS_PER_FRAME, dtype=cp.uint32),
                )
            )
        self._slot_shape = (rows, cols)

    def _device_corrections(self, corr: Corrections, rows: int, cols: int) -> tuple[Any, Any, Any]:
        # The zero dark made for "no dark" has the frame's shape: a new shape needs a new one.
        if (
            self._device_corr is not None
            and self._device_corr[0] is corr
            and self._device_corr[1].shape == (rows, cols)
        ):
            return self._device_corr[1:]
        cp = self._cp
        # The kernels read these on every slot's stream, which are non-blocking: they do not wait for the
        # default stream, where a bare cp.asarray would copy. Upload on one slot's stream and wait for the
        # copies to finish before any kernel is queued.
        stream = self._slots[0].stream
        with stream:
            dark16 = cp.asarray(corr.dark16 if corr.dark16 is not None else np.zeros((rows, cols), np.uint16))
            dark32 = cp.asarray(corr.dark32 if corr.dark32 is not None else np.zeros((rows, cols), np.float32))
            gain32 = None if corr.gain32 is None else cp.asarray(corr.gain32)
        stream.synchronize()
        self._device_corr = (corr, dark16, dark32, gain32)
        return dark16, dark32, gain32

    # -- counting --------------------------------------------------------------------------------------

    def _launch(self, slot: _Slot, n: int, rows: int, cols: int, params: dict[str, Any], cap: int) -> None:
        grid = ((cols + _BLOCK[0] - 1) // _BLOCK[0], (rows + _BLOCK[1] - 1) // _BLOCK[1], n)
        i32, u32 = np.int32, np.uint32
        with slot.stream:
            slot.d_count.fill(0)
            if params.get("row_dark") is not None:
                mean32, use_mean = params["row_dark"]
                use_gain = params["gain32"] is not None
                gain32 = params["gain32"] if use_gain else params["dark32"]  # never read without use_gain
                halves = ((2 * cols + 127) // 128, 1, n)
                args = (slot.d_frames, params["dark32"], gain32, i32(n), i32(rows), i32(cols), np.float32(mean32))
                args += (np.float64(params["background"]), np.float64(params["xray"]), i32(use_mean))
                args += (i32(use_gain), slot.d_pre)
                self._k_rowdark(halves, (128, 1, 1), args)
                args = (slot.d_pre, i32(n), i32(rows), i32(cols), slot.d_keys, slot.d_count, u32(cap))
                self._k_maxima(grid, _BLOCK, args)
            elif params["gain32"] is None:
                args = (slot.d_frames, params["dark16"], i32(n), i32(rows), i32(cols), i32(params["lo"]))
                args += (i32(params["hi"]), slot.d_keys, slot.d_count, u32(cap))
                self._k_u16(grid, _BLOCK, args)
            else:
                args = (slot.d_frames, params["dark32"], params["gain32"], i32(n), i32(rows), i32(cols))
                args += (np.float64(params["background"]), np.float64(params["xray"]), i32(params["skip"]))
                args += (slot.d_keys, slot.d_count, u32(cap))
                self._k_f32(grid, _BLOCK, args)
            # Non-blocking into pinned memory: the host learns the count when it synchronises in _finish.
            slot.d_count.get(stream=slot.stream, out=slot.h_count, blocking=False)

    def _finish(self, slot: _Slot, n: int, rows: int, cols: int, params: dict[str, Any]) -> list[np.ndarray]:
        cp = self._cp
        slot.stream.synchronize()
        total = int(slot.h_count[0])
        if total > slot.d_keys.size:
            # More events than room: grow the key buffer and count this chunk again (frames still on device).
            logger.debug("gpu engine: %d events in a chunk of %d frames, recounting", total, n)
            slot.d_keys = cp.empty(total, dtype=cp.uint32)
            self._launch(slot, n, rows, cols, params, total)
            slot.stream.synchronize()
            total = int(slot.h_count[0])
        with slot.stream:
            keys = cp.sort(slot.d_keys[:total]).get(stream=slot.stream)
        slot.stream.synchronize()
        npix = rows * cols
        frame_of = keys // np.uint32(npix)
        pixels = (keys - frame_of * np.uint32(npix)).astype(np.uint32)
        counts = np.bincount(frame_of, minlength=n)
        return np.split(pixels, np.cumsum(counts)[:-1])

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
        if rows * cols * self.chunk_frames >= 2**32:
            raise CountingError(f"gpu engine: {self.chunk_frames} frames of {rows}x{cols} overflow the keys")
        results: list[np.ndarray] = []
        with self._device:
            self._ensure_slots(rows, cols)
            dark16, dark32, gain32 = self._device_corrections(corr, rows, cols)
            lo, hi = integer_window(background, xray)
            params = {
                "dark16": dark16,
                "dark32": dark32,
                "gain32": gain32,
                "lo": lo,
                "hi": hi,
                "background": background,
                "xray": xray,
                "skip": int(not (background < 0.0) and background == background),
                "row_dark": row_dark,
            }
            if row_dark is not None:
                for slot in self._slots:
                    if slot.d_pre is None:
                        slot.d_pre = self._cp.empty(self.chunk_frames * rows * cols, dtype=self._cp.float32)
            pending: list[tuple[_Slot, int]] = []
            for k, start in enumerate(range(0, n_frames, self.chunk_frames)):
                chunk = batch[start : start + self.chunk_frames]
                n = chunk.shape[0]
                slot = self._slots[k % self.n_streams]
                if len(pending) == self.n_streams:
                    # The oldest chunk used this slot: finish it before its pinned buffer is refilled.
                    results += self._finish(pending[0][0], pending[0][1], rows, cols, params)
                    pending.pop(0)
                np.copyto(slot.pinned[:n], chunk)
                slot.d_frames[:n].set(slot.pinned[:n], stream=slot.stream)
                self._launch(slot, n, rows, cols, params, slot.d_keys.size)
                pending.append((slot, n))
            for slot, n in pending:
                results += self._finish(slot, n, rows, cols, params)
        return results

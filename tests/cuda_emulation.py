"""Run the gpu engine on the CPU: its own CUDA source compiled for the host, behind a fake cupy that keeps
CUDA's asynchrony.

**Kernels.** The source in ``stemstream.counting.engines.gpu`` is compiled by the host C++ compiler with a few
macros in front (``__global__``, ``__device__``, ``blockIdx``, ``atomicAdd``, ...) and a launcher per kernel
that loops over the grid and the block (:func:`build_kernels`). ``-ffp-contract=off`` keeps ``(raw - dark) *
gain`` two float32 operations, as ``--fmad=false`` does for NVRTC. After a launch the event keys are shuffled,
as a GPU's atomics would leave them.

**The fake cupy** (:func:`fake_cupy`) models what the engine relies on, so that an ordering bug fails a test
instead of passing by luck:

* every copy, fill, sort and kernel is queued on a stream (the ``with stream:`` one, else the default
  stream ``Stream.null``) and **runs only when that stream is synchronised** (``Stream.synchronize``,
  ``Device.synchronize``, a blocking ``get``) **or an event recorded after it is waited on**
  (``Event.synchronize``, ``Stream.wait_event``);
* the default stream is separate from ``Stream(non_blocking=True)`` streams (no implicit ordering), while a
  ``Stream()`` (blocking) and the default stream wait for each other, as CUDA's legacy default stream does;
* device arrays are separate memory: ``asarray``, ``set`` and ``get`` copy (a pageable host source is read
  when the copy is queued, as the CUDA driver stages it; pinned memory when the copy runs), device memory
  from ``empty`` holds garbage, and a device array cannot be read on the host except through ``get``;
* pinned memory comes from ``cupyx.empty_pinned``: a numpy array that **raises** :class:`HazardError` when
  the host touches it (index, slice, ufunc, numpy function) while a queued copy into or out of it has not
  run, e.g. reading the result of ``get(out=pinned, blocking=False)`` before synchronising;
* an operation queued on one stream that touches memory which an unfinished operation on another stream
  writes (or that writes memory another stream's unfinished operation touches) **raises** :class:`HazardError`
  when it is queued: nothing orders the two, on a GPU they may run in either order or at once.

What stays for a real GPU: NVRTC, real concurrency and atomics, memory pools, speed.
"""

from __future__ import annotations

import ctypes
import hashlib
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

COMPILER = shutil.which("c++") or shutil.which("g++")

_PRELUDE = r"""
#include <cstddef>
#define __global__
#define __device__
#define __forceinline__ inline
#define __restrict__ __restrict
struct Dim3 { unsigned int x, y, z; };
static Dim3 blockIdx, blockDim, threadIdx;
static unsigned int atomicAdd(unsigned int* address, unsigned int value)
{
    const unsigned int old = *address;
    *address = old + value;
    return old;
}
"""

# One launcher per kernel: the kernel's own parameters after the launch geometry.
_LAUNCHERS = {
    "count_u16": (
        "const unsigned short* frames, const unsigned short* dark16, const int n_frames, const int rows, "
        "const int cols, const int lo, const int hi, unsigned int* keys, unsigned int* n_keys, "
        "const unsigned int capacity",
        "frames, dark16, n_frames, rows, cols, lo, hi, keys, n_keys, capacity",
    ),
    "count_f32": (
        "const unsigned short* frames, const float* dark32, const float* gain32, const int n_frames, "
        "const int rows, const int cols, const double background, const double xray, "
        "const int skip_nonpositive, unsigned int* keys, unsigned int* n_keys, const unsigned int capacity",
        "frames, dark32, gain32, n_frames, rows, cols, background, xray, skip_nonpositive, keys, n_keys, capacity",
    ),
    "rowdark_pre": (
        "const unsigned short* frames, const float* dark32, const float* gain32, const int n_frames, "
        "const int rows, const int cols, const float mean32, const double background, const double xray, "
        "const int use_mean, const int use_gain, float* pre",
        "frames, dark32, gain32, n_frames, rows, cols, mean32, background, xray, use_mean, use_gain, pre",
    ),
    "maxima_f32": (
        "const float* pre, const int n_frames, const int rows, const int cols, unsigned int* keys, "
        "unsigned int* n_keys, const unsigned int capacity",
        "pre, n_frames, rows, cols, keys, n_keys, capacity",
    ),
}

_LAUNCHER = r"""
extern "C" void launch_{name}(const unsigned int gx, const unsigned int gy, const unsigned int gz,
                               const unsigned int bx, const unsigned int by, const unsigned int bz, {params})
{{
    blockDim = Dim3{{bx, by, bz}};
    for (unsigned int z = 0; z < gz; ++z)
        for (unsigned int y = 0; y < gy; ++y)
            for (unsigned int x = 0; x < gx; ++x)
                for (unsigned int tz = 0; tz < bz; ++tz)
                    for (unsigned int ty = 0; ty < by; ++ty)
                        for (unsigned int tx = 0; tx < bx; ++tx) {{
                            blockIdx = Dim3{{x, y, z}};
                            threadIdx = Dim3{{tx, ty, tz}};
                            {name}({args});
                        }}
}}
"""

_CTYPES = {
    "unsigned short*": ctypes.c_void_p,
    "float*": ctypes.c_void_p,
    "unsigned int*": ctypes.c_void_p,
    "int": ctypes.c_int,
    "unsigned int": ctypes.c_uint,
    "double": ctypes.c_double,
    "float": ctypes.c_float,
}


def _argtypes(params: str) -> list[Any]:
    out = [ctypes.c_uint] * 6
    for param in params.split(","):
        words = param.replace("const ", "").split()  # e.g. ["unsigned", "short*", "frames"]
        out.append(_CTYPES[" ".join(words[:-1])])
    return out


def _pointer(array: Any) -> int:
    array = np.asarray(array)
    assert array.flags.c_contiguous, "a kernel argument must be one contiguous buffer, as on the device"
    return array.ctypes.data


def build_kernels(source: str, build_dir: Path) -> dict[str, Callable[..., None]]:
    """Compile ``source`` for the host; ``{kernel name: launch(grid, block, args)}`` like CuPy's RawKernel."""
    assert COMPILER is not None, "no C++ compiler"
    text = (
        _PRELUDE
        + source
        + "".join(_LAUNCHER.format(name=name, params=params, args=args) for name, (params, args) in _LAUNCHERS.items())
    )
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    library = build_dir / f"kernels-{digest}.so"
    if not library.exists():
        cpp = build_dir / f"kernels-{digest}.cpp"
        cpp.write_text(text)
        command = [COMPILER, "-O2", "-ffp-contract=off", "-shared", "-fPIC", "-o", str(library), str(cpp)]
        subprocess.run(command, check=True, capture_output=True, text=True)
    lib = ctypes.CDLL(str(library))

    def kernel(name: str, params: str) -> Callable[..., None]:
        function = getattr(lib, f"launch_{name}")
        function.argtypes = _argtypes(params)
        function.restype = None

        def launch(grid: tuple[int, int, int], block: tuple[int, int, int], args: tuple[Any, ...]) -> None:
            # Arrays by address; numpy scalars by value; plain ints are addresses the caller already took.
            values = [_pointer(a) if isinstance(a, np.ndarray) else a if isinstance(a, int) else a.item() for a in args]
            function(*grid, *block, *values)

        return launch

    return {name: kernel(name, params) for name, (params, _args) in _LAUNCHERS.items()}


# --- the fake cupy ----------------------------------------------------------------------------------------


class HazardError(AssertionError):
    """Memory touched with nothing ordering the access after an unfinished operation: a CUDA ordering bug."""


class _Op:
    """One queued operation: runs at most once, when its stream is drained."""

    __slots__ = ("done", "run", "seq", "stream", "touched", "what")

    def __init__(self, stream: Stream, seq: int, what: str, run: Callable[[], None]) -> None:
        self.stream, self.seq, self.what, self.run, self.done = stream, seq, what, run, False
        self.touched: list[tuple[_Memory, bool]] = []  # (memory, whether this operation writes it)

    def __repr__(self) -> str:
        return f"{self.what} (#{self.seq} on {self.stream.name})"


class _Memory:
    """One allocation (device or pinned host) and the unfinished operations that touch it."""

    __slots__ = ("data", "kind", "pending")

    def __init__(self, data: np.ndarray, kind: str) -> None:
        self.data = data  # 1-D uint8 storage; arrays are views of it
        self.kind = kind
        self.pending: list[tuple[_Op, bool]] = []  # (operation, whether it writes)

    def check_host(self, how: str) -> None:
        if self.pending:
            ops = ", ".join(repr(op) for op, _ in self.pending)
            raise HazardError(f"host {how} pinned memory while {ops} has not run: synchronise its stream first")


def _storage(shape: Any, dtype: Any, fill: int) -> tuple[np.ndarray, np.ndarray]:
    shape = (shape,) if isinstance(shape, int | np.integer) else tuple(shape)
    dtype = np.dtype(dtype)
    raw = np.full(max(int(np.prod(shape)) * dtype.itemsize, 1), fill, np.uint8)
    return raw, raw[: int(np.prod(shape)) * dtype.itemsize].view(dtype).reshape(shape)


class FakeRuntime:
    """The device: streams and their queues, the current stream, and a record of the kernels launched."""

    def __init__(self) -> None:
        self.seq = 0
        self.streams: list[Stream] = []
        self.stack: list[Stream] = []
        self.launches: list[tuple[str, int]] = []  # (kernel, events found) per launch, in run order
        self.null: Stream = Stream(self, non_blocking=False, name="null")

    @property
    def current(self) -> Stream:
        return self.stack[-1] if self.stack else self.null

    def enqueue(
        self,
        stream: Stream,
        what: str,
        run: Callable[[], None],
        reads: tuple[_Memory, ...] = (),
        writes: tuple[_Memory, ...] = (),
    ) -> _Op:
        # CUDA's legacy default stream: it and the blocking streams wait for each other's earlier work.
        if stream is self.null:
            for other in self.streams:
                if not other.non_blocking and other is not self.null:
                    other.drain()
        elif not stream.non_blocking:
            self.null.drain()
        touched = [(m, False) for m in reads if m not in writes] + [(m, True) for m in writes]
        for memory, writes_it in touched:
            for other, other_writes in memory.pending:
                if other.stream is not stream and (writes_it or other_writes):
                    raise HazardError(
                        f"{what} on stream {stream.name} {'writes' if writes_it else 'reads'} {memory.kind} "
                        f"memory that {other!r} {'writes' if other_writes else 'reads'} and nothing orders "
                        "them (synchronise that stream or wait on an event recorded after it)"
                    )
        self.seq += 1
        op = _Op(stream, self.seq, what, run)
        for memory, writes_it in touched:
            memory.pending.append((op, writes_it))
        op.touched = touched
        stream.queue.append(op)
        return op

    def execute(self, op: _Op) -> None:
        op.run()
        op.done = True
        for memory, _ in op.touched:
            memory.pending = [(o, w) for o, w in memory.pending if o is not op]

    def synchronize_all(self) -> None:
        for stream in [self.null, *self.streams]:
            stream.drain()

    def pending(self) -> list[_Op]:
        return [op for stream in [self.null, *self.streams] for op in stream.queue]


class Stream:
    """A CUDA stream: a FIFO of operations that run when the host synchronises it (or waits on an event)."""

    def __init__(self, runtime: FakeRuntime, non_blocking: bool = False, name: str | None = None) -> None:
        self.runtime = runtime
        self.non_blocking = non_blocking
        self.queue: list[_Op] = []
        self.name = name or f"#{len(runtime.streams) + 1}{' non-blocking' if non_blocking else ''}"
        if name != "null":
            runtime.streams.append(self)

    def __enter__(self) -> Stream:
        self.runtime.stack.append(self)
        return self

    def __exit__(self, *exc: object) -> bool:
        self.runtime.stack.pop()
        return False

    def drain(self, upto: _Op | None = None) -> None:
        while self.queue:
            op = self.queue.pop(0)
            self.runtime.execute(op)
            if op is upto:
                return

    def synchronize(self) -> None:
        self.drain()

    def record(self, event: Event | None = None) -> Event:
        event = event or Event()
        event.op = self.queue[-1] if self.queue else None
        event.stream = self
        return event

    def wait_event(self, event: Event) -> None:
        # Later work on this stream runs after the event: the emulation completes what the event follows.
        event.synchronize()

    def __repr__(self) -> str:
        return f"<fake Stream {self.name}>"


class Event:
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.op: _Op | None = None
        self.stream: Stream | None = None

    def synchronize(self) -> None:
        if self.op is not None and not self.op.done and self.stream is not None:
            self.stream.drain(upto=self.op)

    @property
    def done(self) -> bool:
        return self.op is None or self.op.done


class PinnedArray(np.ndarray):
    """Page-locked host memory: numpy, but every host access checks that no queued copy still uses it."""

    _memory: _Memory | None = None

    def __array_finalize__(self, obj: Any) -> None:
        self._memory = getattr(obj, "_memory", None)

    def _check(self, how: str) -> None:
        if self._memory is not None:
            self._memory.check_host(how)

    def __getitem__(self, key: Any) -> Any:
        self._check("read")
        return super().__getitem__(key)

    def __setitem__(self, key: Any, value: Any) -> None:
        self._check("wrote")
        super().__setitem__(key, value)

    def __array_ufunc__(self, ufunc: Any, method: str, *inputs: Any, **kwargs: Any) -> Any:
        for a in (*inputs, *kwargs.get("out", ())):
            if isinstance(a, PinnedArray):
                a._check(f"used ({ufunc.__name__})")
        plain = [a.view(np.ndarray) if isinstance(a, PinnedArray) else a for a in inputs]
        if "out" in kwargs:
            kwargs["out"] = tuple(a.view(np.ndarray) if isinstance(a, PinnedArray) else a for a in kwargs["out"])
        return getattr(ufunc, method)(*plain, **kwargs)

    def __array_function__(self, func: Any, types: Any, args: Any, kwargs: Any) -> Any:
        for a in (*args, *kwargs.values()):
            if isinstance(a, PinnedArray):
                a._check(f"used (numpy.{func.__name__})")
        return super().__array_function__(func, types, args, kwargs)

    def item(self, *args: Any) -> Any:
        self._check("read")
        return super().item(*args)

    def tolist(self) -> Any:
        self._check("read")
        return super().tolist()

    def copy(self, order: Any = "C") -> Any:
        self._check("read")
        return super().copy(order)

    def __int__(self) -> int:
        self._check("read")
        return int(self.view(np.ndarray))

    def __float__(self) -> float:
        self._check("read")
        return float(self.view(np.ndarray))

    def __index__(self) -> int:
        self._check("read")
        return self.view(np.ndarray).__index__()


def _host_source(host: Any) -> tuple[Callable[[], np.ndarray], tuple[_Memory, ...]]:
    """How a copy reads a host array: pinned memory when the copy runs, pageable memory now (staged)."""
    if isinstance(host, PinnedArray) and host._memory is not None:
        host._check("read (copy source)")
        view = host.view(np.ndarray)
        return (lambda: view), (host._memory,)
    snapshot = np.array(host, copy=True)
    return (lambda: snapshot), ()


class FakeDeviceArray:
    """Device memory: separate from the host, read back only through ``get``."""

    def __init__(self, runtime: FakeRuntime, memory: _Memory, view: np.ndarray) -> None:
        self._rt, self._memory, self._view = runtime, memory, view

    shape = property(lambda self: self._view.shape)
    dtype = property(lambda self: self._view.dtype)
    size = property(lambda self: self._view.size)
    ndim = property(lambda self: self._view.ndim)

    def __len__(self) -> int:
        return len(self._view)

    def __getitem__(self, key: Any) -> FakeDeviceArray:
        view = self._view[key]
        assert isinstance(view, np.ndarray), "the fake hands out device views only (slices, not elements)"
        return FakeDeviceArray(self._rt, self._memory, view)

    def __array__(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError("Implicit conversion to a NumPy array is not allowed (device memory): use .get()")

    def __repr__(self) -> str:
        return f"<fake device array {self.shape} {self.dtype}>"

    def fill(self, value: Any) -> None:
        view = self._view

        def run() -> None:
            view[...] = value

        self._rt.enqueue(self._rt.current, f"fill {self.shape}", run, writes=(self._memory,))

    def set(self, host: Any, stream: Stream | None = None) -> None:
        read, memories = _host_source(host)
        view = self._view
        assert np.shape(host) == view.shape, (np.shape(host), view.shape)

        def run() -> None:
            view[...] = read()

        where = stream or self._rt.current
        self._rt.enqueue(where, f"H2D copy {view.shape}", run, reads=memories, writes=(self._memory,))

    def get(self, stream: Stream | None = None, order: str = "C", out: Any = None, blocking: bool = True) -> Any:
        where = stream or self._rt.current
        view = self._view
        if out is None:
            out = np.empty(view.shape, view.dtype)
        pinned = isinstance(out, PinnedArray) and out._memory is not None
        if pinned:
            out._check("wrote (copy target)")
        target = out.view(np.ndarray)
        assert target.shape == view.shape and target.dtype == view.dtype

        def run() -> None:
            target[...] = view

        writes = (out._memory,) if pinned else ()
        self._rt.enqueue(where, f"D2H copy {view.shape}", run, reads=(self._memory,), writes=writes)
        # Only a copy into pinned memory may return before it has run; into pageable memory CUDA waits.
        if blocking or not pinned:
            where.drain()
        return out

    def kernel_arg(self) -> int:
        assert self._view.flags.c_contiguous, "a kernel argument must be one contiguous buffer"
        return self._view.ctypes.data


def _device_array(runtime: FakeRuntime, shape: Any, dtype: Any) -> FakeDeviceArray:
    raw, view = _storage(shape, dtype, 0xA5)  # garbage until written
    return FakeDeviceArray(runtime, _Memory(raw, "device"), view)


def _kernel_outputs(params: str) -> list[bool]:
    """Per parameter: is it a pointer the kernel may write (not const)?"""
    return ["*" in p and "const" not in p for p in params.split(",")]


def fake_cupy(build_dir: Path) -> tuple[Any, Any, FakeRuntime]:
    """``(cupy, cupyx, runtime)``: the parts of CuPy the gpu engine uses, asynchronous as on a GPU, with the
    engine's CUDA source compiled for the CPU; put them in ``sys.modules`` as "cupy" and "cupyx"."""
    import types

    rt = FakeRuntime()

    class RawModule:
        def __init__(self, code: str, options: tuple[str, ...] = ()) -> None:
            assert "--fmad=false" in options
            self._kernels = build_kernels(code, build_dir)

        def get_function(self, name: str) -> Callable[..., None]:
            launch = self._kernels[name]
            outputs = _kernel_outputs(_LAUNCHERS[name][0])

            def kernel(grid: tuple[int, int, int], block: tuple[int, int, int], args: tuple[Any, ...]) -> None:
                assert len(args) == len(outputs), (name, len(args))
                arrays = [(a, w) for a, w in zip(args, outputs, strict=True) if isinstance(a, FakeDeviceArray)]
                assert not any(isinstance(a, np.ndarray) for a in args), "host memory passed to a kernel"
                has_keys = _LAUNCHERS[name][1].endswith("keys, n_keys, capacity")

                def run() -> None:
                    launch(grid, block, tuple(a.kernel_arg() if isinstance(a, FakeDeviceArray) else a for a in args))
                    if not has_keys:  # a preprocessing kernel: no events
                        rt.launches.append((name, 0))
                        return
                    keys, n_keys, capacity = args[-3], args[-2], int(args[-1])
                    found = int(n_keys._view[0])
                    np.random.default_rng(len(rt.launches)).shuffle(keys._view[: min(found, capacity)])
                    rt.launches.append((name, found))

                rt.enqueue(
                    rt.current,
                    f"kernel {name}",
                    run,
                    reads=tuple(a._memory for a, w in arrays if not w),
                    writes=tuple(a._memory for a, w in arrays if w),
                )

            return kernel

    def asarray(a: Any, dtype: Any = None) -> FakeDeviceArray:
        if isinstance(a, FakeDeviceArray):
            return a
        host = np.asarray(a, dtype=dtype)
        out = _device_array(rt, host.shape, host.dtype)
        out.set(host)
        return out

    def zeros(shape: Any, dtype: Any = float) -> FakeDeviceArray:
        out = _device_array(rt, shape, dtype)
        out.fill(0)
        return out

    def sort(a: FakeDeviceArray) -> FakeDeviceArray:
        out = _device_array(rt, a.shape, a.dtype)
        src, dst = a._view, out._view

        def run() -> None:
            dst[...] = np.sort(src)

        rt.enqueue(rt.current, f"sort {a.shape}", run, reads=(a._memory,), writes=(out._memory,))
        return out

    def empty_pinned(shape: Any, dtype: Any = float, order: str = "C") -> PinnedArray:
        raw, view = _storage(shape, dtype, 0x5A)
        arr = view.view(PinnedArray)
        arr._memory = _Memory(raw, "pinned")
        return arr

    class Device:
        def __init__(self, index: int = 0) -> None:
            self.id = index

        def __enter__(self) -> Device:
            return self

        def __exit__(self, *exc: object) -> bool:
            return False

        def synchronize(self) -> None:
            rt.synchronize_all()

    def make_stream(non_blocking: bool = False) -> Stream:
        return Stream(rt, non_blocking=non_blocking)

    make_stream.null = rt.null  # type: ignore[attr-defined]
    cuda = types.SimpleNamespace(
        runtime=types.SimpleNamespace(getDeviceCount=lambda: 1, deviceSynchronize=rt.synchronize_all),
        Device=Device,
        Stream=make_stream,
        Event=Event,
        get_current_stream=lambda: rt.current,
    )
    cupy = types.SimpleNamespace(
        cuda=cuda,
        RawModule=RawModule,
        ndarray=FakeDeviceArray,
        uint16=np.uint16,
        uint32=np.uint32,
        float32=np.float32,
        empty=lambda shape, dtype=float: _device_array(rt, shape, dtype),
        zeros=zeros,
        asarray=asarray,
        sort=sort,
    )
    cupyx = types.SimpleNamespace(empty_pinned=empty_pinned)
    return cupy, cupyx, rt

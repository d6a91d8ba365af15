"""Run the gpu engine's own CUDA kernel source on the CPU, one emulated CUDA thread after another.

The source in ``stemstream.counting.engines.gpu`` is compiled by the host C++ compiler with a few macros in
front (``__global__``, ``__device__``, ``blockIdx``, ``atomicAdd``, ...) and a launcher per kernel that loops
over the grid and the block. No GPU is needed, so every CI run checks what the kernels compute (ties, edges,
x-ray removal, dark wrap, float32 rounding) against stempy; only the CUDA runtime (streams, NVRTC, real
atomics) is left to the test on a GPU. ``-ffp-contract=off`` keeps ``(raw - dark) * gain`` two float32
operations, as ``--fmad=false`` does for NVRTC.
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
            values = [_pointer(a) if isinstance(a, np.ndarray) else a.item() for a in args]
            function(*grid, *block, *values)

        return launch

    return {name: kernel(name, params) for name, (params, _args) in _LAUNCHERS.items()}

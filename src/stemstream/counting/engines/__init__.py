"""Counting engines: ``stempy`` (the reference), ``cpu`` (numba) and ``gpu`` (CuPy), all bit-identical.

Pick one with :func:`get_engine`; each engine module is imported only when asked for, so choosing the
stempy engine never loads numba, and nothing imports cupy unless the GPU is requested.
"""

from __future__ import annotations

import logging

from stemstream.counting.engines.base import CountingEngine
from stemstream.errors import CountingError

logger = logging.getLogger(__name__)

ENGINE_NAMES = ("stempy", "cpu", "gpu", "auto")

__all__ = ["ENGINE_NAMES", "CountingEngine", "get_engine", "gpu_available"]


def gpu_available() -> bool:
    """True when the gpu engine can run here (cupy importable and a CUDA device present)."""
    from stemstream.counting.engines.gpu import gpu_available as _available

    return _available()


def get_engine(name: str = "auto", *, threads: int | None = None) -> CountingEngine:
    """The engine called ``name``: "stempy" | "cpu" | "gpu" | "auto" (gpu when usable, else cpu).

    ``threads`` is the number of cores the cpu engine uses per batch (default: all numba threads).
    """
    key = name.strip().lower() if isinstance(name, str) else name
    if key == "stempy":
        from stemstream.counting.engines.stempy_engine import StempyEngine

        return StempyEngine(threads=threads)
    if key == "cpu":
        from stemstream.counting.engines.cpu import CpuEngine

        return CpuEngine(threads=threads)
    if key == "gpu":
        from stemstream.counting.engines.gpu import GpuEngine

        return GpuEngine()  # raises CountingError saying why (no cupy, no device)
    if key == "auto":
        from stemstream.counting.engines.cpu import CpuEngine

        if gpu_available():
            from stemstream.counting.engines.gpu import GpuEngine

            try:
                engine: CountingEngine = GpuEngine()
            except CountingError as exc:
                logger.warning("counting engine auto: %s; using the cpu engine", exc)
                return CpuEngine(threads=threads)
            logger.info("counting engine auto: using the gpu engine")
            return engine
        logger.info("counting engine auto: no usable GPU, using the cpu engine")
        return CpuEngine(threads=threads)
    raise CountingError(f"unknown counting engine {name!r}; choose one of: {', '.join(ENGINE_NAMES)}")

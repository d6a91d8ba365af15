"""Electron counting: thresholds, engines (stempy, numba CPU, CuPy GPU), the counted-HDF5 file, raw files.

Everything here reproduces stempy 3.6's counting bit for bit; docs/counting.md describes the algorithm,
the stempy behaviours we match on purpose, and the file layout. Submodules are imported on first use,
so ``import stemstream.counting`` loads neither stempy nor numba.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from stemstream.counting.engines import ENGINE_NAMES, CountingEngine, get_engine, gpu_available
    from stemstream.counting.files import count_raw_files
    from stemstream.counting.output import read_counted, save_png, virtual_bright_field, write_counted
    from stemstream.counting.params import CountingParams, counting_params
    from stemstream.counting.thresholds import Thresholds, compute_dark, compute_thresholds

_EXPORTS = {
    "Thresholds": "thresholds",
    "compute_thresholds": "thresholds",
    "compute_dark": "thresholds",
    "CountingEngine": "engines",
    "ENGINE_NAMES": "engines",
    "get_engine": "engines",
    "gpu_available": "engines",
    "write_counted": "output",
    "read_counted": "output",
    "virtual_bright_field": "output",
    "save_png": "output",
    "count_raw_files": "files",
    "CountingParams": "params",
    "counting_params": "params",
}

__all__ = [
    "ENGINE_NAMES",
    "CountingEngine",
    "CountingParams",
    "Thresholds",
    "compute_dark",
    "compute_thresholds",
    "count_raw_files",
    "counting_params",
    "get_engine",
    "gpu_available",
    "read_counted",
    "save_png",
    "virtual_bright_field",
    "write_counted",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value

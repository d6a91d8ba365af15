"""``CountingConfig``: how a NodeGroup process counts, identical on every rank of a job.

The counting parameters themselves (sigmas, sample size, engine, references) are one
:class:`~stemstream.counting.params.CountingParams`, with its names, defaults and checks; this adds only what
belongs to the counting service (output directory, batches, worker processes, timers, analyses).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from stemstream.counting.params import CountingParams
from stemstream.errors import CountingError
from stemstream.wire.protocol import FRAME_SHAPE, N_SECTORS

__all__ = ["DEFAULT_BATCH", "CountingConfig"]

DEFAULT_BATCH = {"stempy": 4, "cpu": 16, "gpu": 64}


@dataclass
class CountingConfig:
    """How a NodeGroup process counts; identical on every rank of a job."""

    output_dir: Path
    params: CountingParams = field(default_factory=CountingParams)
    # The references as arrays; None: read from ``params.dark`` / ``params.gain`` (None without one).
    dark: np.ndarray | None = None
    gain: np.ndarray | None = None
    batch: int | None = None  # frames per engine call (default by engine)
    workers: int | None = None  # counting processes over shared memory (default: 1 for stempy, else 0)
    worker_cpus: list[int] | None = None  # pin the counting processes to these cores
    max_buffered_frames: int = 512  # frames in batch buffers before frame_buffer waits (soft: nodes.batches)
    sample_grace_s: float = 2.0
    scan_timeout_s: float = 60.0  # rank 0 writes what it has when a scan makes no progress this long
    preview_interval_s: float = 1.0
    preview_ttl_s: float = 900.0  # a preview record expires this long after its last update (Settings)
    analyses: dict[str, dict[str, Any]] | None = None  # name -> parameters (analyses.runner.specs_for); None: none
    view: Any = None  # rank 0 serves the live view with this (analyses.page.ViewConfig); None: no view
    frame_shape: tuple[int, int] = FRAME_SHAPE
    n_sectors: int = N_SECTORS

    def __post_init__(self) -> None:
        if self.dark is None:
            self.dark = self.params.load_dark()
        if self.gain is None:
            self.gain = self.params.load_gain()
        if self.batch is not None and self.batch < 1:
            raise CountingError(f"batch must be >= 1, got {self.batch}")
        if self.workers is not None and not 0 <= self.workers <= 1024:
            raise CountingError(f"workers must be 0 (count in this process) .. 1024, got {self.workers}")

    # The counting parameters, by their one name (CountingParams).

    @property
    def engine(self) -> str:
        return self.params.engine

    @property
    def background_n_sigma(self) -> float:
        return self.params.background_n_sigma

    @property
    def xray_n_sigma(self) -> float:
        return self.params.xray_n_sigma

    @property
    def threshold_samples(self) -> int:
        return self.params.threshold_samples

    @property
    def threshold_window(self) -> int:
        return self.params.threshold_window

    @property
    def row_dark(self) -> str:
        return self.params.row_dark

"""The reference engine: stempy's own ``electron_count_frame``, one frame at a time."""

from __future__ import annotations

import logging

import numpy as np

from stemstream.counting.engines.base import Corrections, EngineBase
from stemstream.errors import CountingError

logger = logging.getLogger(__name__)


class StempyEngine(EngineBase):
    """``stempy._image.electron_count_frame`` per frame, serially.

    stempy 3.6.0's binding holds the GIL while it counts (two Python threads count no faster than one,
    measured), so a thread pool would only add overhead: ``threads`` is accepted for symmetry and ignored.
    Run several processes to use more cores with this engine.
    """

    name = "stempy"

    def __init__(self, *, threads: int | None = None) -> None:
        import stempy._image as simage

        self._image = simage
        self.threads = 1
        if threads not in (None, 1):
            logger.debug("stempy engine: threads=%s ignored, stempy holds the GIL while counting", threads)
        super().__init__()
        import stempy.io as sio

        self._io = sio

    def _count(self, batch: np.ndarray, background: float, xray: float, corr: Corrections) -> list[np.ndarray]:
        _, rows, cols = batch.shape
        options = self._image.ElectronCountOptionsClassic()
        options.background_threshold = background
        options.x_ray_threshold = xray
        options.dark_reference = corr.dark32
        options.gain = corr.gain32
        options.apply_row_dark_subtraction = False
        options.optimized_mean = 0.0
        options.apply_row_dark_use_mean = False
        count_frame = self._image.electron_count_frame
        try:
            return [np.asarray(count_frame(frame, (cols, rows), options), dtype=np.uint32) for frame in batch]
        except Exception as exc:
            raise CountingError(f"stempy electron_count_frame failed: {exc}") from None

    def _count_row_dark(
        self, batch: np.ndarray, background: float, xray: float, corr: Corrections, mean32: np.float32, use_mean: bool
    ) -> list[np.ndarray]:
        # stempy's per-frame binding ignores the row-dark options: its whole-scan counter (the one its
        # electron_count(..., apply_row_dark=True) runs) counts the batch as a scan of len(batch) x 1, with our
        # thresholds instead of its own sample's. It crashes without a dark: a zero dark subtracts nothing.
        n, rows, cols = batch.shape
        options = self._image.ElectronCountOptionsClassic()
        options.background_threshold = background
        options.x_ray_threshold = xray
        options.dark_reference = corr.dark32 if corr.dark32 is not None else np.zeros((rows, cols), np.float32)
        options.gain = corr.gain32
        options.scan_dimensions = (n, 1)
        options.apply_row_dark_subtraction = True
        options.optimized_mean = float(mean32)
        options.apply_row_dark_use_mean = use_mean
        reader = self._io.PyReader(batch, list(range(n)), (n, 1), n, n)
        try:
            counted = self._image.electron_count(reader.begin(), reader.end(), options)
        except Exception as exc:
            raise CountingError(f"stempy electron_count (row dark) failed: {exc}") from None
        return [np.asarray(frames[0], dtype=np.uint32) for frames in counted.data]

"""The live preview a rank publishes while it counts a scan: bright-field events per probe position, binned
so that the store value stays small (``/scans/<n>/preview/<rank>``, a :class:`PreviewRecord`)."""

from __future__ import annotations

import math
import time

import numpy as np

from stemstream.counting import Thresholds
from stemstream.scans.records import PreviewRecord

BF_RADIUS = 60.0  # pixels around the frame centre counted as bright field in the live preview
PREVIEW_MAX_SIDE = 256  # the preview image is binned down to at most this many positions a side


def bright_field_mask(frame_shape: tuple[int, int]) -> np.ndarray:
    """Flat boolean mask of the pixels within BF_RADIUS of the frame centre (indexed by event pixel)."""
    rows, cols = frame_shape
    yy, xx = np.mgrid[0:rows, 0:cols]
    cy, cx = (rows - 1) / 2, (cols - 1) / 2
    return (((yy - cy) ** 2 + (xx - cx) ** 2) <= BF_RADIUS**2).ravel()


def binned(image: np.ndarray) -> np.ndarray:
    """Sum ``image`` in blocks so that neither side exceeds PREVIEW_MAX_SIDE (store values stay small)."""
    rows, cols = image.shape
    f = max(1, math.ceil(max(rows, cols) / PREVIEW_MAX_SIDE))
    if f == 1:
        return image
    pad = np.zeros((math.ceil(rows / f) * f, math.ceil(cols / f) * f), image.dtype)
    pad[:rows, :cols] = image
    return pad.reshape(pad.shape[0] // f, f, pad.shape[1] // f, f).sum(axis=(1, 3))


def preview_record(
    rank: int,
    bf: np.ndarray,
    scan_shape: tuple[int, int],
    counted: int,
    share: int,
    final: bool,
    thresholds: Thresholds | None = None,
    halves: list[list[float]] | None = None,
) -> PreviewRecord:
    """The record of one rank's preview: ``bf`` is the bright-field events per frame so far; the scan's
    thresholds and their stability figure (``halves``: [background, x-ray] of each half of the sample)."""
    image = binned(bf.reshape(scan_shape)).astype(np.uint32)
    return PreviewRecord(
        thresholds=(thresholds.background, thresholds.xray) if thresholds is not None else None,
        threshold_halves=tuple((float(b), float(x)) for b, x in halves or ()),
        rank=rank,
        counted=counted,
        share=share,
        shape=(int(image.shape[0]), int(image.shape[1])),
        bf=image.tobytes(),
        final=final,
        at=time.time(),
    )

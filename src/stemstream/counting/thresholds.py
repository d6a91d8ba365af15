"""Counting thresholds and the dark reference, computed by stempy's own C++ functions.

stempy's ``electron_count`` draws ``number_of_samples`` frames at random (``std::random_device``, with
replacement) from its sample blocks, so its thresholds change from run to run. :func:`compute_thresholds`
hands stempy's ``calculate_thresholds`` every sample frame exactly once, in order: the result is what
stempy computes for that draw, and it is reproducible. See docs/counting.md for the algorithm.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from stemstream.errors import CountingError

logger = logging.getLogger(__name__)

# calculate_thresholds casts ``mean + xray_threshold * std_dev`` to a C int (sic: the x-ray threshold,
# not its n-sigma); past this value the cast is undefined and stempy fails with a std::vector error.
_INT_MAX = 2**31 - 1


@dataclass(frozen=True)
class Thresholds:
    """The two counting thresholds and the statistics they came from.

    ``mean`` and ``std_dev`` are those of the Gaussian fitted to the sample histogram (stempy's
    ``optimized_mean`` / ``optimized_std_dev``): ``background = mean + n_sigma_background * std_dev``.
    ``xray`` is the raw sample mean plus ``n_sigma_xray`` raw standard deviations.
    """

    background: float
    xray: float
    mean: float
    std_dev: float
    n_sigma_background: float
    n_sigma_xray: float
    n_samples: int

    def to_dict(self) -> dict[str, float | int]:
        """Plain Python scalars, safe for msgpack, JSON and HDF5 attributes."""
        return {k: (int(v) if k == "n_samples" else float(v)) for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Thresholds:
        """Inverse of :meth:`to_dict`; unknown keys are ignored, missing or non-numeric ones raise."""
        names = [f.name for f in dataclasses.fields(cls)]
        missing = [n for n in names if n not in data]
        if missing:
            raise CountingError(f"thresholds: missing field(s) {', '.join(missing)}")
        try:
            values = {n: (int(data[n]) if n == "n_samples" else float(data[n])) for n in names}
        except (TypeError, ValueError) as exc:
            raise CountingError(f"thresholds: non-numeric field ({exc})") from None
        return cls(**values)


def _as_frames(frames: np.ndarray, what: str) -> np.ndarray:
    arr = np.asarray(frames)
    if arr.ndim == 2:
        arr = arr[np.newaxis]
    if arr.ndim != 3 or arr.shape[0] == 0 or arr.shape[1] == 0 or arr.shape[2] == 0:
        raise CountingError(f"{what}: expected a non-empty (n, rows, cols) array, got shape {arr.shape}")
    if arr.dtype != np.uint16:
        raise CountingError(f"{what}: frames must be uint16 (raw detector counts), got {arr.dtype}")
    return np.ascontiguousarray(arr)


def prepare_dark(dark: np.ndarray | None, frame_shape: tuple[int, int]) -> np.ndarray | None:
    """The dark reference as stempy's C++ sees it: float32, frame-shaped, finite."""
    if dark is None:
        return None
    arr = np.asarray(dark)
    if arr.shape != frame_shape:
        raise CountingError(f"dark reference has shape {arr.shape}, frames are {frame_shape}")
    if not np.issubdtype(arr.dtype, np.number) or np.iscomplexobj(arr):
        raise CountingError(f"dark reference must be real numbers, got {arr.dtype}")
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    # stempy's Python wrapper refuses NaN darks (its lossless-cast check fails on NaN != NaN).
    if not np.isfinite(arr).all():
        raise CountingError("dark reference contains NaN or infinite values")
    return arr


def prepare_gain(gain: np.ndarray | None, frame_shape: tuple[int, int]) -> np.ndarray | None:
    """The per-pixel multiplier stempy's C++ applies: ``np.power(gain, -1)`` as float32.

    stempy's wrapper inverts the gain exactly like this and then insists the float32 cast be lossless;
    we round instead of refusing, which gives the same multiplier whenever stempy accepts the gain.
    """
    if gain is None:
        return None
    arr = np.asarray(gain)
    if arr.shape != frame_shape:
        raise CountingError(f"gain has shape {arr.shape}, frames are {frame_shape}")
    if not np.issubdtype(arr.dtype, np.number) or np.iscomplexobj(arr):
        raise CountingError(f"gain must be real numbers, got {arr.dtype}")
    if not np.issubdtype(arr.dtype, np.floating):
        arr = arr.astype(np.float32)  # np.power refuses integers to negative powers
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        return np.ascontiguousarray(np.power(arr, -1), dtype=np.float32)


def dark_as_uint16(dark32: np.ndarray) -> np.ndarray:
    """What stempy subtracts from uint16 frames: ``static_cast<uint16_t>(float)``, as x86-64 builds do it.

    The cast truncates towards zero through a 32-bit integer (``cvttss2si``) and keeps the low 16 bits:
    2.7 -> 2, -1.5 -> 65535, 70000 -> 4464, and anything outside +-2**31 -> 0 (measured on stempy 3.6.0).
    """
    t = np.trunc(dark32.astype(np.float64))
    in_range = (t >= -(2.0**31)) & (t < 2.0**31)
    as_int = np.where(in_range, t, 0.0).astype(np.int64)
    return (as_int & 0xFFFF).astype(np.uint16)


def _sample_stats(
    frames: np.ndarray,
    dark32: np.ndarray | None,
    gain32: np.ndarray | None,
) -> dict[str, float]:
    """Predict, without wrapping, the values stempy's calculate_thresholds will see; one frame at a time."""
    dark16 = None if dark32 is None else dark_as_uint16(dark32).astype(np.int32)
    n_values = frames.shape[0] * frames.shape[1] * frames.shape[2]
    total = total_sq = 0.0
    lo, hi = math.inf, -math.inf
    wrapped = 0
    for frame in frames:
        if gain32 is None:
            values = frame.astype(np.int32)
            if dark16 is not None:
                values -= dark16
            bad = (values < 0).sum()
        else:
            # With a gain, stempy's sampler stores into a uint16: truncated after the dark and after the gain.
            with np.errstate(invalid="ignore", over="ignore"):
                step = frame.astype(np.float32)
                if dark32 is not None:
                    step = np.trunc(step - dark32)
                values = np.trunc(step * gain32)
                bad_step = ~np.isfinite(step) | (step < 0)
                bad = (bad_step | ~np.isfinite(values) | (values < 0) | (values > 65535)).sum()
        wrapped += int(bad)
        if bad:
            continue
        values = values.astype(np.float64)
        total += float(values.sum())
        total_sq += float(np.square(values).sum())
        lo, hi = min(lo, float(values.min())), max(hi, float(values.max()))
    return {"n": n_values, "wrapped": wrapped, "sum": total, "sum_sq": total_sq, "min": lo, "max": hi}


def _check_sample(stats: dict[str, float], xray_n_sigma: float, has_dark: bool, has_gain: bool) -> None:
    n = stats["n"]
    if stats["wrapped"]:
        cause = "dark reference above the pixel value" if has_dark else "value x gain outside 0..65535"
        if has_gain:
            cause = "dark reference above the pixel value, or value x gain outside 0..65535"
        raise CountingError(
            f"thresholds: {stats['wrapped']} of {n} sample pixels ({stats['wrapped'] / n:.2%}) would wrap "
            f"around in stempy's uint16 arithmetic ({cause}); stempy would return meaningless thresholds. "
            "Use a dark reference below the data (e.g. the average of dark frames, not of the signal)."
        )
    if stats["max"] == stats["min"]:
        raise CountingError(
            f"thresholds: every sample pixel is {stats['min']:g} (all zeros or a constant frame): "
            "no noise distribution to fit"
        )
    mean = stats["sum"] / n
    var = max(stats["sum_sq"] / n - mean * mean, 0.0) * n / max(n - 1, 1)
    std = math.sqrt(var)
    xray = mean + xray_n_sigma * std
    if mean + xray * std >= _INT_MAX * 0.999:
        raise CountingError(
            f"thresholds: sample too spread out for stempy (mean {mean:.1f}, std {std:.1f}: mean + x-ray "
            "threshold x std overflows a C int in calculate_thresholds); are many pixels saturated?"
        )


def compute_thresholds(
    sample_frames: np.ndarray,
    *,
    dark: np.ndarray | None = None,
    gain: np.ndarray | None = None,
    background_n_sigma: float = 4.0,
    xray_n_sigma: float = 10.0,
) -> Thresholds:
    """Thresholds for ``sample_frames`` (n, rows, cols) uint16, by ``stempy._image.calculate_thresholds``.

    Every sample frame is used exactly once (stempy itself draws frames at random). The frames are
    handed to stempy as a single tall frame in one PyReader block with ``number_of_samples=1``: stempy
    then samples exactly these pixels, in this order. Degenerate samples raise :class:`CountingError`
    before stempy is called, because stempy answers them with undefined behaviour or absurd values.
    """
    import stempy._image as simage
    import stempy.io as sio

    frames = _as_frames(sample_frames, "thresholds")
    n, rows, cols = frames.shape
    dark32 = prepare_dark(dark, (rows, cols))
    gain32 = prepare_gain(gain, (rows, cols))
    if not (math.isfinite(background_n_sigma) and math.isfinite(xray_n_sigma)):
        raise CountingError("thresholds: n-sigma values must be finite numbers")
    _check_sample(_sample_stats(frames, dark32, gain32), xray_n_sigma, dark32 is not None, gain32 is not None)

    tall = frames.reshape(1, n * rows, cols)
    block = sio.PyReader(tall, [0], (1, 1), 1, 1).read()._block
    args: list[Any] = [[block]]
    if dark32 is not None:
        args.append(np.tile(dark32, (n, 1)))
    args += [1, float(background_n_sigma), float(xray_n_sigma)]
    if gain32 is not None:
        args.append(np.tile(gain32, (n, 1)))
    try:
        res = simage.calculate_thresholds(*args)
    except Exception as exc:  # pybind11 maps std:: exceptions to several Python types
        raise CountingError(f"thresholds: stempy's calculate_thresholds failed: {exc}") from None
    thresholds = Thresholds(
        background=float(res.background_threshold),
        xray=float(res.xray_threshold),
        mean=float(res.optimized_mean),
        std_dev=float(res.optimized_std_dev),
        n_sigma_background=float(background_n_sigma),
        n_sigma_xray=float(xray_n_sigma),
        n_samples=n,
    )
    if not (math.isfinite(thresholds.background) and math.isfinite(thresholds.xray)):
        raise CountingError(f"thresholds: stempy returned non-finite thresholds {thresholds}")
    logger.debug(
        "thresholds from %d frames: background %.3f, x-ray %.3f (fit mean %.3f, std %.3f)",
        n,
        thresholds.background,
        thresholds.xray,
        thresholds.mean,
        thresholds.std_dev,
    )
    return thresholds


def compute_dark(frames: np.ndarray) -> np.ndarray:
    """Dark reference: the per-pixel mean of ``frames`` by ``stempy.image.calculate_average``, as float32.

    stempy averages in double; its counting code uses the dark as float32 (and its Python wrapper
    refuses a float64 dark that does not survive that cast), so we round once here.
    """
    import stempy.image as simage
    import stempy.io as sio

    arr = _as_frames(frames, "dark reference")
    n = arr.shape[0]
    reader = sio.PyReader(arr, list(range(n)), (n, 1), n, n)
    try:
        average = simage.calculate_average(reader)
    except Exception as exc:
        raise CountingError(f"dark reference: stempy's calculate_average failed: {exc}") from None
    return np.ascontiguousarray(np.asarray(average), dtype=np.float32)


# ---- the threshold sample: which frames, and how stable the thresholds are (docs/counting.md)

SAMPLE_SEED = 20240516  # fixed: the same scan gives the same sample on every path and every run


def sample_candidates(n_frames: int, samples: int, window: int) -> np.ndarray:
    """The frame numbers tried for a scan's threshold sample, in the order they are tried.

    The first ``min(n_frames, max(window, samples))`` frames in an order drawn with :data:`SAMPLE_SEED`,
    then the frames after them in frame-number order (stand-ins for incomplete ones), ``2 x samples`` in
    all at most. The sample is the first ``samples`` *complete* frames of this list (:func:`choose_sample`):
    with ``window == samples`` that is the first complete frames of the scan; with a larger window the sample
    is spread at random over the first ``window`` frames. Streaming (rank 0's coordinator) and
    ``stemstream count`` (every engine) both use it, so the same raw data gives the same sample.
    """
    if n_frames < 0 or samples < 1 or window < 1:
        raise CountingError(f"threshold sample: bad sizes (frames {n_frames}, samples {samples}, window {window})")
    pool = min(n_frames, max(window, samples))
    # O(2 x samples), not O(pool): a window may span a whole scan of millions of frames.
    drawn = np.random.default_rng(SAMPLE_SEED).choice(pool, size=min(pool, 2 * samples), replace=False, shuffle=True)
    rest = np.arange(pool, min(n_frames, pool + 2 * samples))
    return np.concatenate([drawn, rest]).astype(np.int64)[: min(n_frames, 2 * samples)]


def choose_sample(candidates: np.ndarray, complete: Callable[[int], bool], samples: int) -> list[int]:
    """The first ``samples`` frames of ``candidates`` that ``complete(frame)`` accepts, in candidate order."""
    chosen: list[int] = []
    for f in candidates.tolist():
        if complete(f):
            chosen.append(int(f))
            if len(chosen) == samples:
                break
    return chosen


def sample_halves(chosen: list[int]) -> tuple[list[int], list[int]]:
    """The two disjoint halves of a sample (in its candidate order: every other frame), for the stability
    figure; each sorted in frame-number order, as the sample is computed."""
    return sorted(chosen[0::2]), sorted(chosen[1::2])


def half_thresholds(frames: np.ndarray, chosen: list[int], **kwargs: Any) -> list[list[float]]:
    """The stability figure: ``[[background, xray] of half A, [background, xray] of half B]`` computed by
    :func:`compute_thresholds` on each half of the sample (:func:`sample_halves`); ``frames`` are the
    sample frames in sorted frame-number order. A half too small or degenerate to give thresholds is
    ``[nan, nan]``."""
    order = {f: k for k, f in enumerate(sorted(chosen))}
    out: list[list[float]] = []
    for half in sample_halves(chosen):
        try:
            if not half:
                raise CountingError("empty half")
            t = compute_thresholds(frames[[order[f] for f in half]], **kwargs)
            out.append([t.background, t.xray])
        except CountingError:
            out.append([math.nan, math.nan])
    return out


def sample_thresholds(frames: np.ndarray, chosen: list[int], **kwargs: Any) -> tuple[Thresholds, list[list[float]]]:
    """The thresholds of a sample and their stability figure: ``frames`` are the frames ``chosen`` in
    frame-number order; ``kwargs`` as :func:`compute_thresholds`."""
    return compute_thresholds(frames, **kwargs), half_thresholds(frames, chosen, **kwargs)


def halves_array(halves: list[list[float]] | None) -> np.ndarray:
    """The stability figure as the file records it: float64 (2, 2), rows half A and B, columns (background,
    x-ray); NaN where unknown."""
    out = np.full((2, 2), np.nan)
    if halves:
        out[:] = np.asarray(halves, dtype=np.float64).reshape(2, 2)
    return out

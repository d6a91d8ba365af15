"""compute_thresholds gives stempy's thresholds (its own function, fed every sample frame once), refuses
samples stempy would turn into nonsense, and compute_dark is stempy's average."""

from __future__ import annotations

from pathlib import Path

import msgpack
import numpy as np
import pytest
import stempy._image as simage_core
import stempy.image as simage
import stempy.io as sio

from stemstream.counting import Thresholds, compute_dark, compute_thresholds
from stemstream.errors import CountingError
from stemstream.wire.rawfile import RawScanWriter

SHAPE = (576, 576)


def hit_frame(seed: int) -> np.ndarray:
    """Poisson background around 40 with a few dozen bright hits: a plausible sample."""
    rng = np.random.default_rng(seed)
    frame = rng.poisson(40, SHAPE).astype(np.uint16)
    frame[rng.integers(0, 576, 60), rng.integers(0, 576, 60)] += rng.integers(80, 400, 60).astype(np.uint16)
    return frame


def stempy_block(frames: np.ndarray):
    n = frames.shape[0]
    return sio.PyReader(frames, list(range(n)), (n, 1), n, n).read()._block


@pytest.mark.parametrize("with_dark", [False, True])
@pytest.mark.parametrize("with_gain", [False, True])
def test_equals_stempy_calculate_thresholds(with_dark, with_gain):
    # One frame, or n copies of it: stempy's random draws cannot pick anything else, so results must be equal.
    frames = np.repeat(hit_frame(1)[np.newaxis], 3, axis=0)
    dark = np.full(SHAPE, 12.25, np.float32) if with_dark else None
    gain = np.random.default_rng(2).uniform(0.9, 1.1, SHAPE).astype(np.float32) if with_gain else None
    ours = compute_thresholds(frames, dark=dark, gain=gain, background_n_sigma=4.0, xray_n_sigma=10.0)
    args: list = [[stempy_block(frames)]]
    if with_dark:
        args.append(dark)
    args += [3, 4.0, 10.0]
    if with_gain:
        args.append(np.power(gain, -1).astype(np.float32))
    theirs = simage_core.calculate_thresholds(*args)
    assert ours.background == theirs.background_threshold
    assert ours.xray == theirs.xray_threshold
    assert ours.mean == theirs.optimized_mean and ours.std_dev == theirs.optimized_std_dev
    assert (ours.n_samples, ours.n_sigma_background, ours.n_sigma_xray) == (3, 4.0, 10.0)


def test_equals_what_stempy_electron_count_computes(tmp_path: Path):
    """stempy's own electron_count on raw files of identical frames: its recorded thresholds are ours."""
    frame = hit_frame(5)
    dark = np.full(SHAPE, 7.5, np.float32)
    with RawScanWriter(tmp_path, 1, (2, 3)) as writer:
        for i in range(6):
            for m in range(4):
                writer.write(i, m, np.ascontiguousarray(frame[m * 144 : (m + 1) * 144]))
    reader = sio.reader(
        sorted(str(p) for p in tmp_path.glob("*.data")),
        version=sio.FileVersion.VERSION5,
        backend="multi-pass",
        threads=1,
    )
    sparse = simage.electron_count(reader, darkreference=dark, number_of_samples=4, threshold_num_blocks=2)
    recorded = sparse.metadata["electron_counting"]
    ours = compute_thresholds(np.repeat(frame[np.newaxis], 4, axis=0), dark=dark)
    assert ours.background == recorded["background_threshold"]
    assert ours.xray == recorded["x_ray_threshold"]


def test_every_sample_frame_counts_and_result_is_reproducible():
    frames = np.stack([hit_frame(s) for s in (10, 11, 12)])
    first = compute_thresholds(frames)
    assert compute_thresholds(frames) == first  # stempy alone would draw a new random sample each time
    assert compute_thresholds(frames[:1]) != first
    reordered = compute_thresholds(frames[::-1])
    assert reordered.background == pytest.approx(first.background, rel=1e-9)
    assert first.n_samples == 3


def test_single_2d_frame_is_accepted():
    frame = hit_frame(3)
    assert compute_thresholds(frame) == compute_thresholds(frame[np.newaxis])


def test_degenerate_samples_raise_counting_error():
    with pytest.raises(CountingError, match="all zeros"):
        compute_thresholds(np.zeros((2, *SHAPE), np.uint16))
    with pytest.raises(CountingError, match="wrap"):
        # A dark taken from the signal itself: about half the pixels go below zero in uint16.
        frames = np.stack([hit_frame(s) for s in (1, 2)])
        compute_thresholds(frames, dark=compute_dark(frames))
    with pytest.raises(CountingError, match=r"wrap|outside"):
        gain = np.ones(SHAPE, np.float32)
        gain[0, 0] = 0.0  # inverse inf
        compute_thresholds(hit_frame(1), gain=gain)
    with pytest.raises(CountingError, match=r"spread|saturated"):
        half = np.zeros(SHAPE, np.uint16)
        half[::2] = 65535
        compute_thresholds(half)
    with pytest.raises(CountingError, match="uint16"):
        compute_thresholds(hit_frame(1).astype(np.float32))
    with pytest.raises(CountingError, match="shape"):
        compute_thresholds(np.zeros((0, 576, 576), np.uint16))
    with pytest.raises(CountingError, match="dark reference has shape"):
        compute_thresholds(hit_frame(1), dark=np.zeros((4, 4)))


def test_thresholds_round_trip_through_dict_and_msgpack():
    t = Thresholds(24.5, 400.25, 12.0, 3.125, 4.0, 10.0, 40)
    d = t.to_dict()
    assert all(type(v) in (int, float) for v in d.values()) and type(d["n_samples"]) is int
    assert Thresholds.from_dict(msgpack.unpackb(msgpack.packb(d))) == t
    assert Thresholds.from_dict({**d, "extra": 1}) == t
    with pytest.raises(CountingError, match="missing field"):
        Thresholds.from_dict({k: v for k, v in d.items() if k != "xray"})
    with pytest.raises(CountingError, match="non-numeric"):
        Thresholds.from_dict({**d, "mean": "high"})


def test_compute_dark_is_stempys_average_as_float32():
    frames = np.stack([hit_frame(s) for s in range(3)])
    dark = compute_dark(frames)
    assert dark.dtype == np.float32 and dark.shape == SHAPE
    expected = simage.calculate_average(sio.PyReader(frames, [0, 1, 2], (3, 1), 1, 3))
    assert np.array_equal(dark, np.asarray(expected).astype(np.float32))
    assert np.allclose(dark, frames.mean(axis=0))

"""The 4D Camera simulator: determinism, geometry, ground truth, loss, and stempy's counting of it."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest

from stemstream.errors import ConfigError
from stemstream.sim import FourDCameraSim
from stemstream.sim.camera import NOISE_CLIP_SIGMA
from stemstream.wire.rawfile import write_scan


def test_same_parameters_same_data_whatever_the_call_order() -> None:
    a = FourDCameraSim((4, 4), seed=5, scan_number=3, pool_size=4)
    b = FourDCameraSim((4, 4), seed=5, scan_number=3, pool_size=4)
    # b visits the frames backwards and by sector: the data must not depend on the order of calls.
    sectors_b = {(i, m): b.sector(i, m).copy() for i in reversed(range(16)) for m in range(4)}
    for i in range(16):
        frame = a.frame(i)
        for m in range(4):
            assert np.array_equal(sectors_b[(i, m)], frame[m * 144 : (m + 1) * 144])
        assert np.array_equal(a.ground_truth(i), b.ground_truth(i))
    assert a.lost_sectors() == b.lost_sectors()
    assert np.array_equal(a.dark_frames(2), b.dark_frames(2))


def test_seed_and_scan_number_change_the_data_but_scan_number_keeps_the_dark() -> None:
    base = FourDCameraSim((2, 2), seed=1, scan_number=1, pool_size=2)
    other_seed = FourDCameraSim((2, 2), seed=2, scan_number=1, pool_size=2)
    other_scan = FourDCameraSim((2, 2), seed=1, scan_number=2, pool_size=2)
    assert not np.array_equal(base.frame(0), other_seed.frame(0))
    assert not np.array_equal(base.frame(0), other_scan.frame(0))
    assert not np.array_equal(base.ground_truth(0), other_scan.ground_truth(0))
    assert not np.array_equal(base.dark_reference(), other_seed.dark_reference())
    # The dark pattern belongs to the detector (the seed), so a reference carries over between scans.
    assert np.array_equal(base.dark_reference(), other_scan.dark_reference())


def test_geometry_and_sector_views() -> None:
    sim = FourDCameraSim((3, 5), pool_size=2)
    assert sim.n_frames == 15 and sim.scan_shape == (3, 5)
    assert sim.frame_shape == (576, 576) and sim.n_sectors == 4 and sim.sector_shape == (144, 576)
    frame = sim.frame(7)
    assert frame.shape == (576, 576) and frame.dtype == np.uint16
    kept = []
    for m in range(4):
        s = sim.sector(7, m)
        assert s.shape == (144, 576) and s.dtype == np.uint16 and s.flags.c_contiguous
        assert not s.flags.writeable  # a view of the simulator's cache
        assert np.array_equal(s, frame[m * 144 : (m + 1) * 144])
        kept.append((s, s.copy()))
    sim.frame(8), sim.sector(9, 0)  # the next frames must not write into views already handed out
    assert all(np.array_equal(view, copy) for view, copy in kept)
    frame[:] = 0  # frame() returns the caller's own copy
    assert sim.frame(7).any()


def test_frames_do_not_depend_on_loss() -> None:
    lossless = FourDCameraSim((4, 4), loss_rate=0.0, pool_size=2)
    lossy = FourDCameraSim((4, 4), loss_rate=0.5, pool_size=2)
    assert not lossless.lost_sectors() and lossy.lost_sectors()
    for i in range(16):
        assert np.array_equal(lossless.frame(i), lossy.frame(i))


def test_loss_rate_near_nominal_and_consistent() -> None:
    sim = FourDCameraSim((64, 64), loss_rate=0.01, pool_size=1)
    lost = sim.lost_sectors()
    n = sim.n_frames * 4
    sd = (n * 0.01 * 0.99) ** 0.5
    assert abs(len(lost) - n * 0.01) < 4 * sd, len(lost)
    assert {s for s, _ in lost} != {0}  # spread over the sectors
    for i, m in list(lost)[:50]:
        assert sim.is_lost(i, m)
    not_lost = [(i, m) for i in range(0, 200) for m in range(4) if (i, m) not in lost]
    assert not any(sim.is_lost(i, m) for i, m in not_lost)
    assert FourDCameraSim((8, 8)).loss_rate == 0.001


def test_ground_truth_positions_counts_and_separation() -> None:
    sim = FourDCameraSim((16, 16), electrons_per_frame=20.0, pool_size=2)
    counts = []
    for i in range(sim.n_frames):
        gt = sim.ground_truth(i)
        assert gt.dtype == np.uint32 and np.all(np.diff(gt.astype(np.int64)) > 0)
        rows, cols = np.divmod(gt.astype(np.int64), 576)
        assert rows.min(initial=1) >= 1 and rows.max(initial=1) <= 574
        assert cols.min(initial=1) >= 1 and cols.max(initial=1) <= 574
        cheb = np.maximum(np.abs(rows[:, None] - rows), np.abs(cols[:, None] - cols))
        np.fill_diagonal(cheb, 99)
        assert cheb.min(initial=99) >= 3
        counts.append(gt.size)
    # Poisson(20) over 256 frames, minus the rare strikes dropped for being too close to another.
    assert 19.0 < np.mean(counts) < 21.0
    assert 2.5 < np.var(counts) ** 0.5 < 6.0


def test_strike_centres_are_strict_local_maxima_with_negligible_noise() -> None:
    sim = FourDCameraSim((2, 2), read_noise=0.01, electron_signal=60.0, xray_rate=0.0, pool_size=1)
    for i in range(4):
        signal = sim.frame(i).astype(np.int64) - sim.dark_reference().astype(np.int64)
        gt = sim.ground_truth(i).astype(np.int64)
        rows, cols = np.divmod(gt, 576)
        for r, c in zip(rows, cols, strict=True):
            patch = signal[r - 1 : r + 2, c - 1 : c + 2]
            centre = patch[1, 1]
            assert 55 <= centre <= 65
            assert np.all(np.delete(patch.ravel(), 4) < centre)
            assert patch.sum() > centre  # charge is shared with the neighbours
        # Nothing else above the noise: the charge is all in the ground-truth footprints.
        footprint = np.zeros((576, 576), dtype=bool)
        for r, c in zip(rows, cols, strict=True):
            footprint[r - 1 : r + 2, c - 1 : c + 2] = True
        assert np.all(signal[~footprint] == 0)


def test_background_is_dark_plus_bounded_read_noise() -> None:
    sim = FourDCameraSim((2, 2), electrons_per_frame=0.0, xray_rate=0.0, pool_size=2)
    dark = sim.dark_reference()
    assert dark.dtype == np.float32 and dark.shape == (576, 576)
    assert abs(float(dark.mean()) - 100.0) < 0.1
    bound = np.ceil(NOISE_CLIP_SIGMA * sim.read_noise)
    for i in range(4):
        assert sim.ground_truth(i).size == 0
        residual = sim.frame(i).astype(np.float64) - dark
        assert np.abs(residual).max() <= bound
        assert 2.7 < residual.std() < 3.3
    darks = sim.dark_frames(6)
    assert darks.shape == (6, 576, 576) and darks.dtype == np.uint16
    assert np.abs(darks.astype(np.float64) - dark).max() <= bound
    assert np.abs(darks.mean(axis=0) - dark).mean() < 1.5  # a mean of 6 frames estimates the dark
    assert sim.dark_frames(0).shape == (0, 576, 576)


def test_xray_spikes_are_bright_single_pixels_outside_the_ground_truth() -> None:
    sim = FourDCameraSim((4, 4), xray_rate=2.0, pool_size=2)
    spikes = 0
    for i in range(16):
        signal = sim.frame(i).astype(np.int64) - sim.dark_reference().astype(np.int64)
        bright = np.flatnonzero(signal > 1000)
        spikes += bright.size
        assert not set(bright.tolist()) & set(sim.ground_truth(i).tolist())
    assert 10 <= spikes <= 60  # Poisson(2) per frame over 16 frames


@pytest.mark.parametrize(
    "kwargs",
    [
        {"scan_shape": (0, 4)},
        {"scan_shape": (4,)},
        {"loss_rate": 1.0},
        {"loss_rate": -0.1},
        {"electrons_per_frame": -1.0},
        {"read_noise": 0.0},
        {"electron_signal": 0.0},
        {"xray_rate": -1.0},
        {"pool_size": 0},
        {"seed": -1},
    ],
    ids=lambda kw: next(iter(kw)),
)
def test_bad_parameters_raise_config_error(kwargs: dict) -> None:
    scan_shape = kwargs.pop("scan_shape", (2, 2))
    with pytest.raises(ConfigError):
        FourDCameraSim(scan_shape, **kwargs)


def test_out_of_range_indices_raise_index_error() -> None:
    sim = FourDCameraSim((2, 2), pool_size=1)
    for call in (
        lambda: sim.frame(4),
        lambda: sim.frame(-1),
        lambda: sim.sector(0, 4),
        lambda: sim.is_lost(4, 0),
        lambda: sim.is_lost(0, -1),
        lambda: sim.ground_truth(99),
    ):
        with pytest.raises(IndexError):
            call()


def _score(sim: FourDCameraSim, events: np.ndarray) -> tuple[float, float]:
    hits = found = truth = 0
    for i in range(sim.n_frames):
        gt = set(sim.ground_truth(i).tolist())
        ev = set(np.asarray(events[i, 0]).tolist())
        hits += len(gt & ev)
        found += len(ev)
        truth += len(gt)
    return hits / truth, hits / found


@pytest.mark.parametrize("dark", ["none", "subtracted"])
def test_stempy_default_counting_finds_the_ground_truth(tmp_path: Path, dark: str) -> None:
    stempy_io = pytest.importorskip("stempy.io")
    stempy_image = pytest.importorskip("stempy.image")
    sim = FourDCameraSim((8, 8), seed=11, loss_rate=0.0, xray_rate=0.05)
    paths = write_scan(sim, tmp_path)
    reader = stempy_io.reader(
        [str(p) for p in paths], version=stempy_io.FileVersion.VERSION5, backend="multi-pass", threads=2
    )
    reference = None
    if dark == "subtracted":
        # stempy subtracts the dark in uint16: a pixel below its reference wraps to ~65535, and the
        # threshold fit then crashes the process. Lower the reference below the lowest background.
        reference = sim.dark_reference() - np.float32(np.ceil(NOISE_CLIP_SIGMA * sim.read_noise) + 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        counted = stempy_image.electron_count(reader, darkreference=reference)
    assert counted.data.shape == (64, 1)
    recall, precision = _score(sim, counted.data)
    assert recall >= 0.95, recall
    assert precision >= 0.95, precision

"""Row-dark correction: every engine gives exactly the events of stempy's whole-scan ``electron_count(...,
apply_row_dark=True, apply_row_dark_use_mean=...)`` (stempy's per-frame counter has no row-dark).

Two references: stempy's public ``stempy.image.electron_count`` on raw files (what the fallback counter calls
for the stempy engine; thresholds from its own random sample, so our engines are given the ones it recorded),
and the stempy engine (stempy's whole-scan C++ counter on a batch, with given thresholds) on hand-made frames
aimed at the corners of stempy's arithmetic: half-rows of odd length, non-square frames (stempy walks a frame
in runs of ``rows`` values), a dark above the pixels (uint16 wrap after the float subtraction), scale factors
that overflow uint16, negative and zero optimized means, all-zero half-rows (a zero statistic), gains.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import stempy.io as sio

from cuda_emulation import COMPILER, fake_cupy
from stemstream.counting import CountingParams, Thresholds, count_raw_files, get_engine, read_counted
from stemstream.errors import CountingError
from stemstream.sim.camera import FourDCameraSim
from stemstream.wire.rawfile import write_scan

needs_compiler = pytest.mark.skipif(COMPILER is None, reason="no C++ compiler to emulate the CUDA kernels")


def _thresholds(background: float, xray: float, mean: float) -> Thresholds:
    return Thresholds(background, xray, mean, 1.0, 4.0, 10.0, 1)


# (name, frame shape, thresholds, optimized mean, dark, gain): each one of stempy's corners.
CASES = [
    ("plain", (6, 8), 10.0, 300.0, 120.0, None, False),
    ("odd_rows_non_square", (7, 5), 20.0, 400.0, 133.3, None, False),
    ("dark_wraps", (8, 8), 5.0, 60000.0, 120.0, "wrap", False),
    ("scale_overflows_uint16", (6, 6), 3.0, 70000.0, 1e6, "below", False),
    ("negative_mean", (6, 8), -10.0, 70000.0, -3.5, "below", False),
    ("zero_half_rows", (6, 8), 1.0, 70000.0, 50.0, None, False),
    ("gain_and_dark", (9, 4), 2.0, 500.0, 110.0, "below", True),
    ("gain_negative_background", (5, 6), -1.0, 1e9, 0.25, "wrap", True),
    ("full_frame", (576, 576), 60.0, 1200.0, 96.0, "below", False),
    # Half-rows summing past 2**24: stempy's float32 running sum rounds, a double one would not.
    ("bright_full_frame", (576, 576), 55000.0, 1e9, 63700.3, None, False),
]


def _case(index: int) -> tuple[np.ndarray, Thresholds, np.ndarray | None, np.ndarray | None]:
    name, shape, background, xray, mean, dark_kind, with_gain = CASES[index]
    rng = np.random.default_rng([index, 3])
    n = 2 if shape[0] > 100 else 6
    low, high = (62000, 65535) if name.startswith("bright") else (60, 200)
    frames = rng.integers(low, high, size=(n, *shape)).astype(np.uint16)
    frames[:, 0, 0] = 65535  # saturated
    if name == "zero_half_rows":
        frames[1] = 0
        frames[2, :, : shape[1] // 2] = 0
    dark = None
    if dark_kind == "below":
        dark = (rng.integers(0, 40, size=shape) + rng.integers(0, 4, size=shape) / 4).astype(np.float32)
    elif dark_kind == "wrap":
        dark = (rng.integers(100, 150, size=shape) + 0.5).astype(np.float32)
    gain = rng.uniform(0.5, 2.0, size=shape).astype(np.float32) if with_gain else None
    return frames, _thresholds(background, xray, mean), dark, gain


@pytest.fixture(scope="module")
def emulated_gpu(tmp_path_factory) -> Iterator[Any]:
    from stemstream.counting.engines import gpu

    cupy, cupyx, _runtime = fake_cupy(tmp_path_factory.mktemp("kernels"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(sys.modules, "cupy", cupy)
        mp.setitem(sys.modules, "cupyx", cupyx)
        yield gpu.GpuEngine(chunk_frames=4, streams=2)


def _engines(emulated_gpu: Any) -> dict[str, Any]:
    engines = {"cpu": get_engine("cpu", threads=1), "cpu-2-threads": get_engine("cpu", threads=2)}
    if COMPILER is not None:
        engines["gpu kernels on the cpu"] = emulated_gpu
    return engines


@pytest.mark.parametrize("row_dark", ["mean", "median"])
@pytest.mark.parametrize("index", range(len(CASES)), ids=[c[0] for c in CASES])
def test_every_engine_equals_stempys_row_dark(index, row_dark, emulated_gpu):
    frames, thresholds, dark, gain = _case(index)
    frames.flags.writeable = False
    expected = get_engine("stempy").count(frames, thresholds, dark=dark, gain=gain, row_dark=row_dark)
    assert sum(e.size for e in expected) > 0 or CASES[index][0] in ("zero_half_rows", "scale_overflows_uint16")
    plain = get_engine("stempy").count(frames, thresholds, dark=dark, gain=gain)
    if CASES[index][0] in ("plain", "full_frame", "bright_full_frame"):  # the correction changes what is counted
        assert any(not np.array_equal(a, b) for a, b in zip(plain, expected, strict=True))
    for name, engine in _engines(emulated_gpu).items():
        got = engine.count(frames, thresholds, dark=dark, gain=gain, row_dark=row_dark)
        for f, (g, e) in enumerate(zip(got, expected, strict=True)):
            assert np.array_equal(g, e), f"{name}, frame {f}: {g} != {e}"


def test_row_dark_refuses_what_stempy_crashes_on():
    frames = np.ones((2, 1, 8), np.uint16)
    for engine in (get_engine("stempy"), get_engine("cpu")):
        with pytest.raises(CountingError, match="at least 2 rows"):
            engine.count(frames, _thresholds(0.0, 10.0, 1.0), row_dark="median")
        with pytest.raises(CountingError, match="row_dark must be one of"):
            engine.count(np.ones((1, 4, 4), np.uint16), _thresholds(0.0, 10.0, 1.0), row_dark="max")


SCAN = (5, 6)


@pytest.fixture(scope="module")
def raw_scan(tmp_path_factory) -> tuple[FourDCameraSim, Path]:
    sim = FourDCameraSim(SCAN, scan_number=4, seed=21, loss_rate=0.02, pool_size=4)
    directory = tmp_path_factory.mktemp("raw")
    write_scan(sim, directory)
    return sim, directory


@pytest.mark.parametrize(("row_dark", "with_dark"), [("mean", False), ("median", False), ("median", True)])
def test_every_engine_equals_stempys_electron_count_with_row_dark_on_raw_files(
    raw_scan, tmp_path, row_dark, with_dark, emulated_gpu
):
    """stempy's public electron_count(reader, apply_row_dark=True, ...) counts the raw files; every engine, given
    the thresholds and optimized mean it used, gives its events (frames as stempy's reader assembles them)."""
    import stempy.image as simage

    sim, directory = raw_scan
    paths = [str(p) for p in sorted(directory.glob("*.data"))]
    dark = (sim.dark_reference() - 11.0).astype(np.float32) if with_dark else None
    reader = sio.reader(paths, version=sio.FileVersion.VERSION5, backend="multi-pass")
    sparse = simage.electron_count(
        reader,
        darkreference=dark,
        number_of_samples=8,
        threshold_num_blocks=8,
        apply_row_dark=True,
        apply_row_dark_use_mean=row_dark == "mean",
    )
    info = sparse.metadata["electron_counting"]
    thresholds = Thresholds(
        float(info["background_threshold"]), float(info["x_ray_threshold"]), float(info["optimized_mean"]),
        float(info["optimized_std_dev"]), 4.0, 10.0, 8,
    )  # fmt: skip
    expected = list(np.asarray(sparse.data).ravel())
    # stempy takes each half-row's statistic before the dark: with one, the scale (optimized mean ~11 over raw
    # ~100) leaves nothing above the background, which is stempy's behaviour too.
    assert (sum(e.size for e in expected) > 0) != with_dark
    reader = sio.reader(paths, version=sio.FileVersion.VERSION5, backend="multi-pass")
    frames = np.stack(
        [np.asarray(b.data).reshape(576, 576) for i in range(sim.n_frames) for b in reader.read_frames(i)]
    )
    for name, engine in {"stempy": get_engine("stempy"), **_engines(emulated_gpu)}.items():
        got = engine.count(frames, thresholds, dark=dark, row_dark=row_dark)
        for f, (g, e) in enumerate(zip(got, expected, strict=True)):
            assert np.array_equal(g, e), f"{name}, frame {f}"


def test_the_fallback_counter_counts_with_row_dark_and_records_it(raw_scan, tmp_path):
    """count_raw_files with the cpu engine equals the stempy engine (stempy's whole-scan counter) on the same
    sample, and the file records row_dark (the dark's record: test_count_command.py)."""
    _sim, directory = raw_scan
    paths = sorted(directory.glob("*.data"))
    files = {}
    for engine in ("cpu", "stempy"):
        params = CountingParams(engine=engine, threshold_samples=8, row_dark="median", dark=None)
        files[engine] = read_counted(count_raw_files(paths, tmp_path / f"{engine}.h5", scan_number=4, params=params))
    (ours, meta), (theirs, _) = files["cpu"], files["stempy"]
    assert meta["row_dark"] == "median" and meta["engine"] == "cpu" and "dark" not in meta
    ours, theirs = np.asarray(ours.data).ravel(), np.asarray(theirs.data).ravel()
    assert sum(e.size for e in theirs) > 0
    for f, (g, e) in enumerate(zip(ours, theirs, strict=True)):
        assert np.array_equal(g, e), f"frame {f}"

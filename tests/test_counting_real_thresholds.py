"""Engines equal stempy with thresholds as they really come: arbitrary doubles, compared in double.

stempy compares each pixel, after dark and gain, with the double thresholds in double. The thresholds in
tests/test_counting_engines.py are all exact in float32 (40, 14.5, 26, -1), so an engine comparing in float32
would pass there. Here:

* thresholds from ``compute_thresholds`` on seeded simulated scans (arbitrary doubles), with a dark, with
  and without a gain, at three densities: ~20 and ~200 electrons per frame, and noise-dominated frames
  (background at 1 sigma: ~20,000 events per frame, what a dark-less or high-dose scan gives);
* thresholds a hair either side of a pixel's value after dark and gain (the next double, and 1e-8 away):
  stempy keeps a pixel at 27 above a background of 26.99999999, which float32 rounds to 27.0.

Every engine runs: the cpu engine (one thread and all) and the gpu engine's CUDA source compiled for the CPU
behind the fake cupy (tests/cuda_emulation.py).
"""

from __future__ import annotations

import functools
import math
import sys
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import stempy.image as simage

from cuda_emulation import COMPILER, fake_cupy
from stemstream.counting import Thresholds, compute_thresholds
from stemstream.counting.engines.cpu import CpuEngine
from stemstream.counting.thresholds import prepare_gain
from stemstream.sim.camera import FourDCameraSim

N_FRAMES = 12
SAMPLE = 8  # frames for compute_thresholds


def _dark(sim: FourDCameraSim) -> np.ndarray:
    """The simulator's dark less 13 counts (below every pixel: no uint16 wrap), with eighths (exact in float32)."""
    eighths = np.random.default_rng(21).integers(0, 8, size=sim.frame_shape) / 8
    return (sim.dark_reference() - 13.0 + eighths).astype(np.float32)


GAIN = np.random.default_rng(22).uniform(0.95, 1.05, size=(576, 576)).astype(np.float32)

# name: (electrons per frame, background n-sigma)
SCENES = {"sparse": (20.0, 4.0), "200 electrons": (200.0, 4.0), "noise-dominated": (20.0, 1.0)}


@functools.cache
def scene(name: str, with_gain: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, Thresholds]:
    electrons, n_sigma = SCENES[name]
    sim = FourDCameraSim((3, 4), seed=7, loss_rate=0.0, pool_size=4, electrons_per_frame=electrons)
    frames = np.stack([sim.frame(i) for i in range(N_FRAMES)])
    frames.flags.writeable = False
    dark = _dark(sim)
    gain = GAIN if with_gain else None
    t = compute_thresholds(frames[:SAMPLE], dark=dark, gain=gain, background_n_sigma=n_sigma)
    return frames, dark, gain, t


def stempy_events(frame: np.ndarray, t: Thresholds, dark: np.ndarray | None, gain: np.ndarray | None) -> np.ndarray:
    """stempy's public per-frame counting, thresholds passed as Python floats (doubles)."""
    sparse = simage.electron_count_frame(
        frame, darkreference=dark, background_threshold=t.background, xray_threshold=t.xray, gain=gain
    )
    return np.asarray(sparse.data[0, 0], dtype=np.uint32)


def _with(t: Thresholds, **changes: float) -> Thresholds:
    values = t.to_dict()
    values.update(changes)
    return Thresholds.from_dict(values)


@pytest.fixture(scope="module")
def emulated_gpu(tmp_path_factory) -> Iterator[Any]:
    if COMPILER is None:
        pytest.skip("no C++ compiler to build the kernels for the CPU")
    from stemstream.counting.engines import gpu

    cupy, cupyx, _ = fake_cupy(tmp_path_factory.mktemp("kernels"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(sys.modules, "cupy", cupy)
        mp.setitem(sys.modules, "cupyx", cupyx)
        yield gpu.GpuEngine(chunk_frames=8, streams=2)


ENGINES = ("cpu, 1 thread", "cpu", "gpu kernels on the cpu")


@pytest.fixture(params=ENGINES)
def engine(request) -> Any:
    if request.param == "cpu, 1 thread":
        return _cpu(1)
    if request.param == "cpu":
        return _cpu(None)
    return request.getfixturevalue("emulated_gpu")


@functools.cache
def _cpu(threads: int | None) -> CpuEngine:
    return CpuEngine(threads=threads)


# --- thresholds from compute_thresholds ---------------------------------------------------------------------


@pytest.mark.parametrize("with_gain", [False, True], ids=["dark", "dark+gain"])
@pytest.mark.parametrize("name", list(SCENES))
def test_engines_equal_stempy_with_thresholds_from_real_samples(engine, name, with_gain):
    frames, dark, gain, t = scene(name, with_gain)
    # Arbitrary doubles: neither threshold survives a round trip through float32.
    assert float(np.float32(t.background)) != t.background and float(np.float32(t.xray)) != t.xray
    got = engine.count(frames, t, dark=dark, gain=gain)
    expected = [stempy_events(f, t, dark, gain) for f in frames]
    sizes = [e.size for e in expected]
    low, high = {"sparse": (5, 60), "200 electrons": (100, 400), "noise-dominated": (10_000, 60_000)}[name]
    assert low < np.median(sizes) < high, sizes  # the density the scene stands for
    for i, (g, e) in enumerate(zip(got, expected, strict=True)):
        assert np.array_equal(g, e), f"{name} frame {i}: {g.size} events, stempy {e.size}"


# --- thresholds a hair either side of a pixel ---------------------------------------------------------------


def _value(frame: np.ndarray, dark: np.ndarray, gain: np.ndarray | None, pixel: int) -> float:
    """Pixel ``pixel`` after dark and gain, as stempy computes it (uint16 with wrap, or float32)."""
    raw = frame.reshape(-1)[pixel]
    if gain is None:
        return float((int(raw) - int(np.trunc(dark.reshape(-1)[pixel]))) & 0xFFFF)
    inverse = prepare_gain(gain, gain.shape).reshape(-1)[pixel]
    return float((np.float32(raw) - dark.reshape(-1)[pixel]) * inverse)


def _hairs(v: float) -> list[tuple[str, float]]:
    """Thresholds at, and a hair either side of, v: all but v itself round to v in float32."""
    return [
        ("next double below", math.nextafter(v, -math.inf)),
        ("1e-8 below", v - 1e-8),
        ("equal", v),
        ("1e-8 above", v + 1e-8),
        ("next double above", math.nextafter(v, math.inf)),
    ]


def hair_cases(with_gain: bool) -> list[tuple[str, int, Thresholds, bool]]:
    """(label, pixel, thresholds, whether stempy keeps the pixel as an event) for 4 events of one frame."""
    frames, dark, gain, t = scene("sparse", with_gain)
    frame = frames[0]
    events = stempy_events(frame, t, dark, gain)
    cases = []
    for pixel in events[:: max(1, events.size // 4)][:4]:
        v = _value(frame, dark, gain, int(pixel))
        assert t.background < v < t.xray
        for label, h in _hairs(v):
            if label != "equal":
                assert float(np.float32(h)) == v and h != v  # a float32 comparison would see v itself
            cases.append((f"pixel {pixel} = {v!r}, background {label}", int(pixel), _with(t, background=h), h < v))
            cases.append((f"pixel {pixel} = {v!r}, x-ray {label}", int(pixel), _with(t, xray=h), h > v))
    return cases


@pytest.mark.parametrize("with_gain", [False, True], ids=["dark", "dark+gain"])
def test_engines_equal_stempy_with_thresholds_a_hair_from_pixel_values(engine, with_gain):
    frames, dark, gain, _ = scene("sparse", with_gain)
    frame = frames[:1]
    for label, pixel, t, kept in hair_cases(with_gain):
        expected = stempy_events(frame[0], t, dark, gain)
        assert (pixel in expected) == kept, f"stempy: {label}"  # stempy compares in double
        got = engine.count(frame, t, dark=dark, gain=gain)[0]
        assert np.array_equal(got, expected), f"{label}: {got} != stempy {expected}"


@pytest.mark.parametrize("with_gain", [False, True], ids=["no gain", "gain 1"])
def test_the_issue_example_a_3x3_frame_at_26_99999999(engine, with_gain):
    frame = np.array([[[20, 21, 22], [23, 27, 23], [22, 21, 20]]], np.uint16)
    gain = np.ones((3, 3), np.float32) if with_gain else None
    for background, xray, expected in ((26.99999999, 100.0, [4]), (10.0, 27.00000001, [4]), (27.00000001, 100.0, [])):
        t = Thresholds(background, xray, 0.0, 1.0, 4.0, 10.0, 1)
        assert stempy_events(frame[0], t, None, gain).tolist() == expected
        assert engine.count(frame, t, gain=gain)[0].tolist() == expected, (background, xray)

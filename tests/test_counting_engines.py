"""Every counting engine gives exactly stempy's events, frame by frame.

The reference is stempy's public ``stempy.image.electron_count_frame`` with the same thresholds, dark and
gain. The 2,000 synthetic frames are cheap: a few pre-made noise frames plus hand-placed patterns aimed at
the corners of the algorithm: hits on edges and corners, plateaus of 2, 3 and 4 equal maxima, touching
hits, x-ray spikes next to hits, saturated pixels, values exactly at the thresholds, a dark larger than the
pixels (uint16 wrap), negative and huge dark values, zero gains. A hypothesis test covers tiny frames
(1x1, 1xN, ...) with random values from a small alphabet, where ties are everywhere.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import stempy.image as simage
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cuda_emulation import COMPILER, fake_cupy
from stemstream.counting import Thresholds, get_engine, gpu_available
from stemstream.counting.engines.cpu import CpuEngine
from stemstream.errors import CountingError

SHAPE = (576, 576)
FRAMES_PER_CONFIG = 400
BATCH = 80


@dataclass(frozen=True)
class Config:
    name: str
    background: float
    xray: float
    dark: str | None = None  # "wrap": dark above the noise in a band; "below": dark below the data
    gain: bool = False


CONFIGS = (
    # Integer thresholds: pixels exactly at them must be removed (<= background, >= xray).
    Config("plain", background=40.0, xray=3000.0),
    Config("dark_wrap", background=14.0, xray=3000.0, dark="wrap"),
    # With no x-ray limit the wrapped pixels (~65,520) stay and become events of their own.
    Config("dark_wrap_no_xray", background=14.5, xray=1e12, dark="wrap"),
    Config("dark_gain", background=26.0, xray=2500.0, dark="below", gain=True),
    # A negative background keeps every value (float path): zeroed pixels can then be maxima.
    Config("gain_negative_background", background=-1.0, xray=2500.0, gain=True),
)


def _noise_pool() -> np.ndarray:
    rng = np.random.default_rng(1234)
    return np.clip(rng.normal(30.0, 2.0, size=(4, *SHAPE)), 0, None).round().astype(np.uint16)


NOISE = _noise_pool()


def _dark(kind: str | None) -> np.ndarray | None:
    if kind is None:
        return None
    rng = np.random.default_rng(99)
    frac = rng.integers(0, 8, size=SHAPE).astype(np.float32) / 8  # exact in float32: stempy's wrapper insists
    if kind == "below":
        return (18.0 + frac).astype(np.float32)
    dark = (25.0 + frac).astype(np.float32)
    dark[500:, :] += 20.0  # above every noise pixel: uint16 wrap
    dark[0, :5] = [-1.5, -70000.0, 70000.0, 3e9, 65535.5]  # through stempy's float -> uint16 cast
    return dark


def _gain(enabled: bool) -> np.ndarray | None:
    if not enabled:
        return None
    rng = np.random.default_rng(7)
    gain = rng.uniform(0.8, 1.25, size=SHAPE).astype(np.float32)
    gain[10, 10:14] = 0.0  # inverse is inf: inf and NaN values
    return gain


H, W = SHAPE
EDGE_ROWS = np.array([0, 0, H - 1, H - 1, 0, H - 1, 288, 288])
EDGE_COLS = np.array([0, W - 1, 0, W - 1, 288, 288, 0, W - 1])
# Plateaus of equal maxima: 2 horizontal, 2 vertical, 2 diagonal, 3 (an L), 4 (a square).
PLATEAUS = (
    ((0, 0), (0, 1)),
    ((0, 1), (0, 0)),
    ((0, 1), (0, 1)),
    ((0, 0, 1), (0, 1, 0)),
    ((0, 0, 1, 1), (0, 1, 0, 1)),
)


def synth_batch(config_index: int, start: int, n: int) -> np.ndarray:
    """Frames ``start .. start + n`` of a configuration: seeded, all patterns placed in one assignment."""
    rng = np.random.default_rng([config_index, start, n])
    frames = NOISE[np.arange(start, start + n) % len(NOISE)]
    idx = np.arange(n)
    parts: list[tuple[np.ndarray, ...]] = []

    def add(frame, rows, cols, values) -> None:
        parts.append(tuple(np.broadcast_arrays(frame, rows, cols, values)))

    def origins(lo: int, hi_r: int, hi_c: int) -> tuple[np.ndarray, np.ndarray]:
        return rng.integers(lo, hi_r, (n, 1)), rng.integers(lo, hi_c, (n, 1))

    every = idx[:, None]
    add(every, rng.integers(0, H, (n, 30)), rng.integers(0, W, (n, 30)), rng.integers(100, 2000, (n, 30)))
    corners = idx[(start + idx) % 3 == 0][:, None]
    add(corners, EDGE_ROWS, EDGE_COLS, 900)
    for dr, dc in PLATEAUS:
        r0, c0 = origins(-1, H, W)  # -1: clipped onto the edge
        add(every, r0 + np.array(dr), c0 + np.array(dc), 500)
    corner = rng.integers(0, 2, (n, 2)) * np.array([H - 2, W - 2])  # a 2x2 plateau in a corner
    add(every, corner[:, :1] + np.array([0, 0, 1, 1]), corner[:, 1:] + np.array([0, 1, 0, 1]), 700)
    # Touching hits with different maxima; a plateau next to a higher pixel (no maximum at all).
    r0, c0 = origins(1, H - 2, W - 2)
    add(every, r0 + np.array([0, 0]), c0 + np.array([0, 1]), np.array([600, 601]))
    r0, c0 = origins(1, H - 3, W - 3)
    add(every, r0 + np.zeros(3, int), c0 + np.arange(3), np.array([450, 450, 460]))
    # X-ray spikes, saturated pixels and values at the x-ray threshold; a hit beside two spikes.
    add(every, rng.integers(0, H, (n, 4)), rng.integers(0, W, (n, 4)), np.array([5000, 65535, 2999, 3000]))
    r0, c0 = origins(0, H - 1, W - 1)
    add(every, r0 + np.array([0, 1, 1]), c0 + np.array([0, 0, 1]), np.array([65535, 65535, 400]))
    # Isolated values at and around the "plain" background threshold.
    r0, c0 = origins(2, H - 2, W - 2)
    add(every, r0 // 3 * 3 + np.zeros(3, int), c0 // 3 * 3 + np.array([0, 3, 6]), np.array([40, 41, 39]))
    f, r, c, v = (np.concatenate([p[i].ravel() for p in parts]) for i in range(4))
    frames[f, np.clip(r, 0, H - 1), np.clip(c, 0, W - 1)] = v
    return frames


def stempy_options(config: Config, dark: np.ndarray | None, gain: np.ndarray | None):
    """The options stempy.image.electron_count_frame builds from its keywords (checked in a test below)."""
    options = simage._image.ElectronCountOptionsClassic()
    options.dark_reference = dark
    options.background_threshold = config.background
    options.x_ray_threshold = config.xray
    with np.errstate(divide="ignore"):
        options.gain = None if gain is None else np.power(gain, -1).astype(np.float32)
    options.apply_row_dark_subtraction = False
    options.optimized_mean = 0.0
    options.apply_row_dark_use_mean = False
    return options


def stempy_events(frame: np.ndarray, options) -> np.ndarray:
    return np.asarray(simage.electron_count_frame(frame, options).data[0, 0], dtype=np.uint32)


def thresholds_for(config: Config) -> Thresholds:
    return Thresholds(config.background, config.xray, 0.0, 1.0, 4.0, 10.0, 1)


def batches() -> Iterator[tuple[int, Config, int, np.ndarray]]:
    for k, config in enumerate(CONFIGS):
        for start in range(0, FRAMES_PER_CONFIG, BATCH):
            yield k, config, start, synth_batch(k, start, BATCH)


@pytest.fixture(scope="module")
def reference() -> dict[tuple[int, int], list[np.ndarray]]:
    """stempy's events for every batch, computed once (the slow part of this module: ~2,000 stempy calls)."""
    out: dict[tuple[int, int], list[np.ndarray]] = {}
    for k, config, start, frames in batches():
        options = stempy_options(config, _dark(config.dark), _gain(config.gain))
        out[(k, start)] = [stempy_events(f, options) for f in frames]
    return out


def _assert_same(reference: dict[tuple[int, int], list[np.ndarray]], engine, limit: int = BATCH) -> int:
    """Compare ``engine`` with the reference on the first ``limit`` frames of every batch."""
    compared = 0
    for k, config, start, batch in batches():
        frames = batch[:limit]
        frames.flags.writeable = False  # engines must not need to write
        got = engine.count(frames, thresholds_for(config), dark=_dark(config.dark), gain=_gain(config.gain))
        expected = reference[(k, start)][:limit]
        assert len(got) == len(expected)
        for j, (g, e) in enumerate(zip(got, expected, strict=True)):
            assert g.dtype == np.uint32, config.name
            assert np.array_equal(g, e), f"{engine.name} {config.name} frame {start + j}: {g} != {e}"
        compared += len(got)
    return compared


def test_reference_covers_the_hard_cases(reference):
    """The synthetic frames do produce edge events, ties and wrapped events (else the test proves little)."""
    flat = [e for events in reference.values() for e in events]
    every = np.concatenate(flat)
    rows, cols = every // SHAPE[1], every % SHAPE[1]
    assert ((rows == 0) | (rows == SHAPE[0] - 1) | (cols == 0) | (cols == SHAPE[1] - 1)).sum() > 100
    assert 0 in every and SHAPE[0] * SHAPE[1] - 1 in every  # both far corners
    assert len(flat) == len(CONFIGS) * FRAMES_PER_CONFIG
    plain = reference[(0, 0)][0]
    assert 20 < plain.size < 200


@pytest.mark.filterwarnings("ignore:divide by zero")
def test_reference_options_are_what_stempy_builds_from_keywords():
    frame = synth_batch(3, 0, 1)[0]
    for config in CONFIGS:
        dark, gain = _dark(config.dark), _gain(config.gain)
        by_keywords = simage.electron_count_frame(
            frame,
            darkreference=dark,
            background_threshold=config.background,
            xray_threshold=config.xray,
            gain=gain,
        )
        by_options = stempy_events(frame, stempy_options(config, dark, gain))
        assert np.array_equal(by_keywords.data[0, 0], by_options)


def test_cpu_engine_equals_stempy(reference):
    assert _assert_same(reference, get_engine("cpu")) == len(CONFIGS) * FRAMES_PER_CONFIG


def test_cpu_engine_single_thread_equals_stempy(reference):
    assert _assert_same(reference, get_engine("cpu", threads=1)) == len(CONFIGS) * FRAMES_PER_CONFIG


def test_stempy_engine_equals_stempy(reference):
    # The same C++ function behind another wrapper: a few frames of every batch are enough.
    compared = _assert_same(reference, get_engine("stempy"), limit=4)
    assert compared == len(CONFIGS) * FRAMES_PER_CONFIG // BATCH * 4


@pytest.mark.gpu
@pytest.mark.skipif(not gpu_available(), reason="no CUDA GPU with cupy here")
def test_gpu_engine_equals_stempy(reference):
    assert _assert_same(reference, get_engine("gpu")) == len(CONFIGS) * FRAMES_PER_CONFIG


# --- tiny frames, every value a likely tie ------------------------------------------------------------


@st.composite
def tiny_cases(draw):
    rows = draw(st.integers(1, 7))
    cols = draw(st.integers(1, 7))
    n = rows * cols
    values = draw(st.lists(st.sampled_from([0, 1, 2, 3, 5, 9, 65535]), min_size=2 * n, max_size=2 * n))
    frames = np.array(values, np.uint16).reshape(2, rows, cols)
    dark = gain = None
    if draw(st.booleans()):
        choices = st.sampled_from([0.0, 0.5, 1.0, 2.75, 4.0, -1.5, 70000.0])
        dark = np.array(draw(st.lists(choices, min_size=n, max_size=n)), np.float32).reshape(rows, cols)
    if draw(st.booleans()):
        # A zero gain makes inf (and NaN where the pixel equals the dark: 0 * inf).
        values = draw(st.lists(st.sampled_from([0.5, 1.0, 2.0, 0.25, 4.0, 0.0]), min_size=n, max_size=n))
        gain = np.array(values, np.float32).reshape(rows, cols)
    background = draw(st.sampled_from([-1.0, 0.0, 0.5, 1.0, 2.0, 3.0]))
    xray = draw(st.sampled_from([4.0, 9.0, 100.0, 70000.0]))
    return frames, dark, gain, Config("tiny", background, xray)


@functools.cache
def _shared_cpu_engine(threads: int | None) -> CpuEngine:
    """One engine for every example: what it caches between batches (dark, gain, shape) must not leak."""
    return CpuEngine(threads=threads)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tiny_cases())
def test_cpu_engine_equals_stempy_on_tiny_frames(case):
    frames, dark, gain, config = case
    expected = [stempy_events(f, stempy_options(config, dark, gain)) for f in frames]
    for threads in (1, None):
        got = _shared_cpu_engine(threads).count(frames, thresholds_for(config), dark=dark, gain=gain)
        assert all(np.array_equal(g, e) for g, e in zip(got, expected, strict=True)), (got, expected)


# --- behaviour around the kernel ------------------------------------------------------------------------


def nan_neighbour_frames() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A 4x5 peak of 4 counts (after a dark of 5) with one pixel made NaN (zero gain on a pixel equal to the
    dark: 0 * inf) at each of its 8 neighbours, at the peak itself, and on the frame's edge; one frame each."""
    frames, gains = [], []
    for dr, dc in [(-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1), (0, 0), (-2, 2)]:
        frame = np.full((4, 5), 5, np.uint16)
        frame[2, 2] = 9
        frame[0, 4] = 7  # a second peak, on the edge: the NaN at (-2, 2) from the first is beside it
        gain = np.ones((4, 5), np.float32)
        gain[2 + dr, 2 + dc] = 0.0
        if (dr, dc) == (0, 0):
            frame[2, 2] = 5
        frames.append(frame)
        gains.append(gain)
    return np.stack(frames), np.full((4, 5), 5.0, np.float32), np.stack(gains)


@pytest.mark.filterwarnings("ignore:divide by zero")
@pytest.mark.parametrize("threads", [1, None])
def test_nan_blocks_every_neighbour_and_is_never_an_event(threads):
    """``v > NaN`` is false in stempy: a NaN next to a peak, wherever it is among the 8, removes the event."""
    frames, dark, gains = nan_neighbour_frames()
    config = Config("nan", 0.5, 100.0)
    engine = CpuEngine(threads=threads)
    for frame, gain in zip(frames, gains, strict=True):
        expected = stempy_events(frame, stempy_options(config, dark, gain))
        got = engine.count(frame[None], thresholds_for(config), dark=dark, gain=gain)[0]
        assert np.array_equal(got, expected), (gain, got, expected)
    assert stempy_events(frames[0], stempy_options(config, dark, gains[0])).tolist() == [4]  # the edge peak only


@pytest.mark.parametrize("shape", [(1, 1), (1, 3), (3, 3)])
def test_a_threshold_window_with_no_integer_in_it(shape):
    # background 3.5, x-ray 4: no uint16 value is kept, so every pixel is 0; a 1x1 frame is still an event.
    frames = np.arange(2 * shape[0] * shape[1], dtype=np.uint16).reshape(2, *shape) + 3
    config = Config("empty window", 3.5, 4.0)
    expected = [stempy_events(f, stempy_options(config, None, None)) for f in frames]
    assert [e.tolist() for e in expected] == [[0], [0]] if shape == (1, 1) else [[], []]
    for threads in (1, None):
        got = _shared_cpu_engine(threads).count(frames, thresholds_for(config))
        assert [g.tolist() for g in got] == [e.tolist() for e in expected] and got[0].dtype == np.uint32


def test_crowded_frames_have_room_for_every_event():
    # Isolated maxima on every other row and column: 82,944 events, the most a 576 x 576 frame can hold.
    frame = np.zeros(SHAPE, np.uint16)
    frame[::2, ::2] = 100
    frames = np.stack([frame, NOISE[0], frame])
    config = Config("crowded", 40.0, 3000.0)
    got = get_engine("cpu").count(frames, thresholds_for(config))
    options = stempy_options(config, None, None)
    assert [g.size for g in got] == [82944, stempy_events(NOISE[0], options).size, 82944]
    assert np.array_equal(got[0], stempy_events(frame, options))
    assert np.array_equal(got[2], got[0])


def test_engines_reject_bad_batches():
    engine = get_engine("cpu")
    t = thresholds_for(CONFIGS[0])
    with pytest.raises(CountingError, match="uint16"):
        engine.count(np.zeros((1, 4, 4), np.int32), t)
    with pytest.raises(CountingError, match="shape"):
        engine.count(np.zeros((4, 4), np.uint16), t)
    with pytest.raises(CountingError, match="dark reference has shape"):
        engine.count(np.zeros((1, 4, 4), np.uint16), t, dark=np.zeros((3, 3)))
    with pytest.raises(CountingError, match="NaN"):
        engine.count(np.zeros((1, 4, 4), np.uint16), t, dark=np.full((4, 4), np.nan))
    assert engine.count(np.zeros((0, 4, 4), np.uint16), t) == []


def test_changing_dark_between_calls_is_seen():
    # The engines cache the prepared dark by content: refilling the same array must not reuse the old one.
    frames = synth_batch(0, 0, 2)
    config = Config("d", 8.0, 3000.0)
    dark = np.full(SHAPE, 20.0, np.float32)
    engine = get_engine("cpu")
    first = engine.count(frames, thresholds_for(config), dark=dark)
    dark[:] = 25.0
    second = engine.count(frames, thresholds_for(config), dark=dark)
    options = stempy_options(config, dark, None)
    assert all(np.array_equal(s, stempy_events(f, options)) for s, f in zip(second, frames, strict=True))
    assert any(not np.array_equal(a, b) for a, b in zip(first, second, strict=True))


def test_get_engine_errors():
    with pytest.raises(CountingError) as err:
        get_engine("fpga")
    assert "stempy, cpu, gpu, auto" in str(err.value) and "\n" not in str(err.value)
    if not gpu_available():
        with pytest.raises(CountingError, match="gpu engine unavailable"):
            get_engine("gpu")
        assert get_engine("auto").name == "cpu"
    assert get_engine(" CPU ", threads=1).name == "cpu"
    with pytest.raises(CountingError, match="threads"):
        get_engine("cpu", threads=0)


# --- the GPU engine without a GPU: its CUDA source compiled for the CPU, behind a fake cupy ------------


needs_compiler = pytest.mark.skipif(COMPILER is None, reason="no C++ compiler to build the kernels for the CPU")


@pytest.fixture(scope="module")
def emulated_gpu(tmp_path_factory) -> Iterator[Any]:
    """A GpuEngine on the fake cupy: the engine's own kernels, compiled for the CPU, run asynchronously."""
    from stemstream.counting.engines import gpu

    cupy, cupyx, runtime = fake_cupy(tmp_path_factory.mktemp("kernels"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(sys.modules, "cupy", cupy)
        mp.setitem(sys.modules, "cupyx", cupyx)
        yield _Idle(gpu.GpuEngine(chunk_frames=32, streams=2), runtime)


class _Idle:
    """An engine whose every ``count`` must leave no work queued on the (fake) device."""

    def __init__(self, engine: Any, runtime: Any) -> None:
        self.engine, self.runtime, self.name = engine, runtime, engine.name

    def count(self, *args: Any, **kwargs: Any) -> list[np.ndarray]:
        events = self.engine.count(*args, **kwargs)
        assert not self.runtime.pending(), f"work left queued after count: {self.runtime.pending()}"
        return events


@needs_compiler
def test_gpu_kernels_emulated_on_the_cpu_equal_stempy(reference, emulated_gpu):
    # Half of every batch (1,000 frames, every pattern on each): one emulated CUDA thread per pixel is slow.
    assert _assert_same(reference, emulated_gpu, limit=BATCH // 2) == len(CONFIGS) * FRAMES_PER_CONFIG // 2


@needs_compiler
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tiny_cases())
def test_gpu_kernels_emulated_on_the_cpu_equal_stempy_on_tiny_frames(emulated_gpu, case):
    frames, dark, gain, config = case
    expected = [stempy_events(f, stempy_options(config, dark, gain)) for f in frames]
    got = emulated_gpu.count(frames, thresholds_for(config), dark=dark, gain=gain)
    assert all(np.array_equal(g, e) for g, e in zip(got, expected, strict=True)), (got, expected)


@needs_compiler
def test_gpu_engine_host_logic_on_a_fake_cupy(monkeypatch, reference, tmp_path):
    """Chunking over two streams, key decoding, ordering and the overflow recount, against stempy; every copy
    and kernel runs only when its stream is synchronised (tests/cuda_emulation.py)."""
    from stemstream.counting.engines import gpu

    cupy, cupyx, runtime = fake_cupy(tmp_path)
    monkeypatch.setitem(sys.modules, "cupy", cupy)
    monkeypatch.setitem(sys.modules, "cupyx", cupyx)
    monkeypatch.setattr(gpu, "_EVENTS_PER_FRAME", 64)  # small, so crowded chunks take the recount path
    engine = _Idle(gpu.GpuEngine(chunk_frames=24, streams=2), runtime)
    for k in (0, 3, 4):  # integer path, float path, float path with negative background
        config = CONFIGS[k]
        frames = synth_batch(k, 0, BATCH)
        got = engine.count(frames, thresholds_for(config), dark=_dark(config.dark), gain=_gain(config.gain))
        assert all(np.array_equal(g, e) for g, e in zip(got, reference[(k, 0)], strict=True)), config.name
    found = [n for _, n in runtime.launches]
    chunks = 3 * -(-BATCH // 24)
    assert len(found) > chunks  # every chunk, plus the recounts of the crowded ones
    assert max(found) > 24 * 64  # some chunk had more events than its first-pass room

"""The fake cupy behind the gpu engine's CPU tests keeps CUDA's asynchrony (tests/cuda_emulation.py).

If it ran every copy and kernel at once, as the first version did, a missing synchronise or a copy on the
wrong stream would pass every test: each test here fails on such a fake.
"""

from __future__ import annotations

import numpy as np
import pytest

from cuda_emulation import HazardError, fake_cupy


@pytest.fixture
def fake(tmp_path):
    return fake_cupy(tmp_path)


def test_work_on_a_stream_completes_only_at_its_synchronize(fake):
    cp, cpx, runtime = fake
    stream = cp.cuda.Stream(non_blocking=True)
    device = cp.empty(4, dtype=cp.uint32)
    pinned = cpx.empty_pinned((4,), dtype=np.uint32)
    with stream:
        device.fill(7)
    device.get(stream=stream, out=pinned, blocking=False)
    assert len(runtime.pending()) == 2
    with pytest.raises(HazardError, match="host read pinned memory while D2H copy"):
        int(pinned[0])
    with pytest.raises(HazardError):
        np.sum(pinned)
    stream.synchronize()
    assert pinned.tolist() == [7, 7, 7, 7] and not runtime.pending()


def test_the_default_stream_is_separate_from_non_blocking_streams(fake):
    cp, _, _ = fake
    stream = cp.cuda.Stream(non_blocking=True)
    dark = cp.asarray(np.arange(6, dtype=np.uint16))  # a copy queued on the default stream
    with stream, pytest.raises(HazardError, match=r"reads device memory that H2D copy .* on null"):
        cp.sort(dark)
    cp.cuda.Stream.null.synchronize()
    with stream:
        result = cp.sort(dark)
    assert result.get(stream=stream).tolist() == [0, 1, 2, 3, 4, 5]


def test_a_blocking_stream_waits_for_the_default_stream(fake):
    cp, _, _ = fake
    dark = cp.asarray(np.arange(3, dtype=np.uint16))
    with cp.cuda.Stream() as stream:  # non_blocking=False: CUDA's legacy default-stream ordering
        assert cp.sort(dark).get(stream=stream).tolist() == [0, 1, 2]


def test_an_event_orders_two_streams(fake):
    cp, _, _ = fake
    first, second = cp.cuda.Stream(non_blocking=True), cp.cuda.Stream(non_blocking=True)
    with first:
        data = cp.asarray(np.array([3, 1, 2], np.uint32))
    with second, pytest.raises(HazardError):
        cp.sort(data)
    event = first.record()
    assert not event.done
    second.wait_event(event)
    assert event.done
    with second:
        assert cp.sort(data).get(stream=second).tolist() == [1, 2, 3]


def test_writes_on_two_streams_are_a_hazard_too(fake):
    cp, _, _ = fake
    first, second = cp.cuda.Stream(non_blocking=True), cp.cuda.Stream(non_blocking=True)
    counter = cp.zeros(1, dtype=cp.uint32)  # zeros fills on the default stream
    with first, pytest.raises(HazardError, match="writes device memory that fill"):
        counter.fill(0)
    cp.cuda.Device(0).synchronize()
    with first:
        counter.fill(1)
    with second, pytest.raises(HazardError):
        counter.fill(2)


def test_copies_are_copies(fake):
    cp, cpx, _ = fake
    stream = cp.cuda.Stream(non_blocking=True)
    host = np.array([1, 2, 3], np.uint16)
    with stream:
        device = cp.asarray(host)
    host[:] = 9  # pageable memory: the copy took the values when it was queued
    assert device.get(stream=stream).tolist() == [1, 2, 3]
    with pytest.raises(TypeError, match="Implicit conversion"):
        np.asarray(device)
    pinned = cpx.empty_pinned((3,), dtype=np.uint16)
    pinned[:] = [4, 5, 6]
    device[:3].set(pinned, stream=stream)  # pinned memory: read when the copy runs
    with pytest.raises(HazardError, match="host wrote pinned memory while H2D copy"):
        pinned[0] = 0
    with pytest.raises(HazardError):
        np.copyto(pinned[:1], 0)
    stream.synchronize()
    pinned[:] = 0
    assert device.get(stream=stream).tolist() == [4, 5, 6]


def test_a_blocking_get_synchronises_its_stream_and_empty_is_garbage(fake):
    cp, _, runtime = fake
    stream = cp.cuda.Stream(non_blocking=True)
    device = cp.empty(2, dtype=cp.uint32)
    assert device.get(stream=stream).tolist() != [0, 0]  # never zeroed: whatever was there
    with stream:
        device.fill(5)
        assert device.get().tolist() == [5, 5]
    assert not runtime.pending()

"""The counted HDF5 file: stempy opens it, our metadata survives, the write is atomic, and the two cases
that break stempy's own writer (every frame with the same number of events, all frames empty) work."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import stempy.io as sio

from stemstream.counting import Thresholds, read_counted, save_png, virtual_bright_field, write_counted
from stemstream.errors import CountingError

THRESHOLDS = Thresholds(24.5, 400.0, 12.0, 3.0, 4.0, 10.0, 40)
SCAN = (2, 3)  # rows, cols: not square, so a swap would show


def events_of(lengths: list[int], seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [np.sort(rng.choice(576 * 576, n, replace=False)).astype(np.uint32) for n in lengths]


def assert_events(sparse, expected: list[np.ndarray]) -> None:
    got = list(np.asarray(sparse.data).ravel())
    assert len(got) == len(expected)
    for g, e in zip(got, expected, strict=True):
        assert np.array_equal(g, e)


@pytest.mark.parametrize(
    "lengths",
    [[3, 0, 7, 1, 2, 5], [4] * 6, [0] * 6],
    ids=["mixed", "all-same-length", "all-empty"],
)
def test_stempy_opens_what_we_write(tmp_path: Path, lengths: list[int]):
    events = events_of(lengths)
    path = write_counted(tmp_path / "scan.h5", events, scan_shape=SCAN, metadata={"thresholds": THRESHOLDS})
    sparse = sio.load_electron_counts(str(path))
    assert tuple(sparse.scan_shape) == SCAN and tuple(sparse.frame_shape) == (576, 576)
    assert_events(sparse, events)
    assert sparse.metadata["electron_counting"]["background_threshold"] == THRESHOLDS.background


def test_single_frame_scan(tmp_path: Path):
    for events in (events_of([5]), events_of([0])):
        path = write_counted(tmp_path / "one.h5", events, scan_shape=(1, 1), metadata={})
        sparse, meta = read_counted(path)
        assert_events(sparse, events)
        assert meta["n_frames"] == 1


def test_several_frames_per_position(tmp_path: Path):
    events = events_of([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12])
    sparse, _ = read_counted(write_counted(tmp_path / "x.h5", events, scan_shape=SCAN, metadata={}))
    assert np.asarray(sparse.data).shape == (6, 2)
    assert_events(sparse, events)


def test_metadata_round_trip(tmp_path: Path):
    meta_in = {
        "thresholds": THRESHOLDS,
        "engine": "cpu",
        "scan_number": 17,
        "missing_sectors": [(1, 2), (1, 3), (4, 0)],
        "messages": {"data": 23, "expect": 4, "end": 4},
        "timings": {"first_frame": 1700000000.5, "last_frame": 1700000001.25},
        "note": "calibration",
    }
    path = write_counted(tmp_path / "m.h5", events_of([1] * 6), scan_shape=SCAN, metadata=meta_in)
    _, meta = read_counted(path)
    assert meta["thresholds"] == THRESHOLDS
    assert meta["engine"] == "cpu" and meta["scan_number"] == 17 and meta["note"] == "calibration"
    assert meta["missing_sectors"].tolist() == [[1, 2], [1, 3], [4, 0]]
    assert meta["frames_incomplete"] == 2  # derived from the pairs when not given
    assert meta["messages"] == {"data": 23, "expect": 4, "end": 4}
    timings = meta["timings"]
    assert timings["first_frame"] == 1700000000.5 and timings["last_frame"] == 1700000001.25
    assert timings["file_written"] > timings["last_frame"]
    assert meta["scan_shape"] == [2, 3] and meta["format_version"] == 1
    with h5py.File(path) as f:
        assert f["stemstream/missing_sectors"].dtype == np.int64
        assert f["stemstream/thresholds"].attrs["background"] == THRESHOLDS.background


def test_no_missing_sectors_is_an_empty_pair_list(tmp_path: Path):
    _, meta = read_counted(write_counted(tmp_path / "e.h5", events_of([1] * 6), scan_shape=SCAN, metadata={}))
    assert meta["missing_sectors"].shape == (0, 2) and meta["frames_incomplete"] == 0


def test_write_is_atomic(tmp_path: Path):
    path = tmp_path / "scan.h5"
    write_counted(path, events_of([1] * 6), scan_shape=SCAN, metadata={"engine": "first"})
    with pytest.raises(CountingError, match="cannot store"):
        write_counted(path, events_of([2] * 6), scan_shape=SCAN, metadata={"bad": object()})
    assert read_counted(path)[1]["engine"] == "first"  # the old file is untouched
    assert [p.name for p in tmp_path.iterdir()] == ["scan.h5"]  # and no temporary file is left behind
    write_counted(path, events_of([2] * 6), scan_shape=SCAN, metadata={"engine": "second"})
    sparse, meta = read_counted(path)
    assert meta["engine"] == "second" and all(len(e) == 2 for e in np.asarray(sparse.data).ravel())


def test_bad_events_are_refused(tmp_path: Path):
    with pytest.raises(CountingError, match="do not fill"):
        write_counted(tmp_path / "a.h5", events_of([1] * 5), scan_shape=SCAN, metadata={})
    with pytest.raises(CountingError, match="outside the frame"):
        write_counted(tmp_path / "b.h5", [np.array([576 * 576])] * 6, scan_shape=SCAN, metadata={})
    with pytest.raises(CountingError, match="integer"):
        write_counted(tmp_path / "c.h5", [np.array([1.5])] * 6, scan_shape=SCAN, metadata={})
    with pytest.raises(CountingError, match="not a readable"):
        read_counted(tmp_path / "missing.h5")


def test_virtual_bright_field_counts_events_near_the_centre(tmp_path: Path):
    centre = 288 * 576 + 288
    far = 0
    near = 288 * 576 + 288 + 30  # 30 pixels right of the centre
    events = [
        np.array([centre, far]),
        np.array([]),
        np.array([near]),
        np.array([far]),
        np.array([centre, near]),
        np.array([]),
    ]
    sparse, _ = read_counted(write_counted(tmp_path / "v.h5", events, scan_shape=SCAN, metadata={}))
    image = virtual_bright_field(sparse, radius=31)
    assert image.shape == SCAN and image.dtype == np.float64
    assert image.tolist() == [[1.0, 0.0, 1.0], [0.0, 2.0, 0.0]]
    assert virtual_bright_field(sparse, radius=10).tolist() == [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]
    corner = virtual_bright_field(sparse, radius=1, center=(0, 0))
    assert corner.tolist() == [[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]]
    # Same as summing a dense expansion inside the disc.
    dense = sparse.to_dense().reshape(6, 576, 576)
    yy, xx = np.mgrid[0:576, 0:576]
    disc = (yy - 287.5) ** 2 + (xx - 287.5) ** 2 <= 31**2
    assert np.array_equal(image.ravel(), dense[:, disc].sum(axis=1))
    png = save_png(image, tmp_path / "vbf.png", "virtual bright field")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

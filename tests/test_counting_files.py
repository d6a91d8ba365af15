"""Counting from 4D Camera raw files gives what counting the same frames in RAM gives, with the same
thresholds, for stempy's own electron_count and for our engines; lost sectors are recorded."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from stemstream.config import environment
from stemstream.counting import CountingParams, count_raw_files, get_engine, read_counted
from stemstream.counting.files import index_raw_files
from stemstream.errors import CountingError
from stemstream.sim.camera import FourDCameraSim
from stemstream.wire.rawfile import RawScanWriter

SCAN = (6, 8)  # rows, cols
EMPTY_POSITION = 13  # no sector of this frame is written at all


@pytest.fixture(scope="module")
def scan(tmp_path_factory) -> tuple[FourDCameraSim, Path, np.ndarray, set[tuple[int, int]]]:
    """Raw files of a simulated scan with lost sectors, and the frames stempy will assemble from them."""
    sim = FourDCameraSim(SCAN, scan_number=3, seed=11, loss_rate=0.03, pool_size=4, xray_rate=0.5)
    directory = tmp_path_factory.mktemp("raw")
    lost = set(sim.lost_sectors()) | {(EMPTY_POSITION, m) for m in range(4)}
    frames = np.stack([sim.frame(i) for i in range(sim.n_frames)])
    with RawScanWriter(directory, sim.scan_number, SCAN) as writer:
        for i in range(sim.n_frames):
            for m in range(4):
                if (i, m) in lost:
                    frames[i, m * 144 : (m + 1) * 144] = 0  # what stempy fills a missing sector with
                else:
                    writer.write(i, m, sim.sector(i, m))
    assert len(lost) > 4  # the seed does lose sectors besides the empty position
    return sim, directory, frames, lost


def in_ram(frames: np.ndarray, meta: dict, dark: np.ndarray | None) -> list[np.ndarray]:
    events = get_engine("stempy").count(frames, meta["thresholds"], dark=dark)
    events[EMPTY_POSITION] = np.zeros(0, np.uint32)  # a position with no sector has no frame at all
    return events


@pytest.mark.parametrize("engine", ["stempy", "cpu"])
def test_file_counts_equal_counting_in_ram(scan, tmp_path: Path, engine: str):
    sim, directory, frames, lost = scan
    # The simulator's dark is its mean background: stempy's uint16 subtraction would wrap half the pixels.
    dark = sim.dark_reference() - 11.0
    paths = sorted(directory.glob("*.data"))
    target = tmp_path / "c.h5"
    np.save(tmp_path / "dark.npy", dark)
    with environment(dark_dir=tmp_path):
        params = CountingParams(engine=engine, threshold_samples=8, dark=tmp_path / "dark.npy")
        out = count_raw_files(paths, target, scan_number=3, params=params)
    sparse, meta = read_counted(out)
    assert tuple(sparse.scan_shape) == SCAN and meta["engine"] == engine
    got = list(np.asarray(sparse.data).ravel())
    expected = in_ram(frames, meta, dark)
    assert len(got) == sim.n_frames
    for i, (g, e) in enumerate(zip(got, expected, strict=True)):
        assert np.array_equal(g, e), f"frame {i}"
    # Counting found the simulated electrons (and the thresholds are sensible).
    truth = sum(sim.ground_truth(i).size for i in range(sim.n_frames) if i != EMPTY_POSITION)
    assert 0.9 * truth < sum(g.size for g in got) < 1.1 * truth
    assert sorted(map(tuple, meta["missing_sectors"].tolist())) == sorted(lost)
    assert meta["frames_incomplete"] == len({f for f, _ in lost})
    assert meta["messages"]["sectors_received"] == 4 * sim.n_frames - len(lost)
    assert meta["scan_number"] == 3 and meta["thresholds"].n_sigma_background == 4.0
    timings = meta["timings"]
    assert timings["started"] <= timings["first_frame"] <= timings["last_frame"] <= timings["file_written"]


def test_directory_and_engine_instance_are_accepted(scan, tmp_path: Path):
    _, directory, frames, lost = scan
    out = count_raw_files(directory, tmp_path / "d.h5", scan_number=3, counter=get_engine("cpu", threads=1))
    sparse, meta = read_counted(out)
    complete = SCAN[0] * SCAN[1] - len({f for f, _ in lost})
    assert meta["engine"] == "cpu" and meta["thresholds"].n_samples == min(40, complete)
    expected = in_ram(frames, meta, None)
    assert all(np.array_equal(g, e) for g, e in zip(np.asarray(sparse.data).ravel(), expected, strict=True))


def test_index_reads_headers_only(scan):
    _, directory, _, lost = scan
    index = index_raw_files(sorted(directory.glob("*.data")))
    assert index.scan_shape == SCAN and index.scan_number == 3 and index.frames_per_position == 1
    assert index.frames_at[EMPTY_POSITION] == 0
    incomplete = {f for f, _ in lost}
    assert not index.complete[EMPTY_POSITION] and index.complete.sum() == SCAN[0] * SCAN[1] - len(incomplete)


def test_bad_inputs_raise_counting_error(tmp_path: Path):
    with pytest.raises(CountingError, match="does not exist"):
        count_raw_files([tmp_path / "nope.data"], tmp_path / "o.h5", scan_number=1)
    bad_name = tmp_path / "scan.data"
    bad_name.write_bytes(b"")
    with pytest.raises(CountingError, match="module"):
        count_raw_files([bad_name], tmp_path / "o.h5", scan_number=1)
    truncated = tmp_path / "data_scan0000000001_module0_00000.data"
    truncated.write_bytes(b"\0" * 100)
    with pytest.raises(CountingError, match="whole number"):
        count_raw_files([truncated], tmp_path / "o.h5", scan_number=1)
    with pytest.raises(CountingError, match="no raw files"):
        count_raw_files([], tmp_path / "o.h5", scan_number=1)


def test_count_command_writes_the_same_file_as_the_library(scan, tmp_path: Path, capsys):
    from stemstream.cli import main

    _sim, directory, _frames, lost = scan
    out = tmp_path / "cli.h5"
    assert main(["count", str(directory), "--scan", "3", "--engine", "cpu", "--output", str(out), "--no-progress"]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    sparse, meta = read_counted(out)
    direct = count_raw_files(directory, tmp_path / "lib.h5", scan_number=3, params=CountingParams(engine="cpu"))
    sparse_lib, meta_lib = read_counted(direct)
    assert meta["thresholds"] == meta_lib["thresholds"]
    for a, b in zip(np.asarray(sparse.data).ravel(), np.asarray(sparse_lib.data).ravel(), strict=True):
        assert np.array_equal(a, b)
    assert sorted(map(tuple, meta["missing_sectors"].tolist())) == sorted(lost)


def test_count_command_errors_are_one_line(tmp_path: Path, capsys):
    from stemstream.cli import main

    assert main(["count", str(tmp_path / "nowhere"), "--scan", "1"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("stemstream: error:") and "\n" not in err


def test_count_command_takes_the_newest_acquisition_of_a_reused_scan_number(tmp_path: Path, monkeypatch, capsys):
    """Scan 5 acquired twice (a DAQ restart reset the counter): the second's files are in their own
    directory; ``stemstream count DIR --scan 5`` counts the newest, ``--start`` the one named, and the counted
    file of each records its acquisition (the newest's gets a suffix next to the first's file)."""
    from stemstream.cli import main
    from stemstream.counting.output import counted_start
    from stemstream.wire.protocol import new_start_id

    shape = (2, 3)
    first, second = new_start_id(1.7e9), new_start_id(1.7e9 + 60)
    sims = {start: FourDCameraSim(shape, scan_number=5, seed=k, pool_size=2) for k, start in enumerate((first, second))}
    (tmp_path / "raw").mkdir()
    for start, sim in sims.items():
        with RawScanWriter(tmp_path / "raw", 5, shape, start=start) as writer:
            for i in range(sim.n_frames):
                for m in range(4):
                    writer.write(i, m, sim.sector(i, m))
    assert (tmp_path / "raw" / f"scan_5_{second}").is_dir()
    monkeypatch.setenv("STEMSTREAM_OUTPUT_DIR", str(tmp_path / "out"))
    from stemstream.config import get_settings

    get_settings.cache_clear()
    try:
        args = ["count", str(tmp_path / "raw"), "--scan", "5", "--engine", "cpu", "--no-progress"]
        assert main([*args, "--start", first]) == 0
        assert main(args) == 0
        assert main([*args, "--start", "nope"]) == 1
    finally:
        get_settings.cache_clear()
    out = capsys.readouterr().out.split()
    assert out == [str(tmp_path / "out" / "scan_5_counted.h5"), str(tmp_path / "out" / f"scan_5_{second}_counted.h5")]
    for path, start in zip(out, (first, second), strict=True):
        assert counted_start(path) == start
        sparse, meta = read_counted(path)
        events = get_engine("cpu").count(np.stack([sims[start].frame(i) for i in range(6)]), meta["thresholds"])
        assert all(np.array_equal(a, b) for a, b in zip(np.asarray(sparse.data).ravel(), events, strict=True))

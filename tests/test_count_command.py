"""``stemstream count`` on a fallback directory (many scans) and ``stemstream dark``, as real processes.

A fallback directory holds scans 7 (4x4) and 11 (6x5): ``--scan 11`` counts exactly scan 11's files; an absent
or negative number, a missing module file and a mix of scans are refused in one line, with no file written;
a scan with many incomplete frames is counted with a warning, recorded in the file. ``stemstream dark`` is
stempy's ``calculate_average``; ``--dark latest`` finds it, and the counted file records its path and checksum.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import msgpack
import numpy as np
import pytest
import stempy.image as simage
import stempy.io as sio

from stemstream.counting import read_counted
from stemstream.errors import ProtocolError
from stemstream.plane.requests import request_scan
from stemstream.scans.records import ScanRequest
from stemstream.sim.camera import FourDCameraSim
from stemstream.wire.protocol import (
    EndMessage,
    ExpectMessage,
    SectorHeader,
    check_scan_number,
    decode_data_message,
    decode_info,
)
from stemstream.wire.rawfile import write_scan

ROOT = Path(__file__).resolve().parents[1]


def run(*args: object, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "stemstream.cli", *(str(a) for a in args)]
    full = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "STEMSTREAM_LOG_LEVEL": "WARNING", **env}
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, env=full, check=False)


@pytest.fixture(scope="module")
def fallback(tmp_path_factory) -> Path:
    """Scans 7 (4x4) and 11 (6x5) side by side, as the producers' fallback directory holds them."""
    directory = tmp_path_factory.mktemp("fallback")
    write_scan(FourDCameraSim((4, 4), scan_number=7, seed=1, loss_rate=0.0, pool_size=4), directory)
    write_scan(FourDCameraSim((6, 5), scan_number=11, seed=2, loss_rate=0.0, pool_size=4), directory)
    return directory


@pytest.fixture
def env(tmp_path) -> dict[str, str]:
    return {
        "STEMSTREAM_OUTPUT_DIR": str(tmp_path / "counted"),
        "STEMSTREAM_DARK_DIR": str(tmp_path / "darks"),
        "STEMSTREAM_ENGINE": "cpu",
        "STEMSTREAM_THRESHOLD_SAMPLES": "8",
    }


def one_line_error(result: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("stemstream: error:"), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_count_selects_the_scan_by_the_number_in_the_file_names(fallback, env, tmp_path):
    result = run("count", fallback, "--scan", 11, "--no-progress", env=env)
    assert result.returncode == 0, result.stderr
    path = Path(result.stdout.strip())
    sparse, meta = read_counted(path)
    assert path == tmp_path / "counted" / "scan_11_counted.h5"
    assert tuple(sparse.scan_shape) == (6, 5)
    assert meta["messages"] == {"sectors_received": 4 * 30, "sectors_expected": 4 * 30}
    assert sorted(meta["raw_files"]) == sorted(p.name for p in fallback.glob("data_scan0000000011_*.data"))
    assert meta["frames_incomplete"] == 0 and meta["warnings"] == []


@pytest.mark.parametrize(
    ("scan", "fragments"),
    [(8, ("no raw files of scan 8", "scans there: 7, 11")), (-1, ("--scan -1", "outside 0..4294967295"))],
)
def test_count_refuses_a_number_not_there_in_one_line(fallback, env, tmp_path, scan, fragments):
    one_line_error(run("count", fallback, "--scan", scan, "--no-progress", env=env), *fragments)
    assert not (tmp_path / "counted").exists() or not any((tmp_path / "counted").iterdir())


def test_count_names_a_missing_module_file(fallback, env, tmp_path):
    directory = tmp_path / "partial"
    shutil.copytree(fallback, directory)
    for path in directory.glob("data_scan0000000007_module2_*.data"):
        path.unlink()
    one_line_error(
        run("count", directory, "--scan", 7, "--no-progress", env=env),
        "no file of module 2",
        "data_scan0000000007_module2_*.data",
    )
    # Given file by file: the same refusal, naming the absent module.
    one_line_error(
        run("count", *directory.glob("data_scan0000000007_*.data"), "--scan", 7, "--no-progress", env=env),
        "no file of module 2",
        "data_scan0000000007_module2_*.data",
    )


def test_count_refuses_files_of_two_scans(fallback, env):
    files = [*fallback.glob("data_scan0000000007_*.data"), *fallback.glob("data_scan0000000011_*.data")]
    one_line_error(run("count", *files, "--scan", 7, "--no-progress", env=env), "mix scan sizes (4x4, 6x5)")


def test_a_scan_with_many_incomplete_frames_is_counted_with_a_warning_in_the_file(env, tmp_path):
    directory = tmp_path / "lossy"
    write_scan(FourDCameraSim((6, 6), scan_number=3, seed=4, loss_rate=0.05, pool_size=4), directory)
    result = run("count", directory, "--scan", 3, "--no-progress", env=env)
    assert result.returncode == 0, result.stderr
    assert "are incomplete" in result.stderr  # the log's warning
    _sparse, meta = read_counted(Path(result.stdout.strip()))
    assert meta["frames_incomplete"] > 0.01 * 36
    (warning,) = meta["warnings"]
    assert f"{meta['frames_incomplete']} of 36 frames" in warning


def test_scan_numbers_have_one_check_everywhere():
    assert check_scan_number(0) == 0 and check_scan_number(2**32 - 1) == 2**32 - 1
    for bad in (-1, 2**32, 1.5, "7", True):
        with pytest.raises(ProtocolError):
            check_scan_number(bad)
    for bad in (-1, 2**32):
        with pytest.raises(ProtocolError, match="outside"):
            ScanRequest.from_record({"scan": bad, "scan_shape": [4, 4]})
    written: dict[str, object] = {}

    class Store:
        def set(self, key: str, value: object) -> None:
            written[key] = value

    with pytest.raises(ProtocolError, match="outside"):
        request_scan(Store(), -1, (4, 4))
    assert not written
    header = SectorHeader(scan_number=7, frame_number=3, sector=2, scan_shape=(4, 4), timestamp_ns=1)
    expect = ExpectMessage("rs-2/t0", 7, 2, 1, (4, 4), ("ng",), {"ng": 16})
    end = EndMessage(producer="rs-2/t0", scan_number=7, sector=2, sent={"ng": 16}, lost_upstream=0)
    payload = bytes(144 * 576 * 2)
    for bad in (-1, 2**32):
        for message in (expect, end):
            obj = msgpack.unpackb(message.encode(), raw=False) | {"scan": bad}
            with pytest.raises(ProtocolError, match="field 'scan'"):
                decode_info(msgpack.packb(obj))
        obj = msgpack.unpackb(header.encode(), raw=False) | {"scan": bad}
        with pytest.raises(ProtocolError, match="field 'scan'"):
            decode_data_message([msgpack.packb(obj), payload])


def test_dark_is_stempys_average_and_latest_finds_it(env, tmp_path):
    darks = tmp_path / "darks"
    directory = tmp_path / "dark_scan"
    write_scan(FourDCameraSim((3, 4), scan_number=5, seed=8, loss_rate=0.0, electrons_per_frame=0), directory)
    result = run("dark", directory, "--scan", 5, "-o", "first.npy", env=env)
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.strip()) == darks / "first.npy"
    reader = sio.reader(sorted(str(p) for p in directory.glob("*.data")), version=sio.FileVersion.VERSION5)
    expected = np.asarray(simage.calculate_average(reader), dtype=np.float64).astype(np.float32)
    made = np.load(darks / "first.npy")
    assert made.dtype == np.float32 and np.array_equal(made, expected)
    # A second dark, a few noise sigmas below the mean (so stempy's uint16 subtraction does not wrap): the latest.
    result = run("dark", directory, "--scan", 5, "-o", "second.npy", "--offset", 20, env=env)
    assert result.returncode == 0, result.stderr
    assert np.array_equal(np.load(darks / "second.npy"), expected - np.float32(20))
    side = json.loads((darks / "second.json").read_text())
    assert side["scan_number"] == 5 and side["offset"] == 20
    signal = tmp_path / "signal"
    write_scan(FourDCameraSim((4, 4), scan_number=6, seed=8, loss_rate=0.0), signal)
    result = run("count", signal, "--scan", 6, "--dark", "latest", "--no-progress", env=env)
    assert result.returncode == 0, result.stderr
    _sparse, meta = read_counted(Path(result.stdout.strip()))
    assert meta["dark"] == str(darks / "second.npy")
    assert meta["dark_sha256"] == hashlib.sha256((darks / "second.npy").read_bytes()).hexdigest()


def test_a_dark_outside_the_dark_directory_is_refused_in_one_line(fallback, env, tmp_path):
    outside = tmp_path / "elsewhere.npy"
    np.save(outside, np.zeros((576, 576), np.float32))
    (tmp_path / "darks").mkdir()
    os.symlink(outside, tmp_path / "darks" / "link.npy")
    for value in (outside, "../elsewhere.npy", "link.npy"):
        one_line_error(
            run("count", fallback, "--scan", 7, "--dark", value, "--no-progress", env=env), "outside the dark directory"
        )
    one_line_error(run("dark", fallback, "--scan", 7, "-o", outside, env=env), "outside the dark directory")
    one_line_error(run("count", fallback, "--scan", 7, "--dark", "latest", "--no-progress", env=env), "no dark made by")

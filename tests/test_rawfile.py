"""The 4D Camera raw-file writer, read back by stempy's multi-pass reader and by read_sectors."""

from __future__ import annotations

import errno
import os
import struct
import warnings
from pathlib import Path

import numpy as np
import pytest

from stemstream.errors import FallbackError, RawFileError
from stemstream.sim import FourDCameraSim
from stemstream.wire import rawfile
from stemstream.wire.rawfile import (
    HEADER_BYTES,
    RawScanWriter,
    raw_file_name,
    read_sectors,
    sector_of_path,
    write_scan,
)

stempy_io = pytest.importorskip("stempy.io")

SECTOR_BYTES = 144 * 576 * 2
RECORD_BYTES = HEADER_BYTES + SECTOR_BYTES


def _stempy_reader(paths: list[Path]):
    return stempy_io.reader(
        [str(p) for p in paths], version=stempy_io.FileVersion.VERSION5, backend="multi-pass", threads=2
    )


def _expected_frame(sim: FourDCameraSim, i: int, lost: set[tuple[int, int]]) -> np.ndarray:
    frame = sim.frame(i)
    for m in range(4):
        if (i, m) in lost:
            frame[m * 144 : (m + 1) * 144] = 0
    return frame


@pytest.fixture(scope="module")
def lossy_scan(tmp_path_factory: pytest.TempPathFactory) -> tuple[FourDCameraSim, list[Path], set]:
    # A non-square scan (x/y mix-ups show), a loss rate that loses a few sectors, and one position whose
    # four sectors are all lost (the detector dropped the whole frame).
    sim = FourDCameraSim((6, 10), seed=4, loss_rate=0.04, pool_size=4)
    lost = sim.lost_sectors() | {(17, m) for m in range(4)}
    directory = tmp_path_factory.mktemp("lossy")
    with RawScanWriter(directory, sim.scan_number, sim.scan_shape) as writer:
        for i in range(sim.n_frames):
            for m in range(4):
                if (i, m) not in lost:
                    writer.write(i, m, sim.sector(i, m))
    assert writer.sectors_written == 4 * sim.n_frames - len(lost)
    assert writer.bytes_written == writer.sectors_written * RECORD_BYTES
    return sim, writer.paths, lost


def test_file_names_and_sizes(lossy_scan: tuple) -> None:
    sim, paths, lost = lossy_scan
    assert [p.name for p in paths] == [f"data_scan0000000001_module{m}_00000.data" for m in range(4)]
    for m, path in enumerate(paths):
        n = sum(1 for i in range(sim.n_frames) if (i, m) not in lost)
        assert path.stat().st_size == n * RECORD_BYTES
        assert sector_of_path(path) == m


def test_header_bytes_are_what_stempy_reads(lossy_scan: tuple) -> None:
    sim, paths, lost = lossy_scan
    with open(paths[2], "rb") as f:
        for i in range(sim.n_frames):
            if (i, 2) in lost:
                continue
            scan, frame, width, height, x, y = struct.unpack("<IIHHHH", f.read(HEADER_BYTES))
            assert (scan, frame, width, height, x, y) == (1, i, 10, 6, i % 10, i // 10)
            assert f.read(SECTOR_BYTES) == sim.sector(i, 2).tobytes()


def test_stempy_assembles_every_frame_pixel_for_pixel(lossy_scan: tuple) -> None:
    sim, paths, lost = lossy_scan
    partly_lost = {i for i, _ in lost} - {17}
    assert partly_lost, "the seed should lose a few sectors"
    reader = _stempy_reader(paths)
    assert tuple(reader.scan_shape) == (6, 10)  # (rows, cols): stempy reads width, height in that order
    assert reader.num_frames_per_scan == 1
    for i in range(sim.n_frames):
        if i == 17:
            # A position with no sector at all has no frame: stempy refuses to load one.
            with pytest.raises(ValueError, match="out of bounds"):
                reader.read_frames(i)
            continue
        (block,) = reader.read_frames(i)
        assert list(block.header.image_numbers) == [i]
        # Lost sectors come back as zeros; the rest is the simulator's frame exactly.
        assert np.array_equal(block.data, _expected_frame(sim, i, lost)), i
    # (row, col) addressing: row 1, column 3 of a 10-wide scan is frame 13.
    assert list(reader.read_frames((1, 3))[0].header.image_numbers) == [13]


def test_stempy_counts_a_scan_with_lost_sectors(lossy_scan: tuple) -> None:
    stempy_image = pytest.importorskip("stempy.image")
    _, paths, lost = lossy_scan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        counted = stempy_image.electron_count(_stempy_reader(paths))
    assert tuple(counted.scan_shape) == (6, 10) and counted.data.shape == (60, 1)
    # The fully lost position is an empty event list; partial frames are counted where data arrived.
    assert len(counted.data[17, 0]) == 0
    for i, m in lost:
        if i != 17:
            rows = np.asarray(counted.data[i, 0]) // 576
            assert not np.any((rows >= m * 144) & (rows < (m + 1) * 144))
    assert sum(len(counted.data[i, 0]) for i in range(60)) > 15 * 59


def test_read_sectors_round_trip(lossy_scan: tuple) -> None:
    sim, paths, lost = lossy_scan
    seen = set()
    for rec in read_sectors(paths):
        assert rec.scan_number == 1 and rec.scan_shape == (6, 10)
        assert rec.data.dtype == np.uint16 and rec.data.shape == (144, 576)
        assert np.array_equal(rec.data, sim.sector(rec.frame_number, rec.sector))
        seen.add((rec.frame_number, rec.sector))
    assert seen == {(i, m) for i in range(sim.n_frames) for m in range(4)} - lost


def test_write_scan_skips_lost_sectors_and_rolls_files(tmp_path: Path) -> None:
    sim = FourDCameraSim((4, 4), seed=2, loss_rate=0.1, pool_size=2)
    lost = sim.lost_sectors()
    assert lost
    ticks = []
    limit = 5 * RECORD_BYTES + 7
    paths = write_scan(sim, tmp_path / "new" / "dir", max_file_bytes=limit, progress=ticks.append)
    assert sum(ticks) == 16
    per_module = {m: sorted(p for p in paths if sector_of_path(p) == m) for m in range(4)}
    for m, files in per_module.items():
        n = 16 - sum(1 for i, mm in lost if mm == m)
        assert [p.name for p in files] == [raw_file_name(1, m, k) for k in range(-(-n // 5))]
        assert all(p.stat().st_size <= 5 * RECORD_BYTES for p in files)
    assert {(r.frame_number, r.sector) for r in read_sectors(paths)} == {
        (i, m) for i in range(16) for m in range(4)
    } - lost
    # stempy reads a module spread over several files just the same.
    reader = _stempy_reader(paths)
    for i in range(16):
        if all((i, m) in lost for m in range(4)):
            continue
        assert np.array_equal(reader.read_frames(i)[0].data, _expected_frame(sim, i, lost))
    all_paths = write_scan(sim, tmp_path / "all", skip_lost=False)
    assert sum(p.stat().st_size for p in all_paths) == 64 * RECORD_BYTES


def test_writers_of_different_sectors_share_a_directory(tmp_path: Path) -> None:
    sim = FourDCameraSim((2, 3), pool_size=1)
    writers = [RawScanWriter(tmp_path, 9, sim.scan_shape) for _ in range(4)]
    for i in range(6):
        for m, w in enumerate(writers):
            w.write(i, m, sim.sector(i, m))
    for w in writers:
        w.close()
        w.close()  # idempotent
    assert sorted(p.name for w in writers for p in w.paths) == [raw_file_name(9, m) for m in range(4)]
    reader = _stempy_reader(sorted(tmp_path.glob("*.data")))  # not the sidecars: stempy takes any file given
    assert np.array_equal(reader.read_frames(5)[0].data, sim.frame(5))


def test_any_buffer_is_written_as_it_is(tmp_path: Path) -> None:
    data = np.arange(144 * 576, dtype=np.uint16).reshape(144, 576)
    with RawScanWriter(tmp_path, 1, (1, 3)) as w:
        w.write(0, 0, data)
        w.write(1, 0, data.tobytes())
        w.write(2, 0, memoryview(bytearray(data.tobytes())))
    assert all(np.array_equal(r.data, data) for r in read_sectors(w.paths))
    assert [r.frame_number for r in read_sectors(w.paths)] == [0, 1, 2]


def test_short_writes_are_finished(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_pwritev = os.pwritev

    def short_pwritev(fd: int, buffers: list, offset: int) -> int:  # the header and 1000 bytes at most
        data = b"".join(bytes(b) for b in buffers)
        return real_pwritev(fd, [data[: min(len(data), HEADER_BYTES + 1000)]], offset)

    monkeypatch.setattr(rawfile.os, "pwritev", short_pwritev)
    sim = FourDCameraSim((1, 2), pool_size=1)
    with RawScanWriter(tmp_path, 1, (1, 2)) as w:
        w.write(0, 1, sim.sector(0, 1))
        w.write(1, 1, sim.sector(1, 1))
    records = list(read_sectors(w.paths))
    assert [r.frame_number for r in records] == [0, 1]
    assert np.array_equal(records[1].data, sim.sector(1, 1))


def test_a_failed_write_leaves_whole_records_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_pwritev = os.pwritev
    calls = []

    def pwritev_then_disk_full(fd: int, buffers: list, offset: int) -> int:  # part of record 2, then ENOSPC
        calls.append(1)
        if len(calls) == 1:
            return real_pwritev(fd, buffers, offset)
        if len(calls) == 2:
            return real_pwritev(fd, [b"".join(bytes(b) for b in buffers)[:5000]], offset)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(rawfile.os, "pwritev", pwritev_then_disk_full)
    sim = FourDCameraSim((1, 2), pool_size=1)
    with RawScanWriter(tmp_path, 1, (1, 2)) as w:
        w.write(0, 0, sim.sector(0, 0))
        with pytest.raises(FallbackError, match="free space"):
            w.write(1, 0, sim.sector(1, 0))
    assert w.paths[0].stat().st_size == RECORD_BYTES
    assert [r.frame_number for r in read_sectors(w.paths)] == [0]


_FILE_SIZE_LIMIT_CHILD = """
import resource, signal, sys
from pathlib import Path
from stemstream.errors import FallbackError
from stemstream.sim import FourDCameraSim
from stemstream.wire.rawfile import RawScanWriter

RECORD = 16 + 144 * 576 * 2

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead of killing us
sim = FourDCameraSim((1, 3), pool_size=1)
w = RawScanWriter(Path(sys.argv[1]), 1, (1, 3), start="s1")
w.write(0, 2, sim.sector(0, 2))
soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
resource.setrlimit(resource.RLIMIT_FSIZE, (RECORD + RECORD // 2, hard))  # record 1 fits only half way
try:
    w.write(1, 2, sim.sector(1, 2))
    sys.exit("the write past the limit did not fail")
except FallbackError as exc:
    print("failed as it should:", exc)
resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))  # space freed: the retry must continue right there
w.write(1, 2, sim.sector(1, 2))
w.write(2, 2, sim.sector(2, 2))
w.close()
"""


def test_a_write_retried_after_the_disk_refused_it_leaves_no_gap(tmp_path: Path) -> None:
    """A real short write and failure from the kernel (a file-size limit, in a child process): the record cut
    off is dropped, the retry lands exactly after the last whole record, and stempy reads every frame."""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", _FILE_SIZE_LIMIT_CHILD, str(tmp_path)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "failed as it should" in done.stdout and "File too large" in done.stdout
    (path,) = sorted(tmp_path.glob("*.data"))
    assert path.stat().st_size == 3 * RECORD_BYTES
    sim = FourDCameraSim((1, 3), pool_size=1)
    assert [(r.frame_number, r.sector) for r in read_sectors([path])] == [(0, 2), (1, 2), (2, 2)]
    with RawScanWriter(tmp_path, 1, (1, 3), start="s1") as w:  # stempy wants every module: the others, whole
        for i in range(3):
            for m in (0, 1, 3):
                w.write(i, m, sim.sector(i, m))
    reader = _stempy_reader([*w.paths, path])
    for i in range(3):
        assert np.array_equal(reader.read_frames(i)[0].data, sim.frame(i))
    assert rawfile.read_sidecar(tmp_path / rawfile.sidecar_name(1, 2))["state"] == "complete"


def test_sidecars_say_whether_a_sector_is_whole(tmp_path: Path) -> None:
    sim = FourDCameraSim((1, 2), pool_size=1)
    w = RawScanWriter(tmp_path, 4, (1, 2), start="a1")
    w.write(0, 1, sim.sector(0, 1))
    side = rawfile.read_sidecar(tmp_path / rawfile.sidecar_name(4, 1))
    assert side is not None and side["state"] == "writing" and side["start"] == "a1"
    assert rawfile.partial_sectors(w.paths) == [1]  # the writer died here: recognisably partial
    w.write(1, 1, sim.sector(1, 1))
    w.close()
    side = rawfile.read_sidecar(tmp_path / rawfile.sidecar_name(4, 1))
    assert side["state"] == "complete" and side["records"] == 2 and side["files"] == [raw_file_name(4, 1)]
    assert rawfile.partial_sectors(w.paths) == [] and w.complete
    (acq,) = rawfile.find_acquisitions(tmp_path, 4)
    assert acq.start == "a1" and acq.complete and acq.paths == tuple(w.paths)


def test_a_reused_scan_number_writes_to_its_own_directory(tmp_path: Path) -> None:
    first, second = FourDCameraSim((1, 2), seed=1, pool_size=1), FourDCameraSim((1, 2), seed=2, pool_size=1)
    with RawScanWriter(tmp_path, 3, (1, 2), start="20260101T000000000Z-0001") as w1:
        for i in range(2):
            w1.write(i, 0, first.sector(i, 0))
    # The DAQ restarted and counts from 3 again: the plain names are taken, so this acquisition's go apart.
    with RawScanWriter(tmp_path, 3, (1, 2), start="20260101T000500000Z-0002") as w2:
        for i in range(2):
            w2.write(i, 0, second.sector(i, 0))
    assert w2.paths == [tmp_path / "scan_3_20260101T000500000Z-0002" / raw_file_name(3, 0)]
    assert all(np.array_equal(r.data, first.sector(r.frame_number, 0)) for r in read_sectors(w1.paths))
    assert all(np.array_equal(r.data, second.sector(r.frame_number, 0)) for r in read_sectors(w2.paths))
    acquisitions = rawfile.find_acquisitions(tmp_path, 3)
    assert [a.start for a in acquisitions] == ["20260101T000000000Z-0001", "20260101T000500000Z-0002"]
    assert [list(a.paths) for a in acquisitions] == [w1.paths, w2.paths]
    assert rawfile.find_acquisitions(tmp_path, 4) == []


# --- errors -------------------------------------------------------------------------------------------------


def test_bad_writes_raise_raw_file_error(tmp_path: Path) -> None:
    good = np.zeros((144, 576), np.uint16)
    w = RawScanWriter(tmp_path, 1, (2, 2))
    cases = {
        "frame outside scan": (4, 0, good),
        "negative frame": (-1, 0, good),
        "sector outside": (0, 4, good),
        "short buffer": (0, 0, good[:100]),
        "wide dtype": (0, 0, good.astype(np.uint32)),
        "wide dtype, right size": (0, 0, good[:72].astype(np.uint32)),
        "not contiguous": (0, 0, np.zeros((144, 1152), np.uint16)[:, ::2]),
        "big-endian": (0, 0, good.astype(">u2")),
        "not a buffer": (0, 0, "x" * SECTOR_BYTES),
        "float frame": (1.0, 0, good),
    }
    for name, (frame, sector, buf) in cases.items():
        with pytest.raises(RawFileError):
            w.write(frame, sector, buf)
            pytest.fail(name)
    assert w.paths == [] and w.sectors_written == 0  # nothing half-written
    w.close()
    with pytest.raises(RawFileError, match="closed"):
        w.write(0, 0, good)


@pytest.mark.parametrize(
    "args",
    [
        {"scan_shape": (0, 4)},
        {"scan_shape": (70000, 4)},
        {"scan_number": 2**32},
        {"n_sectors": 0},
        {"max_file_bytes": 100},
    ],
    ids=lambda a: next(iter(a)),
)
def test_bad_writer_arguments_raise_raw_file_error(tmp_path: Path, args: dict) -> None:
    kwargs = {"scan_number": 1, "scan_shape": (2, 2), **args}
    with pytest.raises(RawFileError):
        RawScanWriter(tmp_path, **kwargs)


def test_missing_directory_raises_fallback_error(tmp_path: Path) -> None:
    with pytest.raises(FallbackError, match="create it"):
        RawScanWriter(tmp_path / "nope", 1, (2, 2))
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(FallbackError):
        write_scan(FourDCameraSim((1, 1), pool_size=1), tmp_path / "file" / "sub")


def test_existing_file_is_never_overwritten(tmp_path: Path) -> None:
    (tmp_path / raw_file_name(1, 0)).write_bytes(b"precious")
    with RawScanWriter(tmp_path, 1, (2, 2)) as w, pytest.raises(FallbackError, match="already there"):
        w.write(0, 0, np.zeros((144, 576), np.uint16))
    assert (tmp_path / raw_file_name(1, 0)).read_bytes() == b"precious"


@pytest.mark.parametrize(
    ("where", "code", "hint"),
    [
        ("open", errno.ENOSPC, "free space"),
        ("open", errno.EACCES, "permissions"),
        ("pwritev", errno.ENOSPC, "free space"),
        ("pwritev", errno.EDQUOT, "free space"),
        ("pwritev", errno.EIO, "check the disk"),
    ],
)
def test_os_errors_become_one_line_fallback_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str, code: int, hint: str
) -> None:
    def fail(*args: object, **kwargs: object) -> int:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(rawfile.os, where, fail)
    w = RawScanWriter(tmp_path, 1, (2, 2))
    with pytest.raises(FallbackError, match=hint) as info:
        w.write(0, 3, np.zeros((144, 576), np.uint16))
    assert "\n" not in str(info.value) and "module3" in str(info.value)
    monkeypatch.undo()
    w.close()


def _write_record(f, scan=1, frame=0, width=2, height=2, x=0, y=0, payload=SECTOR_BYTES) -> None:
    f.write(struct.pack("<IIHHHH", scan, frame, width, height, x, y))
    f.write(b"\x00" * payload)


@pytest.mark.parametrize(
    ("name", "records"),
    [
        ("truncated header", lambda f: f.write(b"\x01\x00\x00")),
        ("truncated sector", lambda f: _write_record(f, payload=SECTOR_BYTES - 1)),
        ("x outside scan", lambda f: _write_record(f, x=2)),
        ("y outside scan", lambda f: _write_record(f, y=5)),
        ("zero scan width", lambda f: _write_record(f, width=0)),
        ("scan number changes", lambda f: (_write_record(f), _write_record(f, scan=2, x=1))),
        ("scan size changes", lambda f: (_write_record(f), _write_record(f, width=3, x=1))),
    ],
)
def test_malformed_files_raise_raw_file_error(tmp_path: Path, name: str, records) -> None:
    path = tmp_path / raw_file_name(1, 0)
    with open(path, "wb") as f:
        records(f)
    with pytest.raises(RawFileError):
        list(read_sectors([path]))


def test_bad_paths_raise_raw_file_error(tmp_path: Path) -> None:
    with pytest.raises(RawFileError, match="module"):
        list(read_sectors([tmp_path / "scan.data"]))
    with pytest.raises(RawFileError, match="outside"):
        list(read_sectors([tmp_path / "data_scan0000000001_module4_00000.data"]))
    with pytest.raises(RawFileError, match="cannot open"):
        list(read_sectors([tmp_path / raw_file_name(1, 0)]))
    good = tmp_path / raw_file_name(1, 0)
    with open(good, "wb") as f:
        _write_record(f)
    other = tmp_path / raw_file_name(2, 1)
    with open(other, "wb") as f:
        _write_record(f, scan=2)
    with pytest.raises(RawFileError, match="earlier records"):
        list(read_sectors([good, other]))  # files of two scans mixed up
    assert len(list(read_sectors([good]))) == 1
    empty = tmp_path / raw_file_name(1, 3)
    empty.write_bytes(b"")
    assert list(read_sectors([empty])) == []

"""The 4D Camera raw file format, "version 5" in stempy's terms: writer, reader and a sim-scan helper.

This is what NCEM's receiving servers write and what ``stempy.io.reader(paths,
version=stempy.io.FileVersion.VERSION5, backend="multi-pass")`` reads (checked against stempy 3.6's
``stempy/reader.cpp``: ``SectorStreamReader::readHeader``, ``readSectorDataVersion5`` and
``SectorStreamMultiPassThreadedReader``):

* One file stream per sector (module); the sector index comes from the file name only, through the regex
  ``.*module(\\d+).*\\.data``. We name files ``data_scan{scan:010d}_module{m}_{index:05d}.data``; ``index``
  counts files of one module when ``max_file_bytes`` makes a stream roll over.
* Records back to back, each a 16-byte little-endian header then the sector's pixels::

      uint32 scan_number
      uint32 frame_number    # stempy groups the 4 sectors of a frame by (position, frame_number)
      uint16 scan_width      # probe positions per row (x count)
      uint16 scan_height     # rows of probe positions (y count)
      uint16 x               # column of the probe position
      uint16 y               # row of the probe position

  then 144 x 576 uint16 little-endian, C order: rows ``m*144 .. m*144+143`` of the 576 x 576 frame.
* stempy's position is ``y * scan_width + x`` and its ``scan_shape`` is ``(scan_height, scan_width)``. Our
  protocol's frame number is the 0-based row-major position, so we write ``y, x = divmod(frame, width)`` and
  ``frame_number = frame`` (the same in the four sectors of a frame: that is all stempy needs of it). A
  comment in stempy says the firmware swaps the documented x/y order; what matters is the order stempy reads,
  which is the one above (tested on a non-square scan).
* Missing sectors: stempy fills a frame's missing sectors with zeros (and marks it incomplete); a position
  with no sector at all yields no frame (``electron_count`` gives it an empty event list). stempy takes the
  scan size from the first header it reads and does not bounds-check positions, so every file of a scan
  must agree on it: :func:`read_sectors` checks that.

Beyond the format, for stemstream's own bookkeeping (stempy never opens them):

* **Sidecar.** Next to a sector's files, ``data_scan{scan:010d}_module{m}_state.json`` says which acquisition
  (``start``) they hold and whether they are ``complete`` (every file fsynced and closed) or still ``writing``:
  a scan whose writer died, or whose disk never took the rest, stays ``writing``, recognisably partial.
* **Reused scan numbers.** A later acquisition of a scan number never overwrites or joins the earlier one's
  files: it writes into its own directory, ``scan_{scan}_{start}/`` (:func:`acquisition_dir`), chosen by the
  scan's plan or, when the plain names are taken already, by the writer itself. :func:`find_acquisitions`
  lists a directory's acquisitions of a scan number, oldest first.
* **Disk full.** Records are written with ``pwritev`` at the file's own record offset: a record the disk
  refused part way is cut off again (``ftruncate``) and a retry writes exactly there, without a gap.

Nothing here is thread-safe; one writer per sector per thread (``SectorDiskWriter`` adds a lock).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import operator
import os
import re
import struct
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

import numpy as np

from stemstream.errors import FallbackError, RawFileError
from stemstream.wire.protocol import FRAME_SHAPE, SECTOR_SHAPE, start_time

logger = logging.getLogger(__name__)

HEADER = struct.Struct("<IIHHHH")
HEADER_BYTES = HEADER.size  # 16
FILE_VERSION = 5
_MODULE_RE = re.compile(r"module(\d+).*\.data$")
_MAX_SCAN_SIDE = 65535  # uint16 in the header
SIDECAR_FORMAT = "stemstream-raw-state"
STATE_WRITING, STATE_COMPLETE = "writing", "complete"


def raw_file_name(scan_number: int, sector: int, index: int = 0) -> str:
    """The file name the receiving servers use for sector ``sector``'s ``index``-th file of a scan."""
    return f"data_scan{scan_number:010d}_module{sector}_{index:05d}.data"


def sidecar_name(scan_number: int, sector: int) -> str:
    """The sidecar of one sector's files of a scan (no ``.data``: stempy's readers never take it)."""
    return f"data_scan{scan_number:010d}_module{sector}_state.json"


def acquisition_dir(scan_number: int, start: str) -> str:
    """The directory (relative to the fallback directory) of a reused scan number's acquisition ``start``."""
    return f"scan_{scan_number}_{start}"


def read_sidecar(path: Path, kind: str = SIDECAR_FORMAT) -> dict[str, Any] | None:
    """A JSON sidecar's content (a raw file's, or of another ``kind``: its ``format`` field), or None when
    it is missing or not one."""
    try:
        value = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) and value.get("format") == kind else None


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fallback_error(action: str, path: Path, exc: OSError) -> FallbackError:
    """A one-line FallbackError that says what to free or fix."""
    code = exc.errno
    if code in (errno.ENOSPC, errno.EDQUOT):
        hint = "the disk or quota is full: free space there or point STEMSTREAM_FALLBACK_DIR elsewhere"
    elif code in (errno.EACCES, errno.EPERM, errno.EROFS):
        hint = "no permission to write there: fix its permissions or point STEMSTREAM_FALLBACK_DIR elsewhere"
    elif code in (errno.ENOENT, errno.ENOTDIR):
        hint = "the directory does not exist: create it or point STEMSTREAM_FALLBACK_DIR elsewhere"
    elif code == errno.EEXIST:
        hint = "a file of this scan is already there: move it away (scan number reused?)"
    else:
        hint = "check the disk and STEMSTREAM_FALLBACK_DIR"
    return FallbackError(f"cannot {action} {path}: {exc.strerror or exc}; {hint}")


class RawScanWriter:
    """Writes one scan's sectors as 4D Camera raw files, one file stream per sector.

    Files are created lazily, on a sector's first record, so several writers (one per receiving server)
    can share a directory, each writing only its own sector. Existing files are never overwritten: when a
    sector's plain names are taken (an earlier acquisition of the scan number), its files go to
    ``acquisition_dir(scan, start)`` instead. ``write`` sends the header and the caller's buffer with one
    ``pwritev`` call at the record's offset (no Python-side copy); a failed write leaves whole records only
    and a retry continues exactly there. ``close`` fsyncs and closes every file and marks the sidecars
    complete; it may be called again after it failed (the disk was full), and retries what was left.
    """

    def __init__(
        self,
        directory: Path,
        scan_number: int,
        scan_shape: tuple[int, int],
        n_sectors: int = 4,
        sector_shape: tuple[int, int] = SECTOR_SHAPE,
        max_file_bytes: int | None = None,
        *,
        start: str = "",
        sidecar: bool = True,
    ) -> None:
        rows, cols = (int(v) for v in scan_shape)
        if not (0 < rows <= _MAX_SCAN_SIDE and 0 < cols <= _MAX_SCAN_SIDE):
            raise RawFileError(f"scan shape {scan_shape} must be 1..{_MAX_SCAN_SIDE} in both directions")
        if not 0 <= scan_number <= 0xFFFFFFFF:
            raise RawFileError(f"scan number {scan_number} does not fit in uint32")
        if not 1 <= n_sectors <= 64 or min(sector_shape) < 1:
            raise RawFileError(f"bad geometry: {n_sectors} sectors of {sector_shape}")
        self.directory = Path(directory)
        self.scan_number = int(scan_number)
        self.scan_shape = (rows, cols)
        self.n_sectors = int(n_sectors)
        self.sector_shape = (int(sector_shape[0]), int(sector_shape[1]))
        self.sector_nbytes = self.sector_shape[0] * self.sector_shape[1] * 2
        self.record_nbytes = HEADER_BYTES + self.sector_nbytes
        if max_file_bytes is not None and max_file_bytes < self.record_nbytes:
            raise RawFileError(f"max_file_bytes={max_file_bytes} is under one record ({self.record_nbytes})")
        self.max_file_bytes = max_file_bytes
        self.paths: list[Path] = []
        self.bytes_written = 0
        self.sectors_written = 0
        self._n_frames = rows * cols
        self.start = start
        self.sidecar = sidecar
        self._fds: dict[int, int] = {}
        self._file_bytes: dict[int, int] = {}
        self._file_index: dict[int, int] = {}
        self._dirs: dict[int, Path] = {}  # per sector: where its files go (its own directory if names were taken)
        self._records: dict[int, int] = {}  # per sector: records written
        self._unfinished: set[int] = set()  # sectors whose files are not yet all fsynced, closed and marked
        self._closed = False
        if not self.directory.is_dir():
            raise FallbackError(
                f"cannot write raw files to {self.directory}: not a directory; create it or point "
                "STEMSTREAM_FALLBACK_DIR elsewhere"
            )

    def __enter__(self) -> RawScanWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def write(self, frame_number: int, sector: int, buffer: Any) -> None:
        """Append sector ``sector`` of frame ``frame_number`` (0-based row-major probe position).

        ``buffer``: any C-contiguous buffer of exactly the sector's bytes (uint16, little-endian).
        """
        if self._closed:
            raise RawFileError("write to a closed RawScanWriter")
        try:
            frame_number, sector = operator.index(frame_number), operator.index(sector)
        except TypeError:
            raise RawFileError(f"frame {frame_number!r} and sector {sector!r} must be integers") from None
        if not 0 <= frame_number < self._n_frames:
            rows, cols = self.scan_shape
            raise RawFileError(f"frame {frame_number} outside a {rows}x{cols} scan")
        if not 0 <= sector < self.n_sectors:
            raise RawFileError(f"sector {sector} outside 0..{self.n_sectors - 1}")
        payload = _payload_view(buffer)
        if payload.nbytes != self.sector_nbytes:
            raise RawFileError(f"sector buffer of {payload.nbytes} bytes, expected {self.sector_nbytes}")
        y, x = divmod(frame_number, self.scan_shape[1])
        header = HEADER.pack(self.scan_number, frame_number, self.scan_shape[1], self.scan_shape[0], x, y)
        fd = self._fd_for(sector)
        self._writev(fd, sector, header, payload)
        self._file_bytes[sector] += self.record_nbytes
        self._records[sector] = self._records.get(sector, 0) + 1
        self.bytes_written += self.record_nbytes
        self.sectors_written += 1

    def close(self) -> None:
        """Fsync and close every file, then mark each sector's sidecar complete. Idempotent; after a
        FallbackError (a delayed write error, a full disk for the sidecar) calling it again retries."""
        self._closed = True
        error: FallbackError | None = None
        for sector, fd in list(self._fds.items()):
            try:
                os.fsync(fd)
            except OSError as exc:  # a delayed write error (NFS, a full thin volume) surfaces here
                error = error or _fallback_error("fsync", self._path(sector), exc)
                continue
            del self._fds[sector]
            try:
                os.close(fd)
            except OSError as exc:
                error = error or _fallback_error("close", self._path(sector), exc)
        for sector in sorted(self._unfinished):
            if sector in self._fds:
                continue
            try:
                _fsync_dir(self._dir(sector))
                self._write_sidecar(sector, STATE_COMPLETE)
            except OSError as exc:
                error = error or _fallback_error("finish", self._sidecar_path(sector), exc)
                continue
            self._unfinished.discard(sector)
        if error is not None:
            raise error

    @property
    def complete(self) -> bool:
        """Every file written so far is fsynced, closed and marked complete."""
        return self._closed and not self._fds and not self._unfinished

    def _dir(self, sector: int) -> Path:
        return self._dirs.get(sector, self.directory)

    def _path(self, sector: int) -> Path:
        name = raw_file_name(self.scan_number, sector, self._file_index.get(sector, 0))
        return self._dir(sector) / name

    def _sidecar_path(self, sector: int) -> Path:
        return self._dir(sector) / sidecar_name(self.scan_number, sector)

    def _write_sidecar(self, sector: int, state: str) -> None:
        """Replace the sector's sidecar (a temporary file renamed over it; fsynced when complete)."""
        if not self.sidecar:
            return
        path = self._sidecar_path(sector)
        content = {
            "format": SIDECAR_FORMAT,
            "version": 1,
            "scan": self.scan_number,
            "start": self.start,
            "sector": sector,
            "scan_shape": list(self.scan_shape),
            "state": state,
            "records": self._records.get(sector, 0),
            "files": [p.name for p in self.paths if sector_of_path(p) == sector],
        }
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            with open(tmp, "w") as f:
                json.dump(content, f)
                if state == STATE_COMPLETE:
                    f.flush()
                    os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise

    def _choose_dir(self, sector: int) -> None:
        """Before a sector's first file: its plain names taken by an earlier acquisition of this scan number
        (a DAQ restart reset the counter) mean this acquisition's files go to a directory of their own."""
        first = self.directory / raw_file_name(self.scan_number, sector)
        side = read_sidecar(self.directory / sidecar_name(self.scan_number, sector))
        taken = first.exists() or (side is not None and side.get("start") != self.start)
        if not taken:
            return
        if not self.start:
            raise FallbackError(
                f"cannot create {first}: a file of this scan is already there; move it away (scan number reused?)"
            )
        own = self.directory / acquisition_dir(self.scan_number, self.start)
        try:
            own.mkdir(exist_ok=True)
        except OSError as exc:
            raise _fallback_error("create directory", own, exc) from None
        logger.warning("scan %d sector %d: %s is taken (an earlier acquisition); writing to %s",
                       self.scan_number, sector, first.name, own)  # fmt: skip
        self._dirs[sector] = own

    def _fd_for(self, sector: int) -> int:
        fd = self._fds.get(sector)
        if fd is not None:
            full = self.max_file_bytes is not None and (
                self._file_bytes[sector] + self.record_nbytes > self.max_file_bytes
            )
            if not full:
                return fd
            del self._fds[sector]
            try:
                os.close(fd)
            except OSError as exc:
                raise _fallback_error("close", self._path(sector), exc) from None
            self._file_index[sector] += 1
        else:
            if sector not in self._file_index:
                self._choose_dir(sector)
            self._file_index.setdefault(sector, 0)
        path = self._path(sector)
        if sector not in self._unfinished:
            try:  # before the data: a sector with files always has a sidecar saying whether they are whole
                self._write_sidecar(sector, STATE_WRITING)
            except OSError as exc:
                raise _fallback_error("create", self._sidecar_path(sector), exc) from None
            self._unfinished.add(sector)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise _fallback_error("create", path, exc) from None
        logger.debug("raw file %s opened", path)
        self._fds[sector] = fd
        self._file_bytes[sector] = 0
        self.paths.append(path)
        return fd

    def _writev(self, fd: int, sector: int, header: bytes, payload: memoryview) -> None:
        """One record at the file's record offset. Explicit offsets (``pwritev``), never the file position:
        after a failed write the position would point past the cut-off record, and a retry there would
        leave a zero-filled gap that neither stempy nor :func:`read_sectors` can read past."""
        offset = self._file_bytes[sector]
        total = len(header) + payload.nbytes
        try:
            done = 0
            # A regular file takes short writes only near a full disk, but they are legal: finish the record.
            while done < total:
                if done < len(header):
                    written = os.pwritev(fd, [header[done:], payload], offset + done)
                else:
                    written = os.pwritev(fd, [payload[done - len(header) :]], offset + done)
                if written == 0:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                done += written
        except OSError as exc:
            # Drop the partial record, so that the file stays readable up to the last whole one.
            with contextlib.suppress(OSError):
                os.ftruncate(fd, offset)
            raise _fallback_error("write", self._path(sector), exc) from None


def _payload_view(buffer: Any) -> memoryview:
    try:
        view = memoryview(buffer)
    except TypeError:
        raise RawFileError(f"sector data of type {type(buffer).__name__} is not a buffer") from None
    if not view.c_contiguous:
        raise RawFileError("sector buffer is not C-contiguous")
    if view.itemsize not in (1, 2):
        raise RawFileError(f"sector buffer of {view.itemsize}-byte items; the format is uint16")
    fmt = view.format
    big = fmt.startswith((">", "!")) or (sys.byteorder == "big" and view.itemsize > 1 and fmt[0] in "@=")
    if big:
        raise RawFileError("sector buffer is big-endian; the format is little-endian uint16")
    return view.cast("B")


@dataclass(frozen=True, slots=True)
class RawSector:
    """One record of a raw file; ``frame_number`` is the 0-based row-major probe position ``y*width+x``."""

    scan_number: int
    frame_number: int
    sector: int
    scan_shape: tuple[int, int]  # (rows, cols) = (scan_height, scan_width)
    data: np.ndarray  # (144, 576) uint16


def sector_of_path(path: Path | str) -> int:
    """The sector (module) index stempy would take from a raw file's name."""
    match = _MODULE_RE.search(Path(path).name)
    if match is None:
        raise RawFileError(f"{path}: not a raw file name (no 'module<N>' before '.data')")
    return int(match.group(1))


@dataclass(frozen=True, slots=True)
class RecordAt:
    """Where one record of a raw file is, and what its header says (its sector's pixels not read)."""

    path: Path
    payload_offset: int  # the byte of the file where the record's sector starts
    scan_number: int
    frame_number: int
    sector: int
    scan_shape: tuple[int, int]  # (rows, cols)


def index_records(paths: Iterable[Path | str]) -> Iterator[RecordAt]:
    """Every record of ``paths`` (file by file, in order), its header validated as :func:`read_sectors` does;
    the sectors are skipped, not read."""
    return (rec for rec, _ in _records(paths, read_payload=False))


def read_sectors(paths: Iterable[Path | str]) -> Iterator[RawSector]:
    """Every record of ``paths`` (file by file, in order), validated as stempy would need it: RawFileError
    for a truncated record, an impossible header, or files that disagree on the scan number or scan size."""
    for rec, data in _records(paths, read_payload=True):
        assert data is not None
        yield RawSector(rec.scan_number, rec.frame_number, rec.sector, rec.scan_shape, data)


def _records(paths: Iterable[Path | str], read_payload: bool) -> Iterator[tuple[RecordAt, np.ndarray | None]]:
    n_sectors = FRAME_SHAPE[0] // SECTOR_SHAPE[0]
    nbytes = SECTOR_SHAPE[0] * SECTOR_SHAPE[1] * 2
    scan: tuple[int, int, int] | None = None  # scan_number, width, height of the first record
    for path in paths:
        path = Path(path)
        sector = sector_of_path(path)
        if sector >= n_sectors:
            raise RawFileError(f"{path}: module {sector} outside 0..{n_sectors - 1}")
        try:
            f = open(path, "rb")  # noqa: SIM115 (closed in finally; a generator cannot use `with` cleanly)
        except OSError as exc:
            raise RawFileError(f"cannot open {path}: {exc.strerror or exc}") from None
        try:
            size = os.fstat(f.fileno()).st_size
            offset = 0
            while offset < size:
                raw = f.read(HEADER_BYTES)
                where = f"{path} at byte {offset}"
                if len(raw) < HEADER_BYTES:
                    raise RawFileError(f"{where}: truncated record (a header of {len(raw)} of {HEADER_BYTES} bytes)")
                if offset + HEADER_BYTES + nbytes > size:
                    got = size - offset - HEADER_BYTES
                    raise RawFileError(f"{where}: truncated record (a sector of {got} of {nbytes} bytes)")
                scan_number, _frame, width, height, x, y = HEADER.unpack(raw)
                if width == 0 or height == 0 or x >= width or y >= height:
                    raise RawFileError(f"{where}: position ({x}, {y}) outside a {width}x{height} scan")
                if scan is None:
                    scan = (scan_number, width, height)
                elif scan != (scan_number, width, height):
                    raise RawFileError(f"{where}: scan {scan_number} of {width}x{height}, earlier records say "
                                       f"scan {scan[0]} of {scan[1]}x{scan[2]}")  # fmt: skip
                data = np.empty(SECTOR_SHAPE, dtype="<u2") if read_payload else None
                if data is not None and f.readinto(memoryview(data).cast("B")) != nbytes:
                    raise RawFileError(f"{where}: the record was cut short while read")
                offset += HEADER_BYTES + nbytes
                if data is None:
                    f.seek(offset)
                yield RecordAt(path, offset - nbytes, scan_number, y * width + x, sector, (height, width)), data
        except OSError as exc:
            raise RawFileError(f"cannot read {path}: {exc.strerror or exc}") from None
        finally:
            f.close()


@dataclass(frozen=True)
class Acquisition:
    """One acquisition's raw files of a scan number in a directory (:func:`find_acquisitions`)."""

    scan_number: int
    start: str  # "" when the files carry no sidecar (written elsewhere, or before sidecars)
    directory: Path
    paths: tuple[Path, ...]
    partial_sectors: tuple[int, ...]  # sectors whose sidecar still says "writing": the scan is partial

    @property
    def complete(self) -> bool:
        return not self.partial_sectors


def partial_sectors(paths: Iterable[Path | str]) -> list[int]:
    """The sectors of ``paths`` whose sidecar (next to the files) says they were never finished."""
    partial = set()
    for path in paths:
        path = Path(path)
        name = path.name
        if not name.startswith("data_scan") or "_module" not in name:
            continue
        try:
            scan_number = int(name[len("data_scan") : name.index("_module")])
            sector = sector_of_path(path)
        except (ValueError, RawFileError):
            continue
        side = read_sidecar(path.parent / sidecar_name(scan_number, sector))
        if side is not None and side.get("state") != STATE_COMPLETE:
            partial.add(sector)
    return sorted(partial)


def find_acquisitions(directory: Path | str, scan_number: int) -> list[Acquisition]:
    """Every acquisition of ``scan_number`` under ``directory``: its plain-named files, and each directory
    ``scan_<n>_<start>/`` (a reused scan number), oldest first (by the time in the acquisition id where it
    has one, else by when its first file was last written)."""
    directory = Path(directory)
    pattern = f"data_scan{scan_number:010d}_module*.data"
    groups: list[tuple[Path, str]] = [(directory, "")]
    prefix = f"scan_{scan_number}_"
    if directory.is_dir():
        groups += [(d, d.name[len(prefix) :]) for d in sorted(directory.glob(prefix + "*")) if d.is_dir()]
    found: list[tuple[tuple[float, str], Acquisition]] = []
    for where, start in groups:
        paths = tuple(sorted(where.glob(pattern)))
        if not paths:
            continue
        if not start:
            sides = [read_sidecar(x) for x in where.glob(f"data_scan{scan_number:010d}_module*_state.json")]
            starts = {str(x.get("start") or "") for x in sides if x is not None}
            start = starts.pop() if len(starts) == 1 else ""
        when = start_time(start)
        if when is None:
            when = min(p.stat().st_mtime for p in paths)
        acq = Acquisition(scan_number, start, where, paths, tuple(partial_sectors(paths)))
        found.append(((when, start), acq))
    return [acq for _, acq in sorted(found, key=lambda item: item[0])]


class SectorSource(Protocol):
    """What :func:`write_scan` needs of a simulator (``stemstream.sim.FourDCameraSim`` has it)."""

    scan_number: int
    scan_shape: tuple[int, int]
    n_frames: int
    n_sectors: int
    sector_shape: tuple[int, int]

    def sector(self, i: int, m: int) -> np.ndarray: ...
    def is_lost(self, i: int, m: int) -> bool: ...


def write_scan(
    sim: SectorSource,
    directory: Path | str,
    *,
    skip_lost: bool = True,
    max_file_bytes: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> list[Path]:
    """Write every sector of ``sim``'s scan (but the lost ones, if ``skip_lost``) as raw files.

    Frames go in order, the four sectors of each frame in turn, as the receiving servers write them.
    ``progress(n)`` is called after every frame with the number of frames done since the last call.
    Returns the files written.
    """
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _fallback_error("create directory", directory, exc) from None
    with RawScanWriter(
        directory,
        sim.scan_number,
        sim.scan_shape,
        n_sectors=sim.n_sectors,
        sector_shape=sim.sector_shape,
        max_file_bytes=max_file_bytes,
    ) as writer:
        for i in range(sim.n_frames):
            for m in range(sim.n_sectors):
                if skip_lost and sim.is_lost(i, m):
                    continue
                writer.write(i, m, sim.sector(i, m))
            if progress is not None:
                progress(1)
    logger.info(
        "scan %d: %d sectors, %.1f MB in %d files under %s",
        sim.scan_number,
        writer.sectors_written,
        writer.bytes_written / 1e6,
        len(writer.paths),
        directory,
    )
    return list(writer.paths)

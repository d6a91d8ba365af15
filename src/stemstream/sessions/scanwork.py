"""What happens to one scan after it is counted (or lands on disk), as library calls the flows sequence:
its records (from the session's watcher, or read from the store on demand), counting its raw files, one read
of the counted file for the numbers and the picture, the catalogue fields."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from stemstream.config import Settings, get_settings
from stemstream.counting.params import CountingParams
from stemstream.errors import CatalogError
from stemstream.log import RateLimitedLog
from stemstream.scans import keys
from stemstream.scans.records import CountedRecord, ScanRecord, scan_metadata
from stemstream.wire.paths import UnsafePath, under_roots

_rlog = RateLimitedLog(logging.getLogger(__name__))


def counted_file(output_dir: str | Path, scan_number: int) -> Path:
    """Where a scan's counted HDF5 file goes (the NodeGroups' and the fallback counter's layout)."""
    from stemstream.counting.output import counted_path

    return counted_path(Path(output_dir), scan_number)


def _read_store(key: str, settings: Settings | None) -> Any:
    from stemstream.store import StoreClient

    with StoreClient.from_settings(settings or get_settings(), subtree=key, timeout=10) as client:
        return client.get(key)


def read_counted_record(scan_number: int, settings: Settings | None = None) -> dict[str, Any]:
    """``/scans/<n>/counted`` from the store, for a scan processed on demand (a session has it already)."""
    record = CountedRecord.parse(_read_store(keys.counted(scan_number), settings))
    if record is None:
        raise CatalogError(
            f"scan {scan_number} has no counted record in the store; is it still streaming, or did it go to disk? "
            f"(`stemstream store get /scans/{scan_number}`)"
        )
    return record.to_record()


def read_scan_record(scan_number: int, settings: Settings | None = None) -> dict[str, Any]:
    """``/scans/<n>`` from the store ({} when there is none)."""
    record = ScanRecord.parse(_read_store(keys.scan(scan_number), settings))
    return record.to_record() if record is not None else {}


@dataclass(frozen=True)
class Counted:
    """What a ``/scans/<n>/counted`` record says of the scan: its file, or why there is none."""

    path: str | None  # None: the NodeGroups could not count it
    error: str | None
    turnaround_s: float | None  # seconds from the scan's last frame to its counted file


def counted_outcome(record: Mapping[str, Any], output_dir: str | Path | None = None) -> Counted:
    """Read a ``/scans/<n>/counted`` record (as ``to_record`` gives it); a malformed one is a ProtocolError.
    Its file must lie under ``output_dir`` (default STEMSTREAM_OUTPUT_DIR): a path from the store is never
    archived or catalogued otherwise (no file then, and the error says why)."""
    counted = CountedRecord.from_record(record)
    path = None if counted.status == "failed" or not counted.path else counted.path
    if path is not None:
        try:
            path = str(under_roots(path, (output_dir or get_settings().output_dir,), "the counted record's path"))
        except UnsafePath as exc:
            _rlog.error("refused_path", "scan %d: refused %s", counted.scan, exc)
            return Counted(None, str(exc), counted.seconds_after_last_frame)
    return Counted(path, counted.error, counted.seconds_after_last_frame)


def raw_paths_of(
    scan_number: int, record: Mapping[str, Any], raw_paths: list[str] | None = None, settings: Settings | None = None
) -> list[str]:
    """The raw files of a scan on disk: ``raw_paths``, else those the producers reported in ``/scans/<n>``,
    which must lie under the fallback directories (STEMSTREAM_FALLBACK_ROOT, STEMSTREAM_FALLBACK_DIR)."""
    if raw_paths is None:
        scan = ScanRecord.parse(record)
        raw_paths = list(scan.fallback_paths) if scan is not None else []
        if not raw_paths:
            raise CatalogError(
                f"scan {scan_number}: the store knows no raw files for it; pass raw_paths, or check the scan number"
            )
        s = settings or get_settings()
        try:
            roots = (s.fallback_root or s.fallback_dir, s.fallback_dir)
            raw_paths = [str(under_roots(p, roots, f"scan {scan_number}: raw file")) for p in raw_paths]
        except UnsafePath as exc:
            raise CatalogError(f"{exc} (STEMSTREAM_FALLBACK_ROOT)") from None
    missing = [p for p in raw_paths if not Path(p).exists()]
    if missing:
        raise CatalogError(f"scan {scan_number}: raw file {missing[0]} is gone; pass raw_paths where they are now")
    return raw_paths


def turnaround_from_disk(record: Mapping[str, Any], started: float) -> float:
    """Seconds from the scan's last sector on disk (the producers' closing time) to now."""
    scan = ScanRecord.parse(record)
    closed_at = scan.closed_at if scan is not None else None
    return time.time() - (closed_at or started)


def count_raw(raw_paths: list[str], output: str | Path, scan_number: int, params: CountingParams) -> str:
    """Count a scan's raw files into ``output`` (stempy's reader); its path."""
    from stemstream.counting.files import count_raw_files

    return str(count_raw_files([Path(p) for p in raw_paths], output, scan_number=scan_number, params=params))


def daq_metadata_of(record: Mapping[str, Any]) -> dict[str, Any]:
    """The DAQ's metadata in a ``/scans/<n>`` record ({} without any; checked as ``scan_metadata``)."""
    scan = ScanRecord.parse(record)
    return scan_metadata(scan.metadata) if scan is not None else {}


def add_daq_metadata(path: str | Path, metadata: Mapping[str, Any]) -> None:
    """Write the DAQ's metadata into a counted file as ``/stemstream/daq`` attributes, as the NodeGroups do for a
    streamed scan (docs/counting.md): for a scan counted from its raw files, which do not carry it."""
    import h5py

    from stemstream.counting.output import GROUP

    with h5py.File(path, "a") as f:
        daq = f.require_group(GROUP).require_group("daq")
        for key, value in scan_metadata(metadata).items():
            daq.attrs[key] = value


@dataclass
class CountedScan:
    """What a counted file says, read once: the numbers for the catalogue and the picture beside it."""

    scan_number: int
    path: str
    png: str
    scan_shape: tuple[int, int]
    frames: int
    frames_incomplete: int
    events: int
    thresholds: dict[str, Any]
    engine: str
    first_frame: float | None
    last_frame: float | None
    file_written: float | None
    thumbnail: str | None = None  # a small PNG of the virtual bright field (the scan list's picture)
    daq: dict[str, Any] = field(default_factory=dict)  # the DAQ's metadata, as the file has it

    def catalog_fields(self, route: str, **extra: Any) -> dict[str, Any]:
        """The catalogue row's fields (``extra`` wins), turnaround from the file's timings if none is given."""
        rows, cols = self.scan_shape
        fields: dict[str, Any] = {
            "scan_rows": rows,
            "scan_cols": cols,
            "route": route,
            "counted_path": self.path,
            "preview_path": self.png,
            "frames": self.frames,
            "frames_incomplete": self.frames_incomplete,
            "events": self.events,
            "thresholds": self.thresholds,
            "first_frame": self.first_frame,
            "last_frame": self.last_frame,
            "counted_at": self.file_written,
            "progress": 1.0,
            "thumbnail_path": self.thumbnail,
            "metadata": self.daq,
            **extra,
        }
        if fields.get("turnaround_s") is None and self.last_frame and self.file_written:
            fields["turnaround_s"] = self.file_written - self.last_frame
        return fields


def read_counted_scan(path: str | Path, scan_number: int) -> CountedScan:
    """Open the counted file once: its numbers, and its virtual bright-field picture saved beside it."""
    from stemstream.counting import read_counted, save_png, virtual_bright_field

    sparse, meta = read_counted(path)
    lengths = [len(e) for e in sparse.data.ravel()]
    thresholds = meta.get("thresholds")
    timings = meta.get("timings") or {}
    png = Path(path).with_name(f"scan_{scan_number}_vbf.png")
    image = virtual_bright_field(sparse)
    save_png(image, png, title=f"scan {scan_number}: virtual bright field (electrons)")
    thumbnail = save_thumbnail(image, Path(path).with_name(f"scan_{scan_number}_thumb.png"))
    return CountedScan(
        scan_number=scan_number,
        path=str(path),
        png=str(png),
        scan_shape=(int(sparse.scan_shape[0]), int(sparse.scan_shape[1])),
        frames=len(lengths),
        frames_incomplete=int(meta.get("frames_incomplete", 0)),
        events=int(sum(lengths)),
        thresholds=thresholds.to_dict() if thresholds else {},
        engine=str(meta.get("engine", "")),
        first_frame=timings.get("first_frame"),
        last_frame=timings.get("last_frame"),
        file_written=timings.get("file_written"),
        thumbnail=str(thumbnail),
        daq=dict(meta.get("daq") or {}),
    )


THUMBNAIL_PX = 64  # the longer side of a scan's thumbnail, at most


def save_thumbnail(image: np.ndarray, path: Path, size: int = THUMBNAIL_PX) -> Path:
    """A small grey PNG of ``image`` (block means down to at most ``size`` pixels a side; small scans are shown
    pixel for pixel, enlarged by whole pixels): the scan list's picture."""
    from stemstream.analyses.png import image_png

    image = np.asarray(image, dtype=np.float64)
    step = max(1, -(-max(image.shape) // size))
    if step > 1:
        rows, cols = (n // step * step for n in image.shape)
        image = image[:rows, :cols].reshape(rows // step, step, cols // step, step).mean(axis=(1, 3))
    scale = max(1, size // max(image.shape))
    image = np.kron(image, np.ones((scale, scale)))
    path.write_bytes(image_png(image))
    return path


def catalog_counted(
    path: str | Path,
    scan_number: int,
    route: str,
    *,
    url: str | None = None,
    session_uid: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """Read a counted file once (numbers, picture, thumbnail, the DAQ's metadata) and put it in the catalog
    (``url``, default STEMSTREAM_CATALOG_URL); the row. For counts made outside a session (``stemstream count``)."""
    from stemstream.catalog import Catalog

    scan = read_counted_scan(path, scan_number)
    catalog = Catalog(url or get_settings().catalog_url)
    try:
        fields = scan.catalog_fields(route, status="counted", **extra)
        if session_uid:
            fields["session_id"] = catalog.session_id(session_uid)
        return catalog.upsert_scan(scan_number, **fields).as_dict()
    finally:
        catalog.close()

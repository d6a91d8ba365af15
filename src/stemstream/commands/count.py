"""``stemstream count``: count a scan that landed on disk (raw 4D Camera files) into a counted HDF5 file;
``stemstream dark``: make a dark reference from a dark scan's raw files."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from stemstream.commands.options import add_counting_arguments, counting_from

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("count", help="count raw files of a scan (e.g. a disk-fallback scan) into HDF5")
    p.add_argument(
        "raw", nargs="+", type=Path, help="the directory of raw .data files (e.g. the fallback directory), or files"
    )
    p.add_argument("--scan", type=int, required=True, help="scan number: counts the files named for it")
    p.add_argument(
        "--start",
        default=None,
        help="which acquisition of a reused scan number (its id); default: the newest in the directory",
    )
    p.add_argument("--output", type=Path, default=None, help="default <output dir>/scan_<n>_counted.h5")
    add_counting_arguments(p)
    p.add_argument("--threads", type=int, default=None, help="reader and engine threads (default: all cores)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--notes", default="", help="notes for the scan's catalog row")
    p.set_defaults(func=_count)

    d = subparsers.add_parser("dark", help="make a dark reference (.npy) from a dark scan's raw files")
    d.add_argument("raw", type=Path, help="the directory of the dark scan's raw .data files")
    d.add_argument("--scan", type=int, required=True, help="the dark scan's number")
    d.add_argument("--start", default=None, help="which acquisition of a reused scan number (default: the newest)")
    d.add_argument(
        "-o",
        "--output",
        type=Path,
        default=None,
        help="NAME.npy, under STEMSTREAM_DARK_DIR (default dark_scan<n>.npy); counts use it as --dark NAME.npy "
        "or --dark latest (the newest)",
    )
    d.add_argument(
        "--offset",
        type=float,
        default=0.0,
        help="counts subtracted from the average (default 0): stempy subtracts the dark in uint16, so pixels of "
        "noise below it wrap around; a dark a few noise sigmas below the mean avoids that",
    )
    d.set_defaults(func=_dark)


def _count(args: argparse.Namespace) -> int:
    from stemstream.config import get_settings
    from stemstream.counting import count_raw_files
    from stemstream.counting.files import select_scan_files
    from stemstream.counting.output import counted_path_for
    from stemstream.wire.protocol import check_scan_number

    check_scan_number(args.scan, "--scan")
    params = counting_from(args)
    raw: Path | list[Path] = args.raw
    start = args.start
    if len(args.raw) == 1 and args.raw[0].is_dir():
        # A fallback directory holds many scans (and reused numbers): the files named for this one.
        raw, start = select_scan_files(args.raw[0], args.scan, args.start)
    output = args.output or counted_path_for(get_settings().output_dir, args.scan, start or "")
    path = count_raw_files(
        raw,
        output,
        scan_number=args.scan,
        params=params,
        threads=args.threads,
        progress=not args.no_progress,
        start=start,
    )
    print(path)
    _catalog(path, args.scan, [str(p) for p in ([raw] if isinstance(raw, Path) else raw)], args.notes)
    return 0


def _catalog(path: Path, scan_number: int, raw_paths: list[str], notes: str) -> None:
    """The counted scan in the scan catalog (STEMSTREAM_CATALOG_URL): the file is made whatever happens here."""
    from stemstream.errors import StemstreamError
    from stemstream.sessions.scanwork import catalog_counted

    extra = {"raw_paths": raw_paths, **({"notes": notes} if notes else {})}
    try:
        catalog_counted(path, scan_number, "cli", **extra)
    except StemstreamError as exc:
        logger.warning("scan %d is counted but not catalogued: %s", scan_number, exc)


def _dark(args: argparse.Namespace) -> int:
    import time

    import numpy as np

    from stemstream.config import get_settings
    from stemstream.counting.darks import LATEST, average_raw_files, resolve_dark, write_dark
    from stemstream.counting.files import select_scan_files
    from stemstream.errors import CountingError
    from stemstream.wire.protocol import check_scan_number

    check_scan_number(args.scan, "--scan")
    if not args.raw.is_dir():
        raise CountingError(f"{args.raw} is not a directory of raw files")
    paths, start = select_scan_files(args.raw, args.scan, args.start)
    name = args.output or Path(f"dark_scan{args.scan}{'_' + start if start else ''}.npy")
    if str(name) == LATEST:
        raise CountingError(f"{LATEST!r} names the newest dark; give the new one another name")
    output = resolve_dark(name, get_settings().dark_dir)
    began = time.time()
    dark = average_raw_files(paths)
    if args.offset:
        dark = (dark - np.float32(args.offset)).astype(np.float32)
    source = {"raw_dir": str(args.raw.resolve()), "scan_number": args.scan, "start": start, "offset": args.offset}
    source |= {"raw_files": [p.name for p in paths], "seconds": round(time.time() - began, 3)}
    print(write_dark(dark, output, source))
    return 0

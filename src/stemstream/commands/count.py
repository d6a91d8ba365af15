"""``stemstream count``: count a scan that landed on disk (raw 4D Camera files) into a counted HDF5 file."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from stemstream.commands.options import add_counting_arguments, counting_from

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("count", help="count raw files of a scan (e.g. a disk-fallback scan) into HDF5")
    p.add_argument("raw", nargs="+", type=Path, help="the scan's raw .data files, or their directory")
    p.add_argument("--scan", type=int, required=True, help="scan number")
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


def _count(args: argparse.Namespace) -> int:
    from stemstream.config import get_settings
    from stemstream.counting import count_raw_files
    from stemstream.counting.output import counted_path_for
    from stemstream.errors import CountingError
    from stemstream.wire.rawfile import find_acquisitions

    params = counting_from(args)
    raw = args.raw[0] if len(args.raw) == 1 and args.raw[0].is_dir() else args.raw
    start = args.start
    if isinstance(raw, Path):  # a directory: the acquisitions of the scan number in it, the newest by default
        found = find_acquisitions(raw, args.scan)
        chosen = [a for a in found if args.start is None or a.start == args.start]
        if args.start is not None and not chosen:
            have = ", ".join(a.start or "(no id)" for a in found) or "none"
            raise CountingError(f"scan {args.scan}: no acquisition {args.start} in {raw} (there: {have})")
        if chosen:
            acquisition = chosen[-1]
            raw, start = list(acquisition.paths), acquisition.start
            if len(found) > 1:
                logger.warning("scan %d was acquired %d times in %s; counting acquisition %s (--start to choose)",
                               args.scan, len(found), args.raw[0], start or "(no id)")  # fmt: skip
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

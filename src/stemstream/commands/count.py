"""``stemstream count``: count a scan that landed on disk (raw 4D Camera files) into a counted HDF5 file."""

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
    p.set_defaults(func=_count)


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
    return 0

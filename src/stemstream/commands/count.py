"""``stemstream count``: count a scan that landed on disk (raw 4D Camera files) into a counted HDF5 file."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("count", help="count raw files of a scan (e.g. a disk-fallback scan) into HDF5")
    p.add_argument("raw", nargs="+", type=Path, help="the scan's raw .data files, or their directory")
    p.add_argument("--scan", type=int, required=True, help="scan number")
    p.add_argument("--output", type=Path, default=None, help="default <output dir>/scan_<n>_counted.h5")
    p.add_argument("--engine", default=None, help="stempy | cpu | gpu | auto (default STEMSTREAM_ENGINE)")
    p.add_argument("--n-sigma", type=float, default=None, help="background threshold in sigmas (default 4)")
    p.add_argument("--dark", type=Path, default=None, help="dark reference, a .npy of one 576x576 frame")
    p.add_argument("--threads", type=int, default=None, help="reader and engine threads (default: all cores)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_count)


def _count(args: argparse.Namespace) -> int:
    import numpy as np

    from stemstream.config import get_settings
    from stemstream.counting import count_raw_files
    from stemstream.counting.output import counted_path
    from stemstream.errors import CountingError

    s = get_settings()
    dark = None
    if args.dark is not None:
        try:
            dark = np.load(args.dark)
        except (OSError, ValueError) as exc:
            raise CountingError(f"cannot read the dark reference {args.dark}: {exc}; give a .npy file") from None
    n_sigma = args.n_sigma if args.n_sigma is not None else s.background_n_sigma
    if not 0.5 <= n_sigma <= 20:
        raise CountingError(f"--n-sigma {n_sigma} is out of range; use 0.5 .. 20 (usually 4 or 4.5)")
    raw = args.raw[0] if len(args.raw) == 1 and args.raw[0].is_dir() else args.raw
    output = args.output or counted_path(s.output_dir, args.scan)
    path = count_raw_files(
        raw,
        output,
        scan_number=args.scan,
        dark=dark,
        background_n_sigma=n_sigma,
        xray_n_sigma=s.xray_n_sigma,
        engine=args.engine or s.engine,
        threshold_frames=s.threshold_samples,
        threads=args.threads,
        progress=not args.no_progress,
    )
    print(path)
    return 0

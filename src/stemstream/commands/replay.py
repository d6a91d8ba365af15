"""``stemstream replay RAWDIR --scan N``: recorded raw files streamed through the live pipeline as the four
producers would (stemstream.plane.rawreplay)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from stemstream.commands.options import add_store_arguments, store_client

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "replay", help="stream a scan's recorded raw files through the live pipeline, as its four producers would"
    )
    add_store_arguments(p)
    p.add_argument("raw", type=Path, help="the directory of the scan's raw .data files")
    p.add_argument("--scan", type=int, required=True, help="scan number of the raw files")
    p.add_argument("--start", default=None, help="which acquisition of a reused scan number (default: the newest)")
    p.add_argument("--as-scan", type=int, default=None, help="stream it as this scan number (default: --scan)")
    p.add_argument("--rate", type=float, default=None, help="frames per second (default: as fast as it goes)")
    p.add_argument("--threads", type=int, default=1, help="sender threads per sector")
    p.set_defaults(func=_replay)


def _replay(args: argparse.Namespace) -> int:
    from stemstream.commands.plane import SUBTREES, _stop_on_signals
    from stemstream.errors import ConfigError
    from stemstream.plane.rawreplay import replay_scan

    if args.rate is not None and args.rate <= 0:
        raise ConfigError(f"--rate {args.rate}: give frames per second above 0, or leave it out")
    if not 1 <= args.threads <= 64:
        raise ConfigError(f"--threads {args.threads}: give 1..64")
    if not args.raw.is_dir():
        raise ConfigError(f"{args.raw}: not a directory; give the directory of the scan's raw files")
    stop = _stop_on_signals()
    client = store_client(args, subtrees=SUBTREES["producer"], role="leader")
    try:
        results = replay_scan(client, args.raw, args.scan, as_scan=args.as_scan, start=args.start, rate=args.rate,
                              threads=args.threads, stop=stop)  # fmt: skip
    finally:
        client.close()
    sent = sum(r.sent_total for r in results)
    lost = sum(r.lost_upstream for r in results)
    routes = sorted({r.route for r in results})
    as_scan = args.as_scan or args.scan
    print(f"replayed scan {args.scan} as {as_scan}: {sent} sectors {'/'.join(routes)}, {lost} lost upstream")
    return 0

"""``stemstream metrics targets`` (Prometheus service discovery) and ``stemstream health ROLE [UID]`` (probes).

See docs/operations.md, "Watching it".
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from stemstream.commands.options import subcommands


def register(subparsers: argparse._SubParsersAction) -> None:
    sub = subcommands(subparsers, "metrics", "Prometheus: the scrape targets of every process")
    t = sub.add_parser(
        "targets",
        help="write a Prometheus file_sd JSON of every metrics endpoint in the registry",
        description="One target per process that serves /metrics (store servers, producers, aggregators, "
        "NodeGroups, sessions), labelled service and host; written atomically (stdout without --out).",
    )
    t.add_argument("--out", type=Path, default=None, help="file to write (default: print)")
    _store_args(t)
    t.set_defaults(func=_targets)

    h = subparsers.add_parser(
        "health",
        help="exit 0 when a process is registered and making progress, else one line and exit 1",
        description="ROLE is producer, aggregator, nodegroup or store (UID: primary or backup). Without a UID "
        "every registered process of the role must be healthy.",
    )
    h.add_argument("role", help="producer | aggregator | nodegroup | store")
    h.add_argument("uid", nargs="?", default=None, help="one process (default: all of the role)")
    h.add_argument("--window", type=float, default=5.0, help="seconds to watch for progress (default 5)")
    _store_args(h)
    h.set_defaults(func=_health)


def _store_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--store", default=None, help="tcp://host:port of the store (default from the settings)")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the store")


def _client(args: argparse.Namespace):  # -> StoreClient
    from stemstream.config import get_settings
    from stemstream.store.client import StoreClient, store_addresses

    address, backup = store_addresses(get_settings())
    if args.store:
        address, backup = args.store, None
    return StoreClient(address, backup=backup, timeout=args.timeout)  # started by `with`


def _targets(args: argparse.Namespace) -> int:
    import json

    from stemstream.metrics.targets import scrape_targets, write_targets

    with _client(args) as client:
        groups = scrape_targets(client)
    if args.out is None:
        print(json.dumps(groups, indent=2, sort_keys=True))
    else:
        write_targets(groups, args.out)
        print(f"{len(groups)} target(s) written to {args.out}")
    return 0


def _health(args: argparse.Namespace) -> int:
    from stemstream.errors import StoreUnavailable
    from stemstream.metrics.health import check

    try:
        with _client(args) as client:
            verdict = check(client, args.role, args.uid, window=args.window)
    except StoreUnavailable as exc:
        print(f"{args.role}: unknown, the store does not answer ({exc})", file=sys.stderr)
        return 1
    print(verdict.line, file=sys.stdout if verdict.ok else sys.stderr)
    return 0 if verdict.ok else 1

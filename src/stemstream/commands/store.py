"""``stemstream store``: run a Clone store server, or read keys from one (see docs/store.md)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from stemstream.commands.options import subcommands


def register(subparsers: argparse._SubParsersAction) -> None:
    sub = subcommands(subparsers, "store", "run the Clone store, or read keys from it")

    serve = sub.add_parser(
        "serve",
        help="run a store server until SIGINT/SIGTERM",
        description="Serve the Clone store on ports P..P+2 (P+3 and P+4 too with a Binary Star peer). Run "
        "alone, or as a pair: `serve --primary-with-backup tcp://B:P2` on one host and `serve --backup-of "
        "tcp://A:P1` on the other. Writes are checked against stemstream's write policy (docs/security.md).",
    )
    serve.add_argument("--host", default=None, help="interface to bind (default: STEMSTREAM_STORE_HOST)")
    serve.add_argument(
        "--port",
        type=int,
        default=None,
        help="base port, 0 = any free ones (default: STEMSTREAM_STORE_PORT, or STORE_BACKUP_PORT if backup)",
    )
    pair = serve.add_mutually_exclusive_group()
    pair.add_argument("--backup-of", metavar="ADDRESS", help="run as the backup of the primary at ADDRESS")
    pair.add_argument("--primary-with-backup", metavar="ADDRESS", help="run as primary, backup at ADDRESS")
    serve.add_argument("--heartbeat", type=float, default=None, help="seconds (default: STORE_HEARTBEAT_S)")
    serve.add_argument("--max-body", type=int, default=None, help="largest value in bytes (default 1 MiB)")
    serve.add_argument("--stats-interval", type=float, default=5.0, help="seconds between stats updates")
    serve.add_argument("--quota-keys", type=int, default=None, help="keys one writer may hold (default 100000)")
    serve.add_argument(
        "--quota-bytes", type=int, default=None, help="bytes (keys + values) one writer may hold (default 256 MiB)"
    )
    serve.set_defaults(func=_serve)

    get = sub.add_parser("get", help="print the value of one key")
    get.add_argument("key")
    _client_options(get)
    get.set_defaults(func=_get)

    ls = sub.add_parser("ls", help="print the keys and values under a prefix")
    ls.add_argument("prefix", nargs="?", default="/")
    _client_options(ls)
    ls.set_defaults(func=_ls)


def _client_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--address", default=None, help="tcp://HOST:PORT (default: STORE_HOST/PORT)")
    parser.add_argument("--backup", default=None, help="the backup's address (default: STORE_BACKUP_*)")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the store")


def _serve(args: argparse.Namespace) -> int:
    import logging
    import signal
    import threading

    from stemstream.config import get_settings
    from stemstream.metrics.exporter import serve_metrics
    from stemstream.scans.policy import scan_policy
    from stemstream.store.gate import QUOTA_BYTES, QUOTA_KEYS
    from stemstream.store.kvmsg import DEFAULT_MAX_BODY
    from stemstream.store.server import StoreServer

    settings = get_settings()
    role = "backup" if args.backup_of else "primary"
    peer = args.backup_of or args.primary_with_backup
    if role == "backup":
        host = args.host or settings.store_backup_host or settings.store_host
        port = args.port if args.port is not None else settings.store_backup_port
    else:
        host = args.host or settings.store_host
        port = args.port if args.port is not None else settings.store_port
    server = StoreServer(
        host,
        port or None,
        role=role,
        peer=peer,
        heartbeat_s=args.heartbeat,
        max_body=args.max_body or DEFAULT_MAX_BODY,
        stats_interval_s=args.stats_interval,
        policy=scan_policy(),
        quota_keys=args.quota_keys or QUOTA_KEYS,
        quota_bytes=args.quota_bytes or QUOTA_BYTES,
        settings=settings,
    )
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    metrics = serve_metrics(host, settings=settings)
    metrics.watch(server).start()
    # The one line on stdout: scripts and tests read the address from it (port 0 picks it here).
    print(f"stemstream store: {role} serving at {server.address}", flush=True)
    try:
        while not stop.wait(0.5):
            server.maybe_raise()
    finally:
        server.stop()
        metrics.close()
        logging.getLogger(__name__).info("store %s at %s stopped", role, server.address)
    return 0


def _client(args: argparse.Namespace, subtree: str):  # -> StoreClient, imported lazily
    from stemstream.config import load_settings, store_overrides
    from stemstream.store.client import StoreClient

    # Only the subtree asked for is fetched: `get` on a large store stays cheap.
    subtree = subtree if subtree.startswith("/") else "/"
    overrides = store_overrides(args.address, args.backup)
    if args.address is not None and args.backup is None:
        overrides["store_backup_host"] = None  # the settings' backup belongs to the settings' primary
    settings = load_settings(**overrides)
    return StoreClient.from_settings(settings, subtree=subtree, timeout=args.timeout)


def _show(value: Any) -> str:
    return json.dumps(value, default=lambda v: v.hex() if isinstance(v, bytes) else repr(v), sort_keys=True)


def _get(args: argparse.Namespace) -> int:
    from stemstream.errors import StoreError

    missing = object()
    with _client(args, args.key) as client:
        value = client.get(args.key, missing)
        if value is missing:
            raise StoreError(f"no key {args.key!r} in the store at {client.server}")
    print(_show(value))
    return 0


def _ls(args: argparse.Namespace) -> int:
    with _client(args, args.prefix) as client:
        items = client.items(args.prefix)
    for key in sorted(items):
        print(f"{key}  {_show(items[key])}")
    if not items:
        print(f"(no keys under {args.prefix})")
    return 0

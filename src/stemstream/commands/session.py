"""``stemstream session start | stop | list`` and ``stemstream experiment``: the flows from the command line.

``start`` and ``experiment`` run the flow in this process; with ``PREFECT_API_URL`` set, the run shows up
in that Prefect server's UI like one started there.
"""

from __future__ import annotations

import argparse
import time

from stemstream.scans import keys


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("session", help="start, stop and list streaming sessions")
    sub = p.add_subparsers(dest="session_command", metavar="ACTION", required=True)
    start = sub.add_parser("start", help="run a streaming session here (until its time is up or it is stopped)")
    _session_args(start)
    start.add_argument("--minutes", type=float, default=60.0, help="session length (default 60)")
    start.set_defaults(func=_start)
    stop = sub.add_parser("stop", help="end a running session (its nodes are released)")
    stop.add_argument("uid")
    stop.add_argument("--store", default=None)
    stop.set_defaults(func=_stop)
    ls = sub.add_parser("list", help="sessions the store knows")
    ls.add_argument("--store", default=None)
    ls.set_defaults(func=_list)

    e = subparsers.add_parser("experiment", help="N scans at a fixed interval, with a session if none is up")
    _session_args(e)
    e.add_argument("--scans", type=int, default=5, help="number of scans (default 5)")
    e.add_argument("--interval", type=float, default=10.0, help="seconds between scan starts (default 10)")
    e.add_argument("--scan-shape", type=int, nargs=2, default=[32, 32], metavar=("ROWS", "COLS"))
    e.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the scans (default 600)")
    e.set_defaults(func=_experiment)


def _session_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--machine", default="local")
    p.add_argument("--backend", default="local", help="local | slurm | sfapi")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--nodegroups-per-node", type=int, default=2)
    p.add_argument("--n-sigma", type=float, default=4.0, help="background threshold in sigmas (default 4)")
    p.add_argument("--engine", default="stempy", help="stempy | cpu | gpu | auto")
    p.add_argument("--output-dir", default="", help="counted files (default STEMSTREAM_OUTPUT_DIR)")
    p.add_argument("--archive-dir", default="./data/archive")
    p.add_argument("--account", default=None, help="NERSC project, for slurm/sfapi")
    p.add_argument("--store", default=None, help="tcp://host:port of the store (default from the settings)")


def _params(args: argparse.Namespace) -> dict:
    return {
        "machine": args.machine,
        "backend": args.backend,
        "n_nodes": args.nodes,
        "nodegroups_per_node": args.nodegroups_per_node,
        "background_n_sigma": args.n_sigma,
        "engine": args.engine,
        "output_dir": args.output_dir,
        "archive_dir": args.archive_dir,
        "account": args.account,
    }


def _start(args: argparse.Namespace) -> int:
    from stemstream.flows import streaming_session

    result = streaming_session(minutes=args.minutes, store=args.store, **_params(args))
    print(f"session {result['uid']} {result['status']}: {len(result['scans'])} scan(s) processed")
    return 0


def _store(args: argparse.Namespace):
    from stemstream.config import get_settings
    from stemstream.store import StoreClient

    return StoreClient(args.store or get_settings().store_address, timeout=5).start()


def _stop(args: argparse.Namespace) -> int:
    from stemstream.errors import ConfigError

    with _store(args) as client:
        record = client.get(keys.session(args.uid))
        if not isinstance(record, dict):
            raise ConfigError(f"no session {args.uid!r} in the store; `stemstream session list` shows them")
        client.set(keys.session_stop(args.uid), True)
    print(f"asked session {args.uid} to end; its nodes are released when it does")
    return 0


def _list(args: argparse.Namespace) -> int:
    with _store(args) as client:
        sessions = {k.removeprefix(keys.SESSIONS): v for k, v in client.items(keys.SESSIONS).items()}
    print(f"{'session':45s} {'status':10s} until / ended")
    for uid, rec in sorted(sessions.items()):
        when = rec.get("ends_at") or rec.get("ended_at")
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(when)) if when else "-"
        print(f"{uid:45s} {rec.get('status', '?'):10s} {stamp}")
    if not sessions:
        print("(no sessions)")
    return 0


def _experiment(args: argparse.Namespace) -> int:
    from stemstream.flows import multi_scan_experiment

    table = multi_scan_experiment(
        n_scans=args.scans,
        interval_s=args.interval,
        scan_shape=tuple(args.scan_shape),
        store=args.store,
        session=_params(args),
        timeout_s=args.timeout,
    )
    for row in table:
        print(row)
    return 0

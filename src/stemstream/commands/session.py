"""``stemstream session start | stop | list`` and ``stemstream experiment``: the flows from the command line.

``start`` and ``experiment`` run the flow in this process; with ``PREFECT_API_URL`` set, the run shows up
in that Prefect server's UI like one started there.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import Iterator
from typing import Any

from stemstream.commands.options import add_counting_arguments, add_store_arguments, counting_from, store_client
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
    add_store_arguments(stop)
    stop.set_defaults(func=_stop)
    ls = sub.add_parser("list", help="sessions the store knows")
    add_store_arguments(ls)
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
    p.add_argument("--backend", default=None, help="local | slurm | sfapi (default: the machine's, STEMSTREAM_SITES)")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--nodegroups-per-node", type=int, default=2)
    add_counting_arguments(p.add_argument_group("counting"))
    p.add_argument("--output-dir", default="", help="counted files (default: the machine's, STEMSTREAM_OUTPUT_DIR)")
    p.add_argument("--archive-dir", default="", help="local archive (default STEMSTREAM_ARCHIVE_DIR)")
    p.add_argument("--account", default=None, help="NERSC project, for slurm/sfapi (default STEMSTREAM_ACCOUNT)")
    p.add_argument("--notes", default="", help="notes kept with every scan of the session in the catalog")
    add_store_arguments(p)


def _params(args: argparse.Namespace, **more: Any) -> Any:
    from stemstream.sessions import session_params

    # The site's (STEMSTREAM_SITES) unless given here: only what was given goes over the machine's.
    site = {"backend": args.backend, "output_dir": args.output_dir, "archive_dir": args.archive_dir}
    site["account"] = args.account
    return session_params(
        machine=args.machine,
        n_nodes=args.nodes,
        nodegroups_per_node=args.nodegroups_per_node,
        counting=counting_from(args),
        site={k: v for k, v in site.items() if v},
        **more,
    )


@contextlib.contextmanager
def _store_of(args: argparse.Namespace) -> Iterator[None]:
    """The flows use the settings' store: ``--store`` / ``--store-backup`` become this process's settings."""
    from stemstream.config import environment, store_overrides

    overrides = store_overrides(args.store, args.store_backup)
    if not overrides:
        yield
        return
    with environment(**overrides):
        yield


def check_prefect_api(timeout: float = 5.0) -> None:
    """A one-line ConfigError when PREFECT_API_URL is set and nothing answers there (instead of Prefect's
    traceback after its retries). Without PREFECT_API_URL, Prefect runs the flow on a temporary server."""
    import httpx
    from prefect.settings import PREFECT_API_URL

    from stemstream.errors import ConfigError

    url = PREFECT_API_URL.value()
    if not url:
        return
    try:
        httpx.get(f"{url.rstrip('/')}/health", timeout=timeout)
    except httpx.TransportError as exc:  # an HTTP answer (even 401/404) means a server is there
        raise ConfigError(
            f"no Prefect API answers at PREFECT_API_URL={url} ({type(exc).__name__}); start one with "
            "`prefect server start`, or unset PREFECT_API_URL to run the flow on a temporary server"
        ) from None


def _start(args: argparse.Namespace) -> int:
    params = _params(args, minutes=args.minutes, notes=args.notes)
    check_prefect_api()
    with _store_of(args):
        from stemstream.sessions import check_store

        check_store()  # here, in one line: inside the flow Prefect would log the traceback first
        from stemstream.flows import streaming_session

        result = streaming_session(params)
    print(f"session {result['uid']} {result['status']}: {len(result['scans'])} scan(s) processed")
    return 0


def _stop(args: argparse.Namespace) -> int:
    from stemstream.errors import ConfigError
    from stemstream.scans.records import SessionRecord

    # store_client() hands back a started client: close it, do not start it again (``with`` would)
    with contextlib.closing(store_client(args, role="operator")) as client:
        if SessionRecord.parse(client.get(keys.session(args.uid))) is None:
            raise ConfigError(f"no session {args.uid!r} in the store; `stemstream session list` shows them")
        client.set(keys.session_stop(args.uid), True)
    print(f"asked session {args.uid} to end; its nodes are released when it does")
    return 0


def _list(args: argparse.Namespace) -> int:
    from stemstream.scans.records import SessionRecord

    with contextlib.closing(store_client(args, subtrees=(keys.SESSIONS,))) as client:
        items = client.items(keys.SESSIONS)
    sessions = {key.removeprefix(keys.SESSIONS): SessionRecord.parse(value) for key, value in items.items()}
    print(f"{'session':45s} {'status':10s} until / ended")
    for uid, rec in sorted(sessions.items()):
        when = (rec.ends_at or rec.ended_at) if rec else None
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(when)) if when else "-"
        print(f"{uid:45s} {rec.status if rec else '?':10s} {stamp}")
    if not sessions:
        print("(no sessions)")
    return 0


def _experiment(args: argparse.Namespace) -> int:
    params = _params(args, notes=args.notes)
    check_prefect_api()
    with _store_of(args):
        from stemstream.flows import multi_scan_experiment

        table = multi_scan_experiment(
            n_scans=args.scans,
            interval_s=args.interval,
            scan_shape=tuple(args.scan_shape),
            session=params,
            timeout_s=args.timeout,
        )
    for row in table:
        print(row)
    return 0

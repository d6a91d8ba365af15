"""``stemstream demo``: a whole streaming session on this machine, on the embedded defaults.

A Prefect server (embedded SQLite), the Clone store, four simulated receiving-server producers; then a
``multi_scan_experiment`` starts a ``streaming_session`` (aggregator + NodeGroups as MPI ranks), streams
a few scans, each counted, archived (locally) and catalogued; the session ends, one more scan falls back
to disk and ``count_fallback_scan`` counts it. A summary table and where to look at the end. Everything
it started is stopped, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import statistics
import time
from pathlib import Path

from stemstream.commands.options import add_counting_arguments, counting_from
from stemstream.scans import keys

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("demo", help="run a whole streaming session here: stream, count, archive, catalogue")
    p.add_argument("--dir", type=Path, default=Path("data/demo"), help="everything goes here (default data/demo)")
    p.add_argument("--scans", type=int, default=3, help="streamed scans (default 3)")
    p.add_argument("--scan-shape", type=int, nargs=2, default=[32, 32], metavar=("ROWS", "COLS"))
    p.add_argument("--interval", type=float, default=2.0, help="seconds between scan starts (default 2)")
    p.add_argument("--nodegroups", type=int, default=2, help="NodeGroups, each an MPI rank (default 2)")
    add_counting_arguments(p.add_argument_group("counting"))
    p.add_argument("--keep-ui", action="store_true", help="keep the Prefect UI up at the end until Ctrl-C")
    p.set_defaults(func=_demo)


def _demo(args: argparse.Namespace) -> int:
    from stemstream.config import environment, store_overrides
    from stemstream.errors import ConfigError
    from stemstream.sim.site import LocalSite

    if args.scans < 1 or min(args.scan_shape) < 1 or args.nodegroups < 1:
        raise ConfigError("--scans, --scan-shape and --nodegroups must be at least 1")
    root = args.dir.absolute()
    if root.exists():
        shutil.rmtree(root)  # a demo starts from nothing: scan numbers, catalog and files are its own
    catalog_url = f"sqlite:///{root / 'catalog.sqlite'}"
    counting = counting_from(args)
    started = time.monotonic()
    print(f"stemstream demo: everything under {root}")
    # The demo's store has no backup; its producers write raw files under root/fallback (LocalSite), the only
    # place the fallback counter takes raw files from (wire.paths).
    demo_settings = {"store_backup_host": None, "catalog_url": catalog_url, "fallback_dir": root / "fallback"}
    with LocalSite(root) as site, environment(**store_overrides(site.store), **demo_settings):
        print(f"  Prefect UI    {site.prefect_url}  (server on embedded SQLite)")
        print(f"  Clone store   {site.store};  4 simulated producers ready")
        # Prefect is imported only now, so that it reports to the server just started.
        from stemstream.catalog import Catalog
        from stemstream.flows import count_fallback_scan, multi_scan_experiment
        from stemstream.sessions import session_params

        session = session_params(
            nodegroups_per_node=args.nodegroups,
            counting=counting,
            output_dir=str(root / "counted"),
            archive_dir=str(root / "archive"),
            uid=f"demo-{time.strftime('%Y%m%d-%H%M%S')}",
        )
        multi_scan_experiment(
            n_scans=args.scans,
            interval_s=args.interval,
            scan_shape=tuple(args.scan_shape),
            session=session,
            timeout_s=600,
        )
        fallback = _one_scan_to_disk(args.scans + 1, tuple(args.scan_shape))
        count_fallback_scan(fallback, session=session)
        catalog = Catalog(catalog_url)
        rows = catalog.list_scans()
        catalog.close()
        _summary(rows, root, site.prefect_url, time.monotonic() - started, counting.engine)
        _flush_prefect_logs()
        if args.keep_ui:
            print(f"\nThe Prefect UI stays up at {site.prefect_url}; Ctrl-C to stop everything.")
            try:
                while True:
                    time.sleep(1)
            except KeyboardInterrupt:
                pass
    return 0


def _flush_prefect_logs() -> None:
    """Send the runs' last log lines to the server before it stops (else the exit waits on retries)."""
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=10)


def _one_scan_to_disk(scan_number: int, shape: tuple[int, int]) -> int:
    """With the session over (no NodeGroup registered), one more scan: the producers write it to disk."""
    from stemstream.plane.requests import request_scan
    from stemstream.store import Registry, StoreClient

    with StoreClient.from_settings(timeout=10) as client:
        registry = Registry(client)
        deadline = time.monotonic() + 60
        while registry.members("nodegroup") and time.monotonic() < deadline:
            time.sleep(0.5)  # the session released its nodes; their records expire within the TTL
        request_scan(client, scan_number, shape, seed=scan_number)
        key = keys.scan(scan_number)
        client.wait_for(
            lambda items: (items.get(key) or {}).get("status") in ("on_disk", "incomplete"), prefix=key, timeout=120
        )
    print(f"  scan {scan_number}: no NodeGroups registered any more, so the producers wrote it to disk")
    return scan_number


def _engine_of(path: str) -> str:
    """The engine that counted a file (its /stemstream attribute; "" if unreadable)."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            return str(f["stemstream"].attrs.get("engine", ""))
    except (OSError, KeyError):
        return ""


def _summary(rows: list, root: Path, prefect_url: str, seconds: float, engine: str = "") -> None:
    print()
    if engine:
        used = sorted({_engine_of(r.counted_path) for r in rows if r.counted_path} - {""})
        print(f"counting engine: {engine}" + (f" (counted by: {', '.join(used)})" if used else ""))
    print(f"{'scan':>4}  {'went':6}  {'status':9}  {'frames':>6}  {'incompl.':>8}  {'events':>8}  {'to file':>8}")
    for r in rows:
        turnaround = f"{r.turnaround_s:7.2f}s" if r.turnaround_s is not None else "       -"
        went = "stream" if r.route == "stream" else "disk"
        print(
            f"{r.scan_number:>4}  {went:6}  {r.status:9}  {r.frames:>6}  {r.frames_incomplete:>8}  "
            f"{r.events:>8}  {turnaround}"
        )
    streamed = sorted(r.turnaround_s for r in rows if r.route == "stream" and r.turnaround_s is not None)
    if streamed:
        print(f"{'median of the streamed scans':>49}  {statistics.median(streamed):7.2f}s")
    print("('to file': seconds from the scan's last frame to its counted HDF5 file)")
    print()
    print("Where to look:")
    print(f"  counted HDF5   {root / 'counted'}/scan_<n>_counted.h5  (stempy.io.load_electron_counts opens them)")
    print(f"  pictures       {root / 'counted'}/scan_<n>_vbf.png  (virtual bright field)")
    print(f"  archive        {root / 'archive'}")
    print(f"  catalog        stemstream catalog --url sqlite:///{root / 'catalog.sqlite'} list")
    print(f"  Prefect runs   PREFECT_HOME={root / 'prefect'} prefect server start  -> open http://127.0.0.1:4200")
    print(f"                 (the demo's server was at {prefect_url}; it stops with the demo)")
    print(f"  logs           {root / 'logs'}, {root / 'counted' / 'logs'}")
    print(f"demo finished in {seconds:.0f} s")

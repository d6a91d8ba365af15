"""``stemstream producer | aggregator | nodegroup``: the data-plane processes.

Each needs only the store's address (``--store``, default from STEMSTREAM_STORE_HOST/PORT); everything
else is found in the store. They run until SIGTERM/SIGINT (or, for ``producer --scans N``, until done).

Each mirrors only the store subtrees it reads (:data:`SUBTREES`) and declares its store role, which the
store's write policy checks on a site without CURVE (with CURVE it goes by the process's key instead).
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from pathlib import Path
from typing import Any

from stemstream.commands.options import add_counting_arguments, add_store_arguments, counting_from, store_client

logger = logging.getLogger(__name__)

# What each process reads in the store (it writes its own records wherever they live).
SUBTREES = {
    # plans, acks, requests; the registry's producers too (the leader reports them in its metrics)
    "producer": ("/scans/", "/nodegroups/", "/aggregators/", "/producers/", "/control/"),
    "aggregator": ("/nodegroups/",),  # the members it routes to
    "nodegroup": ("/nodegroups/",),  # reads nothing; its own record
}


def register(subparsers: argparse._SubParsersAction) -> None:
    from stemstream.wire.protocol import N_SECTORS

    p = subparsers.add_parser("producer", help="a detector-sector producer fed by the simulator")
    add_store_arguments(p)
    p.add_argument(
        "--sector", type=int, required=True, choices=range(N_SECTORS), metavar="0..3",
        help="detector sector / receiving server, 0..3",
    )  # fmt: skip
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="sender threads (default STEMSTREAM_PRODUCER_THREADS)",
    )
    p.add_argument(
        "--scans",
        type=int,
        default=None,
        help="acquire N scans and exit; without it, serve /control/scan requests",
    )
    p.add_argument("--first-scan", type=int, default=1, help="scan number of the first of --scans")
    p.add_argument("--scan-shape", type=int, nargs=2, default=[64, 64], metavar=("H", "W"))
    p.add_argument("--seed", type=int, default=0, help="simulator seed (a request's 'seed' wins)")
    p.add_argument("--loss-rate", type=float, default=0.001, help="sectors lost upstream (a request's wins)")
    p.add_argument("--interval", type=float, default=0.0, help="seconds between --scans scans")
    p.add_argument(
        "--pregen",
        type=int,
        default=0,
        help="send K pre-generated sector buffers in turn (benchmarks)",
    )
    p.add_argument("--fallback-dir", type=Path, default=None, help="default STEMSTREAM_FALLBACK_DIR")
    p.add_argument("--uid", default=None)
    p.add_argument(
        "--max-skew",
        type=int,
        default=64,
        help="frames a sender thread may run ahead of its siblings",
    )
    p.set_defaults(func=_producer)

    a = subparsers.add_parser("aggregator", help="route sector messages from the producers to the NodeGroups")
    add_store_arguments(a)
    a.add_argument("--sectors", type=int, default=4)
    a.add_argument("--serve", default=None, help="the sectors this aggregator routes, e.g. 0,2 (default: all)")
    a.add_argument(
        "--processes",
        type=int,
        default=1,
        help="N: one aggregator process per share of the sectors (sector m in process m %% N; UIDs <uid>-<i>)",
    )
    a.add_argument("--uid", default=None)
    a.add_argument(
        "--host",
        default=None,
        help="address to bind and advertise (default STEMSTREAM_BIND_HOST)",
    )
    a.add_argument(
        "--pending-limit",
        type=int,
        default=64,
        help="data messages held per sector before an expect",
    )
    a.add_argument("--scan-timeout", type=float, default=None, help="default STEMSTREAM_SCAN_TIMEOUT_S")
    a.set_defaults(func=_aggregator)

    n = subparsers.add_parser("nodegroup", help="receive and assemble frames on a compute node")
    add_store_arguments(n)
    n.add_argument(
        "--consumer",
        choices=["count", "checksum", "collect", "null"],
        default="checksum",
        help="count: electron-count and write one HDF5 per scan (rank 0); the others are for tests",
    )
    n.add_argument("--count", type=int, default=1, help="NodeGroups in this process")
    n.add_argument("--uid", default=None, help="UID (with --count N: the prefix, -0 .. -N-1 appended)")
    n.add_argument("--results", type=Path, default=None, help="write <uid>_scan<N>.json per scan here")
    n.add_argument("--delay", type=float, default=0.0, help="seconds of simulated work per frame")
    n.add_argument(
        "--host",
        default=None,
        help="address to bind and advertise (default STEMSTREAM_BIND_HOST)",
    )
    n.add_argument("--expect-timeout", type=float, default=None, help="how long data waits for its expect")
    n.add_argument("--scan-timeout", type=float, default=None, help="default STEMSTREAM_SCAN_TIMEOUT_S")
    n.add_argument("--max-lag", type=int, default=64, help="messages a sector may run ahead of the slowest")
    c = n.add_argument_group("counting (--consumer count)")
    c.add_argument("--output-dir", type=Path, default=None, help="counted files (default STEMSTREAM_OUTPUT_DIR)")
    add_counting_arguments(c)
    c.add_argument("--batch", type=int, default=None, help="frames per engine call (default by engine)")
    c.add_argument(
        "--workers",
        type=int,
        default=None,
        help="counting processes over shared memory (default 1 for stempy, which holds the GIL; 0 for cpu/gpu)",
    )
    c.add_argument(
        "--worker-cpus",
        default=None,
        help="pin the counting processes to these cores, comma-separated (e.g. 2,3,4,5)",
    )
    c.add_argument("--buffer-frames", type=int, default=512, help="frames held for counting before waiting")
    c.add_argument("--analyses", default=None, help="live analyses: default | all | none | names (STEMSTREAM_ANALYSES)")
    n.set_defaults(func=_nodegroup)


def _stop_on_signals() -> threading.Event:
    stop = threading.Event()

    def handler(signum: int, _frame: object) -> None:
        logger.info("signal %d: stopping", signum)
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    return stop


def _serve(components: list[Any], stop: threading.Event) -> int:
    """Wait for a signal, re-raising a component thread's error; then stop every component."""
    try:
        while not stop.wait(0.5):
            for c in components:
                c.maybe_raise()
    finally:
        for c in components:
            c.stop()
    return 0


def _producer(args: argparse.Namespace) -> int:
    from stemstream.metrics.exporter import serve_metrics
    from stemstream.sim.producer import serve

    metrics = serve_metrics()
    stop = _stop_on_signals()
    client = store_client(args, subtrees=SUBTREES["producer"], role="leader" if args.sector == 0 else "producer")
    try:
        serve(
            client,
            args.sector,
            threads=args.threads,
            scans=args.scans,
            first_scan=args.first_scan,
            scan_shape=(args.scan_shape[0], args.scan_shape[1]),
            seed=args.seed,
            loss_rate=args.loss_rate,
            interval=args.interval,
            pregen=args.pregen,
            fallback_dir=args.fallback_dir,
            uid=args.uid,
            stop=stop,
            max_skew=args.max_skew,
            metrics=metrics,
        )
    finally:
        client.close()
        metrics.close()
    return 0


def _aggregator(args: argparse.Namespace) -> int:
    from stemstream.metrics.exporter import serve_metrics
    from stemstream.plane.aggregator import Aggregator

    if args.processes != 1:
        return _aggregator_processes(args)
    serve = _sector_list(args.serve, args.sectors)
    metrics = serve_metrics(args.host)
    stop = _stop_on_signals()
    client = store_client(args, subtrees=SUBTREES["aggregator"], role="aggregator")
    try:
        agg = Aggregator(
            client,
            n_sectors=args.sectors,
            serve=serve,
            uid=args.uid,
            host=args.host,
            pending_limit=args.pending_limit,
            scan_timeout_s=args.scan_timeout,
        )
        metrics.watch(agg).start()  # watched first: its record has the endpoint when it says "ready"
        return _serve([agg], stop)
    finally:
        client.close()
        metrics.close()


def _sector_list(text: str | None, n_sectors: int) -> list[int] | None:
    from stemstream.errors import ConfigError

    if not text:
        return None
    try:
        sectors = [int(m) for m in text.split(",") if m.strip()]
    except ValueError:
        sectors = []
    if not sectors or not all(0 <= m < n_sectors for m in sectors):
        raise ConfigError(f"--serve {text!r}: give sector numbers 0..{n_sectors - 1} separated by commas, e.g. 0,2")
    return sectors


def _aggregator_processes(args: argparse.Namespace) -> int:
    """``--processes N``: N aggregator processes, sector m in process m % N, each its own registry record
    (``<uid>-<i>``); this process waits for a signal (or one of them to end) and stops them all."""
    import os
    import socket
    import subprocess
    import sys

    from stemstream.errors import ConfigError

    if not 1 <= args.processes <= args.sectors:
        raise ConfigError(
            f"--processes {args.processes}: give 1..{args.sectors} (one process per share of the sectors)"
        )
    base = args.uid or f"aggregator-{socket.gethostname()}-{os.getpid()}"
    common = [sys.executable, "-m", "stemstream.cli", "aggregator", "--sectors", str(args.sectors),
              "--pending-limit", str(args.pending_limit)]  # fmt: skip
    for flag, value in (("--store", args.store), ("--store-backup", args.store_backup), ("--host", args.host),
                        ("--scan-timeout", args.scan_timeout)):  # fmt: skip
        if value is not None:
            common += [flag, str(value)]
    stop = _stop_on_signals()
    children = []
    try:
        for i in range(args.processes):
            share = ",".join(str(m) for m in range(args.sectors) if m % args.processes == i)
            children.append(subprocess.Popen([*common, "--serve", share, "--uid", f"{base}-{i}"]))
        while not stop.wait(0.5):
            ended = [c for c in children if c.poll() is not None]
            if ended:
                logger.error(
                    "aggregator process %d ended (exit %s); stopping the others", ended[0].pid, ended[0].returncode
                )
                return 1
        return 0
    finally:
        for c in children:
            if c.poll() is None:
                c.terminate()
        for c in children:
            try:
                c.wait(20)
            except subprocess.TimeoutExpired:
                c.kill()
                c.wait(5)


def _nodegroup(args: argparse.Namespace) -> int:
    import os
    import socket

    from stemstream.metrics.exporter import serve_metrics
    from stemstream.nodes.consumer import ChecksumConsumer, CollectingConsumer, NullConsumer, SlowConsumer
    from stemstream.plane.nodegroup import NodeGroup

    stop = _stop_on_signals()
    metrics = serve_metrics(args.host)
    service = _counting_service(args) if args.consumer == "count" else None
    base = args.uid or f"nodegroup-{socket.gethostname()}-{os.getpid()}"
    if service is not None and service.transport.size > 1 and args.uid:
        base = f"{args.uid}-r{service.transport.rank}"
    uids = [base if args.count == 1 else f"{base}-{i}" for i in range(args.count)]
    job, job_size = None, None
    if service is not None:  # counting NodeGroups gather per MPI job: a scan must stay within one job
        job = f"{socket.gethostname()}-{os.getpid()}"
        comm = getattr(service.transport, "_comm", None)
        job = comm.bcast(job, root=0) if comm is not None else job
        job_size = args.count * service.transport.size
    client = store_client(args, subtrees=SUBTREES["nodegroup"], role="nodegroup")
    groups: list[NodeGroup] = []
    try:
        if service is not None:
            service.uids = uids
            service.store = client
            service.start()
            metrics.watch(service)
        for uid in uids:
            consumer: Any
            if service is not None:
                consumer = service.consumer(uid)
            elif args.consumer == "null":
                consumer = NullConsumer()
            elif args.consumer == "collect":
                consumer = CollectingConsumer(results_dir=args.results, name=uid)
            else:
                consumer = ChecksumConsumer(results_dir=args.results, name=uid)
            if args.delay > 0:
                consumer = SlowConsumer(consumer, args.delay)
            group = NodeGroup(
                consumer,
                client,
                uid=uid,
                host=args.host,
                expect_timeout=args.expect_timeout,
                scan_timeout_s=args.scan_timeout,
                max_lag=args.max_lag,
                job=job,
                job_size=job_size,
            )
            groups.append(group)
            metrics.watch(group).start()
    except BaseException:
        for group in groups:
            group.stop()
        if service is not None:
            service.stop()
        client.close()
        metrics.close()
        raise
    try:
        return _serve([*groups, *([service] if service is not None else [])], stop)
    finally:
        client.close()
        metrics.close()


def _cpu_list(text: str | None) -> list[int] | None:
    from stemstream.errors import ConfigError

    if not text:
        return None
    try:
        return [int(c) for c in text.split(",") if c.strip()]
    except ValueError:
        raise ConfigError(f"--worker-cpus {text!r}: give core numbers separated by commas, e.g. 2,3") from None


def _counting_service(args: argparse.Namespace) -> Any:
    """The rank's counting service (MPI when run under mpiexec); NodeGroup UIDs are filled in after."""
    from stemstream.config import get_settings
    from stemstream.nodes.config import CountingConfig
    from stemstream.nodes.ranks import make_transport
    from stemstream.nodes.service import CountingService

    s = get_settings()
    counting = counting_from(args)
    config = CountingConfig(
        output_dir=args.output_dir or s.output_dir,
        params=counting,
        batch=args.batch,
        workers=args.workers,
        worker_cpus=_cpu_list(args.worker_cpus),
        max_buffered_frames=args.buffer_frames,
        scan_timeout_s=args.scan_timeout or s.scan_timeout_s,
        preview_ttl_s=s.preview_ttl_s,
        **_analyses_config(args.analyses or s.analyses, s),
    )
    return CountingService(config, transport=make_transport(), uids=[])


def _analyses_config(spec: str, s: Any) -> dict[str, Any]:
    """The live analyses (docs/analyses.md) and, when on, the live view of rank 0."""
    from stemstream.analyses import registry
    from stemstream.analyses.page import ViewConfig
    from stemstream.analyses.runner import specs_for

    if spec.strip() == "none":
        return {"analyses": None, "view": None}
    specs = specs_for(registry.names(spec), s.analysis_params)
    return {"analyses": specs, "view": ViewConfig(host=s.bind_host, ports=s.ports) if s.view else None}

"""Throughput of the data plane on TCP loopback, next to a bare pyzmq chain of the same shape.

Streaming path: store (in this process), 4 sector producer processes (``--threads`` sender threads each,
``--pregen`` pre-generated sector buffers so that the simulator is not what limits), the aggregator process,
``--groups`` NodeGroup processes with the null consumer (frames assembled, then dropped).

Raw chain: 4 producer processes PUSHing ``[msgpack header, 165,888-byte payload]`` messages, a router
process with one thread per sector doing pull -> peek_frame_number -> push (``frame % groups``), and
``--groups`` consumer processes with one PULL thread per sector that only receive.

Both move the same messages (4 x frames sectors); the figure is bytes / (last message in - first sent).
With ``--curve`` a second streaming path runs with ZeroMQ CURVE on every socket (keys made in a temporary
directory, docs/security.md), so the cost of encryption is printed next to the plaintext figure.
With ``--processes N`` another streaming path runs with ``stemstream aggregator --processes N`` (one aggregator
process per share of the sectors), printed next to the one-process figure.
Usage: ``python benchmarks/plane.py [--frames 4096] [--groups 2] [--threads 1] [--repeat 3] [--curve] [--processes N]``.
Runs alternate (raw, streaming, [streaming with CURVE,] raw, ...) so that all see the same machine; the best
of each counts.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from stemstream.scans import keys

SECTOR_SHAPE = (144, 576)
SECTOR_BYTES = SECTOR_SHAPE[0] * SECTOR_SHAPE[1] * 2
N_SECTORS = 4


# ------------------------------------------------------------------------------------------ raw chain


def _raw_producer(
    sector: int,
    router_ep: str,
    n_frames: int,
    shape: tuple[int, int],
    go: Any,
    out: Any,
) -> None:
    import numpy as np
    import zmq

    from stemstream.transport.sockets import make_socket
    from stemstream.wire.protocol import SectorHeader

    ctx = zmq.Context()
    sock = make_socket(ctx, zmq.PUSH)
    sock.connect(router_ep)
    rng = np.random.default_rng(sector)
    pool = [rng.integers(0, 200, SECTOR_SHAPE, dtype=np.uint16) for _ in range(16)]
    go.wait(30)
    start = time.time()
    for f in range(n_frames):
        header = SectorHeader(1, f, sector, shape, timestamp_ns=time.time_ns()).encode()
        sock.send(header, zmq.SNDMORE)
        sock.send(pool[f % len(pool)], copy=False)
    out.put(("producer", sector, start, time.time()))
    sock.close()  # with the settings' linger: what is queued still goes out
    ctx.term()


def _raw_router(data_eps: list[str], consumer_eps: list[list[str]], ready: Any, stop: Any) -> None:
    import zmq

    from stemstream.transport.sockets import make_socket
    from stemstream.wire.protocol import peek_frame_number

    ctx = zmq.Context()

    def route(m: int) -> None:
        pull = make_socket(ctx, zmq.PULL)
        pull.bind(data_eps[m])
        pushes = []
        for eps in consumer_eps:
            push = make_socket(ctx, zmq.PUSH)
            push.connect(eps[m])
            pushes.append(push)
        n = len(pushes)
        ready.put(m)
        try:
            while not stop.is_set():
                if not pull.poll(100):
                    continue
                for _ in range(256):
                    try:
                        parts = pull.recv_multipart(zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    pushes[peek_frame_number(parts[0].buffer) % n].send_multipart(parts, copy=False)
        finally:
            pull.close()
            for push in pushes:
                push.close()

    threads = [threading.Thread(target=route, args=(m,), daemon=True) for m in range(len(data_eps))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ctx.term()


def _raw_consumer(index: int, eps: list[str], expected: int, ready: Any, out: Any) -> None:
    import zmq

    from stemstream.transport.sockets import make_socket

    ctx = zmq.Context()
    counts = [0] * len(eps)
    firsts: list[float] = []
    lasts: list[float] = []
    share = expected // len(eps)

    def receive(m: int) -> None:
        pull = make_socket(ctx, zmq.PULL)
        pull.bind(eps[m])
        ready.put(("consumer", index, m))
        first = None
        while counts[m] < share:
            if not pull.poll(30_000):
                break
            pull.recv_multipart(copy=False)
            counts[m] += 1
            if first is None:
                first = time.time()
        firsts.append(first or time.time())
        lasts.append(time.time())
        pull.close()

    threads = [threading.Thread(target=receive, args=(m,)) for m in range(len(eps))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out.put(("consumer", index, min(firsts), max(lasts), sum(counts)))
    ctx.term()


def _free_endpoint() -> str:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


def run_raw(n_frames: int, groups: int) -> dict[str, float]:
    """One run of the bare chain; bytes, seconds and GB/s."""
    mp_ctx = mp.get_context("spawn")
    shape = _scan_shape(n_frames)
    data_eps = [_free_endpoint() for _ in range(N_SECTORS)]
    consumer_eps = [[_free_endpoint() for _ in range(N_SECTORS)] for _ in range(groups)]
    ready, out, go, stop = mp_ctx.Queue(), mp_ctx.Queue(), mp_ctx.Event(), mp_ctx.Event()
    expected_each = n_frames * N_SECTORS // groups
    procs = [mp_ctx.Process(target=_raw_consumer, args=(i, consumer_eps[i], expected_each, ready, out))
             for i in range(groups)]  # fmt: skip
    procs.append(mp_ctx.Process(target=_raw_router, args=(data_eps, consumer_eps, ready, stop)))
    producers = [mp_ctx.Process(target=_raw_producer, args=(m, data_eps[m], n_frames, shape, go, out))
                 for m in range(N_SECTORS)]  # fmt: skip
    try:
        for p in procs:
            p.start()
        for _ in range(groups * N_SECTORS + N_SECTORS):
            ready.get(timeout=60)
        for p in producers:
            p.start()
        go.set()
        results = [out.get(timeout=300) for _ in range(groups + N_SECTORS)]
    finally:
        stop.set()
        for p in procs + producers:
            p.join(10)
            if p.is_alive():
                p.kill()
    start = min(r[2] for r in results if r[0] == "producer")
    end = max(r[3] for r in results if r[0] == "consumer")
    received = sum(r[4] for r in results if r[0] == "consumer")
    assert received == n_frames * N_SECTORS, f"raw chain lost messages: {received}"
    nbytes = received * SECTOR_BYTES
    return {"bytes": nbytes, "seconds": end - start, "gbps": nbytes / (end - start) / 1e9}


# ------------------------------------------------------------------------------------------ streaming


class _Processes:
    def __init__(self, log_dir: Path, cpus: str | None = None, env: dict[str, str] | None = None) -> None:
        self.log_dir = log_dir
        self.cpus = cpus  # run every process on these cores (taskset -c), None: anywhere
        self.env = env or {}  # on top of this process's environment
        self.procs: list[subprocess.Popen[bytes]] = []
        self.by_name: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, *args: Any, cpus: str | None = None) -> None:
        env = {**os.environ, "STEMSTREAM_LOG_LEVEL": os.environ.get("BENCH_LOG_LEVEL", "WARNING"), **self.env}
        root = Path(__file__).resolve().parents[1]
        env["PYTHONPATH"] = os.pathsep.join([str(root / "src"), env.get("PYTHONPATH", "")])
        cpus = cpus or self.cpus
        pin = ["taskset", "-c", cpus] if cpus else []
        with open(self.log_dir / f"{name}.log", "ab") as log:
            self.procs.append(
                subprocess.Popen(
                    [*pin, sys.executable, "-m", "stemstream.cli", *(str(a) for a in args)],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                    start_new_session=True,
                )
            )
        self.by_name[name] = self.procs[-1]

    def stop(self) -> None:
        for p in self.procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait(5)


class StreamingPlane:
    """The streaming path, started once: store (here), aggregator, NodeGroups and producers (processes)."""

    def __init__(
        self,
        groups: int,
        threads: int,
        log_dir: Path,
        consumer_args: tuple[Any, ...] = ("--consumer", "null"),
        warm_up: int = 256,
        cpus: str | None = None,
        nodegroup_cpus: str | None = None,
        keys_dir: Path | None = None,
        env: dict[str, str] | None = None,
        aggregator_processes: int = 1,
    ) -> None:
        self.aggregator_processes = aggregator_processes  # stemstream aggregator --processes
        self.cpus = cpus
        self.env = env or {}
        self.keys_dir = keys_dir  # CURVE on every socket with the keys there (None: this process's settings)
        self.nodegroup_cpus = nodegroup_cpus
        self.groups = groups
        self.threads = threads
        self.log_dir = log_dir
        self.consumer_args = consumer_args
        self.warm_up = warm_up
        self.scan = 0

    def __enter__(self) -> StreamingPlane:
        from stemstream.config import get_settings, load_settings
        from stemstream.store import Registry, StoreClient, StoreServer

        settings = get_settings() if self.keys_dir is None else load_settings(keys_dir=self.keys_dir)
        env = {} if self.keys_dir is None else {"STEMSTREAM_KEYS_DIR": str(self.keys_dir)}
        env |= self.env  # on top, for every process (e.g. STEMSTREAM_METRICS=off)
        self.server = StoreServer(host="127.0.0.1", port=None, settings=settings).start()
        self.procs = _Processes(self.log_dir, self.cpus, env=env)
        try:
            self.client = StoreClient(self.server.address, timeout=10, settings=settings).start()
            address = self.server.address
            registry = Registry(self.client)
            shard = ("--processes", self.aggregator_processes) if self.aggregator_processes > 1 else ()
            self.procs.start("aggregator", "aggregator", "--store", address, *shard)
            for g in range(self.groups):
                self.procs.start(f"ng-{g}", "nodegroup", "--store", address, "--uid", f"ng-{g}",
                                 *self.consumer_args, cpus=self.nodegroup_cpus)  # fmt: skip
            registry.wait_for_members("aggregator", self.aggregator_processes, status="ready", timeout=60)
            registry.wait_for_members("nodegroup", self.groups, status="ready", timeout=60)
            for m in range(N_SECTORS):
                self.procs.start(f"producer-{m}", "producer", "--store", address, "--sector", m,
                                 "--threads", self.threads, "--pregen", 16, "--loss-rate", 0)  # fmt: skip
            registry.wait_for_members("producer", N_SECTORS, status="ready", timeout=60)
            if self.warm_up:
                self.measure(self.warm_up)  # warm-up: connections made, buffers touched
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.procs.stop()
        if getattr(self, "client", None) is not None:
            self.client.close()
        self.server.stop()

    def measure(self, n_frames: int) -> dict[str, float]:
        """Stream one scan of ``n_frames``; bytes, seconds (first sector sent .. last one in) and GB/s."""
        from stemstream.plane.requests import request_scan
        from stemstream.scans.plan import scan_details

        self.scan += 1
        key = f"/scans/{self.scan}"
        request_scan(self.client, self.scan, _scan_shape(n_frames), loss_rate=0.0)
        self.client.wait_for(
            lambda items: (items.get(key) or {}).get("status") in ("received", "incomplete"), key, timeout=600
        )
        d = scan_details(self.client, self.scan)
        assert d["scan"]["status"] == "received", d["scan"]
        assert d["scan"]["received"] == n_frames * N_SECTORS
        start = min(p["started"] for p in d["producers"].values())
        first = min(g["first_ts"] for g in d["nodegroups"].values())
        end = max(g["last_ts"] for g in d["nodegroups"].values())
        nbytes = d["scan"]["received"] * SECTOR_BYTES
        return {"bytes": nbytes, "seconds": end - start, "gbps": nbytes / (end - start) / 1e9,
                "steady_gbps": nbytes / (end - first) / 1e9}  # fmt: skip

    def count(self, n_frames: int, seed: int = 1) -> dict[str, Any]:
        """Stream one scan to counting NodeGroups; the ``/scans/<n>/counted`` record, plus ``started``
        (first sector sent) and ``seconds`` (first sector sent .. counted file written)."""
        from stemstream.plane.requests import request_scan
        from stemstream.scans.plan import scan_details

        self.scan += 1
        key = keys.counted(self.scan)
        request_scan(self.client, self.scan, _scan_shape(n_frames), loss_rate=0.0, seed=seed)
        record = self.client.wait_for(lambda items: key in items, key, timeout=1200)[key]
        assert record["status"] == "counted", record
        d = scan_details(self.client, self.scan)
        started = min(p["started"] for p in d["producers"].values())
        return {**record, "started": started, "seconds": record["written_at"] - started}


def _scan_shape(n_frames: int) -> tuple[int, int]:
    h = int(math.sqrt(n_frames))
    while n_frames % h:
        h -= 1
    return h, n_frames // h


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=4096, help="frames per scan (4 sectors each)")
    parser.add_argument("--groups", type=int, default=2, help="NodeGroups / raw consumers")
    parser.add_argument("--threads", type=int, default=1, help="sender threads per streaming producer")
    parser.add_argument("--repeat", type=int, default=3, help="measured runs of each; the best counts")
    parser.add_argument("--curve", action="store_true", help="also run the streaming path with CURVE on")
    parser.add_argument("--processes", type=int, default=1, help="also run it with N aggregator processes")
    args = parser.parse_args(argv)

    size = args.frames * N_SECTORS * SECTOR_BYTES / 1e9
    print(f"plane benchmark: {args.frames} frames x 4 sectors of {SECTOR_BYTES:,} B = {size:.2f} GB per run, "
          f"{args.groups} NodeGroups/consumers, tcp loopback, {os.cpu_count()} CPUs")  # fmt: skip
    raw: list[dict[str, float]] = []
    streaming: list[dict[str, float]] = []
    curved: list[dict[str, float]] = []
    sharded: list[dict[str, float]] = []
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="plane-bench-")))
        (tmp / "plain").mkdir()
        plane = stack.enter_context(StreamingPlane(args.groups, args.threads, tmp / "plain"))
        curve_plane = None
        if args.curve:
            from stemstream.transport.keys import KeyDirectory

            KeyDirectory(tmp / "keys").init()
            (tmp / "curve").mkdir()
            curve_plane = stack.enter_context(
                StreamingPlane(args.groups, args.threads, tmp / "curve", keys_dir=tmp / "keys")
            )
        shard_plane = None
        if args.processes > 1:
            (tmp / "sharded").mkdir()
            shard_plane = stack.enter_context(
                StreamingPlane(args.groups, args.threads, tmp / "sharded", aggregator_processes=args.processes)
            )
        for i in range(args.repeat):  # interleaved, so that all see the same machine
            r = run_raw(args.frames, args.groups)
            raw.append(r)
            print(f"  raw chain      run {i + 1}: {r['gbps']:.2f} GB/s ({r['seconds']:.2f} s)")
            r = plane.measure(args.frames)
            streaming.append(r)
            print(f"  streaming path run {i + 1}: {r['gbps']:.2f} GB/s ({r['seconds']:.2f} s; "
                  f"{r['steady_gbps']:.2f} GB/s from the first message in)")  # fmt: skip
            if shard_plane is not None:
                r = shard_plane.measure(args.frames)
                sharded.append(r)
                print(f"  {args.processes} aggregators run {i + 1}: {r['gbps']:.2f} GB/s ({r['seconds']:.2f} s; "
                      f"{r['steady_gbps']:.2f} GB/s from the first message in)")  # fmt: skip
            if curve_plane is not None:
                r = curve_plane.measure(args.frames)
                curved.append(r)
                print(f"  with CURVE     run {i + 1}: {r['gbps']:.2f} GB/s ({r['seconds']:.2f} s; "
                      f"{r['steady_gbps']:.2f} GB/s from the first message in)")  # fmt: skip
    best_raw = max(r["gbps"] for r in raw)
    best_stream = max(r["gbps"] for r in streaming)
    ratio = best_stream / best_raw
    print(f"best: streaming path {best_stream:.2f} GB/s, raw chain {best_raw:.2f} GB/s, ratio {ratio:.0%} "
          f"(target >= 70%)")  # fmt: skip
    if sharded:
        best_shard = max(r["gbps"] for r in sharded)
        print(f"best: streaming path with {args.processes} aggregator processes {best_shard:.2f} GB/s, with one "
              f"{best_stream:.2f} GB/s, ratio {best_shard / best_stream:.0%} (target >= 90%)")  # fmt: skip
    if curved:
        best_curve = max(r["gbps"] for r in curved)
        print(f"best: streaming path with CURVE {best_curve:.2f} GB/s, without {best_stream:.2f} GB/s, "
              f"ratio {best_curve / best_stream:.0%}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())

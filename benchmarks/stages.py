"""CPU per stage of the data plane, from /proc, next to a bare forwarder and a bare receiver in the same run.

    nice -n 0 python benchmarks/stages.py [--frames 2048] [--groups 2] [--repeat 1] [--processes 1]

Each repetition streams the same messages (``--frames`` frames x 4 sectors of 165,888 bytes) twice:

* **bare chain**: 4 producer processes PUSH ``[msgpack header, payload]`` to a *bare forwarder* process (one
  thread per sector: ``recv_multipart`` -> ``send_multipart``, zero-copy, no parsing; one PUSH per sector
  connected to every receiver, so ZeroMQ spreads the messages) and ``--groups`` *bare receiver* processes
  (one PULL thread per sector that only receives);
* **the plane**: 4 ``stemstream producer`` processes, ``stemstream aggregator`` and ``--groups``
  ``stemstream nodegroup --consumer count --engine cpu`` processes, one scan, counted and written.

CPU-seconds are utime + stime from ``/proc/<pid>/stat`` (whole processes) and ``/proc/<pid>/task/<tid>/stat``
(threads: the CLI gives each thread its Python name as its OS name), read before and after each scan, so the
processes' start-up is not counted. The NodeGroup process is split by thread: ``ng-data-*`` / ``ng-info``
and ZeroMQ's I/O threads (receive and assembly), ``counting-count-*`` plus counting worker processes
(counting), ``counting-control-*`` (rank 0: thresholds, gather, the HDF5 write), the rest (publisher,
store client, metrics). Figures are per GB of sector payload and per frame (4 sectors); the ratio is the
stage over its bare counterpart (aggregator / bare forwarder, NodeGroup receive / bare receiver, producer /
bare producer). Wall-clock rates mean little on a shared machine; CPU per GB side by side in one run does.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing as mp
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from plane import N_SECTORS, SECTOR_BYTES, StreamingPlane, _free_endpoint, _scan_shape

_TICK = os.sysconf("SC_CLK_TCK")


# ------------------------------------------------------------------------------------------ /proc


def _stat_cpu(path: str) -> float:
    """utime + stime (seconds) of a /proc stat file; 0 when the process or thread is gone."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return 0.0
    fields = text[text.rindex(")") + 2 :].split()  # the name may hold spaces and parentheses
    return (int(fields[11]) + int(fields[12])) / _TICK


def process_cpu(pid: int) -> float:
    return _stat_cpu(f"/proc/{pid}/stat")


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU-seconds per thread name (threads of one name summed)."""
    out: dict[str, float] = {}
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{tid}/comm") as f:
                    name = f.read().strip()
            except OSError:
                continue
            out[name] = out.get(name, 0.0) + _stat_cpu(f"/proc/{pid}/task/{tid}/stat")
    return out


def children(pid: int) -> list[int]:
    """Direct children of ``pid`` (counting worker processes)."""
    kids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                text = f.read()
        except OSError:
            continue
        if int(text[text.rindex(")") + 2 :].split()[1]) == pid:
            kids.append(int(entry))
    return kids


def _delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: v - before.get(k, 0.0) for k, v in after.items()}


# ------------------------------------------------------------------------------------------ bare chain


def _bare_producer(sector: int, ep: str, n_frames: int, shape: tuple[int, int], go: Any, out: Any, stop: Any) -> None:
    import numpy as np
    import zmq

    from stemstream.transport.sockets import make_socket
    from stemstream.wire.protocol import SECTOR_SHAPE, SectorHeader

    ctx = zmq.Context()
    sock = make_socket(ctx, zmq.PUSH)
    sock.connect(ep)
    rng = np.random.default_rng(sector)
    pool = [rng.integers(0, 200, SECTOR_SHAPE, dtype=np.uint16) for _ in range(16)]
    out.put(("ready", os.getpid()))
    go.wait(60)
    for f in range(n_frames):
        sock.send(SectorHeader(1, f, sector, shape, timestamp_ns=time.time_ns()).encode(), zmq.SNDMORE)
        sock.send(pool[f % len(pool)], copy=False)
    out.put(("sent", os.getpid()))
    stop.wait(600)  # alive until read: its CPU is in /proc only while it runs
    sock.close()
    ctx.term()


def _bare_forwarder(data_eps: list[str], receiver_eps: list[list[str]], out: Any, stop: Any) -> None:
    import zmq

    from stemstream.transport.sockets import make_socket

    ctx = zmq.Context()

    def forward(m: int) -> None:
        pull = make_socket(ctx, zmq.PULL)
        pull.bind(data_eps[m])
        push = make_socket(ctx, zmq.PUSH)
        for eps in receiver_eps:
            push.connect(eps[m])
        out.put(("ready", os.getpid()))
        try:
            while not stop.is_set():
                if pull.poll(100):
                    for _ in range(256):
                        try:
                            parts = pull.recv_multipart(zmq.NOBLOCK, copy=False)
                        except zmq.Again:
                            break
                        push.send_multipart(parts, copy=False)
        finally:
            pull.close()
            push.close()

    threads = [threading.Thread(target=forward, args=(m,), daemon=True) for m in range(len(data_eps))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ctx.term()


def _bare_receiver(eps: list[str], out: Any, stop: Any) -> None:
    import zmq

    from stemstream.transport.sockets import make_socket

    ctx = zmq.Context()
    counts = [0] * len(eps)

    def receive(m: int) -> None:
        pull = make_socket(ctx, zmq.PULL)
        pull.bind(eps[m])
        out.put(("ready", os.getpid()))
        while not stop.is_set():
            if pull.poll(100):
                for _ in range(256):
                    try:
                        pull.recv_multipart(zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    counts[m] += 1
                out.put(("received", os.getpid(), sum(counts)))
        pull.close()

    threads = [threading.Thread(target=receive, args=(m,), daemon=True) for m in range(len(eps))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ctx.term()


def run_bare(n_frames: int, groups: int) -> dict[str, float]:
    """CPU-seconds of the bare producers, forwarder and receivers for one pass of the messages."""
    mp_ctx = mp.get_context("spawn")
    shape = _scan_shape(n_frames)
    data_eps = [_free_endpoint() for _ in range(N_SECTORS)]
    receiver_eps = [[_free_endpoint() for _ in range(N_SECTORS)] for _ in range(groups)]
    out, go, stop = mp_ctx.Queue(), mp_ctx.Event(), mp_ctx.Event()
    receivers = [mp_ctx.Process(target=_bare_receiver, args=(eps, out, stop)) for eps in receiver_eps]
    forwarder = mp_ctx.Process(target=_bare_forwarder, args=(data_eps, receiver_eps, out, stop))
    producers = [mp_ctx.Process(target=_bare_producer, args=(m, data_eps[m], n_frames, shape, go, out, stop))
                 for m in range(N_SECTORS)]  # fmt: skip
    procs = [*receivers, forwarder, *producers]
    try:
        for p in procs:
            p.start()
        for _ in range(groups * N_SECTORS + 2 * N_SECTORS):
            out.get(timeout=120)
        pids = {"producer": [p.pid for p in producers], "forwarder": [forwarder.pid],
                "receiver": [p.pid for p in receivers]}  # fmt: skip
        before = {k: sum(process_cpu(p) for p in v) for k, v in pids.items()}
        threads_before = thread_cpu(forwarder.pid)
        go.set()
        want, got, t0 = n_frames * N_SECTORS, {}, time.time()
        while sum(got.values()) < want:
            msg = out.get(timeout=300)
            if msg[0] == "received":
                got[msg[1]] = msg[2]
        seconds = time.time() - t0
        after = {k: sum(process_cpu(p) for p in v) for k, v in pids.items()}
        after |= {f"forwarder thread {k}": v for k, v in _delta(thread_cpu(forwarder.pid), threads_before).items()}
    finally:
        stop.set()
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
    return {**_delta(after, before), "seconds": seconds}


# ------------------------------------------------------------------------------------------ the plane


def _plane_cpu(plane: StreamingPlane) -> dict[str, float]:
    """CPU-seconds so far of each stage of the running plane."""
    by = plane.procs.by_name
    out = dict.fromkeys(("producer", "aggregator", "receive", "counting", "write", "ng_other"), 0.0)
    out["producer"] = sum(process_cpu(p.pid) for n, p in by.items() if n.startswith("producer-"))
    for name, p in by.items():
        if name.startswith("aggregator"):
            out["aggregator"] += process_cpu(p.pid) + sum(process_cpu(c) for c in children(p.pid))  # --processes
            for thread, cpu in thread_cpu(p.pid).items():
                out[f"aggregator thread {thread}"] = out.get(f"aggregator thread {thread}", 0.0) + cpu
    for name, p in by.items():
        if not name.startswith("ng-"):
            continue
        total = process_cpu(p.pid)
        threads = thread_cpu(p.pid)
        receive = sum(v for k, v in threads.items() if k.startswith(("ng-data", "ng-info", "ZMQbg")))
        counting = sum(v for k, v in threads.items() if k.startswith("counting-count"))
        write = sum(v for k, v in threads.items() if k.startswith("counting-contr"))
        workers = sum(process_cpu(c) for c in children(p.pid))
        out["receive"] += receive
        out["counting"] += counting + workers
        out["write"] += write
        out["ng_other"] += total - receive - counting - write
    return out


_ROWS = (  # (stage, key, bare counterpart)
    ("producer (4 processes)", "producer", "producer"),
    ("aggregator", "aggregator", "forwarder"),
    ("NodeGroup receive + assembly", "receive", "receiver"),
    ("counting (cpu engine)", "counting", None),
    ("rank 0: thresholds, gather, HDF5 write", "write", None),
    ("NodeGroup other threads", "ng_other", None),
)


def table(plane: dict[str, float], bare: dict[str, float], nbytes: int, n_frames: int) -> str:
    gb = nbytes / 1e9
    lines = [
        "| stage | CPU-s | CPU-s per GB | ms per frame | bare counterpart, CPU-s per GB | ratio |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for label, key, bare_key in _ROWS:
        cpu = plane[key]
        cell, ratio = "-", "-"
        if bare_key is not None:
            cell = f"{bare[bare_key] / gb:.2f} (bare {bare_key})"
            ratio = f"{cpu / bare[bare_key]:.2f}" if bare[bare_key] > 0 else "-"
        lines.append(f"| {label} | {cpu:.2f} | {cpu / gb:.2f} | {cpu / n_frames * 1e3:.2f} | {cell} | {ratio} |")
    return "\n".join(lines)


def _by_thread(cpu: dict[str, float], process: str) -> str:
    threads = {k.split(" ", 2)[2]: v for k, v in cpu.items() if k.startswith(f"{process} thread ")}
    return ", ".join(f"{k} {v:.2f}" for k, v in sorted(threads.items(), key=lambda kv: -kv[1]) if v >= 0.01)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=2048, help="frames per scan (4 sectors each)")
    parser.add_argument("--groups", type=int, default=2, help="NodeGroups / bare receivers")
    parser.add_argument("--repeat", type=int, default=1, help="repetitions (bare chain, then the plane)")
    parser.add_argument("--processes", type=int, default=1, help="stemstream aggregator --processes")
    parser.add_argument("--consumer", choices=["count", "null"], default="count", help="the NodeGroups' consumer")
    args = parser.parse_args(argv)

    nbytes = args.frames * N_SECTORS * SECTOR_BYTES
    print(f"stages benchmark: {args.frames} frames x 4 sectors of {SECTOR_BYTES:,} B = {nbytes / 1e9:.2f} GB per "
          f"pass, {args.groups} NodeGroups / bare receivers, tcp loopback, {os.cpu_count()} CPUs")  # fmt: skip
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="stages-bench-")))
        consumer: tuple[Any, ...] = ("--consumer", "count", "--engine", "cpu", "--output-dir", tmp / "counted")
        if args.consumer == "null":
            consumer = ("--consumer", "null")
        env = {"STEMSTREAM_METRICS": "off"}
        plane = stack.enter_context(
            StreamingPlane(args.groups, 1, tmp, consumer_args=consumer, env=env, aggregator_processes=args.processes)
        )
        for i in range(args.repeat):
            bare = run_bare(args.frames, args.groups)
            before = _plane_cpu(plane)
            t0 = time.time()
            record = plane.count(args.frames, seed=i + 1) if args.consumer == "count" else plane.measure(args.frames)
            seconds = time.time() - t0
            time.sleep(1.0)  # the publisher threads' last round is not the scan's work, but let them settle
            used = _delta(_plane_cpu(plane), before)
            print(f"\nrun {i + 1}: bare chain {nbytes / bare['seconds'] / 1e9:.2f} GB/s wall; plane {seconds:.1f} s "
                  f"to the counted file ({record.get('frames', '?')} frames)")  # fmt: skip
            print(table(used, bare, nbytes, args.frames))
            for what, cpu in (("aggregator", used), ("bare forwarder", bare)):
                print(f"{what} process by thread, CPU-s: " + _by_thread(cpu, what.split()[-1]))
    return 0


if __name__ == "__main__":
    sys.exit(main())

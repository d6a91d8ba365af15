"""Turnaround, the streaming paper's Table 1 at this machine's scale: streaming against the file workflow.

    python benchmarks/turnaround.py [--sizes 32x32,64x64,128x128] [--repeats 3] [--count-cores 1]

For each scan size, the time from the scan's start (the producers' scan session, just before the first
sector is sent) to the counted HDF5 file written, for

* **streaming**: Clone store, aggregator, 4 simulated producer processes (one per sector), one NodeGroup
  process counting with stempy in ``--count-cores`` worker processes over shared memory; rank 0 writes the
  HDF5 and publishes ``/scans/<n>/counted`` (its ``written_at`` is the end);
* **file workflow**: a second store with its own 4 producers and no NodeGroup, so the scan falls back to
  disk (raw files, the 4D Camera's format) in an "acquisition" directory (the receiving servers' NFS buffer);
  the files are fsync'd (on storage, as on the buffer), copied to a "scratch" directory (the transfer; each
  copy fsync'd and dropped from the page cache, so counting reads it from the disk as a compute node reads
  scratch) and counted from there by ``count_raw_files`` with stempy (what ``stemstream count`` runs), which
  writes the HDF5. ``--page-cache`` leaves out the fsyncs and the drop: the raw files then never leave this
  machine's RAM, which no file workflow can claim; it shows how much of the difference is storage.

Fair shares: counting gets the same cores in both (the last ``--count-cores`` cores: the NodeGroup's stempy
workers are pinned there, and so is the thread that runs ``count_raw_files`` with that many reader threads);
everything else (producers, aggregator, NodeGroup receiving threads, the stores, the copy) runs on the other
cores. On the real system that other work runs on other machines (four receiving servers and an aggregator
host; data transfer nodes); here the data plane's ~3-4 ms of CPU per frame (two loopback TCP hops, six
processes) share one core, so streaming is only as fast as that core allows. The producers send (or write)
pre-generated simulator sectors (``--pregen 16``): on the real system the data is in the receiving servers'
RAM, generating it belongs to neither workflow. Both sites are started once and warmed up; runs alternate
(stream first, then file first) so both see the same machine; every scan is the same simulated data on both
sites, and each run prints its events, so the two counted files can be compared.

Still generous to the file workflow: no network, no batch queue, and ``count_raw_files`` runs in this process
(no job start-up). The benchmark is not a test; it prints a table of mean +- sd, the ratio file/stream and the
data rate (raw bytes = frames x 576 x 576 x 2 over the turnaround).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from stemstream.scans import keys

sys.path.insert(0, str(Path(__file__).resolve().parent))
from plane import N_SECTORS, StreamingPlane, _Processes

FRAME_BYTES = 576 * 576 * 2
SEED = 1  # every scan is the same simulated data, on both sites
PREGEN = 16
TIMEOUT_S = 1800.0
SCAN_TIMEOUT_S = 900


# ------------------------------------------------------------------------------------------ helpers


@contextlib.contextmanager
def pinned(cpus: set[int] | None) -> Iterator[None]:
    """Run the calling thread (and the threads it starts) on ``cpus``; None: leave it where it is."""
    if not cpus:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def parse_sizes(text: str) -> list[tuple[int, int]]:
    sizes = []
    for item in text.split(","):
        rows, _, cols = item.strip().lower().partition("x")
        try:
            shape = (int(rows), int(cols or rows))
        except ValueError:
            raise SystemExit(f"--sizes: {item!r} is not ROWSxCOLS (e.g. 64x64)") from None
        if min(shape) < 8:
            raise SystemExit(f"--sizes: {item!r} is too small (at least 8x8: thresholds need 40 frames)")
        sizes.append(shape)
    return sizes


def flush(path: Path, drop: bool = False) -> None:
    """fsync ``path``; with ``drop``, then evict it from the page cache (a later read comes from the disk)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        if drop:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def count_events(path: Path) -> int:
    from stemstream.counting.output import read_counted

    sparse, _ = read_counted(path)
    return int(sum(np.asarray(e).size for e in np.asarray(sparse.data).ravel()))


def machine_line() -> str:
    cpu = platform.processor() or ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = ""
    with contextlib.suppress(OSError, ValueError, IndexError):
        kib = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f", {kib / 2**20:.0f} GiB RAM"
    cores = os.cpu_count()
    return f"{platform.node()}: {cores} cores ({cpu}){mem}, Python {platform.python_version()}"


def load_line() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} {five:.2f} {fifteen:.2f}"


# ------------------------------------------------------------------------------------------ the sites


@dataclass
class Run:
    seconds: float
    frames: int
    events: int
    phases: dict[str, float] = field(default_factory=dict)

    @property
    def gbps(self) -> float:
        return self.frames * FRAME_BYTES / self.seconds / 1e9


class StreamSite:
    """Store, aggregator, 4 producers, one counting NodeGroup (stempy workers on the counting cores)."""

    def __init__(self, workdir: Path, dark_path: Path, count_cpus: list[int], plane_cpus: list[int]) -> None:
        self.output = workdir / "counted"
        os.environ["STEMSTREAM_DARK_DIR"] = str(Path(dark_path).parent)  # a dark must lie under the dark directory
        args: tuple[Any, ...] = ("--consumer", "count", "--engine", "stempy", "--dark", dark_path)
        args += ("--output-dir", self.output, "--workers", len(count_cpus))
        # A generous watchdog: on one counting core a 128x128 scan takes ~80 s to count, and this measures
        # turnaround, not stall detection (up to 888bb0b rank 0 wrote a scan off as partial after 60 s
        # without a message from its ranks, even while they were counting; c7ca4e7 sends progress).
        args += ("--scan-timeout", SCAN_TIMEOUT_S)
        if plane_cpus:
            args += ("--worker-cpus", ",".join(map(str, count_cpus)))
        cpus = ",".join(map(str, plane_cpus)) or None
        (workdir / "logs").mkdir(parents=True, exist_ok=True)
        self.plane = StreamingPlane(1, 1, workdir / "logs", consumer_args=args, warm_up=0, cpus=cpus)

    def __enter__(self) -> StreamSite:
        self.plane.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.plane.__exit__()

    def run(self, shape: tuple[int, int]) -> Run:
        from stemstream.plane.requests import request_scan
        from stemstream.scans.plan import scan_details

        plane = self.plane
        plane.scan += 1
        n = plane.scan
        key = keys.counted(n)
        request_scan(plane.client, n, shape, loss_rate=0.0, seed=SEED)
        record = plane.client.wait_for(lambda items: key in items, key, timeout=TIMEOUT_S)[key]
        if record.get("status") != "counted":
            raise RuntimeError(f"streamed scan {n}: {record.get('status')}: {record.get('error')}")
        details = scan_details(plane.client, n)
        started = min(p["started"] for p in details["producers"].values())
        path = Path(record["path"])
        events = count_events(path)
        path.unlink(missing_ok=True)
        end = record["written_at"]
        phases = {
            "last sector in": record["last_frame"] - started,
            "thresholds": record["thresholds_at"] - started,
            "file after last sector": end - record["last_frame"],
        }
        return Run(end - started, int(record["frames"]), events, phases)


class FileSite:
    """A second store with its own 4 producers and no NodeGroup: every scan goes to disk."""

    def __init__(
        self, workdir: Path, dark_path: Path, count_cpus: list[int], plane_cpus: list[int], durable: bool = True
    ) -> None:
        self.workdir = workdir
        self.durable = durable
        self.dark_path = dark_path
        self.count_cpus = set(count_cpus) if plane_cpus else None
        self.plane_cpus = set(plane_cpus) or None
        self.threads = len(count_cpus)
        self.cpus = ",".join(map(str, plane_cpus)) or None
        self.scan = 0

    def __enter__(self) -> FileSite:
        from stemstream.store import Registry, StoreClient, StoreServer

        (self.workdir / "logs").mkdir(parents=True, exist_ok=True)
        self.server = StoreServer(host="127.0.0.1", port=None).start()
        self.procs = _Processes(self.workdir / "logs", self.cpus)
        self.client = None
        try:
            self.client = StoreClient(self.server.address, timeout=10).start()
            for m in range(N_SECTORS):
                self.procs.start(f"producer-{m}", "producer", "--store", self.server.address, "--sector", m,
                                 "--threads", 1, "--pregen", PREGEN, "--loss-rate", 0,
                                 "--fallback-dir", self.workdir / "unused")  # fmt: skip
            Registry(self.client).wait_for_members("producer", N_SECTORS, status="ready", timeout=60)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.procs.stop()
        if self.client is not None:
            self.client.close()
        self.server.stop()

    def run(self, shape: tuple[int, int]) -> Run:
        from stemstream.config import environment
        from stemstream.counting import CountingParams, count_raw_files
        from stemstream.plane.requests import request_scan
        from stemstream.scans.plan import scan_details

        self.scan += 1
        n = self.scan
        acquisition = self.workdir / "acquisition" / f"scan{n}"  # the receiving servers' NFS buffer
        scratch = self.workdir / "scratch" / f"scan{n}"  # the HPC centre's scratch file system
        output = self.workdir / "counted" / f"scan_{n}_counted.h5"
        key = keys.scan(n)
        try:
            request_scan(self.client, n, shape, fallback_dir=str(acquisition), loss_rate=0.0, seed=SEED)
            record = self.client.wait_for(
                lambda items: (items.get(key) or {}).get("status") in ("on_disk", "incomplete"), key, TIMEOUT_S
            )[key]
            noticed = time.time()
            if record["status"] != "on_disk" or record.get("route") != "disk":
                raise RuntimeError(f"file workflow scan {n}: {record.get('route')} {record['status']}")
            details = scan_details(self.client, n)
            started = min(p["started"] for p in details["producers"].values())
            written = max(p["finished"] for p in details["producers"].values())
            raw = sorted(acquisition.glob("*.data"))
            if self.durable:  # on the buffer's storage, not only in this machine's RAM
                for path in raw:
                    flush(path)
            flushed = time.time()
            scratch.mkdir(parents=True)
            for path in raw:  # the transfer
                shutil.copyfile(path, scratch / path.name)
                if self.durable:  # on scratch's storage; the compute node reads it from there, not from RAM
                    flush(scratch / path.name, drop=True)
            copied = time.time()
            with pinned(self.count_cpus), environment(dark_dir=Path(self.dark_path).parent):
                params = CountingParams(engine="stempy", dark=self.dark_path)
                count_raw_files(scratch, output, scan_number=n, params=params, threads=self.threads)
            done = time.time()
            events = count_events(output)
        finally:
            for path in (acquisition, scratch):
                shutil.rmtree(path, ignore_errors=True)
            output.unlink(missing_ok=True)
        phases = {
            "write": written - started,
            "notice": noticed - written,
            "flush": flushed - noticed,
            "copy": copied - flushed,
            "count": done - copied,
        }
        return Run(done - started, shape[0] * shape[1], events, phases)


# ------------------------------------------------------------------------------------------ main


def fmt_phases(run: Run) -> str:
    return ", ".join(f"{k} {v:.2f}" for k, v in run.phases.items())


def mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="32x32,64x64,128x128", help="scan sizes, comma-separated ROWSxCOLS")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each workflow per size (default 3)")
    parser.add_argument(
        "--count-cores",
        type=int,
        default=1,
        help="cores that count, in both workflows (default 1: one stempy worker / one reader thread)",
    )
    parser.add_argument(
        "--page-cache",
        action="store_true",
        help="file workflow without fsync: its raw files never leave this machine's RAM (flatters it)",
    )
    parser.add_argument("--dir", type=Path, default=None, help="work directory (default: a temporary one)")
    args = parser.parse_args(argv)
    sizes = parse_sizes(args.sizes)
    if args.repeats < 1:
        raise SystemExit("--repeats must be at least 1")
    cores = sorted(os.sched_getaffinity(0))
    if not 1 <= args.count_cores <= len(cores):
        raise SystemExit(f"--count-cores must be 1..{len(cores)}")
    count_cpus = cores[-args.count_cores :]
    plane_cpus = cores[: -args.count_cores]  # empty: nothing is pinned (a machine with too few cores)

    if plane_cpus:
        # This process (both stores, the copy) stays off the counting cores too; only the thread that runs
        # count_raw_files moves there, and the reader threads it starts.
        os.sched_setaffinity(0, set(plane_cpus))

    from stemstream.sim import FourDCameraSim

    # The simulator's dark is its mean background; lowered so that stempy's uint16 subtraction never wraps.
    dark = FourDCameraSim((8, 8), seed=SEED).dark_reference() - 11.0
    started = dt.datetime.now().astimezone()
    print(f"turnaround benchmark, {started:%Y-%m-%d %H:%M %Z}")
    print(f"machine: {machine_line()}; {load_line()} at start")
    where = (
        f"counting on core(s) {','.join(map(str, count_cpus))}, everything else on {','.join(map(str, plane_cpus))}"
        if plane_cpus
        else "nothing pinned (too few cores)"
    )
    print(f"counting: stempy on {args.count_cores} core(s) in both workflows; {where}")
    io = "page cache only (no fsync)" if args.page_cache else "fsync'd, scratch copy read back from disk"
    print(f"file workflow's raw files: {io}")
    print(f"sizes {', '.join(f'{r}x{c}' for r, c in sizes)}, {args.repeats} repeats, interleaved\n", flush=True)

    results: dict[tuple[int, int], dict[str, list[Run]]] = {s: {"stream": [], "file": []} for s in sizes}
    with contextlib.ExitStack() as stack:
        tmp = args.dir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="stemstream-turnaround-")))
        tmp.mkdir(parents=True, exist_ok=True)
        dark_path = tmp / "dark.npy"
        np.save(dark_path, dark)
        stream = stack.enter_context(StreamSite(tmp / "stream", dark_path, count_cpus, plane_cpus))
        files = stack.enter_context(FileSite(tmp / "file", dark_path, count_cpus, plane_cpus, not args.page_cache))
        print("warming up (connections, buffers, stempy) ...", flush=True)
        stream.run((8, 8))
        files.run((8, 8))
        for shape in sizes:
            label = f"{shape[0]}x{shape[1]}"
            for k in range(args.repeats):
                order = ("stream", "file") if k % 2 == 0 else ("file", "stream")
                for which in order:
                    os.sync()  # start each run without the previous one's dirty pages
                    run = stream.run(shape) if which == "stream" else files.run(shape)
                    results[shape][which].append(run)
                    print(f"  {label} {which:6s} run {k + 1}: {run.seconds:7.2f} s, {run.gbps:5.2f} GB/s, "
                          f"{run.events} events  ({fmt_phases(run)})", flush=True)  # fmt: skip

    print()
    print(f"turnaround: scan start -> counted HDF5 written; mean +- sd of {args.repeats}; stempy on "
          f"{args.count_cores} counting core(s) in both")  # fmt: skip
    header = f"{'scan':>9} {'frames':>7} {'GB':>6}  {'file workflow (s)':>17}  {'streaming (s)':>15}"
    print(header + f"  {'file/stream':>11}  {'GB/s file':>9}  {'GB/s stream':>11}")
    slower = []
    for shape in sizes:
        frames = shape[0] * shape[1]
        f_mean, f_sd = mean_sd([r.seconds for r in results[shape]["file"]])
        s_mean, s_sd = mean_sd([r.seconds for r in results[shape]["stream"]])
        gb = frames * FRAME_BYTES / 1e9
        ratio = f_mean / s_mean
        if ratio <= 1:
            slower.append(f"{shape[0]}x{shape[1]}")
        print(f"{shape[0]:>4}x{shape[1]:<4} {frames:>7} {gb:>6.2f}  {f_mean:>8.2f} +- {f_sd:5.2f}  "
              f"{s_mean:>6.2f} +- {s_sd:5.2f}  {ratio:>11.2f}  {gb / f_mean:>9.3f}  {gb / s_mean:>11.3f}")  # fmt: skip
    print(f"machine: {machine_line()}; {load_line()} at the end")
    if slower:
        print(f"streaming was NOT faster at {', '.join(slower)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

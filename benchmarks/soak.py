"""Soak: stream scans continuously with random faults, then account for every sector from the files.

    python benchmarks/soak.py [--minutes 2] [--scan-shape 16 16] [--fault-rate 0.3] [--seed 1]

Runs a whole data plane on this machine (store, four simulated producers, an aggregator and an MPI-less
NodeGroup process with two counting NodeGroups, the last two under a supervisor that restarts them), and
acquires scans back to back for ``--minutes``. In a fraction ``--fault-rate`` of the scans, once the
NodeGroups have received part of the scan, it SIGKILLs the NodeGroup process or the aggregator (chosen at
random; the supervisor restarts them, as a session would). Scans that could not be counted are replayed to
disk by the producers; the soak counts those from their raw files, as the session's
``count_fallback_scan`` does.

At the end every scan is audited from its files (``stemstream.audit``: the counted HDF5 and the raw files,
against the simulator's ground truth of what was lost upstream), and it prints sectors entered / counted
/ on disk / lost upstream / unaccounted, faults injected, the peak memory of the processes, and the p50 /
p99 time from a scan's last frame to its counted file. Exit code 1 if any sector is unaccounted for.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from stemstream.audit import ScanAudit, audit_scan, entered_from_sim
from stemstream.counting.files import count_raw_files
from stemstream.plane.requests import request_scan
from stemstream.sessions.supervise import ProcessSpec, Supervisor
from stemstream.sim import FourDCameraSim
from stemstream.sim.site import LocalSite
from stemstream.store import Registry, StoreClient

LOSS = 0.002
# Faults must be noticed within seconds here (production defaults are minutes); set before any child starts.
ENV = {
    "STEMSTREAM_SCAN_TIMEOUT_S": "8",
    "STEMSTREAM_ACK_TIMEOUT_S": "40",
    "STEMSTREAM_STORE_TTL_S": "2",
    "STEMSTREAM_LOG_LEVEL": "INFO",
}


def _cli(*args: Any) -> list[str]:
    return [sys.executable, "-m", "stemstream.cli", *(str(a) for a in args)]


class Soak:
    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args = args
        self.work = work
        self.out = work / "counted"
        self.rng = random.Random(args.seed)
        self.faults: dict[str, int] = {"nodegroup": 0, "aggregator": 0}
        self.peak_rss = 0
        self.scans: list[int] = []
        self.seconds_to_file: list[float] = []
        self.stuck: list[int] = []

    def sample_memory(self) -> None:
        total = 0
        for proc in psutil.Process().children(recursive=True):
            try:
                total += proc.memory_info().rss
            except psutil.Error:
                continue
        self.peak_rss = max(self.peak_rss, total)

    def wait(self, client: Any, sup: Supervisor, condition: Any, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for event in sup.check():
                print(f"  supervisor: {event.name} {event.kind} (pid {event.pid})", flush=True)
            self.sample_memory()
            if condition():
                return True
            time.sleep(0.2)
        return False

    def settled(self, client: Any, n: int) -> bool:
        record = client.get(f"/scans/{n}") or {}
        counted = client.get(f"/scans/{n}/counted") or {}
        if record.get("status") == "on_disk":
            return True
        return counted.get("status") == "counted" and record.get("status") == "received"

    def run(self) -> int:
        a = self.args
        sup = Supervisor(backoff_s=1.0, max_backoff_s=5.0)
        with LocalSite(self.work / "site", prefect=False) as site, StoreClient(site.store, timeout=10) as client:
            logs = site.log_dir
            agg = sup.add(ProcessSpec("aggregator", _cli("aggregator", "--store", site.store, "--uid", "agg"),
                                      log_path=logs / "aggregator.log"))  # fmt: skip
            ngs = sup.add(ProcessSpec(
                "nodegroups",
                _cli("nodegroup", "--store", site.store, "--consumer", "count", "--count", 2,
                     "--output-dir", self.out, "--scan-timeout", 30),
                log_path=logs / "nodegroups.log",
            ))  # fmt: skip
            registry = Registry(client)
            registry.wait_for_members("nodegroup", 2, status="ready", timeout=120)
            registry.wait_for_members("aggregator", 1, status="ready", timeout=60)
            deadline = time.monotonic() + a.minutes * 60
            n = 0
            while time.monotonic() < deadline:
                n += 1
                # A restarted NodeGroup registers anew: let the next scan find it.
                self.wait(client, sup, lambda: len(registry.members("nodegroup", status="ready")) >= 2, 60)
                request_scan(client, n, tuple(a.scan_shape), seed=a.seed + n, loss_rate=LOSS)
                self.scans.append(n)
                if self.rng.random() < a.fault_rate:
                    target = self.rng.choice(["nodegroup", "aggregator"])
                    frames = a.scan_shape[0] * a.scan_shape[1]
                    want = self.rng.randint(frames // 4, 2 * frames)  # sectors received before the kill

                    def received(want: int = want) -> bool:
                        return sum(r.counts.get("received", 0) for r in registry.members("nodegroup")) >= want

                    base = sum(r.counts.get("received", 0) for r in registry.members("nodegroup"))
                    self.wait(client, sup, lambda base=base, want=want: received(base + want), 30)
                    victim = ngs if target == "nodegroup" else agg
                    if victim.pid is not None:
                        os.killpg(victim.pid, signal.SIGKILL)
                        self.faults[target] += 1
                        print(f"scan {n}: killed the {target} (pid {victim.pid})", flush=True)
                if not self.wait(client, sup, lambda n=n: self.settled(client, n), 180):
                    self.stuck.append(n)
                    print(f"scan {n}: not settled within 180 s", flush=True)
                    continue
                counted = client.get(f"/scans/{n}/counted") or {}
                record = client.get(f"/scans/{n}") or {}
                if record.get("status") == "on_disk":
                    print(f"scan {n}: on disk ({record.get('replay_reason') or record.get('reason')})", flush=True)
                elif counted.get("seconds_after_last_frame") is not None:
                    self.seconds_to_file.append(float(counted["seconds_after_last_frame"]))
            # Let the producers settle the last scans (acknowledge or replay) before auditing.
            self.wait(client, sup, lambda: all(p.counts.get("held_bytes", 0) == 0
                                               for p in registry.members("producer")), 90)  # fmt: skip
            fallback_paths = {n: (client.get(f"/scans/{n}") or {}).get("fallback_paths") or [] for n in self.scans}
            on_disk = {n for n in self.scans if (client.get(f"/scans/{n}") or {}).get("status") == "on_disk"}
            sup.stop()
        return self.report(site.fallback_dir, fallback_paths, on_disk)

    def report(self, fallback: Path, paths: dict[int, list[str]], on_disk: set[int]) -> int:
        a = self.args
        audits: list[ScanAudit] = []
        for n in self.scans:
            raw = sorted(fallback.glob(f"data_scan{n:010d}_module*.data"))
            sim = FourDCameraSim(tuple(a.scan_shape), scan_number=n, seed=a.seed + n, loss_rate=LOSS)
            audit = audit_scan(n, entered_from_sim(sim), counted_file=self.out / f"scan_{n}_counted.h5",
                               raw_files=raw)  # fmt: skip
            audits.append(audit)
            if n in on_disk and raw:  # what the session does with a scan on disk: count it from its files
                count_raw_files(raw, self.out / f"scan_{n}_from_disk.h5", scan_number=n)
        total = {k: sum(getattr(x, k) for x in audits) for k in ("entered", "counted", "on_disk", "lost_upstream",
                                                                   "unaccounted")}  # fmt: skip
        frames = len(audits) * a.scan_shape[0] * a.scan_shape[1]
        print()
        print(f"soak: {a.minutes:g} min, {len(audits)} scans of {a.scan_shape[0]}x{a.scan_shape[1]} ({frames} frames), "
              f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}")  # fmt: skip
        print(f"faults injected: {sum(self.faults.values())} ({self.faults['nodegroup']} NodeGroup kills, "
              f"{self.faults['aggregator']} aggregator kills); scans replayed to disk: {len(on_disk)}")  # fmt: skip
        print(f"sectors entered {total['entered']} = counted {total['counted']} + on disk {total['on_disk']} + "
              f"unaccounted {total['unaccounted']}; lost upstream {total['lost_upstream']}")  # fmt: skip
        print(f"peak memory of the processes: {self.peak_rss / 2**30:.2f} GiB")
        if self.seconds_to_file:
            p50, p99 = np.percentile(self.seconds_to_file, [50, 99])
            print(f"last frame -> counted file: p50 {p50:.2f} s, p99 {p99:.2f} s ({len(self.seconds_to_file)} scans)")
        if self.stuck:
            print(f"scans that did not settle in time: {self.stuck}")
        bad = [x for x in audits if x.unaccounted]
        for x in bad:
            print(f"UNACCOUNTED: {x.line()} e.g. {x.examples}")
        print("zero sectors unaccounted for" if not bad else f"{len(bad)} scan(s) with sectors unaccounted for")
        return 1 if bad else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=2.0)
    parser.add_argument("--scan-shape", type=int, nargs=2, default=[16, 16])
    parser.add_argument("--fault-rate", type=float, default=0.3, help="fraction of scans with a fault")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--keep", type=Path, default=None, help="work here and keep the files (default: a temp dir)")
    args = parser.parse_args()
    os.environ.update(ENV)
    if args.keep is not None:
        args.keep.mkdir(parents=True, exist_ok=True)
        return Soak(args, args.keep).run()
    with tempfile.TemporaryDirectory(prefix="stemstream-soak-") as tmp:
        return Soak(args, Path(tmp)).run()


if __name__ == "__main__":
    sys.exit(main())

"""Work proportional to data, not to declarations (issue 17), with real processes: info messages that declare a
huge scan cost a NodeGroup almost nothing (RSS, CPU), and honest traffic keeps flowing past them."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest
import zmq

from plane_helpers import ProcessTree, read_results, start_store, store_client, wait_until

DECLARED = (1024, 1024)
MB = 1 << 20


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def _cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def _push(ctx: zmq.Context, endpoint: str) -> zmq.Socket:
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, 5000)
    sock.setsockopt(zmq.SNDTIMEO, 5000)
    sock.connect(endpoint)
    return sock


@pytest.mark.slow
def test_eight_info_messages_declaring_a_megaframe_scan_cost_a_nodegroup_nothing(tmp_path: Path):
    from stemstream.store import Registry
    from stemstream.wire.protocol import EndMessage, ExpectMessage

    results = tmp_path / "results"
    ctx = zmq.Context()
    try:
        with ProcessTree(tmp_path / "logs") as tree:
            address = start_store(tree)
            proc = tree.start("ng-0", "nodegroup", "--store", address, "--uid", "ng-0", "--results", results)
            with store_client(address) as client:
                registry = Registry(client)
                ng = registry.wait_for_members("nodegroup", 1, status="ready", timeout=60)[0]
                time.sleep(1.0)  # settled: imports done, threads started
                rss0, cpu0 = _rss(proc.pid), _cpu_s(proc.pid)
                info = _push(ctx, ng.endpoints["info"])
                n_frames = DECLARED[0] * DECLARED[1]
                for m in range(4):  # 8 messages, ~900 bytes: expect and end of each sector, nothing sent
                    info.send(ExpectMessage("evil", 50, m, 1, DECLARED, ("ng-0",), {"ng-0": n_frames}).encode())
                    info.send(EndMessage("evil", 50, m, {"ng-0": 0}, lost_upstream=n_frames).encode())
                # and one declaring the protocol's largest scan: rejected at once
                info.send(ExpectMessage("evil", 51, 0, 1, (65535, 65535), ("ng-0",), {"ng-0": 1}).encode())
                info.close()
                # No plan names ng-0 for scan 50, so the store refuses its scan record (write policy): the
                # consumer's results file says when the scan is closed.
                done = results / "ng-0_scan50.json"
                wait_until(lambda: done.exists(), 60, "scan 50 closed", tree)
                wait_until(
                    lambda: registry.members("nodegroup")[0].counts.get("rejected.info_too_large", 0) == 1,
                    30,
                    "the 65535 x 65535 expect rejected",
                    tree,
                )
                rss1, cpu1 = _rss(proc.pid), _cpu_s(proc.pid)
                tree.check_alive()
    finally:
        ctx.destroy(linger=0)

    grown, spent = (rss1 - rss0) / MB, cpu1 - cpu0
    print(f"NodeGroup after 8 info messages declaring {DECLARED}: RSS +{grown:.1f} MB, CPU {spent:.2f} s")
    assert grown < 50, f"RSS grew {grown:.1f} MB"
    assert spent < 3.0, f"{spent:.2f} s of CPU"
    # Nothing arrived: no frame handed over but max_lag (64) empty ones; the rest counted as absent.
    handed: dict[str, Any] = read_results(results, "ng-0", 50)
    assert len(handed["order"]) <= 64
    summary = handed["summary"]
    assert summary["frames_incomplete"] == n_frames and summary["received"] == 0
    assert summary["absent"] == n_frames - len(handed["order"])

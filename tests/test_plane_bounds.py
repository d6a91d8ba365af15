"""Work proportional to data, not to declarations (issue 17), with real processes: info messages that declare a
huge scan cost a NodeGroup almost nothing (RSS, CPU), and honest traffic keeps flowing past them."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest
import zmq

from plane_helpers import ProcessTree, push_socket, read_results, start_store, store_client, wait_until

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
                info = push_socket(ctx, ng.endpoints["info"], linger=5000)
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


SECTOR_BYTES = 144 * 576 * 2
HONEST = (2, 2)


def _honest_scan(info: list[zmq.Socket], data: list[zmq.Socket], n: int) -> None:
    """Scan ``n`` of 2x2 frames for ng-0, as four single-thread producers would send it."""
    from stemstream.wire.protocol import EndMessage, ExpectMessage, SectorHeader

    frames = HONEST[0] * HONEST[1]
    for m in range(4):
        info[m].send(ExpectMessage(f"p/{m}", n, m, 1, HONEST, ("ng-0",), {"ng-0": frames}).encode())
    for m in range(4):
        for f in range(frames):
            data[m].send_multipart([SectorHeader(n, f, m, HONEST).encode(), bytes(SECTOR_BYTES)])
        info[m].send(EndMessage(f"p/{m}", n, m, {"ng-0": frames}, 0).encode())


@pytest.mark.slow
def test_an_aggregator_sector_is_not_stalled_by_unknown_members_unknown_scans_or_many_expects(tmp_path: Path):
    """An expect naming an unregistered NodeGroup, 1,000 data messages of unknown scan numbers and 30 expects of
    ~900 KB on sector 0: honest scans on the same sector still arrive within seconds (the registry wait used
    to hold the sector's router thread 10 s, the unknown scans minutes), the extra scans are rejected and
    counted, and the aggregator's memory stays bounded."""
    from stemstream.store import Registry
    from stemstream.wire.protocol import ExpectMessage, SectorHeader

    results = tmp_path / "results"
    ctx = zmq.Context()
    try:
        with ProcessTree(tmp_path / "logs") as tree:
            address = start_store(tree)
            agg_proc = tree.start("aggregator", "aggregator", "--store", address,
                                  env={"STEMSTREAM_MAX_OPEN_SCANS": "8"})  # fmt: skip
            tree.start("ng-0", "nodegroup", "--store", address, "--uid", "ng-0", "--results", results)
            with store_client(address) as client:
                registry = Registry(client)
                agg = registry.wait_for_members("aggregator", 1, status="ready", timeout=60)[0]
                registry.wait_for_members("nodegroup", 1, status="ready", timeout=60)
                info = [push_socket(ctx, agg.endpoints[f"info_{m}"], linger=5000) for m in range(4)]
                data = [push_socket(ctx, agg.endpoints[f"data_{m}"], linger=5000) for m in range(4)]

                def arrives(n: int, within: float) -> float:
                    t0 = time.monotonic()
                    _honest_scan(info, data, n)
                    done = results / f"ng-0_scan{n}.json"
                    wait_until(done.exists, within, f"honest scan {n} at ng-0", tree)
                    handed = read_results(results, "ng-0", n)
                    assert sorted(handed["order"]) == list(range(4)) and not handed["missing"]
                    return time.monotonic() - t0

                def agg_counts() -> dict[str, int]:
                    return registry.members("aggregator")[0].counts

                arrives(1, 30)  # warm: connections to ng-0 made
                # 1. A member nobody registered: the scan waits (resolve_timeout, 10 s) off the router thread.
                info[0].send(ExpectMessage("p/0", 90, 0, 1, HONEST, ("zz-ghost",), {"zz-ghost": 4}).encode())
                for k in range(200):  # and its data: it must not hold the sector's buffer (64) meanwhile
                    data[0].send_multipart([SectorHeader(90, k % 4, 0, HONEST).encode(), bytes(SECTOR_BYTES)])
                ghost = arrives(2, 8)
                # 2. 1,000 data messages of 1,000 scan numbers no expect names, ahead of the honest scan's.
                for k in range(1000):
                    data[0].send_multipart([SectorHeader(1000 + k, 0, 0, HONEST).encode(), bytes(SECTOR_BYTES)])
                flood = arrives(3, 8)
                wait_until(lambda: agg_counts().get("rejected.pending_full", 0) >= 900, 30, "flood rejected", tree)
                # 3. Expects of ~900 KB for scans that never start (2 threads announced, 1 expect sent).
                rss0 = _rss(agg_proc.pid)
                members = tuple(f"ng-{i:05d}-" + "x" * 80 for i in range(9000))
                for k in range(30):
                    big = ExpectMessage("p/0", 200 + k, 0, 2, HONEST, members, {members[0]: 1})
                    info[0].send(big.encode())
                wait_until(lambda: agg_counts().get("rejected.too_many_scans", 0) >= 25, 30, "big expects", tree)
                grown = (_rss(agg_proc.pid) - rss0) / MB
                tree.check_alive()
    finally:
        ctx.destroy(linger=0)
    print(f"honest scan after a ghost member: {ghost:.2f} s; after 1,000 unknown scans: {flood:.2f} s; "
          f"30 expects of ~900 KB: aggregator RSS +{grown:.1f} MB")  # fmt: skip
    assert grown < 50


def test_member_resolver_and_open_scans_units():
    from stemstream.plane.admission import MemberResolver, OpenScans

    registered: set[str] = {"a"}
    resolver = MemberResolver(lambda: registered, timeout_s=5.0)
    assert resolver.known(("a",)) and not resolver.known(("a", "b"))
    resolver.wait("s1", ("a", "b"))
    resolver.wait("s2", ("zz",))
    t = time.monotonic()
    assert resolver.ready(t) == [] and resolver.waiting("s1")
    registered.add("b")
    assert resolver.ready(t + 0.01) == []  # checked at most every 50 ms
    assert resolver.ready(t + 0.1) == ["s1"] and not resolver.waiting("s1")
    assert resolver.ready(t + 6.0) == ["s2"] and len(resolver) == 0  # given up waiting: activated as it is

    open_scans = OpenScans(max_scans=2, max_bytes=1000)
    assert open_scans.admit("x", 400) is None and open_scans.admit("x", 400) is None
    assert "MAX_EXPECT_BYTES" in (open_scans.admit("y", 300) or "")
    assert open_scans.admit("y", 100) is None
    assert "MAX_OPEN_SCANS" in (open_scans.admit("z", 1) or "")
    open_scans.close("x")
    assert open_scans.total == 100 and open_scans.admit("z", 1) is None

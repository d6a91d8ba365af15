"""End to end with real processes: store, 4 sector producers (2 threads each), aggregator, 3 NodeGroups
stream a simulated 64x64 scan with sector loss. Every frame arrives exactly once on the NodeGroup that
``frame % 3`` picks, complete frames before the incomplete ones, pixels equal to the simulator's, and the
counts in the store add up."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from plane_helpers import (
    ProcessTree,
    crc,
    expected_frame,
    read_results,
    start_store,
    store_client,
    wait_scan_status,
)

SCAN = 1
SHAPE = (64, 64)
SEED = 1  # 0.1% of 16,384 sectors: this seed loses 22, each from a different frame
LOSS = 0.001
GROUPS = ("ng-0", "ng-1", "ng-2")


@pytest.mark.slow
def test_stream_64x64_with_loss_through_three_nodegroups(tmp_path: Path):
    from stemstream.plane.requests import request_scan
    from stemstream.sim import FourDCameraSim
    from stemstream.store import Registry

    sim = FourDCameraSim(SHAPE, scan_number=SCAN, seed=SEED, loss_rate=LOSS)
    lost = sim.lost_sectors()
    assert lost, "the seed must lose some sectors"
    results = tmp_path / "results"
    with ProcessTree(tmp_path / "logs") as tree:
        address = start_store(tree)
        tree.start("aggregator", "aggregator", "--store", address)
        for uid in GROUPS:
            tree.start(uid, "nodegroup", "--store", address, "--uid", uid, "--results", results)
        with store_client(address) as client:
            registry = Registry(client)
            registry.wait_for_members("aggregator", 1, status="ready", timeout=60)
            registry.wait_for_members("nodegroup", 3, status="ready", timeout=60)
            for m in range(4):
                tree.start(f"producer-{m}", "producer", "--store", address, "--sector", m, "--threads", 2)
            registry.wait_for_members("producer", 4, status="ready", timeout=60)

            request_scan(client, SCAN, SHAPE, seed=SEED, loss_rate=LOSS)
            record = wait_scan_status(client, SCAN, ("received", "incomplete"), timeout=180)
            tree.check_alive()

            # The store's accounting: sent = routed = received, sent + lost upstream = every sector.
            n_sectors = 4 * SHAPE[0] * SHAPE[1]
            assert record["route"] == "stream" and record["members"] == list(GROUPS)
            assert record["status"] == "received"
            assert record["lost_upstream"] == len(lost)
            assert record["sent"] == n_sectors - len(lost)
            assert record["routed"] == record["sent"] == record["received"]
            assert record["frames_incomplete"] == len({f for f, _ in lost})
            assert record["frames_complete"] + record["frames_incomplete"] == SHAPE[0] * SHAPE[1]
            assert record["rejected"] == 0
            agg = registry.members("aggregator")[0]
            producers = registry.members("producer")
            assert sum(p.counts.get("sent", 0) for p in producers) == record["sent"]

            # Producer counts reach the registry with the scan; the aggregator's within a publish interval.
            def agg_counts_in(items: dict) -> bool:
                recs = [r for r in registry.members("aggregator")]
                return bool(recs) and recs[0].counts.get("routed") == record["sent"]

            client.wait_for(agg_counts_in, prefix="/aggregators/", timeout=10)
            agg = registry.members("aggregator")[0]
            assert agg.counts["rejected"] == 0
            for uid in GROUPS:
                received = client.get(f"/scans/{SCAN}/nodegroups/{uid}")["received"]
                assert agg.counts[f"routed.{uid}"] == received

    by_frame: dict[int, tuple[str, int]] = {}
    for i, uid in enumerate(GROUPS):
        res = read_results(results, uid, SCAN)
        order = res["order"]
        mine = set(range(i, SHAPE[0] * SHAPE[1], 3))
        assert len(order) == len(set(order)) == len(mine), f"{uid}: every frame exactly once"
        assert set(order) == mine
        missing = {int(f): tuple(v) for f, v in res["missing"].items()}
        want_missing: dict[int, list[int]] = {}
        for f, m in sorted(lost):
            if f % 3 == i:
                want_missing.setdefault(f, []).append(m)
        assert missing == {f: tuple(v) for f, v in want_missing.items()}
        tail = order[len(order) - len(missing) :] if missing else []
        assert set(tail) == set(missing), f"{uid}: incomplete frames come after every complete one"
        summary = res["summary"]
        assert summary["status"] == "received" and summary["received"] == summary["expected"]
        for f, c in res["checksums"].items():
            by_frame[int(f)] = (uid, c)

    assert len(by_frame) == SHAPE[0] * SHAPE[1]
    sample = set(random.Random(0).sample(range(SHAPE[0] * SHAPE[1]), 60)) | {f for f, _ in lost}
    for f in sorted(sample):
        assert by_frame[f][1] == crc(expected_frame(sim, f)), f"frame {f} differs from the simulator's"

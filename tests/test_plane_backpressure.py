"""Back-pressure with real processes: a NodeGroup whose consumer needs ``DELAY`` s per frame slows the
producers down (small HWMs everywhere, so only a little can be queued), and nothing is dropped."""

from __future__ import annotations

from pathlib import Path

import pytest

from plane_helpers import ProcessTree, read_results, start_store, store_client, wait_scan_status

SHAPE = (32, 32)
DELAY = 0.005  # s per frame, one frame at a time: the NodeGroup takes >= 1024 * 5 ms = 5.1 s
HWM = {"STEMSTREAM_SNDHWM": "2", "STEMSTREAM_RCVHWM": "2"}
MAX_LAG = 16  # messages a NodeGroup sector may run ahead of the slowest before it waits
MAX_SKEW = 16  # frame numbers a producer thread may run ahead of its sibling


@pytest.mark.slow
def test_slow_nodegroup_slows_the_producers_and_nothing_is_dropped(tmp_path: Path):
    from stemstream.plane.requests import request_scan
    from stemstream.store import Registry

    n_frames = SHAPE[0] * SHAPE[1]
    bound = DELAY * n_frames
    results = tmp_path / "results"
    with ProcessTree(tmp_path / "logs", env=HWM) as tree:
        address = start_store(tree)
        tree.start("aggregator", "aggregator", "--store", address)
        tree.start("ng-slow", "nodegroup", "--store", address, "--uid", "ng-slow", "--results", results,
                   "--delay", DELAY, "--max-lag", MAX_LAG)  # fmt: skip
        with store_client(address) as client:
            registry = Registry(client)
            registry.wait_for_members("aggregator", 1, status="ready", timeout=60)
            registry.wait_for_members("nodegroup", 1, status="ready", timeout=60)
            for m in range(4):
                tree.start(f"producer-{m}", "producer", "--store", address, "--sector", m, "--threads", 2,
                           "--loss-rate", 0, "--max-skew", MAX_SKEW)  # fmt: skip
            registry.wait_for_members("producer", 4, status="ready", timeout=60)

            request_scan(client, 1, SHAPE, seed=2, loss_rate=0.0)
            record = wait_scan_status(client, 1, ("received", "incomplete"), timeout=120)
            tree.check_alive()
            producers = client.items("/scans/1/producers/")
            client.wait_for(
                lambda items: bool(registry.members("nodegroup")[0].counts.get("scans")),
                timeout=10,
            )
            peak = registry.members("nodegroup")[0].counts["assembling_peak"]

    assert record["status"] == "received"
    assert record["sent"] == record["routed"] == record["received"] == 4 * n_frames
    assert record["lost_upstream"] == 0 and record["rejected"] == 0
    res = read_results(results, "ng-slow", 1)
    assert sorted(res["order"]) == list(range(n_frames))
    # The sectors advanced together: what the NodeGroup held at once is its lag bound plus the skew between
    # a producer's two threads (MAX_SKEW, plus what the kernel's TCP buffers let one run ahead), a constant,
    # not a share of the scan (without the bounds: 800 of these 1024 frames).
    assert peak <= 128, f"{peak} frames in assembly at once"
    consumer_time = res["summary"]["last_ts"] - res["summary"]["first_ts"]
    assert consumer_time >= 0.9 * bound
    # What the pipeline can hold (HWM 2 per socket, plus the kernel's TCP buffers) is a fraction of the
    # scan, so every producer was held back for most of the consumer's time.
    for uid, p in producers.items():
        took = p["finished"] - p["started"]
        assert took >= 0.5 * bound, f"{uid} finished in {took:.2f} s: not held back (bound {bound:.2f} s)"

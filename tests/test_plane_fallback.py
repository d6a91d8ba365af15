"""Disk fallback with real processes: with no NodeGroup registered the scan lands on disk as raw files that
stempy reads frame for frame equal to the simulator; once a NodeGroup registers, the next scan streams."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from plane_helpers import (
    ProcessTree,
    expected_frame,
    read_results,
    start_store,
    store_client,
    wait_scan_status,
)

SHAPE = (16, 16)
SEED = 5
LOSS = 0.01


@pytest.mark.slow
def test_disk_without_nodegroups_then_stream_once_one_registers(tmp_path: Path):
    import stempy.io

    from stemstream.plane.requests import request_scan
    from stemstream.sim import FourDCameraSim
    from stemstream.store import Registry

    fallback = tmp_path / "fallback"
    results = tmp_path / "results"
    with ProcessTree(tmp_path / "logs") as tree:
        address = start_store(tree)
        tree.start("aggregator", "aggregator", "--store", address)
        for m in range(4):
            tree.start(
                f"producer-{m}", "producer", "--store", address, "--sector", m, "--threads", 2,
                "--fallback-dir", fallback,
            )  # fmt: skip
        with store_client(address) as client:
            registry = Registry(client)
            registry.wait_for_members("aggregator", 1, status="ready", timeout=60)
            registry.wait_for_members("producer", 4, status="ready", timeout=60)
            assert not registry.members("nodegroup")

            request_scan(client, 1, SHAPE, seed=SEED, loss_rate=LOSS)
            record = wait_scan_status(client, 1, ("on_disk", "incomplete"), timeout=120)
            sim = FourDCameraSim(SHAPE, scan_number=1, seed=SEED, loss_rate=LOSS)
            assert record["route"] == "disk" and record["status"] == "on_disk"
            assert record["reason"] == "no NodeGroup is ready"
            assert record["lost_upstream"] == len(sim.lost_sectors()) > 0
            assert record["sent"] == 4 * sim.n_frames - len(sim.lost_sectors())
            paths = record["fallback_paths"]
            assert sorted(Path(p).name for p in paths) == [
                f"data_scan0000000001_module{m}_00000.data" for m in range(4)
            ]

            reader = stempy.io.reader(paths, version=stempy.io.FileVersion.VERSION5, backend="multi-pass")
            assert tuple(reader.scan_shape) == SHAPE
            for i in range(sim.n_frames):
                blocks = reader.read_frames(i)
                assert len(blocks) == 1
                assert np.array_equal(blocks[0].data.reshape(576, 576), expected_frame(sim, i)), f"frame {i}"

            tree.start("ng-0", "nodegroup", "--store", address, "--uid", "ng-0", "--results", results)
            registry.wait_for_members("nodegroup", 1, status="ready", timeout=60)
            request_scan(client, 2, SHAPE, seed=SEED, loss_rate=LOSS)
            record = wait_scan_status(client, 2, ("received", "incomplete"), timeout=120)
            assert record["route"] == "stream" and record["status"] == "received"
            assert record["members"] == ["ng-0"] and record["fallback_paths"] == []
            assert not list(fallback.glob("data_scan0000000002_*"))
            tree.check_alive()

    res = read_results(results, "ng-0", 2)
    assert sorted(res["order"]) == list(range(SHAPE[0] * SHAPE[1]))

"""``stemstream replay``, real processes: a simulated scan's raw files replayed through aggregator and counting
NodeGroups (no producers running: the replay is the four of them), counted, and equal event for event to
``stemstream count`` on the same files."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from plane_helpers import ProcessTree, start_store, store_client
from stemstream.scans import keys

SCAN = 4
SHAPE = (12, 12)
SEED = 11
LOSS = 0.01
# Every complete frame is in the threshold sample on both sides (the stream's first N complete frames, the
# files' N spread over the scan), so that both count at the same thresholds.
COUNTING = ["--engine", "cpu", "--threshold-samples", "200"]


def _sim():
    from stemstream.sim import FourDCameraSim

    return FourDCameraSim(SHAPE, scan_number=SCAN, seed=SEED, loss_rate=LOSS)


def test_index_scan_finds_each_sectors_records_and_refuses_a_cut_file(tmp_path: Path):
    from stemstream.errors import RawFileError
    from stemstream.plane.rawreplay import FileSectors, index_scan
    from stemstream.wire.rawfile import write_scan

    sim = _sim()
    files = write_scan(sim, tmp_path)
    recorded = index_scan(tmp_path, SCAN)
    assert recorded.scan_shape == SHAPE
    lost = set(sim.lost_sectors())
    for m in range(4):
        assert set(recorded.sectors[m]) == {f for f in range(sim.n_frames) if (f, m) not in lost}
        source = FileSectors(recorded.sectors[m])
        f = min(recorded.sectors[m])
        assert np.array_equal(source(f), sim.sector(f, m))
        source.close()
    with pytest.raises(RawFileError, match="no raw files of scan 99"):
        index_scan(tmp_path, 99)
    with open(files[1], "r+b") as fh:
        fh.truncate(fh.seek(0, 2) - 7)
    with pytest.raises(RawFileError, match="truncated record"):
        index_scan(tmp_path, SCAN)


@pytest.mark.slow
def test_a_replayed_scan_is_counted_as_stemstream_count_counts_its_files(tmp_path: Path):
    from stemstream.counting import read_counted
    from stemstream.store import Registry
    from stemstream.wire.rawfile import write_scan

    sim = _sim()
    assert sim.lost_sectors(), "the seed must lose sectors"
    raw = tmp_path / "raw"
    write_scan(sim, raw)
    reference = tmp_path / "reference.h5"
    argv = ["count", str(raw), "--scan", str(SCAN), "--output", str(reference), "--no-progress", *COUNTING]
    subprocess.run([sys.executable, "-m", "stemstream.cli", *argv], check=True, capture_output=True, timeout=120)

    out = tmp_path / "counted"
    with ProcessTree(tmp_path / "logs") as tree:
        address = start_store(tree)
        tree.start("aggregator", "aggregator", "--store", address)
        tree.start("nodegroups", "nodegroup", "--store", address, "--consumer", "count", "--count", 2,
                   "--output-dir", out, "--uid", "ng", *COUNTING)  # fmt: skip
        with store_client(address) as client:
            registry = Registry(client)
            registry.wait_for_members("aggregator", 1, status="ready", timeout=60)
            registry.wait_for_members("nodegroup", 2, status="ready", timeout=90)
            tree.start("replay", "replay", str(raw), "--scan", SCAN, "--store", address, "--threads", 2,
                       "--rate", 2000)  # fmt: skip
            key = keys.counted(SCAN)
            record = client.wait_for(lambda items: key in items, prefix=key, timeout=180)[key]
            assert tree.wait_exit("replay", 60) == 0, tree.tail("replay")
            assert "replayed scan 4 as 4: " in tree.log("replay")
            plan = client.get(keys.scan(SCAN))
    assert record["status"] == "counted", record
    assert plan["route"] == "stream" and plan["decided_by"].startswith("replay-0-")

    ours, ours_meta = read_counted(record["path"])
    theirs, theirs_meta = read_counted(reference)
    assert ours_meta["thresholds"] == theirs_meta["thresholds"]
    a = [np.asarray(e, dtype=np.uint32) for e in np.asarray(ours.data).ravel()]
    b = [np.asarray(e, dtype=np.uint32) for e in np.asarray(theirs.data).ravel()]
    assert len(a) == len(b) == SHAPE[0] * SHAPE[1]
    differ = [f for f, (x, y) in enumerate(zip(a, b, strict=True)) if not np.array_equal(x, y)]
    assert not differ, f"frames {differ[:10]} differ from stemstream count's"
    assert sum(x.size for x in a) > 0
    assert sorted(map(tuple, ours_meta["missing_sectors"].tolist())) == sorted(sim.lost_sectors())

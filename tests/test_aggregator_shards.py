"""A scan through two aggregator processes (``stemstream aggregator --processes 2``), real processes: the plan
names which serves which sector, each writes its sectors' records (the store's write policy lets only the
planned one), and the scan is counted whole, its events equal to stempy's reading the same scan's raw files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from plane_helpers import ProcessTree, start_store, store_client
from stemstream.scans import keys
from test_counting_stream import LOSS, SCAN, SEED, SHAPE, _dark_file, _sim, _stempy_from_raw_files


@pytest.mark.slow
def test_a_scan_through_two_aggregators_is_counted_whole_and_equal_to_stempy(tmp_path: Path):
    from stemstream.counting import read_counted
    from stemstream.plane.requests import request_scan
    from stemstream.scans.records import AggregatorScanRecord, ScanPlan
    from stemstream.store import Registry

    dark_path = _dark_file(tmp_path)
    out = tmp_path / "counted"
    with ProcessTree(tmp_path / "logs", env={"STEMSTREAM_DARK_DIR": str(dark_path.parent)}) as tree:
        address = start_store(tree)
        tree.start("aggregators", "aggregator", "--store", address, "--processes", 2, "--uid", "agg")
        tree.start("nodegroups", "nodegroup", "--store", address, "--consumer", "count", "--count", 2,
                   "--output-dir", out, "--engine", "cpu", "--dark", dark_path, "--uid", "ng")  # fmt: skip
        with store_client(address) as client:
            registry = Registry(client)
            aggs = registry.wait_for_members("aggregator", 2, status="ready", timeout=60)
            assert {a.uid: sorted(k for k in a.endpoints if k.startswith("data_")) for a in aggs} == {
                "agg-0": ["data_0", "data_2"],
                "agg-1": ["data_1", "data_3"],
            }
            registry.wait_for_members("nodegroup", 2, status="ready", timeout=90)
            for m in range(4):
                tree.start(f"producer-{m}", "producer", "--store", address, "--sector", m, "--threads", 2)
            registry.wait_for_members("producer", 4, status="ready", timeout=60)
            request_scan(client, SCAN, SHAPE, seed=SEED, loss_rate=LOSS)
            key = keys.counted(SCAN)
            record = client.wait_for(lambda items: key in items, prefix=key, timeout=240)[key]
            tree.check_alive()
            plan = ScanPlan.from_record(client.get(keys.scan(SCAN)))
            routed = {m: AggregatorScanRecord.from_record(client.get(keys.aggregator(SCAN, m))) for m in range(4)}
    assert record["status"] == "counted", record
    assert plan.sector_aggregators == {"0": "agg-0", "1": "agg-1", "2": "agg-0", "3": "agg-1"}
    for m, rec in routed.items():
        assert rec.aggregator == f"agg-{m % 2}" and rec.status == "done"
        assert rec.routed_total == rec.sent_total > 0

    sparse, meta = read_counted(record["path"])
    dark = np.load(dark_path)
    ours = [np.asarray(e, dtype=np.uint32) for e in np.asarray(sparse.data).ravel()]
    from stemstream.wire.rawfile import write_scan

    theirs = _stempy_from_raw_files(write_scan(_sim(), tmp_path / "raw"), meta["thresholds"], dark)
    assert len(ours) == len(theirs) == SHAPE[0] * SHAPE[1]
    differ = [f for f, (a, b) in enumerate(zip(ours, theirs, strict=True)) if not np.array_equal(a, b)]
    assert not differ, f"frames {differ[:10]} differ from stempy's"
    assert sorted(map(tuple, meta["missing_sectors"].tolist())) == sorted(_sim().lost_sectors())
    assert record["events"] == sum(e.size for e in ours) > 0


# ------------------------------------------------------------------------------------------ plan and policy


class _Members:
    def __init__(self, records: dict[str, list]) -> None:
        self.records = records

    def members(self, role: str, status: str | None = None) -> list:
        return [r for r in self.records.get(role, []) if status is None or r.status == status]


def _agg(uid: str, sectors: list[int], key: str | None = None):
    from stemstream.store.registry import Record

    eps = {f"{kind}_{m}": f"tcp://h:{4000 + 10 * m + (kind == 'info')}" for m in sectors for kind in ("data", "info")}
    return Record(uid=uid, role="aggregator", status="ready", endpoints=eps, server_key=key)


def _plan(aggregators: list):
    from stemstream.scans.plan import decide_plan
    from stemstream.store.registry import Record

    ng = Record(uid="ng-a", role="nodegroup", status="ready", endpoints={"info": "tcp://n:1"})
    return decide_plan(_Members({"aggregator": aggregators, "nodegroup": [ng]}), 7, (4, 4), decided_by="p0")


def test_the_plan_names_each_sectors_aggregator_and_its_endpoints_and_key():
    from stemstream.scans.records import ScanPlan

    shards = [_agg("agg-0", [0, 2], "K0"), _agg("agg-1", [1, 3], "K1")]
    plan = ScanPlan.from_record(_plan(shards).to_record())  # as every reader gets it: through the store
    assert plan.route == "stream" and plan.aggregator == "agg-0"
    assert plan.sector_aggregators == {"0": "agg-0", "1": "agg-1", "2": "agg-0", "3": "agg-1"}
    assert plan.aggregator_server_keys == {"agg-0": "K0", "agg-1": "K1"}
    for m in range(4):
        assert plan.aggregator_endpoints[f"data_{m}"] == shards[m % 2].endpoints[f"data_{m}"]
        assert plan.aggregator_endpoints[f"info_{m}"] == shards[m % 2].endpoints[f"info_{m}"]
        assert plan.aggregator_of(m) == f"agg-{m % 2}" and plan.server_key_of(m) == f"K{m % 2}"
    # One aggregator serving every sector wins over shards; the plan is then as before sharding.
    whole = _plan([*shards, _agg("agg-w", [0, 1, 2, 3], "KW")])
    assert whole.aggregator == "agg-w" and whole.sector_aggregators == {} and whole.server_key_of(3) == "KW"
    # A sector nobody serves: to disk.
    assert _plan([_agg("agg-0", [0, 2])]).route == "disk"


def test_only_the_aggregator_the_plan_names_for_a_sector_writes_its_record():
    from stemstream.scans.policy import AGGREGATOR
    from test_store_policy import State, check, registry

    state = State()
    registry(state, AGGREGATOR, "agg-0", "host-a")
    registry(state, AGGREGATOR, "agg-1", "host-b")
    state.put(keys.scan(7), _plan([_agg("agg-0", [0, 2]), _agg("agg-1", [1, 3])]).to_record(), "daq0")
    for m in range(4):
        mine, other = ("host-a", "host-b") if m % 2 == 0 else ("host-b", "host-a")
        assert check(state, mine, AGGREGATOR, keys.aggregator(7, m)) is None
        assert check(state, other, AGGREGATOR, keys.aggregator(7, m)).kind == "plans_aggregator"

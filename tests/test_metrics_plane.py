"""Metrics end to end, with real processes: store, aggregator, one process of two counting NodeGroups and 4
producers (2 threads each) stream a simulated 16x16 scan with sector loss. Every process's /metrics port
(found in the registry) is scraped over HTTP before and after; the differences must equal what the test
itself asked the simulated detector to deliver (sectors present, their bytes, sectors lost, per producer and
per NodeGroup), not what a store record says. Then ``stemstream health`` and ``stemstream metrics targets``
against the same processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from plane_helpers import ProcessTree, free_port_block, store_client
from stemstream.metrics.catalog import BY_ROLE
from stemstream.scans import keys

SCAN = 1
SHAPE = (16, 16)
SEED = 3
LOSS = 0.01  # about 10 of 1,024 sectors
GROUPS = ("ng-0", "ng-1")
SECTOR_BYTES = 144 * 576 * 2


class Scrape:
    """One scrape of a /metrics endpoint: family names and samples."""

    def __init__(self, url: str) -> None:
        from prometheus_client.parser import text_string_to_metric_families

        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
        self.families: set[str] = set()
        self.samples: list[tuple[str, dict[str, str], float]] = []
        for family in text_string_to_metric_families(text):
            self.families.add(family.name + ("_total" if family.type == "counter" else ""))
            self.samples += [(s.name, s.labels, s.value) for s in family.samples]

    def value(self, name: str, **labels: str) -> float:
        """The sum of the samples of ``name`` whose labels include ``labels`` (0 when there is none)."""
        return sum(v for n, lab, v in self.samples if n == name and labels.items() <= lab.items())


def _delta(before: Scrape, after: Scrape, name: str, **labels: str) -> float:
    return after.value(name, **labels) - before.value(name, **labels)


def _wait(predicate: Callable[[], bool], timeout: float, what: str, tree: ProcessTree) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        tree.check_alive()
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.2)


def _cli(*args: object, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    from plane_helpers import ROOT

    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    return subprocess.run(
        [sys.executable, "-m", "stemstream.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


@pytest.mark.slow
def test_scraped_counters_equal_what_the_producers_sent(tmp_path: Path):
    from stemstream.plane.requests import request_scan
    from stemstream.sim import FourDCameraSim
    from stemstream.store import Registry

    sim = FourDCameraSim(SHAPE, scan_number=SCAN, seed=SEED, loss_rate=LOSS)
    n_frames = SHAPE[0] * SHAPE[1]
    lost = set(sim.lost_sectors())
    assert lost, "the seed must lose some sectors"
    assert not any(all((f, m) in lost for m in range(4)) for f in range(n_frames)), "no frame entirely lost"
    present = {m: n_frames - sum(1 for _, s in lost if s == m) for m in range(4)}
    total = sum(present.values())
    share = {uid: [f for f in range(n_frames) if f % len(GROUPS) == i] for i, uid in enumerate(GROUPS)}
    dark = tmp_path / "dark.npy"
    np.save(dark, sim.dark_reference() - 11.0)

    with ProcessTree(tmp_path / "logs", env={"STEMSTREAM_DARK_DIR": str(tmp_path)}) as tree:
        port = free_port_block(3)
        tree.start("store", "store", "serve", "--port", port, "--stats-interval", 0.5)
        address = f"tcp://127.0.0.1:{port}"
        tree.start("aggregator", "aggregator", "--store", address)
        tree.start("nodegroups", "nodegroup", "--store", address, "--consumer", "count", "--count", 2, "--uid", "ng",
                   "--output-dir", tmp_path / "counted", "--dark", dark, "--threshold-samples", 20)  # fmt: skip
        with store_client(address) as client:
            registry = Registry(client)
            registry.wait_for_members("aggregator", 1, status="ready", timeout=60)
            registry.wait_for_members("nodegroup", 2, status="ready", timeout=90)
            for m in range(4):
                tree.start(f"producer-{m}", "producer", "--store", address, "--sector", m, "--threads", 2)
            registry.wait_for_members("producer", 4, status="ready", timeout=60)

            # Every process says where its metrics are: the registry (and the store's stats record).
            _wait(lambda: "metrics" in (client.get("/store/primary/stats") or {}).get("endpoints", {}), 30,
                  "the store's metrics endpoint", tree)  # fmt: skip
            urls = {"store": client.get("/store/primary/stats")["endpoints"]["metrics"]}
            urls["aggregator"] = registry.members("aggregator")[0].endpoints["metrics"]
            groups = {r.uid: r.endpoints["metrics"] for r in registry.members("nodegroup")}
            assert set(groups) == set(GROUPS)
            assert len(set(groups.values())) == 1, "NodeGroups of one process share its port"
            urls["nodegroups"] = groups["ng-0"]
            producers = {r.extra["sector"]: r for r in registry.members("producer")}
            for m, rec in producers.items():
                urls[f"producer-{m}"] = rec.endpoints["metrics"]
            assert len(set(urls.values())) == len(urls) == 7, urls

            before = {name: Scrape(url) for name, url in urls.items()}
            request_scan(client, SCAN, SHAPE, seed=SEED, loss_rate=LOSS)
            key = keys.counted(SCAN)
            record = client.wait_for(lambda items: key in items, prefix=key, timeout=240)[key]
            assert record["status"] == "counted", record

            def released() -> bool:  # the producers let go of the scan once it is counted
                return all(Scrape(urls[f"producer-{m}"]).value("stemstream_scans_handled_total", outcome="acked")
                           > before[f"producer-{m}"].value("stemstream_scans_handled_total", outcome="acked")
                           for m in range(4))  # fmt: skip

            _wait(released, 60, "the producers to release the scan", tree)
            after = {name: Scrape(url) for name, url in urls.items()}

            # Health probes and scrape targets, against the same processes.
            for args in (("aggregator",), ("nodegroup", "ng-1"), ("producer",), ("store",), ("store", "primary")):
                done = _cli("health", *args, "--store", address, "--window", 4)
                assert done.returncode == 0, (args, done.stdout, done.stderr)
                assert done.stdout.count("\n") == 1 and ": ok" in done.stdout, done.stdout
            done = _cli("health", "nodegroup", "ng-9", "--store", address, "--window", 1)
            assert done.returncode == 1 and done.stdout == ""
            assert done.stderr.strip() == f"nodegroup ng-9: not registered in the store at {address}"
            out = tmp_path / "sd" / "stemstream.json"
            done = _cli("metrics", "targets", "--store", address, "--out", out)
            assert done.returncode == 0, done.stderr
            tree.check_alive()

    # Producers: what each sent is the sectors its detector sector delivered, and their bytes.
    for m in range(4):
        b, a = before[f"producer-{m}"], after[f"producer-{m}"]
        uid = producers[m].uid
        assert _delta(b, a, "stemstream_messages_sent_total", uid=uid) == present[m]
        assert _delta(b, a, "stemstream_bytes_sent_total", uid=uid) == present[m] * SECTOR_BYTES
        assert _delta(b, a, "stemstream_sectors_lost_upstream_total", uid=uid) == n_frames - present[m]
        assert _delta(b, a, "stemstream_scans_handled_total", outcome="streamed") == 1
        assert _delta(b, a, "stemstream_scans_handled_total", outcome="replayed") == 0
        assert a.value("stemstream_hold_bytes") == 0, "released: nothing held"
        assert a.value("stemstream_send_blocked_seconds_total") >= 0
        assert a.value("stemstream_hold_limit_bytes") > 0

    # The aggregator took in and routed exactly that, bytes included; nothing rejected, nothing waiting.
    b, a = before["aggregator"], after["aggregator"]
    assert _delta(b, a, "stemstream_messages_received_total") == total
    assert _delta(b, a, "stemstream_bytes_received_total") == total * SECTOR_BYTES
    assert _delta(b, a, "stemstream_messages_sent_total") == total
    assert _delta(b, a, "stemstream_bytes_sent_total") == total * SECTOR_BYTES
    assert a.value("stemstream_messages_rejected_total") == 0
    assert a.value("stemstream_queue_depth", queue="pending") == 0
    assert a.value("stemstream_scans_open") == 0

    # Each NodeGroup got the sectors of its frames (frame % 2), and knows which were lost upstream.
    b, a = before["nodegroups"], after["nodegroups"]
    for uid, frames in share.items():
        mine = sum(4 - sum(1 for m in range(4) if (f, m) in lost) for f in frames)
        assert _delta(b, a, "stemstream_messages_received_total", role="nodegroup", uid=uid) == mine
        assert _delta(b, a, "stemstream_bytes_received_total", role="nodegroup", uid=uid) == mine * SECTOR_BYTES
        assert _delta(b, a, "stemstream_sectors_lost_upstream_total", uid=uid) == 4 * len(frames) - mine
        incomplete = len({f for f, _ in lost if f % len(GROUPS) == GROUPS.index(uid)})
        assert _delta(b, a, "stemstream_frames_assembled_total", uid=uid, complete="false") == incomplete
        assert _delta(b, a, "stemstream_frames_assembled_total", uid=uid, complete="true") == len(frames) - incomplete
        assert _delta(b, a, "stemstream_scans_handled_total", uid=uid, outcome="received") == 1
    # ... and counted every frame of the scan; nothing waits to be counted any more.
    assert _delta(b, a, "stemstream_frames_counted_total", role="counting") == n_frames
    assert _delta(b, a, "stemstream_counted_files_total", status="counted") == 1
    assert a.value("stemstream_counting_backlog_frames") == 0
    assert a.value("stemstream_counting_lag_seconds") == 0

    # The leader producer tells the scans' outcomes and the registry; the store its sequence and state.
    leader = after["producer-0"]
    assert leader.value("stemstream_scans", outcome="counted") == 1
    assert leader.value("stemstream_scans", outcome="open") == 0
    assert leader.value("stemstream_scan_open_oldest_seconds") == 0
    for member, n in (("nodegroup", 2), ("producer", 4), ("aggregator", 1)):
        assert leader.value("stemstream_registry_members", member=member) == n
    b, a = before["store"], after["store"]
    assert _delta(b, a, "stemstream_store_sequence") > 0
    assert a.value("stemstream_store_active") == 1 and a.value("stemstream_store_peer_configured") == 0
    assert a.value("stemstream_store_failovers_total") == 0

    # Every metric the catalogue promises for a role is in that process's scrape.
    roles = {"store": ("store",), "aggregator": ("aggregator",), "nodegroups": ("nodegroup", "counting")}
    roles |= {f"producer-{m}": ("producer", "leader") if m == 0 else ("producer",) for m in range(4)}
    for name, scrape in after.items():
        assert "process_cpu_seconds_total" in scrape.families
        for role in roles[name]:
            missing = set(BY_ROLE[role]) - scrape.families
            assert not missing, f"{name} lacks {sorted(missing)}"

    # Scrape targets: one per process, labelled with what runs there.
    groups_sd = json.loads(out.read_text())
    by_target = {g["targets"][0]: g["labels"]["service"] for g in groups_sd}
    service = {"store": "store", "aggregator": "aggregator", "nodegroups": "nodegroup"}
    want = {url.split("/")[2]: service.get(name, "producer") for name, url in urls.items()}
    assert by_target == want

"""Failures survived, with real processes: nothing that entered the system is lost.

Each test runs a store, an aggregator, NodeGroups and the four simulated producers as separate processes,
breaks one of them in the middle of a scan, and then checks the promise from the files themselves
(``stemstream.audit``: the counted HDF5 and the raw files), not from counters: every sector the simulator
did not lose upstream is counted or on disk. The producers hold each streamed scan until it is
acknowledged and replay it to disk when it cannot be (``stemstream.plane.retention``).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest

from plane_helpers import (
    ProcessTree,
    crc,
    expected_frame,
    free_port_block,
    read_results,
    start_store,
    store_client,
    wait_scan_status,
)

SEED = 11
LOSS = 0.003
# Short timeouts so that failures are noticed within seconds here (production: minutes).
ENV = {
    "STEMSTREAM_SCAN_TIMEOUT_S": "6",
    "STEMSTREAM_ACK_TIMEOUT_S": "40",
    "STEMSTREAM_STORE_TTL_S": "2",
}

pytestmark = pytest.mark.slow


def _sim(scan: int, shape: tuple[int, int]) -> Any:
    from stemstream.sim import FourDCameraSim

    return FourDCameraSim(shape, scan_number=scan, seed=SEED, loss_rate=LOSS)


def _raw_files(directory: Path, scan: int) -> list[Path]:
    return sorted(directory.glob(f"data_scan{scan:010d}_module*.data"))


def _audit(scan: int, shape: tuple[int, int], counted_dir: Path, fallback: Path) -> Any:
    from stemstream.audit import audit_scan, entered_from_sim

    result = audit_scan(
        scan,
        entered_from_sim(_sim(scan, shape)),
        counted_file=counted_dir / f"scan_{scan}_counted.h5",
        raw_files=_raw_files(fallback, scan),
    )
    print(result.line())
    assert result.unaccounted == 0, f"{result.line()}; e.g. {result.examples}"
    assert result.entered + result.lost_upstream == 4 * shape[0] * shape[1]
    return result


def _start_producers(tree: ProcessTree, address: str, fallback: Path, env: dict[str, str] | None = None) -> None:
    for m in range(4):
        tree.start(f"producer-{m}", "producer", "--store", address, "--sector", m, "--threads", 2,
                   "--fallback-dir", fallback, env=env)  # fmt: skip


def _start_counting(tree: ProcessTree, name: str, address: str, out: Path, count: int = 2) -> None:
    # Counting gets more time than the data plane's 6 s: on 2 busy cores a rank may count for longer than
    # that without a word, and rank 0 would write the scan off as partial.
    tree.start(name, "nodegroup", "--store", address, "--consumer", "count", "--count", count, "--uid", name,
               "--output-dir", out, "--scan-timeout", 30)  # fmt: skip


def _wait_members(client: Any, *, nodegroups: int, aggregators: int = 1, producers: int = 4) -> None:
    from stemstream.store import Registry

    registry = Registry(client)
    registry.wait_for_members("aggregator", aggregators, status="ready", timeout=60)
    registry.wait_for_members("nodegroup", nodegroups, status="ready", timeout=60)
    registry.wait_for_members("producer", producers, status="ready", timeout=60)


def _wait_received(client: Any, at_least: int, timeout: float = 60) -> None:
    """Until the NodeGroups report at least ``at_least`` data messages received (mid-scan)."""

    def enough(items: dict[str, Any]) -> bool:
        return sum(int((v.get("counts") or {}).get("received", 0)) for v in items.values()) >= at_least

    client.wait_for(enough, prefix="/nodegroups/", timeout=timeout)


def _wait_released(client: Any, scan: int, timeout: float = 60) -> None:
    """Until every producer has let go of what it held (the scan was acknowledged)."""
    from stemstream.store import Registry

    registry = Registry(client)

    def released(_: dict[str, Any]) -> bool:
        producers = registry.members("producer")
        return len(producers) == 4 and all(
            p.counts.get("acked", 0) >= 1 and p.counts.get("held_bytes", 1) == 0 for p in producers
        )

    try:
        client.wait_for(released, prefix="/producers/", timeout=timeout)
    except TimeoutError:
        print({p.uid: p.counts for p in registry.members("producer")})
        raise


def _kill(tree: ProcessTree, name: str) -> None:
    os.killpg(tree.procs[name].pid, signal.SIGKILL)
    tree.procs[name].wait(10)


def test_a_nodegroup_killed_mid_scan_is_replayed_to_disk_and_the_next_scan_streams(tmp_path: Path):
    from stemstream.counting.files import count_raw_files
    from stemstream.plane.requests import request_scan

    shape, out, fallback = (24, 24), tmp_path / "counted", tmp_path / "fallback"
    with ProcessTree(tmp_path / "logs", env=ENV) as tree:
        address = start_store(tree)
        tree.start("aggregator", "aggregator", "--store", address)
        _start_counting(tree, "ng-a", address, out)
        _start_producers(tree, address, fallback)
        with store_client(address) as client:
            _wait_members(client, nodegroups=2)
            request_scan(client, 1, shape, seed=SEED, loss_rate=LOSS)
            _wait_received(client, 600)
            _kill(tree, "ng-a")  # SIGKILL: no goodbye, its frames in RAM are gone

            record = wait_scan_status(client, 1, ("on_disk",), timeout=90)
            assert record["replayed"] and "left before the scan was acknowledged" in record["replay_reason"]
            assert sorted(record["fallback_paths"]) == [str(p) for p in _raw_files(fallback, 1)]
            audit = _audit(1, shape, out, fallback)
            assert audit.on_disk == audit.entered  # the whole scan, from the producers' RAM

            # What the session does next with it: count it from its files (count_fallback_scan's path).
            counted = count_raw_files(_raw_files(fallback, 1), out / "scan_1_counted.h5", scan_number=1)
            assert counted.exists()

            # A NodeGroup comes back: the next scan streams, is counted, acknowledged, nothing on disk.
            _start_counting(tree, "ng-b", address, out, count=1)
            _wait_members(client, nodegroups=1)
            request_scan(client, 2, shape, seed=SEED, loss_rate=LOSS)
            try:
                record = wait_scan_status(client, 2, ("received",), timeout=40)
            except TimeoutError:
                import pprint

                pprint.pprint({k: v for k, v in client.items("/scans/2").items() if "preview" not in k})
                raise
            assert record["members"] == ["ng-b"]
            _wait_released(client, 2)
            audit = _audit(2, shape, out, fallback)
            assert audit.counted == audit.entered and not _raw_files(fallback, 2)


def test_the_aggregator_killed_and_restarted_mid_scan(tmp_path: Path):
    from stemstream.plane.requests import request_scan

    # Scan 1 is larger than the NodeGroups' counting buffers (512 frames): the producers are still held back
    # by counting when the aggregator dies, so it dies mid-scan however fast the machine is.
    big, shape, out, fallback = (40, 40), (24, 24), tmp_path / "counted", tmp_path / "fallback"
    with ProcessTree(tmp_path / "logs", env=ENV) as tree:
        address = start_store(tree)
        tree.start("aggregator", "aggregator", "--store", address, "--uid", "agg")
        _start_counting(tree, "ng", address, out)
        _start_producers(tree, address, fallback)
        with store_client(address) as client:
            _wait_members(client, nodegroups=2)
            request_scan(client, 1, big, seed=SEED, loss_rate=LOSS)
            _wait_received(client, 800)
            _kill(tree, "aggregator")
            tree.start("aggregator-2", "aggregator", "--store", address, "--uid", "agg")  # as a supervisor would

            record = wait_scan_status(client, 1, ("on_disk",), timeout=120)
            # Producers still sending when it died could not stream; those done already see the shortfall.
            reason = record["replay_reason"]
            assert record["replayed"] and ("could not stream" in reason or "sent sectors reached" in reason), reason
            assert record["sent"] < 4 * big[0] * big[1] - record["lost_upstream"]  # it was cut short
            audit = _audit(1, big, out, fallback)
            assert audit.on_disk == audit.entered

            request_scan(client, 2, shape, seed=SEED, loss_rate=LOSS)  # through the restarted aggregator
            record = wait_scan_status(client, 2, ("received",), timeout=90)
            _wait_released(client, 2)
            audit = _audit(2, shape, out, fallback)
            assert audit.counted == audit.entered and not _raw_files(fallback, 2)


def test_the_store_primary_killed_mid_scan_fails_over_without_loss(tmp_path: Path):
    from stemstream.plane.requests import request_scan

    shape, out, fallback = (24, 24), tmp_path / "counted", tmp_path / "fallback"
    p, b = free_port_block(5), free_port_block(5)
    primary, backup = f"tcp://127.0.0.1:{p}", f"tcp://127.0.0.1:{b}"
    env = {**ENV, "STEMSTREAM_STORE_BACKUP_HOST": "127.0.0.1", "STEMSTREAM_STORE_BACKUP_PORT": str(b)}
    with ProcessTree(tmp_path / "logs", env=env) as tree:
        common = ["--heartbeat", "0.3", "--stats-interval", "1"]
        tree.start("store-primary", "store", "serve", "--port", p, "--primary-with-backup", backup, *common)
        tree.start("store-backup", "store", "serve", "--port", b, "--backup-of", primary, *common)
        tree.start("aggregator", "aggregator", "--store", primary)
        _start_counting(tree, "ng", primary, out)
        _start_producers(tree, primary, fallback)
        from stemstream.store import StoreClient

        with StoreClient(primary, backup=backup, timeout=30) as client:
            _wait_members(client, nodegroups=2)
            request_scan(client, 1, shape, seed=SEED, loss_rate=LOSS)
            _wait_received(client, 600)
            _kill(tree, "store-primary")

            record = wait_scan_status(client, 1, ("received",), timeout=90)
            assert client.server == backup
            counted = client.wait_for(lambda it: "/scans/1/counted" in it, "/scans/1/", timeout=60)
            assert counted["/scans/1/counted"]["status"] == "counted"
            _wait_released(client, 1)
            audit = _audit(1, shape, out, fallback)
            assert audit.counted == audit.entered and audit.on_disk == 0
            assert record["sent"] == record["received"] == audit.entered


def test_a_nodegroup_that_joins_mid_scan_takes_part_from_the_next_scan(tmp_path: Path):
    from stemstream.plane.requests import request_scan

    shape, results, fallback = (24, 24), tmp_path / "results", tmp_path / "fallback"
    with ProcessTree(tmp_path / "logs", env=ENV) as tree:
        address = start_store(tree)
        tree.start("aggregator", "aggregator", "--store", address)
        tree.start(
            "ng-a", "nodegroup", "--store", address, "--uid", "ng-a", "--results", results, "--delay", "0.004"
        )  # fmt: skip (slow enough that the scan is still streaming at the join)
        _start_producers(tree, address, fallback)
        with store_client(address) as client:
            _wait_members(client, nodegroups=1)
            request_scan(client, 1, shape, seed=SEED, loss_rate=LOSS)
            _wait_received(client, 300)
            tree.start("ng-b", "nodegroup", "--store", address, "--uid", "ng-b", "--results", results)
            _wait_members(client, nodegroups=2)
            first = wait_scan_status(client, 1, ("received", "incomplete"), timeout=90)
            request_scan(client, 2, shape, seed=SEED, loss_rate=LOSS)
            second = wait_scan_status(client, 2, ("received", "incomplete"), timeout=90)
            _wait_released(client, 2)
            ngs = {uid: client.get(f"/nodegroups/{uid}")["counts"] for uid in ("ng-a", "ng-b")}

    assert first["members"] == ["ng-a"] and first["status"] == "received"
    assert second["members"] == ["ng-a", "ng-b"] and second["status"] == "received"
    assert all(c["rejected"] == 0 for c in ngs.values()), ngs  # nothing misrouted, nothing late
    assert not (tmp_path / "results" / "ng-b_scan1.json").exists()
    for scan, members in ((1, ["ng-a"]), (2, ["ng-a", "ng-b"])):
        sim = _sim(scan, shape)
        frames: dict[int, int] = {}
        for i, uid in enumerate(members):
            res = read_results(results, uid, scan)
            mine = set(range(i, sim.n_frames, len(members)))
            assert sorted(map(int, res["checksums"])) == sorted(mine), f"scan {scan}: {uid} got frames not its own"
            frames.update({int(f): c for f, c in res["checksums"].items()})
        assert len(frames) == sim.n_frames
        for f in range(0, sim.n_frames, 7):
            assert frames[f] == crc(expected_frame(sim, f)), f"scan {scan} frame {f}"
    assert not list(fallback.glob("*.data"))  # acknowledged on receipt: nothing was replayed


@contextlib.contextmanager
def _small_disk(path: Path, size: str) -> Any:
    """A tmpfs of ``size`` at ``path`` (needs root, as on the project's machines); skips where not allowed."""
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def _fill(path: Path) -> None:
    with contextlib.suppress(OSError), open(path / "filler", "wb") as f:
        while True:
            f.write(b"\0" * 65536)


def test_a_full_fallback_disk_keeps_the_data_in_ram_and_streaming_goes_on(tmp_path: Path):
    from stemstream.plane.requests import request_scan
    from stemstream.store import Registry

    shape, small_shape, out = (12, 12), (8, 8), tmp_path / "counted"
    sector = 144 * 576 * 2
    # Room for 100 sectors per producer: a streamed scan of 144 frames must spill, and cannot; a disk scan
    # of 64 frames fits in RAM.
    env = {**ENV, "STEMSTREAM_HOLD_BYTES": str(100 * sector)}
    with _small_disk(tmp_path / "small", "1m") as fallback, ProcessTree(tmp_path / "logs", env=ENV) as tree:
        _fill(fallback)
        address = start_store(tree)
        tree.start("aggregator", "aggregator", "--store", address)
        _start_counting(tree, "ng", address, out, count=1)
        _start_producers(tree, address, fallback, env=env)
        with store_client(address) as client:
            registry = Registry(client)
            _wait_members(client, nodegroups=1)

            # 1. Streaming goes on: the hold overflows, the disk refuses the spill, the scan is still counted.
            request_scan(client, 1, shape, seed=SEED, loss_rate=LOSS)
            wait_scan_status(client, 1, ("received",), timeout=90)
            _wait_released(client, 1)
            counts = [p.counts for p in registry.members("producer")]
            assert all(c["disk_errors"] >= 1 and c["unprotected"] > 0 for c in counts), counts
            assert "the disk or quota is full: free space there" in tree.log("producer-0")
            audit = _audit(1, shape, out, fallback)
            assert audit.counted == audit.entered

            # 2. No NodeGroup: the scan goes to the full disk; it stays in RAM, the record says what to free.
            tree.stop("ng")
            client.wait_for(lambda items: not items, prefix="/nodegroups/", timeout=30)
            request_scan(client, 2, small_shape, seed=SEED, loss_rate=LOSS)
            client.wait_for(
                lambda it: len([k for k in it if k.startswith("/scans/2/producers/")]) == 4, "/scans/2/", 60
            )
            held = [client.get(k) for k in client.items("/scans/2/producers/")]
            assert {r["status"] for r in held} == {"held"}
            assert all("free space there" in r["disk_error"] for r in held)
            assert all(r["held_bytes"] > 0 for r in held)

            # 3. The operator frees space: the held scan is written on the next retry, nothing lost.
            (fallback / "filler").unlink()
            subprocess.run(["mount", "-o", "remount,size=256m", str(fallback)], check=True)
            client.wait_for(
                lambda it: {v.get("status") for k, v in it.items() if "/producers/" in k} == {"done"},
                "/scans/2/",
                timeout=60,
            )
            audit = _audit(2, small_shape, out, fallback)
            assert audit.on_disk == audit.entered


def test_ack_verdicts():
    """The decision every producer makes from the store's records (a pure function)."""
    from stemstream.scans.ack import ACK, REPLAY, WAIT, ack_verdict
    from stemstream.scans.records import ScanPlan

    plan = ScanPlan(7, (2, 2), "stream", members=("a", "b"), n_sectors=2, ack="counted")
    producers = {f"/scans/7/producers/p{m}": {"producer": f"p{m}", "status": "done", "sent_total": 4}
                 for m in range(2)}  # fmt: skip
    counted = {"status": "counted", "path": "x.h5", "messages": {"received": 8}}
    live = {"a", "b"}
    assert ack_verdict(plan, producers, live)[0] == WAIT
    assert ack_verdict(plan, {**producers, "/scans/7/counted": counted}, live)[0] == ACK
    short = {**counted, "messages": {"received": 7}}
    assert ack_verdict(plan, {**producers, "/scans/7/counted": short}, live) == (
        REPLAY,
        "7 of 8 sent sectors reached the NodeGroups",
    )
    partial = {**counted, "status": "partial", "ranks_missing": [1]}
    assert ack_verdict(plan, {**producers, "/scans/7/counted": partial}, live)[0] == REPLAY
    assert ack_verdict(plan, producers, {"a"})[0] == REPLAY  # b left before counting
    degraded = {**producers, "/scans/7/producers/p0": {"producer": "p0", "degraded": True, "error": "x"}}
    assert ack_verdict(plan, degraded, live)[0] == REPLAY
    one = {"/scans/7/producers/p0": producers["/scans/7/producers/p0"], "/scans/7/counted": counted}
    assert ack_verdict(plan, one, live)[0] == WAIT  # counted, but a producer's record is not in yet

    received_plan = ScanPlan(7, (2, 2), "stream", members=("a",), n_sectors=2, ack="received")
    ng = {"/scans/7/nodegroups/a": {"status": "received", "received": 8}}
    assert ack_verdict(received_plan, {**producers, **ng}, {"a"})[0] == ACK
    timeout = {"/scans/7/nodegroups/a": {"status": "timeout", "received": 5}}
    assert ack_verdict(received_plan, {**producers, **timeout}, {"a"})[0] == REPLAY


def test_a_scan_goes_to_one_counting_job(tmp_path: Path):
    from stemstream.scans.plan import decide_plan
    from stemstream.store.registry import Record

    def ng(uid: str, job: str | None, size: int, started: float) -> Record:
        extra = {"job": job, "job_size": size, "ack": "counted"} if job else {}
        return Record(uid=uid, role="nodegroup", status="ready", started=started, extra=extra)

    class Reg:
        def __init__(self, records: list[Record]) -> None:
            self.records = records

        def members(self, role: str, status: str | None = None) -> list[Record]:
            if role == "aggregator":
                eps = {f"{k}_{m}": "tcp://x:1" for k in ("data", "info") for m in range(4)}
                return [Record(uid="agg", role="aggregator", status="ready", endpoints=eps)]
            return self.records

    old = [ng("a-0", "A", 2, 1.0), ng("a-1", "A", 2, 1.0)]
    plan = decide_plan(Reg(old), 1, (4, 4), decided_by="t")
    assert plan.members == ("a-0", "a-1") and plan.ack == "counted"
    # A newer job, complete: the next scan goes to it alone (counting gathers within one MPI job).
    plan = decide_plan(Reg([*old, ng("b-0", "B", 1, 2.0)]), 2, (4, 4), decided_by="t")
    assert plan.members == ("b-0",) and "job B" in plan.reason
    # A newer job still registering its ranks: the complete one keeps the scans meanwhile.
    plan = decide_plan(Reg([*old, ng("c-0", "C", 4, 3.0)]), 3, (4, 4), decided_by="t")
    assert plan.members == ("a-0", "a-1")
    # Test consumers without a job: one group, acknowledged on receipt.
    plan = decide_plan(Reg([ng("x", None, 1, 1.0), ng("y", None, 1, 2.0)]), 4, (4, 4), decided_by="t")
    assert plan.members == ("x", "y") and plan.ack == "received"

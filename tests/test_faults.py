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

import numpy as np
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
    wait_until,
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


def _sim(scan: int, shape: tuple[int, int], seed: int = SEED) -> Any:
    from stemstream.sim import FourDCameraSim

    return FourDCameraSim(shape, scan_number=scan, seed=seed, loss_rate=LOSS)


def _raw_files(directory: Path, scan: int) -> list[Path]:
    return sorted(directory.glob(f"data_scan{scan:010d}_module*.data"))


def _acquisition(client: Any, scan: int) -> str:
    """The acquisition id of the newest acquisition of ``scan`` (its plan's ``start``)."""
    return str((client.get(f"/scans/{scan}") or {}).get("start") or "")


def _counted_file(client: Any, scan: int, out: Path, start: str) -> Path | None:
    """The scan's counted file, as its counted record names it (when that record is this acquisition's)."""
    record = client.get(f"/scans/{scan}/counted") or {}
    if record.get("start") == start and record.get("path"):
        return Path(record["path"])
    plain = out / f"scan_{scan}_counted.h5"
    return plain if plain.exists() else None


def _audit(
    scan: int,
    shape: tuple[int, int],
    counted_file: Path | None,
    raw_files: list[Path],
    *,
    seed: int = SEED,
    start: str | None = None,
) -> Any:
    """Every sector that entered, proven counted (the file's events are stempy's on the frame as it entered)
    or on disk (byte for byte), from the simulator's regenerated scan."""
    from stemstream.audit import audit_scan

    result = audit_scan(scan, _sim(scan, shape, seed), counted_file=counted_file, raw_files=raw_files, start=start)
    print(result.line())
    assert result.unaccounted == 0, f"{result.line()}; e.g. {result.examples}; frames differ {result.frames_differ}"
    assert result.clean, result.line()
    assert result.entered + result.lost_upstream == 4 * shape[0] * shape[1]
    return result


def _start_producers(
    tree: ProcessTree, address: str, fallback: Path, env: dict[str, str] | None = None, *, suffix: str = ""
) -> None:
    for m in range(4):
        tree.start(f"producer-{m}{suffix}", "producer", "--store", address, "--sector", m, "--threads", 2,
                   "--fallback-dir", fallback, "--uid", f"p{m}", env=env)  # fmt: skip


def _start_counting(tree: ProcessTree, name: str, address: str, out: Path, count: int = 2) -> None:
    # Counting gets more time than the data plane's 6 s: on 2 busy cores a rank may count for longer than
    # that without a word, and rank 0 would write the scan off as partial.
    # The stempy engine, as these tests were written for: its counting worker processes and shared memory.
    tree.start(name, "nodegroup", "--store", address, "--consumer", "count", "--count", count, "--uid", name,
               "--output-dir", out, "--scan-timeout", 30, "--engine", "stempy")  # fmt: skip


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


def _wait_released(client: Any, scan: int, timeout: float = 60, acked: int = 1) -> None:
    """Until every producer has let go of what it held (``acked`` scans acknowledged)."""
    from stemstream.store import Registry

    registry = Registry(client)

    def released(_: dict[str, Any]) -> bool:
        producers = registry.members("producer")
        return len(producers) == 4 and all(
            p.counts.get("acked", 0) >= acked and p.counts.get("held_bytes", 1) == 0 for p in producers
        )

    try:
        client.wait_for(released, prefix="/producers/", timeout=timeout)
    except TimeoutError:
        print({p.uid: p.counts for p in registry.members("producer")})
        raise


def _kill(tree: ProcessTree, name: str) -> None:
    os.killpg(tree.procs[name].pid, signal.SIGKILL)
    tree.procs[name].wait(10)


def _segments(pid: int) -> list[str]:
    """The shared-memory segments counting process ``pid`` created (named after it: nodes.workers)."""
    return sorted(p.name for p in Path("/dev/shm").glob(f"stemstream-{pid}-*"))


def test_a_nodegroup_killed_mid_scan_four_times_larger_than_the_hold_is_replayed_to_disk(tmp_path: Path):
    """SIGKILL of a counting NodeGroup process (that process only: its counting workers must follow it)
    while the producers stream a scan four times larger than what they may hold in RAM: everything past
    the hold is written through to disk as it is sent, the replay completes from there, and the audit
    finds every sector that entered on disk, byte for byte; nothing is unprotected."""
    import psutil

    from stemstream.counting.files import count_raw_files
    from stemstream.plane.requests import request_scan
    from stemstream.store import Registry

    shape, out, fallback = (24, 24), tmp_path / "counted", tmp_path / "fallback"
    sector = 144 * 576 * 2
    hold = shape[0] * shape[1] // 4  # sectors: a quarter of each producer's share of the scan
    env = {**ENV, "STEMSTREAM_HOLD_BYTES": str(hold * sector)}
    with ProcessTree(tmp_path / "logs", env=env) as tree:
        address = start_store(tree)
        tree.start("aggregator", "aggregator", "--store", address)
        _start_counting(tree, "ng-a", address, out)
        _start_producers(tree, address, fallback)
        with store_client(address) as client:
            _wait_members(client, nodegroups=2)
            victim = psutil.Process(tree.procs["ng-a"].pid)
            workers = [p for p in victim.children() if "resource_tracker" not in " ".join(p.cmdline())]
            assert workers and _segments(victim.pid), "the counting NodeGroup has worker processes and segments"
            request_scan(client, 1, shape, seed=SEED, loss_rate=LOSS)
            _wait_received(client, 600)
            os.kill(victim.pid, signal.SIGKILL)  # the NodeGroup process alone: no goodbye, its frames are gone
            tree.procs["ng-a"].wait(10)

            # Clean death: its counting workers exit and its shared memory is unlinked within seconds.
            _, alive = psutil.wait_procs(workers, timeout=10)
            assert not alive, f"counting workers outlived their NodeGroup: {alive}"
            wait_until(lambda: not _segments(victim.pid), 15, "the dead NodeGroup's segments unlinked")

            record = wait_scan_status(client, 1, ("on_disk",), timeout=90)
            assert record["replayed"] and "left before the scan was acknowledged" in record["replay_reason"]
            raw = _raw_files(fallback, 1)
            assert sorted(record["fallback_paths"]) == [str(p) for p in raw]
            audit = _audit(1, shape, None, raw, start=record["start"])
            assert audit.on_disk == audit.entered  # the whole scan: the hold, then the disk
            counts = [p.counts for p in Registry(client).members("producer")]
            assert all(c["unprotected"] == 0 and c["written_through"] > 0 for c in counts), counts

            # What the session does next with it: count it from its files (count_fallback_scan's path).
            counted = count_raw_files(raw, out / "scan_1_counted.h5", scan_number=1)
            assert counted.exists()

            # A NodeGroup comes back: the next scan streams, is counted, acknowledged; the files it was
            # written through to are deleted again.
            _start_counting(tree, "ng-b", address, out, count=1)
            _wait_members(client, nodegroups=1)
            request_scan(client, 2, shape, seed=SEED, loss_rate=LOSS)
            record = wait_scan_status(client, 2, ("received",), timeout=60)
            assert record["members"] == ["ng-b"]
            _wait_released(client, 2)
            audit = _audit(2, shape, _counted_file(client, 2, out, record["start"]), [], start=record["start"])
            assert audit.counted == audit.entered and not _raw_files(fallback, 2)


def test_a_killed_counting_job_leaves_no_shared_memory_once_one_starts_again(tmp_path: Path):
    """The whole counting job SIGKILLed (its workers and resource tracker with it: nobody left to unlink its
    shared memory): the next counting process on the node unlinks the orphaned segments when it starts."""
    with ProcessTree(tmp_path / "logs", env=ENV) as tree:
        address = start_store(tree)
        _start_counting(tree, "ng", address, tmp_path / "counted", count=1)
        with store_client(address) as client:
            _wait_members(client, nodegroups=1, aggregators=0, producers=0)
            pid = tree.procs["ng"].pid
            orphans = _segments(pid)
            assert orphans
            _kill(tree, "ng")
            assert _segments(pid) == orphans  # killed with everything it started: the segments are left
            _start_counting(tree, "ng-next", address, tmp_path / "counted", count=1)
            wait_until(lambda: not _segments(pid), 60, "the orphaned segments unlinked")
            client.wait_for(lambda it: "/nodegroups/ng-next" in it, prefix="/nodegroups/", timeout=60)
            assert "unlinked" in tree.log("ng-next") and _segments(tree.procs["ng-next"].pid)  # its own stay


def test_producers_stopped_mid_scan_write_what_they_hold_and_exit_within_seconds(tmp_path: Path):
    """SIGTERM to the producers while their sends are blocked (the aggregator frozen mid-scan) and they hold
    what they sent: each gives up its sends at once, says what it does, writes everything it was given
    and exits within 5 s plus that write, not after its 30 s send timeout."""
    import time

    from stemstream.plane.requests import request_scan
    from stemstream.scans.records import ProducerScanRecord
    from stemstream.store import Registry
    from stemstream.wire.rawfile import find_acquisitions, read_sectors

    shape, fallback = (24, 24), tmp_path / "fallback"
    env = {**ENV, "STEMSTREAM_SNDHWM": "8", "STEMSTREAM_RCVHWM": "8"}
    with ProcessTree(tmp_path / "logs", env=env) as tree:
        address = start_store(tree)
        tree.start("aggregator", "aggregator", "--store", address)
        tree.start("ng", "nodegroup", "--store", address, "--uid", "ng", "--consumer", "null", "--delay", "0.01")
        _start_producers(tree, address, fallback, env={"STEMSTREAM_SCAN_TIMEOUT_S": "30"})
        with store_client(address) as client:
            registry = Registry(client)
            _wait_members(client, nodegroups=1)
            request_scan(client, 1, shape, seed=SEED, loss_rate=LOSS)
            _wait_received(client, 60)
            os.killpg(tree.procs["aggregator"].pid, signal.SIGSTOP)  # frozen: the producers' sends block
            try:
                seen: list[int] = []

                def data_stopped() -> bool:  # nothing reaches the NodeGroup any more: the sends are blocked
                    seen.append(sum(r.counts.get("received", 0) for r in registry.members("nodegroup")))
                    return len(seen) > 3 and seen[-1] == seen[-4]

                wait_until(data_stopped, 30, "the data flow to stop")
                assert not client.items("/scans/1/producers/")  # the producers are still sending
                start = _acquisition(client, 1)
                for m in range(4):  # all at once, as a host shutting down would
                    os.killpg(tree.procs[f"producer-{m}"].pid, signal.SIGTERM)
                began = time.monotonic()
                for m in range(4):
                    assert tree.wait_exit(f"producer-{m}", 60) == 0
                took = time.monotonic() - began
            finally:
                os.killpg(tree.procs["aggregator"].pid, signal.SIGCONT)
            records = [ProducerScanRecord.from_record(v) for v in client.items("/scans/1/producers/").values()]
    print(f"the producers exited {took:.1f} s after SIGTERM")
    assert took < 6, f"the producers took {took:.1f} s to exit"  # 5 s, and < 100 MB to write: under 1 s
    for m in range(4):
        log = tree.log(f"producer-{m}")
        assert "shutting down with" in log and "writing them to disk" in log and "held scans written" in log, log
    # Everything a producer was given is on disk, byte for byte (what the DAQ never handed over did not enter).
    assert len(records) == 4 and all(r.start == start for r in records), records
    (acquisition,) = find_acquisitions(fallback, 1)
    sim = _sim(1, shape)
    on_disk = {m: 0 for m in range(4)}
    for r in read_sectors(acquisition.paths):
        assert np.array_equal(r.data, sim.sector(r.frame_number, r.sector))
        on_disk[r.sector] += 1
    assert on_disk == {r.sector: r.sent_total + r.written for r in records}, (on_disk, records)
    assert acquisition.complete


def test_a_reused_scan_number_is_counted_as_a_second_scan(tmp_path: Path):
    """The DAQ restarts (its producers too, same UIDs) and counts from 1 again: scan 1 is a new scan. The
    long-lived aggregator and NodeGroups take it (nothing rejected as late), the old records acknowledge
    nothing, the counted file gets a suffix, and each file holds its own acquisition's events."""
    import time

    from stemstream.plane.requests import request_scan
    from stemstream.store import Registry

    shape, out, fallback = (12, 12), tmp_path / "counted", tmp_path / "fallback"
    with ProcessTree(tmp_path / "logs", env=ENV) as tree:
        address = start_store(tree)
        tree.start("aggregator", "aggregator", "--store", address)
        _start_counting(tree, "ng", address, out)
        _start_producers(tree, address, fallback)
        with store_client(address) as client:
            registry = Registry(client)
            _wait_members(client, nodegroups=2)
            request_scan(client, 1, shape, seed=SEED, loss_rate=LOSS)
            first = wait_scan_status(client, 1, ("received",), timeout=60)
            _wait_released(client, 1)
            first_file = _counted_file(client, 1, out, first["start"])
            assert first_file == out / "scan_1_counted.h5"

            # The DAQ restarts: producers stop (quickly: nothing is held) and come back under the same UIDs.
            for m in range(4):
                began = time.monotonic()
                assert tree.stop(f"producer-{m}", grace=15) == 0
                assert time.monotonic() - began < 5, "a producer took more than 5 s to exit on SIGTERM"
            client.wait_for(lambda items: not items, prefix="/producers/", timeout=30)
            _start_producers(tree, address, fallback, suffix="-again")
            _wait_members(client, nodegroups=2)
            request_scan(client, 1, shape, seed=SEED + 1, loss_rate=LOSS)  # other pixels: a mix-up would show

            def second_received(items: dict[str, Any]) -> bool:
                rec = items.get("/scans/1") or {}
                return rec.get("start") != first["start"] and rec.get("status") == "received"

            second = client.wait_for(second_received, prefix="/scans/1", timeout=60)["/scans/1"]
            assert second["start"] != first["start"] and second["raw_dir"] == f"scan_1_{second['start']}"
            _wait_released(client, 1)
            assert client.get(f"/scans/1/acquisitions/{first['start']}")["start"] == first["start"]
            second_file = _counted_file(client, 1, out, second["start"])
            assert second_file == out / f"scan_1_{second['start']}_counted.h5"
            for m in range(4):  # acknowledged by this acquisition's own counted file, not the earlier one's
                assert f"acknowledged (counted in {second_file})" in tree.log(f"producer-{m}-again")
            rejected = {r.uid: r.counts.get("rejected", -1) for r in registry.members("nodegroup")}
            rejected["aggregator"] = registry.members("aggregator")[0].counts.get("rejected", -1)

    assert all(n == 0 for n in rejected.values()), rejected  # nothing "late", nothing else
    first_audit = _audit(1, shape, first_file, [], start=first["start"])
    second_audit = _audit(1, shape, second_file, [], seed=SEED + 1, start=second["start"])
    assert first_audit.counted == first_audit.entered and second_audit.counted == second_audit.entered
    assert not list(fallback.rglob("*.data"))  # both acknowledged by their own counted files


def test_the_aggregator_killed_and_restarted_mid_scan(tmp_path: Path):
    from stemstream.plane.requests import request_scan

    # Scan 1 is larger than the NodeGroups' counting buffers (512 frames): the producers are still held back
    # by counting when the aggregator dies, so it dies mid-scan however fast the machine is.
    big, shape, out, fallback = (40, 40), (12, 12), tmp_path / "counted", tmp_path / "fallback"
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
            audit = _audit(1, big, None, _raw_files(fallback, 1), start=record["start"])
            assert audit.on_disk == audit.entered

            request_scan(client, 2, shape, seed=SEED, loss_rate=LOSS)  # through the restarted aggregator
            record = wait_scan_status(client, 2, ("received",), timeout=90)
            _wait_released(client, 2)
            audit = _audit(2, shape, _counted_file(client, 2, out, record["start"]), [], start=record["start"])
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
            audit = _audit(1, shape, _counted_file(client, 1, out, record["start"]), [], start=record["start"])
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
    from stemstream.wire.rawfile import find_acquisitions

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

            # 1. RAM and disk both fail: streaming goes on, the scan is still counted, and the sectors that
            #    neither could take are unprotected, said loudly (the one case the promise excludes).
            request_scan(client, 1, shape, seed=SEED, loss_rate=LOSS)
            record = wait_scan_status(client, 1, ("received",), timeout=90)
            _wait_released(client, 1)
            counts = [p.counts for p in registry.members("producer")]
            assert all(c["disk_errors"] >= 1 and c["unprotected"] > 0 for c in counts), counts
            log = tree.log("producer-0")
            assert "the disk or quota is full: free space there" in log and "UNPROTECTED" in log
            audit = _audit(1, shape, _counted_file(client, 1, out, record["start"]), [], start=record["start"])
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
            (acquisition,) = find_acquisitions(fallback, 2)
            audit = _audit(2, small_shape, None, list(acquisition.paths), start=_acquisition(client, 2))
            assert audit.on_disk == audit.entered


def test_the_disk_full_part_way_through_a_record_then_freed_mid_scan(tmp_path: Path):
    """The fallback disk fills up while a scan is being written (a record cut off part way), and space is
    freed while the scan goes on: the writers continue exactly where the last whole record ended, the files
    are fsynced and marked complete, stempy reads every frame from them, and every sector is there."""
    import os as _os

    import stempy.io

    from stemstream.plane.requests import request_scan
    from stemstream.wire.rawfile import find_acquisitions

    shape = (16, 16)
    record_bytes = 16 + 144 * 576 * 2
    with _small_disk(tmp_path / "small", "4m") as fallback, ProcessTree(tmp_path / "logs", env=ENV) as tree:
        st = _os.statvfs(fallback)
        room = 2 * record_bytes + record_bytes // 3  # two records and a third of one: one will be cut off
        (fallback / "filler").write_bytes(b"\0" * (st.f_bavail * st.f_frsize - room))
        address = start_store(tree)
        _start_producers(tree, address, fallback)
        with store_client(address) as client:
            _wait_members(client, nodegroups=0, aggregators=0)
            # A microscope's dwell time keeps the scan going for a few seconds: space is freed mid-scan.
            request_scan(client, 3, shape, seed=SEED, loss_rate=LOSS, dwell_s=0.02)
            wait_until(
                lambda: all("free space there" in tree.log(f"producer-{m}") for m in range(4)),
                30,
                "every producer to hit the full disk",
                tree,
            )
            assert len(client.items("/scans/3/producers/")) < 4, "the scan was over before the disk was freed"
            (fallback / "filler").unlink()
            subprocess.run(["mount", "-o", "remount,size=256m", str(fallback)], check=True)
            record = wait_scan_status(client, 3, ("on_disk", "incomplete"), timeout=60)
            assert record["status"] == "on_disk", record

        (acquisition,) = find_acquisitions(fallback, 3)
        assert acquisition.complete and len(acquisition.paths) == 4
        # Byte for byte first: a file with a gap would crash stempy's reader rather than fail it.
        audit = _audit(3, shape, None, list(acquisition.paths), start=record["start"])
        assert audit.on_disk == audit.entered
        sim = _sim(3, shape)
        reader = stempy.io.reader(
            [str(p) for p in acquisition.paths], version=stempy.io.FileVersion.VERSION5, backend="multi-pass"
        )
        lost = sim.lost_sectors()
        for i in range(sim.n_frames):
            blocks = reader.read_frames(i)
            if all((i, m) in lost for m in range(4)):
                assert not blocks
                continue
            assert np.array_equal(np.asarray(blocks[0].data).reshape(576, 576), expected_frame(sim, i)), i


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

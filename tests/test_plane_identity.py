"""Scan identity, the RAM hold and the DAQ ring, in process against a real (in-process) store: a NodeGroup and
an aggregator fed by raw sockets with a reused scan number; a producer's keeper spilling, writing through and
failing only when RAM and disk both fail; a source whose ring wraps before a replay reads it."""

from __future__ import annotations

import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq

from plane_helpers import pull_socket, push_socket
from stemstream.nodes.consumer import CollectingConsumer
from stemstream.plane.aggregator import Aggregator
from stemstream.plane.nodegroup import NodeGroup
from stemstream.plane.retention import ScanKeeper
from stemstream.scans.records import ROUTE_STREAM, ProducerScanRecord, ScanPlan
from stemstream.store import Registry, StoreClient
from stemstream.wire.protocol import EndMessage, ExpectMessage, SectorHeader, decode_data_message, decode_info
from stemstream.wire.rawfile import read_sectors

SECTOR_SHAPE = (144, 576)
SECTOR_BYTES = 144 * 576 * 2


def _sector(value: int) -> np.ndarray:
    return np.full(SECTOR_SHAPE, value, dtype=np.uint16)


def _wait(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


# ------------------------------------------------------------------------------------ reused scan numbers


def _one_frame_scan(info: zmq.Socket, data: list[zmq.Socket], scan: int, start: str, value: int, uid: str) -> None:
    """A 1x1 scan for NodeGroup ``uid``: expect, the frame's four sectors (pixels = value + sector), end.
    ``start`` "" sends no acquisition id (a producer that omits it)."""
    for m in range(4):
        info.send(ExpectMessage("agg", scan, m, 1, (1, 1), (uid,), {uid: 1}, start=start).encode())
    for m in range(4):
        data[m].send_multipart([SectorHeader(scan, 0, m, (1, 1), start=start).encode(), _sector(value + m)])
    for m in range(4):
        info.send(EndMessage("agg", scan, m, {uid: 1}, 0, start=start).encode())


def test_a_nodegroup_takes_a_reused_scan_number_as_a_new_scan(client: StoreClient, ctx: zmq.Context):
    consumer = CollectingConsumer()
    ng = NodeGroup(consumer, client, uid="ng-r", expect_timeout=5, scan_timeout_s=30).start()
    try:
        info = push_socket(ctx, ng.endpoints["info"])
        data = [push_socket(ctx, ng.endpoints[f"data_{m}"]) for m in range(4)]
        _one_frame_scan(info, data, 4, "a1", 10, "ng-r")
        assert ng.wait_scan(4, 10, start="a1").status == "received"
        frame = consumer.wait_scan(4, 5)
        assert frame is not None and int(consumer.frames[4][0][0, 0]) == 10

        # The same scan number again, a new acquisition: not late, a scan of its own.
        _one_frame_scan(info, data, 4, "b2", 20, "ng-r")
        assert ng.wait_scan(4, 10, start="b2").status == "received"
        _wait(lambda: int(consumer.frames[4][0][0, 0]) == 20, 5, "the second acquisition's frame")

        # Without an id, a message means the newest acquisition of its number: that one is closed, so late.
        data[0].send_multipart([SectorHeader(4, 0, 0, (1, 1)).encode(), _sector(0)])
        _wait(lambda: ng.counts().get("rejected.late") == 1, 5, "late")
        assert client.get("/scans/4/nodegroups/ng-r")["start"] == "b2"
        assert ng.counts()["rejected"] == 1
    finally:
        ng.stop()


def test_a_new_acquisition_closes_the_open_one_before_it_begins(client: StoreClient, ctx: zmq.Context):
    """The DAQ restarted in the middle of scan 6 and begins scan 6 again: the open acquisition is closed as a
    timeout (the consumer ends it before the new one begins) and its late data is rejected."""
    events: list[tuple[str, int]] = []

    class Recording(CollectingConsumer):
        def begin_scan(self, scan: Any) -> None:
            events.append(("begin", scan.scan_number))
            super().begin_scan(scan)

        def end_scan(self, scan_number: int, summary: Any) -> None:
            events.append(("end", scan_number))
            super().end_scan(scan_number, summary)

    ng = NodeGroup(Recording(), client, uid="ng-s", expect_timeout=5, scan_timeout_s=30).start()
    try:
        info = push_socket(ctx, ng.endpoints["info"])
        data = [push_socket(ctx, ng.endpoints[f"data_{m}"]) for m in range(4)]
        for m in range(4):  # acquisition x1 of scan 6: two frames announced, one sector arrives
            info.send(ExpectMessage("agg", 6, m, 1, (1, 2), ("ng-s",), {"ng-s": 2}, start="x1").encode())
        data[0].send_multipart([SectorHeader(6, 0, 0, (1, 2), start="x1").encode(), _sector(1)])
        _wait(lambda: ng.counts()["received"] == 1, 5, "the first sector")
        _one_frame_scan(info, data, 6, "y2", 30, "ng-s")
        old = ng.wait_scan(6, 10, start="x1")
        new = ng.wait_scan(6, 10, start="y2")
        assert old.status == "timeout" and old.received == 1 and new.status == "received"
        assert events == [("begin", 6), ("end", 6), ("begin", 6), ("end", 6)]
        data[1].send_multipart([SectorHeader(6, 0, 1, (1, 2), start="x1").encode(), _sector(1)])
        _wait(lambda: ng.counts().get("rejected.late") == 1, 5, "the closed acquisition's data rejected")
    finally:
        ng.stop()


def test_the_aggregator_routes_a_reused_scan_number(client: StoreClient, ctx: zmq.Context):
    registry = Registry(client, ttl=5.0)
    d, d_ep = pull_socket(ctx)
    i, i_ep = pull_socket(ctx)
    reg = registry.register("nodegroup", "ng-z", status="ready", endpoints={"data_0": d_ep, "info": i_ep})
    agg = Aggregator(client, n_sectors=1, uid="agg-r", registry=registry).start()
    try:
        data = push_socket(ctx, agg.endpoints["data_0"])
        info = push_socket(ctx, agg.endpoints["info_0"])
        for start, value in (("s1", 5), ("s2", 7)):
            info.send(ExpectMessage("p/0", 2, 0, 1, (1, 1), ("ng-z",), {"ng-z": 1}, start=start).encode())
            data.send_multipart([SectorHeader(2, 0, 0, (1, 1), start=start).encode(), _sector(value)])
            info.send(EndMessage("p/0", 2, 0, {"ng-z": 1}, 0, start=start).encode())
            expect = decode_info(i.recv())
            header, payload = decode_data_message(d.recv_multipart())
            end = decode_info(i.recv())
            assert expect.start == header.start == end.start == start
            assert np.frombuffer(payload, np.uint16)[0] == value
            agg.wait_scan(2, 10, start=start)
        assert agg.counts()["rejected"] == 0 and agg.counts()["routed"] == 2
        data.send_multipart([SectorHeader(2, 0, 0, (1, 1)).encode(), _sector(0)])  # no id: the newest, closed
        _wait(lambda: agg.counts().get("rejected.late") == 1, 5, "late")
        assert client.get("/scans/2/aggregator/0")["start"] == "s2"
    finally:
        agg.stop()
        reg.close()


# -------------------------------------------------------------------------------------------- the hold


def _keeper(client: StoreClient, hold_sectors: int) -> ScanKeeper:
    return ScanKeeper(
        client,
        Registry(client),
        0,
        producer_uid="p0",
        sector_nbytes=SECTOR_BYTES,
        n_sectors=4,
        sector_shape=SECTOR_SHAPE,
        leader=False,
        hold_bytes=hold_sectors * SECTOR_BYTES,
        ack_timeout_s=60,
        retry_s=0.2,
        poll_s=0.05,
    ).start()


def _plan(scan: int, shape: tuple[int, int] = (4, 4), start: str = "a") -> ScanPlan:
    return ScanPlan(scan, shape, ROUTE_STREAM, members=("ng",), start=start)


def test_past_the_hold_the_oldest_scans_are_spilled_and_the_current_one_written_through(
    client: StoreClient, tmp_path: Path
):
    keeper = _keeper(client, hold_sectors=4)
    try:
        old = keeper.open(_plan(1), tmp_path / "d")
        for f in range(3):
            keeper.keep(old, f, _sector(100 + f))
        assert keeper.held_bytes() == 3 * SECTOR_BYTES and not list(tmp_path.rglob("*.data"))
        new = keeper.open(_plan(2), tmp_path / "d")
        for f in range(10):
            keeper.keep(new, f, _sector(200 + f))
        counts = keeper.snapshot()
        # The older scan went to disk first; then the current one, which is written through from then on.
        assert old.spilled and new.spilled and counts["spilled"] == 2
        assert counts["unprotected"] == 0 and counts["written_through"] > 0
        assert keeper.held_bytes() <= 4 * SECTOR_BYTES
        on_disk = {
            (r.scan_number, r.frame_number): int(r.data[0, 0])
            for scan in (1, 2)
            for r in read_sectors(sorted(tmp_path.rglob(f"data_scan{scan:010d}_*.data")))
        }
        held = set(new.ram)
        assert {f for s, f in on_disk if s == 2} | held == set(range(10))
        assert all(v == (100 if s == 1 else 200) + f for (s, f), v in on_disk.items())
        assert {f for s, f in on_disk if s == 1} == {0, 1, 2}
    finally:
        keeper.close(0)


def test_two_acquisitions_of_a_scan_number_held_at_once_are_settled_each_on_its_own(
    client: StoreClient, tmp_path: Path
):
    """The DAQ begins scan 2 again while its earlier acquisition still waits for its acknowledgement (found
    by the soak): the earlier one is acknowledged by its own records, the newer one, whose NodeGroup left,
    is replayed to disk; neither is lost track of."""
    keeper = ScanKeeper(
        client, Registry(client), 0, producer_uid="p0", sector_nbytes=SECTOR_BYTES, n_sectors=1,
        sector_shape=SECTOR_SHAPE, leader=False, hold_bytes=64 * SECTOR_BYTES, ack_timeout_s=60, retry_s=0.2,
        gone_grace_s=0.2, poll_s=0.05,
    ).start()  # fmt: skip
    try:
        plans = {start: ScanPlan(2, (1, 4), ROUTE_STREAM, members=("ng",), n_sectors=1, start=start)
                 for start in ("early", "late")}  # fmt: skip
        held = {start: keeper.open(plan, tmp_path) for start, plan in plans.items()}
        for start, h in held.items():
            for f in range(4):
                keeper.keep(h, f, _sector(f))
            record = ProducerScanRecord(producer="p0", sector=0, status="done", sent_total=4, start=start)
            keeper.sending_done(h, record)
        # Only the early acquisition's NodeGroup reports (the late one's is gone): its records, its start.
        client.set("/scans/2/producers/p0", {"producer": "p0", "status": "done", "sent_total": 4, "start": "early"})
        client.set("/scans/2/nodegroups/ng", {"status": "received", "received": 4, "start": "early"})
        assert keeper.wait_settled(2, 10, start="early") == "acked"
        assert keeper.wait_settled(2, 10, start="late") == "on_disk"
        assert keeper.held_bytes() == 0 and keeper.pending() == []
        records = list(read_sectors(_files(tmp_path)))
        assert sorted(r.frame_number for r in records) == [0, 1, 2, 3]  # the late one's, replayed
    finally:
        keeper.close(0)


def test_a_sector_is_unprotected_only_when_ram_and_disk_both_fail(client: StoreClient, tmp_path: Path):
    broken = tmp_path / "not-a-directory"
    broken.write_bytes(b"")
    keeper = _keeper(client, hold_sectors=3)
    try:
        held = keeper.open(_plan(3), broken / "sub")
        for f in range(3):
            keeper.keep(held, f, _sector(f))
        assert keeper.snapshot()["unprotected"] == 0  # in RAM
        keeper.keep(held, 3, _sector(3))  # RAM full, the disk refuses it: the one case left
        counts = keeper.snapshot()
        assert counts["unprotected"] == 1 and counts["disk_errors"] >= 1
        assert held.unprotected == 1 and sorted(held.ram) == [0, 1, 2]
    finally:
        keeper.close(0)


def _files(root: Path) -> list[Path]:
    return sorted(root.rglob("*.data"))


# ----------------------------------------------------------------------------------------- the DAQ's ring


class Ring:
    """A DAQ's RAM ring of ``slots`` sectors: frame f lives in slot f % slots until a later frame takes it."""

    def __init__(self, slots: int, with_generation: bool) -> None:
        self.data = np.zeros((slots, *SECTOR_SHAPE), np.uint16)
        self.writes = np.zeros(slots, np.int64)
        self.slots = slots
        if with_generation:
            self.generation = lambda f: int(self.writes[f % self.slots])

    def put(self, f: int) -> np.ndarray:
        slot = f % self.slots
        self.data[slot] = 1000 + f
        self.writes[slot] += 1
        return self.data[slot]

    def __call__(self, f: int) -> np.ndarray:
        return self.data[f % self.slots]


@pytest.mark.parametrize("with_generation", [True, False], ids=["generation", "checksum"])
def test_a_ring_that_wrapped_before_the_replay_is_reported_and_never_written(
    client: StoreClient, tmp_path: Path, with_generation: bool
):
    ring = Ring(4, with_generation)
    keeper = _keeper(client, hold_sectors=16)
    try:
        held = keeper.open(_plan(5, (2, 4), start="w"), tmp_path, source=ring)
        for f in range(4):
            keeper.keep(held, f, ring.put(f))
        if not with_generation:
            assert held.ram[0] == zlib.crc32(np.full(SECTOR_SHAPE, 1000, np.uint16))
        for f in (4, 5):  # the DAQ goes on: frames 4 and 5 take the slots of frames 0 and 1
            ring.put(f)
        keeper._replay(held, "the test replays it")
        record = keeper.sending_done(held, ProducerScanRecord(producer="p0", sector=0, status="done", start="w"))
        assert record.start == "w"
        assert keeper.wait_settled(5, 10) == "on_disk"
        assert keeper.snapshot()["wrapped"] == 2 and held.wrapped == 2
        records = {r.frame_number: r.data for r in read_sectors(_files(tmp_path))}
        assert sorted(records) == [2, 3]  # 0 and 1 would have been frames 4 and 5's pixels: not written
        assert all(int(records[f][0, 0]) == 1000 + f for f in (2, 3))
        _wait(lambda: (client.get("/scans/5/replay/0") or {}).get("wrapped") == 2, 5, "the replay record")
        _wait(lambda: (client.get("/scans/5/producers/p0") or {}).get("wrapped") == 2, 5, "the producer record")
    finally:
        keeper.close(0)

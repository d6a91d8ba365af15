"""In-process tests of the data-plane pieces, against a real (in-process) store server: a NodeGroup fed by
raw sockets that play the aggregator, an aggregator between raw producer and NodeGroup sockets, the
producer's plan and disk fallback, scan requests and scan records."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
import zmq

from plane_helpers import pull_socket, push_socket
from stemstream.nodes.consumer import CollectingConsumer, NullConsumer, ScanSummary
from stemstream.plane.aggregator import Aggregator
from stemstream.plane.nodegroup import NodeGroup
from stemstream.plane.producer import Producer
from stemstream.plane.requests import ScanRequests, request_scan
from stemstream.scans import keys
from stemstream.scans.plan import ROUTE_DISK, ROUTE_STREAM, ScanPlan, scan_closed_inputs, scan_details, summarize_scan
from stemstream.store import Registry, StoreClient
from stemstream.wire.protocol import (
    EndMessage,
    ExpectMessage,
    SectorHeader,
    decode_data_message,
    decode_info,
)

SECTOR_BYTES = 144 * 576 * 2


def _sector(f: int, m: int) -> np.ndarray:
    return np.full((144, 576), f * 4 + m + 1, dtype=np.uint16)


def _data(scan: int, f: int, m: int, shape: tuple[int, int]) -> list[Any]:
    return [SectorHeader(scan, f, m, shape).encode(), _sector(f, m)]


def _wait(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


# ------------------------------------------------------------------------------------------ NodeGroup


def test_nodegroup_assembles_rejects_and_hands_incomplete_frames_over_last(
    client: StoreClient,
    ctx: zmq.Context,
):
    consumer = CollectingConsumer()
    ng = NodeGroup(consumer, client, uid="ng-a", expect_timeout=10, scan_timeout_s=30).start()
    try:
        info = push_socket(ctx, ng.endpoints["info"])
        data = [push_socket(ctx, ng.endpoints[f"data_{m}"]) for m in range(4)]
        scan, shape, members = 5, (4, 4), ("ng-a", "ng-b")  # ng-a is index 0: the even frames
        mine = list(range(0, 16, 2))
        lost = {(2, 1), (4, 3)} | {(6, m) for m in range(4)}  # frame 6 lost entirely
        # Data before its expect: held until the expect comes.
        data[0].send_multipart(_data(scan, 0, 0, shape))
        expected = [sum(1 for f in mine if (f, m) not in lost) for m in range(4)]
        for m in range(4):
            info.send(
                ExpectMessage(
                    "agg",
                    scan,
                    m,
                    2,
                    shape,
                    members,
                    {"ng-a": expected[m], "ng-b": 8},
                ).encode()
            )
        # Bad input, all of which must be rejected and counted without disturbing the scan. Sent before the
        # rest of the data on the same sockets, so the scan cannot be closed before they are looked at.
        data[1].send(b"one part only")
        data[1].send_multipart([b"\x93garbage", b"x" * SECTOR_BYTES])
        data[1].send_multipart([SectorHeader(scan, 8, 1, shape).encode(), b"short"])
        data[1].send_multipart(_data(scan, 8, 2, shape))  # sector 2's header on sector 1's socket
        data[2].send_multipart(_data(scan, 1, 2, shape))  # frame 1 is ng-b's
        data[0].send_multipart(_data(scan, 0, 0, shape))  # a duplicate
        info.send(b"not msgpack")
        for m in range(4):
            for f in mine:
                if (f, m) not in lost and (f, m) != (0, 0):
                    data[m].send_multipart(_data(scan, f, m, shape))
        for m in range(4):
            info.send(EndMessage("agg", scan, m, {"ng-a": expected[m], "ng-b": 8}, 3).encode())

        summary = ng.wait_scan(scan, timeout=20)
        results = consumer.wait_scan(scan, timeout=5)
    finally:
        ng.stop()

    assert summary.status == "received"
    assert summary.expected == summary.received == sum(expected)
    assert summary.frames_complete == 5 and summary.frames_incomplete == 3
    assert summary.incomplete == [(2, (1,)), (4, (3,)), (6, (0, 1, 2, 3))]
    assert summary.lost_upstream == 6
    assert summary.rejected == {"not_mine": 1, "duplicate": 1}  # wrong_sector is not attributed to a scan
    assert sorted(results.order) == mine
    assert set(results.order[-3:]) == {2, 4, 6}, "incomplete frames come after every complete one"
    for f in mine:
        frame = consumer.frames[scan][f]
        for m in range(4):
            want = 0 if (f, m) in lost else f * 4 + m + 1
            assert (frame[m * 144 : (m + 1) * 144] == want).all(), (f, m)
    counts = ng.counts()
    assert counts["rejected.malformed"] == 3
    assert counts["rejected.info_malformed"] == 1
    assert counts["rejected"] == 7
    assert counts["received"] == sum(expected) and counts["frames_incomplete"] == 3
    rec = client.get(f"/scans/{scan}/nodegroups/ng-a")
    assert rec["status"] == "received" and rec["received"] == sum(expected)


def test_nodegroup_rejects_data_without_expect_and_late_data(client: StoreClient, ctx: zmq.Context):
    ng = NodeGroup(NullConsumer(), client, uid="ng-t", expect_timeout=0.3, scan_timeout_s=30).start()
    try:
        info = push_socket(ctx, ng.endpoints["info"])
        d0 = push_socket(ctx, ng.endpoints["data_0"])
        d0.send_multipart(_data(9, 0, 0, (1, 1)))  # scan 9 never gets an expect
        _wait(lambda: ng.counts().get("rejected.no_expect") == 1, 5, "no_expect")
        for m in range(4):
            info.send(
                ExpectMessage(
                    "agg",
                    10,
                    m,
                    1,
                    (1, 1),
                    ("ng-t",),
                    {"ng-t": 1 if m == 0 else 0},
                ).encode()
            )
            info.send(EndMessage("agg", 10, m, {"ng-t": 1 if m == 0 else 0}, 0 if m == 0 else 1).encode())
        d0.send_multipart(_data(10, 0, 0, (1, 1)))
        summary = ng.wait_scan(10, timeout=10)
        assert summary.frames_incomplete == 1 and summary.incomplete == [(0, (1, 2, 3))]
        d0.send_multipart(_data(10, 0, 0, (1, 1)))  # after the scan closed
        _wait(lambda: ng.counts().get("rejected.late") == 1, 5, "late")
    finally:
        ng.stop()


def test_unknown_scan_numbers_hold_a_nodegroup_socket_once_not_once_each(client: StoreClient, ctx: zmq.Context):
    # Data of a scan no expect names waits expect_timeout for it; once such a wait ran out, new unknown numbers
    # are rejected at once for a while: 50 of them cost no more than one (they took 50 x expect_timeout).
    ng = NodeGroup(NullConsumer(), client, uid="ng-u", expect_timeout=1.0, scan_timeout_s=30).start()
    try:
        info = push_socket(ctx, ng.endpoints["info"])
        d0 = push_socket(ctx, ng.endpoints["data_0"])
        t0 = time.monotonic()
        for n in range(100, 151):
            d0.send_multipart(_data(n, 0, 0, (1, 1)))
        _wait(lambda: ng.counts().get("rejected.no_expect") == 51, 10, "51 unknown scans rejected")
        assert time.monotonic() - t0 < 5
        for m in range(4):  # an honest scan, its expect first (as the aggregator sends it): it arrives
            info.send(ExpectMessage("agg", 11, m, 1, (1, 1), ("ng-u",), {"ng-u": 1}).encode())
        _wait(lambda: ng.counts()["scans_open"] == 1, 5, "scan 11 open")
        data = [d0] + [push_socket(ctx, ng.endpoints[f"data_{m}"]) for m in range(1, 4)]
        for m in range(4):
            data[m].send_multipart(_data(11, 0, m, (1, 1)))
            info.send(EndMessage("agg", 11, m, {"ng-u": 1}, 0).encode())
        summary = ng.wait_scan(11, timeout=10)
        assert summary.frames_complete == 1 and summary.received == 4
    finally:
        ng.stop()


def test_a_nodegroup_caps_its_open_scans(client: StoreClient, ctx: zmq.Context):
    # Each expect naming this NodeGroup begins a scan in its consumer, whose per-scan state follows the scan's
    # declared size: at most STEMSTREAM_MAX_OPEN_SCANS at once; a closed one makes room again.
    from stemstream.config import load_settings

    ng = NodeGroup(NullConsumer(), client, uid="ng-c", settings=load_settings(max_open_scans=3)).start()
    try:
        info = push_socket(ctx, ng.endpoints["info"])
        for n in range(5):  # sector 0's expect only: the scans stay open
            info.send(ExpectMessage("agg", 20 + n, 0, 1, (1, 1), ("ng-c",), {"ng-c": 1}).encode())
        _wait(lambda: ng.counts().get("rejected.info_too_many_scans") == 2, 5, "too many scans")
        assert ng.counts()["scans_open"] == 3
        for m in range(4):  # scan 20 closes (nothing was sent)
            if m:
                info.send(ExpectMessage("agg", 20, m, 1, (1, 1), ("ng-c",), {"ng-c": 0}).encode())
            info.send(EndMessage("agg", 20, m, {"ng-c": 0}, 1).encode())
        ng.wait_scan(20, timeout=10)
        info.send(ExpectMessage("agg", 30, 0, 1, (1, 1), ("ng-c",), {"ng-c": 1}).encode())
        _wait(lambda: ng.counts()["scans_open"] == 3, 5, "room for scan 30")
        assert ng.counts()["rejected.info_too_many_scans"] == 2
    finally:
        ng.stop()


# ------------------------------------------------------------------------------------------ aggregator


def test_aggregator_combines_expects_holds_early_data_routes_and_rejects(
    client: StoreClient,
    ctx: zmq.Context,
):
    registry = Registry(client, ttl=5.0)
    groups: dict[str, dict[str, zmq.Socket]] = {}
    regs = []
    for uid in ("ng-x", "ng-y"):
        d, d_ep = pull_socket(ctx)
        i, i_ep = pull_socket(ctx)
        groups[uid] = {"data": d, "info": i}
        regs.append(
            registry.register(
                "nodegroup",
                uid,
                status="ready",
                endpoints={"data_0": d_ep, "info": i_ep},
            )
        )
    agg = Aggregator(client, n_sectors=1, uid="agg-t", registry=registry, pending_limit=4).start()
    try:
        data = [push_socket(ctx, agg.endpoints["data_0"]) for _ in range(2)]
        info = [push_socket(ctx, agg.endpoints["info_0"]) for _ in range(2)]
        scan, shape, members = 3, (2, 4), ("ng-x", "ng-y")
        # Thread 0's data arrives before any expect: held (the pending buffer is 4 deep).
        for f in (0, 2):
            data[0].send_multipart(_data(scan, f, 0, shape))
        data[0].send(b"one part")
        data[0].send_multipart([b"\xc1", b"x" * SECTOR_BYTES])
        data[0].send_multipart([SectorHeader(scan, 4, 0, shape).encode(), b"x" * 10])
        info[0].send(b"\x00garbage")
        for t in range(2):  # thread t: frames f % 2 == t, so thread 0 -> ng-x only, thread 1 -> ng-y only
            expected = {"ng-x": 4 if t == 0 else 0, "ng-y": 4 if t == 1 else 0}
            info[t].send(ExpectMessage(f"p/{t}", scan, 0, 2, shape, members, expected).encode())
        for f in range(8):
            if f not in (0, 2):
                data[f % 2].send_multipart(_data(scan, f, 0, shape))
        for t in range(2):
            sent = {"ng-x": 4 if t == 0 else 0, "ng-y": 4 if t == 1 else 0}
            info[t].send(EndMessage(f"p/{t}", scan, 0, sent, 0).encode())

        for uid, want in (("ng-x", [0, 2, 4, 6]), ("ng-y", [1, 3, 5, 7])):
            expect = decode_info(groups[uid]["info"].recv())
            assert isinstance(expect, ExpectMessage)
            assert expect.expected == {"ng-x": 4, "ng-y": 4} and expect.members == members
            got = []
            for _ in range(4):
                header, payload = decode_data_message(groups[uid]["data"].recv_multipart())
                got.append(header.frame_number)
                assert np.frombuffer(payload, np.uint16)[0] == header.frame_number * 4 + 1
            assert sorted(got) == want
            end = decode_info(groups[uid]["info"].recv())
            assert isinstance(end, EndMessage) and end.sent == {"ng-x": 4, "ng-y": 4}
        agg.wait_scan(scan, timeout=10)
        counts = agg.counts()
        assert counts["routed"] == 8 and counts["routed.ng-x"] == 4 and counts["routed.ng-y"] == 4
        assert counts["rejected.malformed"] == 2 and counts["rejected.wrong_size"] == 1
        assert counts["rejected.info_malformed"] == 1 and counts["received"] == 11
        _wait(lambda: (client.get(f"/scans/{scan}/aggregator/0") or {}).get("status") == "done", 5, "record")
        rec = client.get(f"/scans/{scan}/aggregator/0")
        assert rec["routed_total"] == rec["sent_total"] == 8
    finally:
        agg.stop()
        for reg in regs:
            reg.close()


# ------------------------------------------------------------------------------------------ producer


def test_producer_plans_disk_without_nodegroups_and_writes_raw_files(client: StoreClient, tmp_path: Path):
    from stemstream.sim import FourDCameraSim
    from stemstream.wire.rawfile import read_sectors

    def make_sim() -> FourDCameraSim:
        return FourDCameraSim((4, 5), scan_number=7, seed=3, loss_rate=0.05)

    sim = make_sim()
    producers = [Producer(client, m, threads=2, uid=f"p{m}", fallback_dir=tmp_path).start() for m in range(4)]
    results = []
    try:

        def run(p: Producer) -> None:
            own = make_sim()  # the simulator is not thread-safe: one per producer
            session = p.begin_scan(7, (4, 5))
            assert session.route == ROUTE_DISK
            for t in range(2):
                frames = [f for f in session.share(t) if not own.is_lost(f, p.sector)]
                with session.sender(t, frames) as tx:
                    for f in frames:
                        tx.send(f, own.sector(f, p.sector))
            results.append(session.finish())

        threads = [threading.Thread(target=run, args=(p,)) for p in producers[1:]]
        for th in threads:
            th.start()
        run(producers[0])  # the leader decides; the others wait for its plan
        for th in threads:
            th.join(10)
        producers[0].wait_closed(10)
    finally:
        for p in producers:
            p.close(drain_timeout=0)
    record = client.get(keys.scan(7))
    assert record["route"] == ROUTE_DISK and record["status"] == "on_disk"
    assert record["lost_upstream"] == len(sim.lost_sectors()) > 0
    assert record["sent"] == 4 * 20 - len(sim.lost_sectors())
    paths = record["fallback_paths"]
    assert len(paths) == 4
    seen = set()
    for rec in read_sectors(sorted(paths)):
        assert np.array_equal(rec.data, sim.sector(rec.frame_number, rec.sector))
        seen.add((rec.frame_number, rec.sector))
    assert seen == {(f, m) for f in range(20) for m in range(4)} - sim.lost_sectors()


def test_sender_checks_what_it_is_given(client: StoreClient, tmp_path: Path):
    p = Producer(client, 0, threads=2, uid="p-check", fallback_dir=tmp_path, n_sectors=1).start()
    try:
        session = p.begin_scan(11, (2, 2))
        with pytest.raises(ValueError, match="frame % 2 == 0"):
            session.sender(0, [1])
        with session.sender(0, [0]) as tx:
            with pytest.raises(ValueError, match="not announced"):
                tx.send(2, np.zeros((144, 576), np.uint16))
            tx.send(0, np.zeros((144, 576), np.uint16))
        result = session.finish()  # slot 1 never sent: its share counts as lost
        assert result.sent == {"disk": 1} and result.lost_upstream == 3
    finally:
        p.close(drain_timeout=0)


def test_scan_requests_are_seen_once_and_old_ones_ignored(client: StoreClient):
    request_scan(client, 1, (2, 2))
    _wait(lambda: client.get("/control/scan") is not None, 5, "request")
    requests = ScanRequests(client).start()
    try:
        request_scan(client, 2, (3, 3), seed=4)
        req = requests.get(timeout=5)
        assert (
            req is not None
            and req.scan_number == 2
            and req.scan_shape
            == (
                3,
                3,
            )
            and req.extra["seed"] == 4
        )
        client.set("/control/scan", req.to_record())  # the same request again (a re-sync): not a new scan
        assert requests.get(timeout=0.3) is None
        again = request_scan(client, 2, (3, 3))  # scan number 2 once more (a DAQ restart): a new scan
        req = requests.get(timeout=5)
        assert req is not None and req.scan_number == 2 and req.requested_at == again.requested_at
    finally:
        requests.close()


def test_scan_summary_adds_up_the_sub_records():
    plan = ScanPlan(4, (2, 2), ROUTE_STREAM, members=("a", "b"), n_sectors=2)
    items = {
        "/scans/4/producers/p0": {"status": "done", "sent_total": 3, "lost_upstream": 1},
        "/scans/4/producers/p1": {"status": "done", "sent_total": 4, "lost_upstream": 0},
        "/scans/4/aggregator/0": {"routed_total": 3, "rejected": 0},
        "/scans/4/aggregator/1": {"routed_total": 4, "rejected": 1},
        "/scans/4/nodegroups/a": {"status": "received", "received": 4, "frames_complete": 2, "rejected": {}},
        "/scans/4/nodegroups/b": {
            "status": "received",
            "received": 3,
            "frames_incomplete": 1,
            "rejected": {},
        },
    }
    out = summarize_scan(plan, items)
    assert out["status"] == "received" and out["sent"] == out["routed"] == out["received"] == 7
    assert out["lost_upstream"] == 1 and out["rejected"] == 1
    items["/scans/4/nodegroups/b"] = {"status": "timeout", "received": 2}
    assert summarize_scan(plan, items)["status"] == "incomplete"


def test_a_scan_closes_only_once_every_aggregator_thread_has_reported_its_share():
    # The NodeGroups can report "received" before the last aggregator thread's closing record lands;
    # a scan closed then would record fewer messages routed than sent.
    plan = ScanPlan(5, (2, 2), ROUTE_STREAM, members=("a",), n_sectors=2)
    ready = scan_closed_inputs(plan)
    items: dict[str, Any] = {
        "/scans/5/producers/p0": {"status": "done", "sent_total": 4},
        "/scans/5/producers/p1": {"status": "done", "sent_total": 4},
        "/scans/5/nodegroups/a": {"status": "received", "received": 8},
        "/scans/5/aggregator/0": {"status": "done", "routed_total": 4},
        "/scans/5/aggregator/1": {"status": "routing", "routed_total": 0},
    }
    assert not ready(items)
    items["/scans/5/aggregator/1"] = {"status": "done", "routed_total": 4}
    assert ready(items)
    assert summarize_scan(plan, items)["routed"] == 8
    # A NodeGroup that timed out: the aggregator may be gone too, so the scan closes without its records.
    items["/scans/5/nodegroups/a"] = {"status": "timeout", "received": 6}
    del items["/scans/5/aggregator/1"]
    assert ready(items)


def test_scan_details_groups_sub_records(client: StoreClient):
    client.set("/scans/12", {"route": "disk"})
    client.set("/scans/12/producers/p0", {"sent_total": 1})
    client.set("/scans/120", {"route": "stream"})
    _wait(lambda: client.get("/scans/120") is not None, 5, "records")
    details = scan_details(client, 12)
    assert details["scan"] == {"route": "disk"} and details["producers"] == {"p0": {"sent_total": 1}}


def test_summary_to_dict_is_msgpack_friendly():
    s = ScanSummary(4, 4, 1, 1, [(3, (0, 2))], 2, {"late": 1}, 1.0, 2.0)
    assert msgpack.unpackb(msgpack.packb(s.to_dict()))["incomplete"] == [[3, [0, 2]]]


def test_a_failed_scan_is_recorded_and_the_producer_serves_the_next(client: StoreClient, tmp_path: Path):
    from stemstream.sim.producer import serve

    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    stop = threading.Event()
    results: list[Any] = []
    worker = threading.Thread(
        target=lambda: results.extend(
            serve(client, 0, threads=1, uid="p-serve", stop=stop, loss_rate=0.0, fallback_dir=tmp_path)
        )
    )
    worker.start()
    try:
        _wait(lambda: client.get("/producers/p-serve") is not None, 10, "registration")
        request_scan(client, 21, (2, 2), fallback_dir=str(not_a_dir))
        client.wait_for(lambda items: "/scans/21/producers/p-serve" in items, "/scans/21/", timeout=10)
        held = client.get("/scans/21/producers/p-serve")
        # The disk refused the scan: it stays in RAM (retried), and the record says what to fix.
        assert held["status"] == "held" and "fallback directory" in held["disk_error"]
        assert held["held_bytes"] == 4 * 144 * 576 * 2
        request_scan(client, 22, (2, 2), fallback_dir=str(tmp_path / "ok"))
        client.wait_for(lambda items: "/scans/22/producers/p-serve" in items, "/scans/22/", timeout=10)
        assert client.get("/scans/22/producers/p-serve")["status"] == "done"
        not_a_dir.unlink()  # the operator frees the path: the held scan is written on the next retry
        client.wait_for(
            lambda items: (items.get("/scans/21/producers/p-serve") or {}).get("status") == "done",
            "/scans/21/",
            timeout=15,
        )
        assert sorted(p.name for p in not_a_dir.glob("*.data")) == ["data_scan0000000021_module0_00000.data"]
    finally:
        stop.set()
        worker.join(10)
    assert [r.scan_number for r in results] == [21, 22]


def test_a_slot_ahead_waits_for_its_sibling_until_the_sibling_leaves(client: StoreClient, tmp_path: Path):
    p = Producer(
        client, 0, threads=2, uid="p-skew", fallback_dir=tmp_path, n_sectors=1, max_skew=4, skew_wait_s=30
    ).start()
    try:
        session = p.begin_scan(31, (8, 8))
        buf = np.zeros((144, 576), np.uint16)
        sent_one, release = threading.Event(), threading.Event()
        errors: list[BaseException] = []

        def behind() -> None:
            with session.sender(1, [1]) as tx:
                tx.send(1, buf)
                sent_one.set()
                release.wait(10)

        def ahead() -> None:
            try:
                with session.sender(0, [20]) as tx:
                    tx.send(20, buf)  # 19 frames ahead of its sibling: waits
            except BaseException as exc:
                errors.append(exc)

        slow, fast = threading.Thread(target=behind), threading.Thread(target=ahead)
        slow.start()
        assert sent_one.wait(5)
        fast.start()
        _wait(lambda: 0 in session._at, 5, "slot 0 to reach its send")
        fast.join(0.3)
        assert fast.is_alive(), "slot 0 should wait while its sibling is 19 frames behind"
        release.set()  # the sibling leaves: nobody is behind any more
        slow.join(5)
        fast.join(5)
        assert not fast.is_alive() and not errors
        assert p._counts["skew_timeouts"] == 0
        session.finish()
    finally:
        p.close(drain_timeout=0)


def test_a_planned_aggregator_that_is_not_there_sends_the_scan_to_disk(client: StoreClient, tmp_path: Path):
    """A stale aggregator record (it died within its TTL): the expect is never taken, the scan degrades to
    disk and every sector the producer had is in its raw file."""
    from stemstream.sim.site import free_port_block
    from stemstream.wire.rawfile import read_sectors

    registry = Registry(client)
    nowhere = {f"{k}_0": f"tcp://127.0.0.1:{free_port_block(1)}" for k in ("data", "info")}
    agg = registry.register("aggregator", "agg-gone", status="ready", endpoints=nowhere)
    ng = registry.register("nodegroup", "ng-x", status="ready", endpoints={})
    p = Producer(client, 0, threads=1, uid="p-deg", fallback_dir=tmp_path, n_sectors=1, send_timeout=0.5).start()
    try:
        session = p.begin_scan(41, (2, 3))
        assert session.route == "stream"
        with session.sender(0) as tx:
            for f in range(6):
                tx.send(f, np.full((144, 576), f, np.uint16))
        result = session.finish()
        record = client.get("/scans/41/producers/p-deg")
        assert record["degraded"] and "could not stream to the aggregator" in record["error"]
        assert record["sent_total"] == 0 and record["written"] == 6 and result.sent == {"ng-x": 0, "disk": 6}
        assert p.keeper is not None and p.keeper.wait_settled(41, 15) == "on_disk"
        frames = [s.frame_number for s in read_sectors(sorted(tmp_path.glob("data_scan0000000041_*.data")))]
        assert sorted(frames) == list(range(6))
    finally:
        p.close(drain_timeout=0)
        agg.close()
        ng.close()

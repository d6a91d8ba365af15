"""A scan whose data stopped mid-way (its aggregator was killed) must not stall the scans after it.

In-process and fast: a NodeGroup fed by raw sockets, and a CountingService (one rank, LocalTransport) fed as
a NodeGroup feeds it. The scan that stopped stays open until the NodeGroup's scan timeout closes it; until
then the next scan must stream and be counted as usual, and the stopped one must then be written as counted
(its missing frames incomplete), not written off as partial.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq

from plane_helpers import push_socket
from stemstream.counting.params import CountingParams
from stemstream.nodes import batches
from stemstream.nodes.config import CountingConfig
from stemstream.nodes.consumer import ScanInfo, ScanSummary
from stemstream.nodes.ranks import LocalTransport
from stemstream.nodes.service import CountingService
from stemstream.plane.nodegroup import NodeGroup
from stemstream.store import StoreClient
from stemstream.wire.protocol import EndMessage, ExpectMessage, SectorHeader

SECTOR = (4, 16)  # small sectors: the mechanics are those of (144, 576), the test is fast
FRAME = (4 * SECTOR[0], SECTOR[1])


class _Frames:
    """A FrameConsumer of small frames that records what it is handed."""

    def __init__(self) -> None:
        self.ready: dict[int, list[int]] = {}
        self.summaries: dict[int, ScanSummary] = {}
        self._lock = threading.Lock()

    def begin_scan(self, scan: ScanInfo) -> None:
        with self._lock:
            self.ready[scan.scan_number] = []

    def frame_buffer(self, scan_number: int, frame_number: int) -> np.ndarray:
        return np.zeros(FRAME, np.uint16)

    def frame_ready(self, scan_number: int, frame_number: int, missing_sectors: tuple[int, ...]) -> None:
        with self._lock:
            self.ready[scan_number].append(frame_number)

    def end_scan(self, scan_number: int, summary: ScanSummary) -> None:
        self.summaries[scan_number] = summary


def test_a_sector_whose_data_stopped_does_not_hold_up_the_other_sectors_or_the_next_scan(
    client: StoreClient, ctx: zmq.Context
):
    # Scan 1: sector 1's data stops after 4 frames (the aggregator died); the other sectors' data of the whole
    # scan is already queued on their sockets, far more than max_lag ahead. Behind it on the same sockets:
    # scan 2, complete. Each queued message of scan 1 used to wait lag_wait_s (1 s) for sector 1, which never
    # moves: scan 2 came ~60 s late, and scan 1, "touched" by every one of them, never timed out meanwhile.
    uid, shape, n = "ng-s", (8, 8), 64
    consumer = _Frames()
    ng = NodeGroup(
        consumer, client, uid=uid, sector_shape=SECTOR, max_lag=4, lag_wait_s=1.0, scan_timeout_s=3.0
    ).start()
    try:
        info = push_socket(ctx, ng.endpoints["info"])
        data = [push_socket(ctx, ng.endpoints[f"data_{m}"]) for m in range(4)]

        def send(scan: int, f: int, m: int) -> None:
            payload = np.full(SECTOR, scan * 1000 + f * 4 + m, np.uint16)
            data[m].send_multipart([SectorHeader(scan, f, m, shape, sector_shape=SECTOR).encode(), payload])

        for m in range(4):
            info.send(ExpectMessage("agg", 1, m, 1, shape, (uid,), {uid: n}).encode())
        for f in range(n):
            for m in range(4):
                if m != 1 or f < 4:
                    send(1, f, m)
        for m in range(4):
            info.send(ExpectMessage("agg", 2, m, 1, shape, (uid,), {uid: n}).encode())
        for f in range(n):
            for m in range(4):
                send(2, f, m)
        for m in range(4):
            info.send(EndMessage("agg", 2, m, {uid: n}).encode())

        t0 = time.monotonic()
        second = ng.wait_scan(2, timeout=30)
        took = time.monotonic() - t0
        first = ng.wait_scan(1, timeout=30)
        lag_timeouts = ng.counts()["lag_timeouts"]
    finally:
        ng.stop()

    assert second.status == "received" and second.frames_complete == n, second
    assert took < 15, f"scan 2 took {took:.1f} s behind the stopped scan"
    # A wait is not repeated while the sector waited for does not move: once per sector, not once per message.
    assert lag_timeouts <= 6, lag_timeouts
    assert first.status == "timeout" and first.frames_complete == 4 and first.frames_incomplete == n - 4
    assert first.received == 4 + 3 * n


def _noise(rng: np.random.Generator) -> np.ndarray:
    return np.clip(rng.normal(100, 4, FRAME), 0, None).astype(np.uint16)


def _service(tmp_path: Path, store: StoreClient, **overrides: Any) -> CountingService:
    settings: dict[str, Any] = {
        "output_dir": tmp_path,
        "params": CountingParams(engine="stempy", threshold_samples=4, threshold_window=4),
        "workers": 0,  # in this process: no worker start-up
        "batch": 4,
        "max_buffered_frames": 16,  # 4 batches
        "frame_shape": FRAME,
        "scan_timeout_s": 60.0,
        "preview_interval_s": 0.2,
    }
    settings.update(overrides)
    config = CountingConfig(**settings)
    return CountingService(config, transport=LocalTransport(), uids=["ng-a"], store=store).start()


def _summary(n_complete: int, incomplete: list[tuple[int, tuple[int, ...]]], status: str) -> ScanSummary:
    return ScanSummary(
        expected=0, received=0, frames_complete=n_complete, frames_incomplete=len(incomplete),
        incomplete=incomplete, status=status,
    )  # fmt: skip


def test_frames_stuck_in_assembly_do_not_throttle_the_next_scans_buffers(
    tmp_path: Path, client: StoreClient, monkeypatch: pytest.MonkeyPatch
):
    # The frames a scan had in assembly when its data stopped hold their batches until the NodeGroup's scan
    # timeout (minutes in production). frame_buffer waited _BUFFER_WAIT_S for every batch past the pool's cap
    # although counting could free none of them: the next scan got a few frames a second. Here that wait is
    # made long enough to fail the test outright, so that timing noise cannot hide it.
    monkeypatch.setattr(batches, "BUFFER_WAIT_S", 60.0)
    rng = np.random.default_rng(3)
    service = _service(tmp_path, client)
    consumer = service.consumer("ng-a")
    shape, n = (8, 8), 64
    stuck = range(8, 32)  # 24 frames, 6 batches: more than the whole pool
    done = threading.Event()

    def nodegroup() -> None:
        consumer.begin_scan(ScanInfo(1, shape, FRAME, 4, ("ng-a",), 0))
        for f in range(8):
            consumer.frame_buffer(1, f)[...] = _noise(rng)
            consumer.frame_ready(1, f, ())
        for f in stuck:  # first sectors in, the rest never came
            consumer.frame_buffer(1, f)[: SECTOR[0]] = _noise(rng)[: SECTOR[0]]
        consumer.begin_scan(ScanInfo(2, shape, FRAME, 4, ("ng-a",), 0))
        for f in range(n):
            consumer.frame_buffer(2, f)[...] = _noise(rng)
            consumer.frame_ready(2, f, ())
        consumer.end_scan(2, _summary(n, [], "received"))
        done.set()

    feeder = threading.Thread(target=nodegroup, daemon=True)
    try:
        feeder.start()
        assert done.wait(20), "the next scan's frames waited for buffers that only the stopped scan held"
        second = service.wait_written(2, timeout=20)
        assert second["status"] == "counted" and second["frames_incomplete"] == 0, second

        # The NodeGroup's scan timeout closes scan 1: what came, the rest incomplete; then it is written.
        incomplete: list[tuple[int, tuple[int, ...]]] = []
        for f in stuck:
            consumer.frame_ready(1, f, (1, 2, 3))
            incomplete.append((f, (1, 2, 3)))
        for f in range(stuck.stop, n):
            consumer.frame_buffer(1, f)[...] = 0
            consumer.frame_ready(1, f, (0, 1, 2, 3))
            incomplete.append((f, (0, 1, 2, 3)))
        consumer.end_scan(1, _summary(8, incomplete, "timeout"))
        first = service.wait_written(1, timeout=20)
    finally:
        service.stop()
        feeder.join(5)
    assert first["status"] == "counted", first
    assert first["frames_incomplete"] == n - 8


def test_rank_0_does_not_write_off_a_scan_its_nodegroups_still_hold_open(tmp_path: Path, client: StoreClient):
    # Nothing of scan 1 can be counted while its NodeGroup waits for data that will not come (the aggregator
    # died): rank 0 must wait for the NodeGroup's own scan timeout, not write the scan off as partial after
    # its scan_timeout_s of silence, the same timeout counted from an earlier moment.
    rng = np.random.default_rng(4)
    service = _service(tmp_path, client, scan_timeout_s=1.5)
    consumer = service.consumer("ng-a")
    shape, n = (4, 4), 16
    try:
        consumer.begin_scan(ScanInfo(1, shape, FRAME, 4, ("ng-a",), 0))
        for f in range(6):
            consumer.frame_buffer(1, f)[...] = _noise(rng)
            consumer.frame_ready(1, f, ())
        consumer.frame_buffer(1, 6)[: SECTOR[0]] = _noise(rng)[: SECTOR[0]]
        with pytest.raises(TimeoutError):
            service.wait_written(1, timeout=4.5)  # three of rank 0's timeouts
        consumer.frame_ready(1, 6, (1, 2, 3))
        incomplete = [(6, (1, 2, 3))]
        for f in range(7, n):
            consumer.frame_buffer(1, f)[...] = 0
            consumer.frame_ready(1, f, (0, 1, 2, 3))
            incomplete.append((f, (0, 1, 2, 3)))
        consumer.end_scan(1, _summary(6, incomplete, "timeout"))
        record = service.wait_written(1, timeout=10)
    finally:
        service.stop()
    assert record["status"] == "counted", record
    assert record["frames_incomplete"] == n - 6
    assert client.get("/scans/1/counted")["status"] == "counted"


def test_previews_expire_from_the_store(tmp_path: Path, client: StoreClient):
    # Previews (~256 KiB per rank per scan) had no TTL and filled a counting job's store quota after ~250 scans.
    rng = np.random.default_rng(5)
    service = _service(tmp_path, client, preview_ttl_s=1.0)
    consumer = service.consumer("ng-a")
    shape, n = (4, 4), 16
    key = "/scans/1/preview/0"
    try:
        consumer.begin_scan(ScanInfo(1, shape, FRAME, 4, ("ng-a",), 0))
        for f in range(n):
            consumer.frame_buffer(1, f)[...] = _noise(rng)
            consumer.frame_ready(1, f, ())
        consumer.end_scan(1, _summary(n, [], "received"))
        service.wait_written(1, timeout=20)
        client.wait_for(lambda items: key in items, prefix="/scans/1/", timeout=10)
    finally:
        service.stop()
    client.wait_for(lambda items: key not in items, prefix="/scans/1/", timeout=10)  # expired, nothing deleted it
    assert client.get("/scans/1/counted")["status"] == "counted"  # the scan's other records stay


def test_a_scan_with_absent_frames_is_written_partial(tmp_path: Path, client: StoreClient):
    # A NodeGroup hands over no more empty frames than frames that arrived (plane.nodelife); the rest are
    # "absent": not in the file's incomplete list, so the file must not claim to be the whole scan.
    rng = np.random.default_rng(6)
    service = _service(tmp_path, client)
    consumer = service.consumer("ng-a")
    try:
        consumer.begin_scan(ScanInfo(1, (4, 4), FRAME, 4, ("ng-a",), 0))
        for f in range(4):
            consumer.frame_buffer(1, f)[...] = _noise(rng)
            consumer.frame_ready(1, f, ())
        summary = _summary(4, [], "timeout")
        summary.absent = summary.frames_incomplete = 12
        consumer.end_scan(1, summary)
        record = service.wait_written(1, timeout=20)
    finally:
        service.stop()
    assert record["status"] == "partial" and "12 frames never arrived" in record["error"], record

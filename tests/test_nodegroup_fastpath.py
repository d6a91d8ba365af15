"""The NodeGroup's byte-template fast path: once a sector has a scan's template, data that is not this NodeGroup's,
of the wrong size, duplicated or of another scan is still rejected as on the full path."""

from __future__ import annotations

import numpy as np
import zmq

from stemstream.nodes.consumer import CollectingConsumer
from stemstream.plane.nodegroup import NodeGroup
from stemstream.store import StoreClient
from stemstream.wire.protocol import EndMessage, ExpectMessage, SectorHeader

SHAPE = (2, 4)  # 8 frames; this NodeGroup (index 0 of 2) gets the even ones
MINE = [0, 2, 4, 6]


def _data(f: int, m: int, scan: int = 9) -> list[object]:
    header = SectorHeader(scan, f, m, SHAPE, timestamp_ns=1_700_000_000_000_000_000, start="a1").encode()
    return [header, np.full((144, 576), f * 4 + m + 1, dtype=np.uint16)]


def test_rejections_after_the_template_match_the_full_path(client: StoreClient):
    ctx = zmq.Context()
    consumer = CollectingConsumer()
    ng = NodeGroup(consumer, client, uid="ng-a", expect_timeout=0.5, scan_timeout_s=30).start()
    try:
        info = ctx.socket(zmq.PUSH)
        info.connect(ng.endpoints["info"])
        data = []
        for m in range(4):
            sock = ctx.socket(zmq.PUSH)
            sock.connect(ng.endpoints[f"data_{m}"])
            data.append(sock)
        for m in range(4):
            info.send(ExpectMessage("agg", 9, m, 1, SHAPE, ("ng-a", "ng-b"), {"ng-a": 4, "ng-b": 4}, "a1").encode())
        for m in range(4):
            data[m].send_multipart(_data(0, m))  # the template of each sector
        data[1].send_multipart(_data(1, 1))  # not_mine
        data[1].send_multipart(_data(0, 1))  # duplicate
        data[1].send_multipart([_data(2, 1)[0], b"\x00" * 100])  # malformed: the wrong size
        data[1].send_multipart(_data(2, 1, scan=10))  # a scan no expect named: rejected after expect_timeout
        for m in range(4):
            for f in MINE[1:]:
                data[m].send_multipart(_data(f, m))
        for m in range(4):
            info.send(EndMessage("agg", 9, m, {"ng-a": 4, "ng-b": 4}, 0, "a1").encode())
        summary = ng.wait_scan(9, timeout=20)
        results = consumer.wait_scan(9, timeout=5)
        counts = ng.counts()
    finally:
        ng.stop()
        ctx.destroy(linger=0)
    assert summary.status == "received" and summary.frames_complete == 4
    assert sorted(results.order) == MINE
    for f in MINE:
        for m in range(4):
            assert (consumer.frames[9][f][m * 144 : (m + 1) * 144] == f * 4 + m + 1).all()
    assert summary.rejected == {"not_mine": 1, "duplicate": 1}
    assert counts["rejected.malformed"] == 1 and counts["rejected.no_expect"] == 1

"""The aggregator's fast path in a running aggregator: once a scan's template is made, duplicates, frames out of
the scan, wrong sizes and sectors are still rejected as the full decoder would, and headers that differ from the
template only in their encoding are still routed (through the full decoder)."""

from __future__ import annotations

import msgpack
import numpy as np
import zmq

from stemstream.plane.aggregator import Aggregator
from stemstream.store import Registry, StoreClient
from stemstream.wire.protocol import EndMessage, ExpectMessage, SectorHeader, decode_data_message

SHAPE = (4, 4)
START = "acq-1"


def _sock(ctx: zmq.Context, kind: int) -> zmq.Socket:
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDTIMEO, 5000)
    sock.setsockopt(zmq.RCVTIMEO, 5000)
    return sock


def _payload(f: int) -> np.ndarray:
    return np.full((144, 576), f + 1, dtype=np.uint16)


def _header(f: int, sector: int = 0) -> bytes:
    return SectorHeader(5, f, sector, SHAPE, timestamp_ns=1_700_000_000_000_000_000 + f, start=START).encode()


def test_after_the_template_bad_data_is_rejected_as_on_the_full_path(client: StoreClient):
    ctx = zmq.Context()
    registry = Registry(client, ttl=5.0)
    ng_data, ng_info = _sock(ctx, zmq.PULL), _sock(ctx, zmq.PULL)
    eps = {"data_0": f"tcp://127.0.0.1:{ng_data.bind_to_random_port('tcp://127.0.0.1')}",
           "info": f"tcp://127.0.0.1:{ng_info.bind_to_random_port('tcp://127.0.0.1')}"}  # fmt: skip
    reg = registry.register("nodegroup", "ng-f", status="ready", endpoints=eps)
    agg = Aggregator(client, n_sectors=1, uid="agg-f", registry=registry).start()
    try:
        data, info = _sock(ctx, zmq.PUSH), _sock(ctx, zmq.PUSH)
        data.connect(agg.endpoints["data_0"])
        info.connect(agg.endpoints["info_0"])
        info.send(ExpectMessage("p/0", 5, 0, 1, SHAPE, ("ng-f",), {"ng-f": 16}, start=START).encode())
        assert ng_info.recv()  # the combined expect: the scan is being routed
        for f in range(6):
            data.send_multipart([_header(f), _payload(f)])
        data.send_multipart([_header(3), _payload(3)])  # duplicate
        data.send_multipart([_header(3, sector=1), _payload(3)])  # wrong_sector
        data.send_multipart([_header(4), b"\x00" * 100])  # wrong_size
        obj = msgpack.unpackb(_header(16 - 1))
        obj["frame"] = 16
        data.send_multipart([msgpack.packb(obj), _payload(1)])  # frame outside the scan: malformed
        data.send_multipart([_header(15)[:-1], _payload(15)])  # cut short: malformed
        obj["frame"] = 6
        data.send_multipart([msgpack.packb(dict(reversed(list(obj.items())))), _payload(6)])  # another key order
        for f in range(7, 16):
            data.send_multipart([_header(f), _payload(f)])
        info.send(EndMessage("p/0", 5, 0, {"ng-f": 16}, start=START).encode())
        got = []
        for _ in range(16):
            header, payload = decode_data_message(ng_data.recv_multipart())
            assert int(np.frombuffer(payload, np.uint16)[0]) == header.frame_number + 1
            got.append(header.frame_number)
        assert sorted(got) == list(range(16))
        agg.wait_scan(5, timeout=10)
        counts = agg.counts()
        assert counts["routed"] == 16 and counts["received"] == 16 + 5
        assert counts["rejected.duplicate"] == 1 and counts["rejected.wrong_sector"] == 1
        assert counts["rejected.wrong_size"] == 1 and counts["rejected.malformed"] == 2
        assert counts["rejected"] == 5
    finally:
        agg.stop()
        reg.close()
        ctx.destroy(linger=0)

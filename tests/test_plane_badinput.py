"""Bad input with real processes: malformed and wrong-size messages pushed straight at the aggregator's
and a NodeGroup's data and info sockets, before and during a scan, are rejected, counted in the registry
records and logged; the processes keep going and every good frame still arrives."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq

from plane_helpers import ProcessTree, read_results, start_store, store_client, wait_scan_status

SHAPE = (16, 16)
SECTOR_BYTES = 144 * 576 * 2


def _bad_burst(ctx: zmq.Context, agg: dict[str, str], ng: dict[str, str]) -> None:
    from stemstream.wire.protocol import SectorHeader

    good = np.zeros((144, 576), np.uint16)

    def push(endpoint: str) -> zmq.Socket:
        sock = ctx.socket(zmq.PUSH)
        sock.setsockopt(zmq.LINGER, 5000)
        sock.setsockopt(zmq.SNDTIMEO, 5000)
        sock.connect(endpoint)
        return sock

    a_data, a_info = push(agg["data_0"]), push(agg["info_0"])
    a_data.send(b"one part")  # malformed
    a_data.send_multipart([b"\x00junk", good])  # malformed
    a_data.send_multipart([SectorHeader(1, 0, 0, SHAPE).encode(), b"\x00" * 1000])  # wrong_size
    a_info.send(b"junk")  # info_malformed
    a_info.send_multipart([b"a", b"b"])  # info_malformed

    n_data, n_info = push(ng["data_2"]), push(ng["info"])
    n_data.send(b"x")  # malformed
    n_data.send_multipart([b"\x00junk", good])  # malformed
    n_data.send_multipart([SectorHeader(1, 0, 2, SHAPE).encode(), b"\x00" * 1000])  # malformed (size)
    n_data.send_multipart([SectorHeader(1, 0, 1, SHAPE).encode(), good])  # wrong_sector
    n_info.send(b"junk")  # info_malformed
    for sock in (a_data, a_info, n_data, n_info):
        sock.close()  # linger: delivered before the sockets go


AGG_BURST = {"rejected.malformed": 2, "rejected.wrong_size": 1, "rejected.info_malformed": 2}
NG_BURST = {"rejected.malformed": 3, "rejected.wrong_sector": 1, "rejected.info_malformed": 1}


@pytest.mark.slow
def test_bad_messages_are_rejected_counted_logged_and_the_scan_still_arrives(tmp_path: Path):
    from stemstream.plane.requests import request_scan
    from stemstream.store import Registry

    results = tmp_path / "results"
    ctx = zmq.Context()
    try:
        with ProcessTree(tmp_path / "logs") as tree:
            address = start_store(tree)
            tree.start("aggregator", "aggregator", "--store", address)
            tree.start("ng-0", "nodegroup", "--store", address, "--uid", "ng-0", "--results", results)
            with store_client(address) as client:
                registry = Registry(client)
                agg = registry.wait_for_members("aggregator", 1, status="ready", timeout=60)[0]
                ng = registry.wait_for_members("nodegroup", 1, status="ready", timeout=60)[0]

                def counts_reach(times: int) -> Any:
                    def check(items: dict[str, Any]) -> bool:
                        a = registry.members("aggregator")
                        n = registry.members("nodegroup")
                        return (
                            bool(a and n)
                            and all(a[0].counts.get(k, 0) == v * times for k, v in AGG_BURST.items())
                            and all(n[0].counts.get(k, 0) == v * times for k, v in NG_BURST.items())
                        )

                    return check

                _bad_burst(ctx, agg.endpoints, ng.endpoints)  # before any scan
                client.wait_for(counts_reach(1), timeout=20)

                for m in range(4):
                    tree.start(f"producer-{m}", "producer", "--store", address, "--sector", m, "--threads", 2)
                registry.wait_for_members("producer", 4, status="ready", timeout=60)
                request_scan(client, 1, SHAPE, seed=7, loss_rate=0.0)
                _bad_burst(ctx, agg.endpoints, ng.endpoints)  # while the scan streams
                record = wait_scan_status(client, 1, ("received", "incomplete"), timeout=120)
                client.wait_for(counts_reach(2), timeout=20)
                tree.check_alive()
                assert record["status"] == "received"
                assert record["sent"] == record["routed"] == record["received"] == 4 * SHAPE[0] * SHAPE[1]
                a = registry.members("aggregator")[0].counts
                n = registry.members("nodegroup")[0].counts
                assert a["rejected"] == 2 * sum(AGG_BURST.values())
                assert n["rejected"] == 2 * sum(NG_BURST.values())
            assert "rejected (malformed)" in tree.log("aggregator")
            assert "rejected (wrong_sector)" in tree.log("ng-0")
    finally:
        ctx.destroy(linger=0)

    res = read_results(results, "ng-0", 1)
    assert sorted(res["order"]) == list(range(SHAPE[0] * SHAPE[1]))
    assert res["missing"] == {}

"""Bad input on every bound socket of every service (issue 9, "Bad input"), with real sockets.

The store server (snapshot ROUTER, update XPUB, collector PULL, Binary Star state PUB, and the SUB it
connects to its peer), an aggregator (``data_<m>``, ``info_<m>``) and a NodeGroup (``data_<m>``, ``info``)
run in this process. Each gets garbage, truncated and wrongly framed messages, oversized parts (a little
over a limit: rejected and counted; 10 MB: refused by ZeroMQ's MAXMSGSIZE before it is read, which the
sender sees as a disconnect), wrong-size payloads, unknown scan numbers and duplicate frames, with good
traffic before, during and after. Checked: the good data all arrives (frame checksums), every bad message
is counted under its kind, exactly, and the counts are in the store (registry records, store stats), and
a flood of 500 of one kind is logged once, not 500 times.

tests/test_plane_badinput.py (processes, a few bad messages during a scan), tests/test_plane_units.py and
tests/test_store.py already cover a first round of the same; what they check is not repeated here.
"""

from __future__ import annotations

import logging
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any

import msgpack
import numpy as np
import pytest
import zmq
from zmq.utils.monitor import recv_monitor_message

from stemstream.nodes.consumer import ChecksumConsumer, frame_checksum
from stemstream.plane.aggregator import Aggregator
from stemstream.plane.nodegroup import NodeGroup
from stemstream.store import StoreClient, StoreServer
from stemstream.store.kvmsg import ICANHAZ, MAX_SUBTREES
from stemstream.wire.protocol import (
    MAX_INFO_BYTES,
    EndMessage,
    ExpectMessage,
    SectorHeader,
)

FLOOD = 500  # bad messages of one kind in a row: logged once, counted 500 times
TEN_MB = 10 * 1024 * 1024
WAIT_S = 30.0  # every wait is for a condition; this is only how long before the test fails
SHAPE = (4, 4)
N_FRAMES = SHAPE[0] * SHAPE[1]
SECTOR_BYTES = 144 * 576 * 2


def _connect(ctx: zmq.Context, kind: int, endpoint: str) -> zmq.Socket:
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDTIMEO, int(WAIT_S * 1000))
    sock.connect(endpoint)
    return sock


def _refused(ctx: zmq.Context, kind: int, endpoint: str, parts: list[bytes]) -> None:
    """Send ``parts`` on a connection of its own and wait until the receiver drops that connection
    (ZeroMQ's MAXMSGSIZE): proof that the message got there and was refused before it was read."""
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    monitor = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED)
    try:
        sock.connect(endpoint)
        _wait_event(monitor, zmq.EVENT_HANDSHAKE_SUCCEEDED, endpoint)
        sock.send_multipart(parts, copy=False)
        _wait_event(monitor, zmq.EVENT_DISCONNECTED, endpoint)
    finally:
        sock.disable_monitor()
        monitor.close(linger=0)
        sock.close(linger=0)


def _wait_event(monitor: zmq.Socket, event: int, endpoint: str) -> None:
    while monitor.poll(int(WAIT_S * 1000)):
        if recv_monitor_message(monitor)["event"] == event:
            return
    raise AssertionError(f"{endpoint}: no {zmq.Event(event).name} within {WAIT_S:.0f} s")


def _wait_subscription(xpub: zmq.Socket) -> None:
    """Wait until a subscriber subscribes to everything (``\\x01``) on ``xpub``."""
    while xpub.poll(int(WAIT_S * 1000)):
        if xpub.recv() == b"\x01":
            return
    raise AssertionError(f"no subscription within {WAIT_S:.0f} s")


def _log_lines(caplog: pytest.LogCaptureFixture, logger: str, kind: str) -> int:
    return sum(1 for r in caplog.records if r.name == logger and f"({kind})" in r.getMessage())


def _check_logged_once_per_kind(
    caplog: pytest.LogCaptureFixture, logger: str, counts: dict[str, int], sectors: int = 1
) -> None:
    for kind, n in counts.items():
        lines = _log_lines(caplog, logger, kind)
        # One line per kind (per sector, for the aggregator) per 10 s; a slow machine may cross one interval
        # boundary during the test.
        assert 1 <= lines <= 2 * sectors, f"{logger}: {lines} log lines for {n} rejections of kind {kind!r}"


# ------------------------------------------------------------------------------------------- the store


def _kv(key: bytes = b"/k", seq: bytes = bytes(8), uid: bytes | None = None, props: bytes = b"", body: bytes = b"v"):
    return [key, seq, uuid.uuid4().bytes if uid is None else uid, props, body]


def test_store_server_rejects_counts_and_logs_bad_input_on_every_port_and_keeps_serving(
    ctx: zmq.Context, caplog: pytest.LogCaptureFixture
):
    caplog.set_level(logging.WARNING, logger="stemstream")
    # The server's Binary Star peer is played by an XPUB here: the server's state SUB connects to it.
    peer = ctx.socket(zmq.XPUB)
    peer.setsockopt(zmq.LINGER, 0)
    peer.setsockopt(zmq.XPUB_VERBOSE, 1)
    peer_port = peer.bind_to_random_port("tcp://127.0.0.1", min_port=20003, max_port=60000)
    server = StoreServer(
        heartbeat_s=0.1,
        max_body=1000,
        stats_interval_s=0.2,
        role="primary",
        peer=f"tcp://127.0.0.1:{peer_port - 3}",
    ).start()
    host, port = "127.0.0.1", server.port
    try:
        with StoreClient(server.address, timeout=10) as writer, StoreClient(server.address, subtree="/good/") as reader:
            seen: list[Any] = []
            reader.watch(lambda _key, value: seen.append(value), prefix="/good/")
            writer.set("/good/0", 0)  # the server is active (no peer heard: the first vote made it so)
            reader.wait_for(lambda items: "/good/0" in items, "/good/", timeout=WAIT_S)
            assert server.state == "active"

            dealer = _connect(ctx, zmq.DEALER, f"tcp://{host}:{port}")
            xsub = _connect(ctx, zmq.XSUB, f"tcp://{host}:{port + 1}")
            push = _connect(ctx, zmq.PUSH, f"tcp://{host}:{port + 2}")
            xsub_state = _connect(ctx, zmq.XSUB, f"tcp://{host}:{port + 3}")
            xsub_peer = _connect(ctx, zmq.XSUB, f"tcp://{host}:{port + 4}")  # the updates for the peer
            _wait_subscription(peer)  # the server's state SUB is connected to its "peer"

            expected: Counter[str] = Counter()

            def send(sock: zmq.Socket, kind: str | None, *messages: list[bytes]) -> None:
                for parts in messages:
                    sock.send_multipart(parts)
                    if kind is not None:
                        expected[kind] += 1

            # Snapshot port (ROUTER): commands, frame counts, subtrees.
            send(dealer, "bad_command", [b"GIMME"], [b""], [b"ICANHAZ", b"/"], [ICANHAZ + b"\x00"])
            many = [ICANHAZ, *[b"/"] * (MAX_SUBTREES + 1)]  # one subtree too many for one request
            send(dealer, "bad_request", many, [ICANHAZ, b"/", b"\xff\xfe"], [ICANHAZ, b"/" * 2000])
            writer.set("/good/1", 1)
            # Update port (XPUB): anything that is not a (un)subscription. A two-frame message is taken as a
            # subscription (its first frame) and a stray frame.
            send(xsub, "bad_subscription", [b"not a subscription"], [b""], [b"\x05x", b"y"], [b"\x01/x", b"z"])
            send(xsub_peer, "bad_subscription", [b"junk"], [b"\x07"])
            # Collector (PULL): each kind of malformed kvmsg.
            send(push, "bad_frames", [b"one frame"], _kv()[:4], [*_kv(), b"sixth"])
            send(push, "bad_sequence", _kv(seq=bytes(7)), _kv(seq=b"\xff" * 8))
            send(push, "bad_uuid", _kv(uid=bytes(15)), _kv(uid=bytes(17)))
            send(push, "bad_key", _kv(key=b"\xff\xfe"), _kv(key=b"/a\x01b"), _kv(key=b"/" + b"k" * 1100), _kv(key=b""))
            send(
                push, "bad_properties", _kv(props=b"novalue\n"), _kv(props=b"\xff=1\n"), _kv(props=b"p=" + b"v" * 5000)
            )
            send(push, "bad_ttl", _kv(props=b"ttl=forever\n"), _kv(props=b"ttl=-1\n"), _kv(props=b"ttl=1_0\n"))
            send(push, "oversized", _kv(body=b"x" * 1001), _kv(body=b"x" * 60_000))
            writer.set("/good/2", 2)
            # A flood of one kind: counted 500 times, logged once.
            send(push, "bad_key", *[_kv(key=b"no-slash") for _ in range(FLOOD)])
            writer.set("/good/3", 3)
            # Binary Star: the peer's state messages (the state SUB), and stray input on our state PUB.
            send(peer, "bad_peer", [b"9"], [b"0"], [b"xx"], [b""], [b"33"], [b"3", b"3"], [b"\x01"])
            send(xsub_state, None, [b"junk"], [b"\x01" + b"x" * 10], [b"a", b"b"])

            # Over ZeroMQ's MAXMSGSIZE: the sender is disconnected, nothing is read or counted.
            _refused(ctx, zmq.DEALER, f"tcp://{host}:{port}", [ICANHAZ, b"/" * 100_000])
            # (Not as subscriptions: libzmq's XSUB keeps its own subscriptions in a trie that it frees
            # recursively, and a 10 MB one overflows the stack of the *sending* process when it closes.)
            _refused(ctx, zmq.XSUB, f"tcp://{host}:{port + 1}", [b"/" * TEN_MB])
            _refused(ctx, zmq.PUSH, f"tcp://{host}:{port + 2}", _kv(body=b"x" * TEN_MB))
            _refused(ctx, zmq.XSUB, f"tcp://{host}:{port + 3}", [b"x" * TEN_MB])
            _refused(ctx, zmq.XSUB, f"tcp://{host}:{port + 4}", [b"x" * TEN_MB])
            # (Not from the peer: the state SUB is the one socket here that connects, and a connecting socket
            # that refuses an oversized message never reconnects; see docs/store.md, Bad input.)

            for i in range(4, 50):  # good traffic after all that
                writer.set(f"/good/{i}", i)
            reader.wait_for(lambda items: len(items) == 50, "/good/", timeout=WAIT_S)
            assert seen == list(range(50)), "every good update arrives, once, in order"
            with StoreClient(server.address, timeout=10) as late:  # and snapshots are still served
                assert late.wait_for(lambda items: len(items) == 50, "/good/", timeout=WAIT_S)["/good/49"] == 49

            # The counts are in the store: /store/primary/stats, published every stats interval.
            expected["rejected"] = sum(expected.values())

            def counted(items: dict[str, Any]) -> bool:
                counters = (items.get("/store/primary/stats") or {}).get("counters", {})
                return all(counters.get(kind, 0) >= n for kind, n in expected.items())

            stats = writer.wait_for(counted, "/store/", timeout=WAIT_S)["/store/primary/stats"]
            counters = stats["counters"]
            assert {k: counters.get(k, 0) for k in expected} == dict(expected), "each bad message counted once"
            assert stats["state"] == "active" and server.alive
            for sock in (dealer, xsub, push, xsub_state, xsub_peer):
                sock.close()
    finally:
        server.stop()
        peer.close()
    del expected["rejected"]
    _check_logged_once_per_kind(caplog, "stemstream.store.server", dict(expected))


# ------------------------------------------------------------------------------ aggregator and NodeGroup


def _payload(scan: int, frame: int, sector: int) -> np.ndarray:
    return np.full((144, 576), (scan * 1000 + frame * 4 + sector) % 65536, dtype=np.uint16)


def _checksum(scan: int, frame: int) -> int:
    return frame_checksum(np.vstack([_payload(scan, frame, m) for m in range(4)]))


def _header(scan: int, frame: int, sector: int, **kw: Any) -> bytes:
    return SectorHeader(scan, frame, sector, kw.pop("scan_shape", SHAPE), **kw).encode()


def _data(scan: int, frame: int, sector: int) -> list[Any]:
    return [_header(scan, frame, sector), _payload(scan, frame, sector)]


class _Producer:
    """Plays the receiving servers: one thread per sector, each with a data and an info PUSH."""

    def __init__(self, ctx: zmq.Context, endpoints: dict[str, str], members: tuple[str, ...]) -> None:
        self.data = [_connect(ctx, zmq.PUSH, endpoints[f"data_{m}"]) for m in range(4)]
        self.info = [_connect(ctx, zmq.PUSH, endpoints[f"info_{m}"]) for m in range(4)]
        self.members = members

    def expect(self, scan: int) -> None:
        for m in range(4):
            msg = ExpectMessage(f"p{m}/0", scan, m, 1, SHAPE, self.members, {self.members[0]: N_FRAMES})
            self.info[m].send(msg.encode())

    def frames(self, scan: int, frames: range) -> None:
        for f in frames:
            for m in range(4):
                self.data[m].send_multipart(_data(scan, f, m), copy=False)

    def end(self, scan: int) -> None:
        for m in range(4):
            self.info[m].send(EndMessage(f"p{m}/0", scan, m, {self.members[0]: N_FRAMES}, 0).encode())

    def scan(self, scan: int) -> None:
        self.expect(scan)
        self.frames(scan, range(N_FRAMES))
        self.end(scan)

    def close(self) -> None:
        for sock in (*self.data, *self.info):
            sock.close()


def _check_scan(ng: NodeGroup, consumer: ChecksumConsumer, scan: int) -> None:
    summary = ng.wait_scan(scan, timeout=WAIT_S)
    assert summary.status == "received", summary
    assert summary.frames_complete == N_FRAMES and summary.frames_incomplete == 0
    results = consumer.scans[scan]
    assert results.checksums == {f: _checksum(scan, f) for f in range(N_FRAMES)}, f"scan {scan}: pixels differ"


def _wait_counts(client: StoreClient, key: str, expected: dict[str, int]) -> dict[str, int]:
    """Wait until the registry record ``key`` counts at least ``expected``; then they must be equal."""

    def reached(items: dict[str, Any]) -> bool:
        counts = (items.get(key) or {}).get("counts", {})
        return all(counts.get(k, 0) >= n for k, n in expected.items())

    try:
        counts = client.wait_for(reached, key, timeout=WAIT_S)[key]["counts"]
    except TimeoutError:
        raise AssertionError(f"{key}: counts {client.get(key, {}).get('counts')} never reached {expected}") from None
    assert {k: counts.get(k, 0) for k in expected} == expected, f"{key}: counted more than was sent"
    return counts


def _rejected(kinds: Counter[str]) -> dict[str, int]:
    out = {f"rejected.{k}": n for k, n in kinds.items()}
    out["rejected"] = sum(kinds.values())
    return out


@pytest.fixture
def plane() -> Iterator[tuple[StoreClient, Aggregator, NodeGroup, ChecksumConsumer]]:
    server = StoreServer(heartbeat_s=0.2).start()
    client = StoreClient(server.address, timeout=10).start()
    consumer = ChecksumConsumer()
    ng = agg = None
    try:
        ng = NodeGroup(consumer, client, uid="ng-g", expect_timeout=0.5, scan_timeout_s=60, publish_interval=0.2)
        ng.start()
        agg = Aggregator(client, uid="agg-g", expect_grace_s=0.5, scan_timeout_s=60, publish_interval=0.2).start()
        yield client, agg, ng, consumer
        agg.maybe_raise()
        ng.maybe_raise()
    finally:
        for service in (agg, ng):
            if service is not None:
                service.stop()
        client.close()
        server.stop()


def test_aggregator_and_nodegroup_reject_count_and_log_bad_input_on_every_socket_and_keep_serving(
    plane: tuple[StoreClient, Aggregator, NodeGroup, ChecksumConsumer],
    ctx: zmq.Context,
    caplog: pytest.LogCaptureFixture,
):
    caplog.set_level(logging.WARNING, logger="stemstream")
    client, agg, ng, consumer = plane
    producer = _Producer(ctx, agg.endpoints, ("ng-g",))
    a_data = [_connect(ctx, zmq.PUSH, agg.endpoints[f"data_{m}"]) for m in range(4)]
    a_info = [_connect(ctx, zmq.PUSH, agg.endpoints[f"info_{m}"]) for m in range(4)]
    n_data = [_connect(ctx, zmq.PUSH, ng.endpoints[f"data_{m}"]) for m in range(4)]
    n_info = _connect(ctx, zmq.PUSH, ng.endpoints["info"])
    agg_kinds: Counter[str] = Counter()
    ng_kinds: Counter[str] = Counter()
    agg_data_sent = 0

    def to_agg(m: int, kind: str, *messages: list[Any]) -> None:
        nonlocal agg_data_sent
        for parts in messages:
            a_data[m].send_multipart(parts, copy=False)
            agg_kinds[kind] += 1
            agg_data_sent += 1

    def info_to_agg(m: int, kind: str | None, *messages: list[bytes]) -> None:
        for parts in messages:
            a_info[m].send_multipart(parts)
            if kind is not None:
                agg_kinds[kind] += 1

    def to_ng(m: int, kind: str, *messages: list[Any]) -> None:
        for parts in messages:
            n_data[m].send_multipart(parts, copy=False)
            ng_kinds[kind] += 1

    def info_to_ng(kind: str, *messages: list[bytes]) -> None:
        for parts in messages:
            n_info.send_multipart(parts)
            ng_kinds[kind] += 1

    good = _payload(0, 0, 0)
    try:
        producer.scan(1)  # before anything bad
        _check_scan(ng, consumer, 1)

        # --- the aggregator's data sockets
        header = _header(1, 0, 0)
        to_agg(0, "malformed", [header], [header, good, b""], [b"\xc1", good], [header[:-3], good], [b"", b""])
        to_agg(1, "malformed", *[[b"garbage"] for _ in range(FLOOD)])
        to_agg(0, "wrong_size", [header, good.tobytes()[:-2]], [header, good.tobytes() + b"\x00"], [header, b""])
        to_agg(0, "wrong_sector", [_header(1, 0, 2), good])
        to_agg(0, "wrong_shape", [_header(1, 0, 0, dtype="<u1"), good], [_header(1, 0, 0, sector_shape=(1, 1)), good])
        to_agg(2, "late", _data(1, 3, 2))  # scan 1 is closed
        to_agg(3, "no_expect", *[_data(999, f % N_FRAMES, 3) for f in range(100)])  # an unknown scan number
        # --- the aggregator's info sockets
        pad = {"v": 1, "type": "end", "pad": "x" * MAX_INFO_BYTES}  # over the info limit, under the socket's
        info_to_agg(
            0, "info_malformed", [b"junk"], [b"a", b"b"], [ExpectMessage("p", 5, 0, 1, SHAPE, ("x",)).encode()[:-1]]
        )
        info_to_agg(0, "info_malformed", [msgpack.packb(pad)])
        info_to_agg(0, "info_wrong_sector", [ExpectMessage("p0/0", 5, 2, 1, SHAPE, ("ng-g",)).encode()])
        info_to_agg(1, "info_late", [ExpectMessage("p1/0", 1, 1, 1, SHAPE, ("ng-g",)).encode()])
        info_to_agg(1, "info_late", [EndMessage("p1/0", 1, 1, {"ng-g": 16}).encode()])
        info_to_agg(2, "info_no_expect", [EndMessage("p2/0", 777, 2, {"ng-g": 16}).encode()])
        two = ExpectMessage("p3/0", 50, 3, 2, SHAPE, ("ng-g",))  # scan 50: two threads, never complete
        info_to_agg(3, None, [two.encode()])
        info_to_agg(3, "info_inconsistent", [ExpectMessage("p3/1", 50, 3, 2, (2, 2), ("ng-g",)).encode()])
        info_to_agg(3, "info_duplicate", [two.encode()])
        info_to_agg(3, "info_no_expect", [EndMessage("p3/1", 50, 3, {"ng-g": 8}).encode()])  # p3/1 was refused
        # --- the NodeGroup's data sockets (as if it were the aggregator)
        to_ng(
            0,
            "malformed",
            [b"x"],
            [b"\xc1", good],
            [_header(1, 0, 0), good.tobytes()[:-2]],
            [_header(1, 0, 0), good, b""],
        )
        to_ng(0, "wrong_sector", [_header(1, 0, 2), good])
        to_ng(0, "wrong_shape", [SectorHeader(1, 0, 0, SHAPE, n_sectors=2).encode(), good])
        to_ng(1, "late", _data(1, 0, 1))
        to_ng(2, "no_expect", *[_data(888, f % N_FRAMES, 2) for f in range(FLOOD)])  # unknown: one wait, not 500
        # --- the NodeGroup's info socket
        info_to_ng("info_malformed", [b"junk"], [b"a", b"b"], [msgpack.packb(pad)])
        info_to_ng("info_wrong_sector", [ExpectMessage("agg", 61, 9, 1, SHAPE, ("ng-g",)).encode()])
        info_to_ng("info_late", [ExpectMessage("agg", 1, 0, 1, SHAPE, ("ng-g",)).encode()])
        info_to_ng("info_late", [EndMessage("agg", 12345, 0, {"ng-g": 1}).encode()])
        info_to_ng("info_not_member", [ExpectMessage("agg", 60, 0, 1, SHAPE, ("ng-other",)).encode()])

        # --- oversized parts, each on a connection of its own: refused before they are read
        huge = b"\x00" * TEN_MB
        for endpoint, parts in [
            (agg.endpoints["data_0"], [header, huge]),
            (agg.endpoints["data_1"], [huge]),
            (agg.endpoints["info_0"], [huge]),
            (ng.endpoints["data_0"], [header, huge]),
            (ng.endpoints["info"], [huge]),
        ]:
            _refused(ctx, zmq.PUSH, endpoint, parts)
        # A little over a sector is still read, and rejected by size (the socket's limit is header + sector).
        to_agg(0, "wrong_size", [header, good.tobytes() + b"\x00" * 1000])
        to_ng(3, "malformed", [_header(1, 0, 3), good.tobytes() + b"\x00" * 1000])

        _wait_counts(client, "/aggregators/agg-g", _rejected(agg_kinds))
        _wait_counts(client, "/nodegroups/ng-g", _rejected(ng_kinds))

        # --- scan 2, with duplicates and stray headers during it
        producer.expect(2)
        producer.frames(2, range(8))
        for m in range(4):  # the same frames again, through the aggregator: it must not route them twice
            producer.data[m].send_multipart(_data(2, m, m))
        scan2 = Counter({"duplicate": 4, "frame_range": 1, "wrong_shape": 1})
        agg_kinds.update(scan2)
        producer.data[0].send_multipart([_header(2, 40, 0, scan_shape=(8, 8)), good])  # frame_range
        producer.data[0].send_multipart([_header(2, 3, 0, scan_shape=(2, 8)), good])  # wrong_shape
        # The ends now, ahead of the rest of the data (they travel on other sockets: that happens). The scan
        # is routed when as many messages are routed as the ends say were sent: duplicates must not count.
        producer.end(2)
        _wait_counts(client, "/nodegroups/ng-g", {"received": N_FRAMES * 4 + 8 * 4})
        # Straight to the NodeGroup: sectors it has, and a second (and a contradicting) expect.
        to_ng(0, "duplicate", *[_data(2, f, 0) for f in range(4)])
        info_to_ng("info_duplicate", [ExpectMessage("agg-g", 2, 0, 1, SHAPE, ("ng-g",), {"ng-g": 16}).encode()])
        info_to_ng("info_inconsistent", [ExpectMessage("agg-g", 2, 1, 1, (2, 8), ("ng-g",)).encode()])
        _wait_counts(client, "/nodegroups/ng-g", _rejected(ng_kinds))
        producer.frames(2, range(8, N_FRAMES))
        _check_scan(ng, consumer, 2)

        producer.scan(3)  # and after everything
        _check_scan(ng, consumer, 3)

        agg_counts = _wait_counts(client, "/aggregators/agg-g", {**_rejected(agg_kinds), "scans_done": 3})
        ng_counts = _wait_counts(client, "/nodegroups/ng-g", {**_rejected(ng_kinds), "scans": 3})
        assert agg_counts["routed"] == 3 * N_FRAMES * 4, "every good message routed, once"
        # What the aggregator read: the good data, the bad data sent to it, never the refused 10 MB parts.
        assert agg_counts["received"] == 3 * N_FRAMES * 4 + agg_data_sent + 4 + 2
        assert ng_counts["frames_complete"] == 3 * N_FRAMES and ng_counts["frames_incomplete"] == 0
        # Rejections that belong to a scan are in its records too.
        assert client.get("/scans/2/aggregator/0")["rejected"] == 1 + 1 + 1  # duplicate, frame_range, shape
        assert sum(client.get(f"/scans/2/aggregator/{m}")["rejected"] for m in range(4)) == sum(scan2.values())
        assert client.get("/scans/2/nodegroups/ng-g")["rejected"] == {
            "duplicate": 4,
            "info_duplicate": 1,
            "info_inconsistent": 1,
        }
    finally:
        producer.close()
        for sock in (*a_data, *a_info, *n_data, n_info):
            sock.close()

    _check_logged_once_per_kind(caplog, "stemstream.plane.aggregator", dict(agg_kinds), sectors=4)
    _check_logged_once_per_kind(caplog, "stemstream.plane.nodegroup", dict(ng_kinds))

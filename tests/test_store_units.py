"""Clone store parts without child processes: kvmsg, Binary Star FSM, registry records, input checks."""

import struct
import time
import uuid

import msgpack
import pytest
import zmq
from hypothesis import given, settings
from hypothesis import strategies as st

from stemstream.errors import ProtocolError, StoreError, StoreUnavailable
from stemstream.store import Record, StoreClient, StoreServer
from stemstream.store.bstar import BinaryStar, Event, State
from stemstream.store.kvmsg import (
    KVMsg,
    KVMsgError,
    decode_properties,
    decode_value,
    encode_properties,
    format_ttl,
)


def test_kvmsg_roundtrip_is_the_zguide_layout():
    msg = KVMsg("/a/b", 7, b"body", {"ttl": "5", "x": "y=z"})
    frames = msg.frames()
    assert frames[0] == b"/a/b"
    assert frames[1] == struct.pack("!q", 7)  # the zguide's network-order int64
    assert len(frames[2]) == 16
    assert frames[3] == b"ttl=5\nx=y=z\n"
    assert frames[4] == b"body"
    back = KVMsg.from_frames(frames)
    assert back == msg and back.ttl == 5.0 and not back.is_delete
    # An empty uuid is allowed; an empty body means delete.
    assert KVMsg.from_frames([b"/k", bytes(8), b"", b"", b""]).is_delete


@pytest.mark.parametrize(
    ("frames", "kind"),
    [
        ([b"/k", bytes(8), bytes(16), b""], "bad_frames"),
        ([b"/k", bytes(7), bytes(16), b"", b"v"], "bad_sequence"),
        ([b"/k", struct.pack(">q", -1), bytes(16), b"", b"v"], "bad_sequence"),
        ([b"/k", bytes(8), bytes(15), b"", b"v"], "bad_uuid"),
        ([b"\xff\xfe", bytes(8), bytes(16), b"", b"v"], "bad_key"),
        ([b"/k", bytes(8), bytes(16), b"novalue\n", b"v"], "bad_properties"),
        ([b"/k", bytes(8), bytes(16), b"", b"x" * 101], "oversized"),
    ],
)
def test_kvmsg_rejects_malformed_frames_by_kind(frames, kind):
    with pytest.raises(KVMsgError) as info:
        KVMsg.from_frames(frames, max_body=100)
    assert info.value.kind == kind
    assert isinstance(info.value, ProtocolError)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=40), max_size=7))
def test_kvmsg_decoding_garbage_raises_only_kvmsgerror(frames):
    try:
        msg = KVMsg.from_frames(frames, max_body=32)
    except KVMsgError:
        return
    assert KVMsg.from_frames(msg.frames(), max_body=32) == msg


def test_properties_and_ttl_text():
    assert decode_properties(encode_properties({"a": "1", "ttl": "0.5"})) == {"a": "1", "ttl": "0.5"}
    assert format_ttl(5) == "5" and format_ttl(0.25) == "0.25"  # whole seconds as integers, like the zguide
    for bad in ("0", "-1", "nan", "inf", "soon"):
        with pytest.raises(KVMsgError):
            KVMsg("/k", properties={"ttl": bad}).ttl  # noqa: B018
    with pytest.raises(KVMsgError):
        format_ttl(-1)


def test_decode_value_falls_back_to_bytes_for_foreign_bodies():
    assert decode_value(msgpack.packb({"a": [1, 2]})) == {"a": [1, 2]}
    assert decode_value(b"hello") == b"hello"


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_bstar_primary_and_backup_pair_up_then_fail_over_on_a_vote():
    clock = FakeClock()
    primary, backup = BinaryStar(True, 1.0, clock), BinaryStar(False, 1.0, clock)
    assert not backup.handle(Event.CLIENT_REQUEST)  # a lone backup never serves
    primary.peer_state(backup.state)
    backup.peer_state(primary.state)
    assert (primary.state, backup.state) == (State.ACTIVE, State.PASSIVE)
    assert primary.handle(Event.CLIENT_REQUEST)
    assert not backup.handle(Event.CLIENT_REQUEST)  # the primary is alive: refuse
    clock.t = 2.5  # primary silent for more than two heartbeats
    assert backup.handle(Event.CLIENT_REQUEST) and backup.state is State.ACTIVE
    restarted = BinaryStar(True, 1.0, clock)
    restarted.peer_state(backup.state)
    assert restarted.state is State.PASSIVE  # a returning primary follows the backup


def test_bstar_lone_primary_serves_after_two_heartbeats_and_split_brain_backup_steps_down():
    clock = FakeClock()
    primary = BinaryStar(True, 1.0, clock)
    assert not primary.handle(Event.CLIENT_REQUEST)
    clock.t = 2.1
    assert primary.handle(Event.CLIENT_REQUEST)
    backup = BinaryStar(False, 1.0, clock)
    backup.state = State.ACTIVE
    backup.peer_state(State.ACTIVE)
    assert backup.state is State.PASSIVE
    primary.peer_state(State.ACTIVE)
    assert primary.state is State.ACTIVE
    with pytest.raises(ValueError):
        primary.peer_state(9)


def test_record_roundtrip_and_validation():
    rec = Record(uid="ng-1", role="nodegroup", counts={"n": 3}, endpoints={"data": "h:1"}, extra={"x": 1})
    data = msgpack.unpackb(msgpack.packb(rec.to_dict()))
    assert Record.from_dict(data) == rec
    assert Record.from_dict({"uid": "x", "role": "flow", "future_field": 1}).status == "starting"
    for bad in (
        {"role": "flow"},
        {"uid": "x", "role": "flow", "pid": True},
        {"uid": "x", "role": "f", "counts": {"a": "1"}},
    ):
        with pytest.raises(ProtocolError):
            Record.from_dict(bad)


def test_in_process_server_counts_bad_input_and_keeps_serving():
    with StoreServer(heartbeat_s=0.1, max_body=1000) as server:
        ctx = zmq.Context()
        try:
            push = ctx.socket(zmq.PUSH)
            push.linger = 0
            push.connect(f"tcp://127.0.0.1:{server.port + 2}")
            push.send_multipart([b"junk"])
            push.send_multipart([b"nokey", bytes(8), uuid.uuid4().bytes, b"", b"v"])
            push.send_multipart([b"/big", bytes(8), uuid.uuid4().bytes, b"", b"x" * 1001])
            push.send_multipart([b"/ttl", bytes(8), uuid.uuid4().bytes, b"ttl=-3\n", b"v"])
            with StoreClient(server.address, timeout=5) as client:
                client.set("/ok", 1)
                client.wait_for(lambda items: items.get("/ok") == 1)
                with pytest.raises(StoreError):
                    client.set("/too-big", "x" * (2 << 20))
                with pytest.raises(StoreError):
                    client.set("no-slash", 1)
                with pytest.raises(StoreError):
                    client.set("/k", object())
            # The raw messages came on another connection: wait for them rather than assume they are in.
            kinds = ("bad_frames", "bad_key", "oversized", "bad_ttl", "updates")
            deadline = time.monotonic() + 5
            while not all(server.stats.get(k) for k in kinds) and time.monotonic() < deadline:
                time.sleep(0.01)
            assert all(server.stats.get(k) for k in kinds), server.stats
            assert server.alive and server.state == "active"
        finally:
            ctx.destroy(linger=0)


def test_client_against_nothing_raises_store_unavailable_in_one_line():
    with pytest.raises(StoreUnavailable) as info:
        StoreClient("tcp://127.0.0.1:9", timeout=0.3).start()
    message = str(info.value)
    assert "\n" not in message and "tcp://127.0.0.1:9" in message and "stemstream store serve" in message

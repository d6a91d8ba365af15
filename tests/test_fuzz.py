"""Property-based fuzzing of every wire decoder (issue 9, "Bad input").

What tests/test_protocol.py and tests/test_store_units.py already do (random bytes, random maps, one random
field, random kvmsg frames) is not repeated here. This file adds, for the data header and data message,
the info messages (``expect``, ``end``), the kvmsg and the other messages a store server reads (snapshot
requests, subscriptions, Binary Star states, properties, ``ttl``) and registry records:

* valid messages of every shape round-trip, in every msgpack encoding the protocol allows (any integer
  width, any str/array/map width, keys in any order, unknown keys added);
* every strict prefix (truncation) of a valid message is rejected;
* valid messages with random byte edits, arbitrary msgpack objects and wrongly sized or typed parts either
  decode to something valid or raise the module's own error (``ProtocolError``; ``KVMsgError`` with a
  documented ``kind`` for the store), never anything else, and the error text stays one short line;
* the NodeGroup's fast path accepts nothing that the protocol's decoder rejects.

Example counts are modest (the file runs in a few seconds); the properties still found real gaps.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator
from typing import Any

import msgpack
import numpy as np
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stemstream.errors import ProtocolError
from stemstream.store.kvmsg import (
    ICANHAZ,
    MAX_KEY_BYTES,
    MAX_PROPERTIES_BYTES,
    MAX_SUBTREES,
    MAX_TTL_S,
    KVMsg,
    KVMsgError,
    check_path,
    decode_key,
    decode_peer_state,
    decode_properties,
    decode_request,
    decode_subscription,
    decode_value,
    encode_properties,
    format_ttl,
    parse_ttl,
)
from stemstream.store.registry import Record
from stemstream.wire.protocol import (
    MAX_HEADER_BYTES,
    EndMessage,
    ExpectMessage,
    SectorHeader,
    decode_data_message,
    decode_info,
    peek_frame_number,
)

PROPERTY = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
FEW = settings(PROPERTY, max_examples=60)

# The kinds docs/store.md documents for a kvmsg on the collector.
KVMSG_KINDS = {"bad_frames", "bad_sequence", "bad_uuid", "bad_key", "bad_properties", "oversized"}
MAX_ERROR_CHARS = 400  # an error message is a log line: short, one line, whatever the input


def _check_error(exc: Exception) -> None:
    text = str(exc)
    assert "\n" not in text and len(text) <= MAX_ERROR_CHARS, f"{len(text)} chars: {text[:200]}..."


def _only_protocol_errors(decode: Callable[[], Any]) -> Any:
    """Run ``decode``; a ProtocolError (with a short one-line message) is fine and gives None."""
    try:
        return decode()
    except ProtocolError as exc:
        _check_error(exc)
        return None


# --- strategies: valid messages ----------------------------------------------------------------------------

_u32 = st.integers(0, 2**32 - 1)
_dim = st.integers(1, 65535)
_uid = st.text(st.characters(codec="utf-8"), min_size=1, max_size=12)


@st.composite
def headers(draw: st.DrawFn, small_payload: bool = False) -> SectorHeader:
    nsec = draw(st.integers(1, 64))
    scan_shape = (draw(_dim), draw(_dim))
    n_frames = scan_shape[0] * scan_shape[1]
    dim = st.integers(1, 8) if small_payload else _dim
    return SectorHeader(
        scan_number=draw(_u32),
        frame_number=draw(st.integers(0, n_frames - 1)),
        sector=draw(st.integers(0, nsec - 1)),
        scan_shape=scan_shape,
        sector_shape=(draw(dim), draw(dim)),
        n_sectors=nsec,
        dtype=draw(st.sampled_from(["<u1", "<u2", "<u4"])),
        timestamp_ns=draw(st.integers(0, 2**63 - 1)),
    )


@st.composite
def expects(draw: st.DrawFn) -> ExpectMessage:
    members = draw(st.lists(_uid, min_size=1, max_size=6, unique=True))
    named = draw(st.lists(st.sampled_from(members), unique=True))
    return ExpectMessage(
        producer=draw(st.text(min_size=1, max_size=256)),
        scan_number=draw(_u32),
        sector=draw(st.integers(0, 63)),
        threads=draw(st.integers(1, 1024)),
        scan_shape=(draw(_dim), draw(_dim)),
        members=tuple(members),
        expected={uid: draw(_u32) for uid in named},
    )


ends = st.builds(
    EndMessage,
    producer=st.text(min_size=1, max_size=256),
    scan_number=_u32,
    sector=st.integers(0, 63),
    sent=st.dictionaries(_uid, _u32, max_size=6),
    lost_upstream=_u32,
)
infos = expects() | ends

# Keys: paths of UTF-8 text without control characters, at most 1024 bytes.
_path_text = st.text(st.characters(codec="utf-8", exclude_categories=("Cc", "Cs")), max_size=60)
paths = _path_text.map(lambda t: "/" + t).filter(lambda k: len(k.encode()) <= MAX_KEY_BYTES)
_prop_names = st.text(st.characters(codec="utf-8", exclude_characters="=\n"), min_size=1, max_size=12)
_prop_values = st.text(st.characters(codec="utf-8", exclude_characters="\n"), max_size=24)
properties = st.dictionaries(_prop_names, _prop_values, max_size=5)
kvmsgs = st.builds(
    KVMsg,
    key=paths,
    sequence=st.integers(0, 2**63 - 1),
    body=st.binary(max_size=64),
    properties=properties,
    uuid=st.sampled_from([b""]) | st.binary(min_size=16, max_size=16),
)


# --- strategies: arbitrary msgpack objects, other encodings, byte edits ------------------------------------

_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=10)
    | st.binary(max_size=10)
    | st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=8))
)
msgpack_objects = st.recursive(
    _scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8) | st.binary(max_size=4), inner, max_size=4)
    ),
    max_leaves=10,
)


def _alt_pack(obj: Any, data: st.DataObject) -> bytes:
    """msgpack-encode ``obj`` choosing at random among the encodings the spec allows for each value
    (fixint / uint 8..64 / int 8..64 for a non-negative int, fixstr / str 8..32, fix / 16 / 32 arrays and
    maps, keys in random order). msgpack-python itself always writes the shortest one."""
    if isinstance(obj, bool) or obj is None:
        return msgpack.packb(obj)
    if isinstance(obj, int):
        if obj < 0:
            return msgpack.packb(obj)
        forms = [("B", 0xCC, 2**8), (">H", 0xCD, 2**16), (">I", 0xCE, 2**32), (">Q", 0xCF, 2**64)]
        forms += [("b", 0xD0, 2**7), (">h", 0xD1, 2**15), (">i", 0xD2, 2**31), (">q", 0xD3, 2**63)]
        choices = [(fmt, tag) for fmt, tag, limit in forms if obj < limit]
        if obj < 128:
            choices.append(("", -1))
        fmt, tag = data.draw(st.sampled_from(choices))
        return bytes([obj]) if tag < 0 else bytes([tag]) + struct.pack(fmt, obj)
    if isinstance(obj, str):
        raw = obj.encode()
        widths = [(0xD9, "B", 2**8), (0xDA, ">H", 2**16), (0xDB, ">I", 2**32)]
        choices = [(tag, fmt) for tag, fmt, limit in widths if len(raw) < limit]
        if len(raw) < 32:
            choices.append((0xA0 | len(raw), ""))
        tag, fmt = data.draw(st.sampled_from(choices))
        return bytes([tag]) + (struct.pack(fmt, len(raw)) if fmt else b"") + raw
    if isinstance(obj, list | tuple):
        tag, fmt = data.draw(st.sampled_from([(0xDC, ">H"), (0xDD, ">I"), *([(0x90, "")] if len(obj) < 16 else [])]))
        head = bytes([tag | len(obj)]) if not fmt else bytes([tag]) + struct.pack(fmt, len(obj))
        return head + b"".join(_alt_pack(v, data) for v in obj)
    if isinstance(obj, dict):
        items = data.draw(st.permutations(list(obj.items())))
        tag, fmt = data.draw(st.sampled_from([(0xDE, ">H"), (0xDF, ">I"), *([(0x80, "")] if len(obj) < 16 else [])]))
        head = bytes([tag | len(obj)]) if not fmt else bytes([tag]) + struct.pack(fmt, len(obj))
        return head + b"".join(_alt_pack(k, data) + _alt_pack(v, data) for k, v in items)
    return msgpack.packb(obj, use_bin_type=True)


def _mutate(raw: bytes, data: st.DataObject) -> bytes:
    """One to four random edits: flip bits, overwrite, insert, delete or repeat a span."""
    b = bytearray(raw)
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "set", "insert", "delete", "repeat"]))
        i = data.draw(st.integers(0, len(b)))
        if op == "insert" or not b:
            b[i:i] = data.draw(st.binary(min_size=1, max_size=8))
            continue
        i = min(i, len(b) - 1)
        n = data.draw(st.integers(1, 8))
        if op == "flip":
            b[i] ^= data.draw(st.integers(1, 255))
        elif op == "set":
            b[i] = data.draw(st.sampled_from([0x00, 0x7F, 0x80, 0xC0, 0xC1, 0xCF, 0xD3, 0xDB, 0xDF, 0xFF]))
        elif op == "delete":
            del b[i : i + n]
        else:
            b[i:i] = b[i : i + n]
    return bytes(b)


# --- data header and data message --------------------------------------------------------------------------


@PROPERTY
@given(headers(), st.data())
def test_valid_headers_round_trip_in_every_encoding(header: SectorHeader, data: st.DataObject) -> None:
    assert SectorHeader.decode(header.encode()) == header
    obj = msgpack.unpackb(header.encode(), raw=False)
    if data.draw(st.booleans()):
        obj["future_field"] = data.draw(msgpack_objects)  # decoders ignore keys they do not know
    raw = _alt_pack(obj, data)
    if len(raw) <= MAX_HEADER_BYTES:
        assert SectorHeader.decode(raw) == header
        assert peek_frame_number(raw) == header.frame_number


@PROPERTY
@given(headers(small_payload=True), st.sampled_from(["bytes", "frame", "memoryview", "numpy"]))
def test_valid_data_messages_round_trip_whatever_the_part_type(header: SectorHeader, kind: str) -> None:
    payload = np.random.default_rng(header.frame_number).integers(0, 256, header.payload_nbytes, np.uint8)
    parts: list[Any] = [header.encode(), payload.tobytes()]
    if kind == "frame":
        parts = [zmq.Frame(p) for p in parts]
    elif kind == "memoryview":
        parts = [memoryview(p) for p in parts]
    elif kind == "numpy":
        parts[1] = payload
    got, view = decode_data_message(parts)
    assert got == header and bytes(view) == payload.tobytes()


@PROPERTY
@given(headers(small_payload=True), st.integers(-64, 64).filter(bool))
def test_a_payload_of_the_wrong_size_is_rejected(header: SectorHeader, delta: int) -> None:
    size = max(0, header.payload_nbytes + delta)
    with pytest.raises(ProtocolError, match="payload") as info:
        decode_data_message([header.encode(), bytes(size)])
    _check_error(info.value)


@FEW
@given(headers(), st.data())
def test_every_truncation_of_a_header_is_rejected(header: SectorHeader, data: st.DataObject) -> None:
    raw = _alt_pack(msgpack.unpackb(header.encode(), raw=False), data)
    for cut in range(len(raw)):
        with pytest.raises(ProtocolError) as info:
            SectorHeader.decode(raw[:cut])
        _check_error(info.value)
        with pytest.raises(ProtocolError):
            peek_frame_number(raw[:cut])


@PROPERTY
@given(headers(small_payload=True), st.data())
def test_edited_headers_decode_to_a_valid_header_or_raise_protocol_error(
    header: SectorHeader, data: st.DataObject
) -> None:
    raw = _mutate(header.encode(), data)
    got = _only_protocol_errors(lambda: SectorHeader.decode(raw))
    frame = _only_protocol_errors(lambda: peek_frame_number(raw))
    if got is not None:
        assert SectorHeader.decode(got.encode()) == got
        assert 0 <= got.sector < got.n_sectors and got.frame_number < got.n_frames
        assert frame == got.frame_number
    message = _only_protocol_errors(lambda: decode_data_message([raw, bytes(header.payload_nbytes)]))
    if message is not None:
        assert message[0] == got and message[0].payload_nbytes == header.payload_nbytes


@PROPERTY
@given(msgpack_objects)
def test_any_msgpack_object_as_a_header_or_info_message_raises_only_protocol_error(obj: Any) -> None:
    raw = msgpack.packb(obj, use_bin_type=True)
    _only_protocol_errors(lambda: SectorHeader.decode(raw))
    _only_protocol_errors(lambda: peek_frame_number(raw))
    _only_protocol_errors(lambda: decode_info(raw))


@PROPERTY
@given(
    st.dictionaries(
        st.sampled_from(["v", "scan", "frame", "sector", "nsec", "scan_shape", "shape"]), msgpack_objects, min_size=5
    )
)
def test_a_header_map_with_many_wrong_fields_raises_only_protocol_error(changes: dict[str, Any]) -> None:
    obj = {**msgpack.unpackb(SectorHeader(1, 0, 0, (2, 2)).encode(), raw=False), **changes}
    got = _only_protocol_errors(lambda: SectorHeader.decode(msgpack.packb(obj, use_bin_type=True)))
    if got is not None:
        assert SectorHeader.decode(got.encode()) == got


_parts = st.one_of(
    st.binary(max_size=64),
    st.binary(max_size=64).map(zmq.Frame),
    st.binary(max_size=64).map(bytearray),
    st.binary(max_size=64).map(memoryview),
    st.sampled_from([np.zeros((3, 5), "<u2"), np.zeros((4, 4), np.float64)[:, ::2], np.zeros(0, np.uint8)]),
    st.none(),
    st.integers(),
    st.text(max_size=8),
)


@PROPERTY
@given(st.lists(_parts, max_size=4) | st.tuples(_parts, _parts) | _parts)
def test_data_messages_of_any_parts_raise_only_protocol_error(parts: Any) -> None:
    _only_protocol_errors(lambda: decode_data_message(parts))


@PROPERTY
@given(st.integers(1, 4 * MAX_HEADER_BYTES), st.sampled_from([b"\x00", b"\xc1", b"\x81"]))
def test_header_size_limit_is_checked_before_unpacking(size: int, fill: bytes) -> None:
    raw = fill * size
    got = _only_protocol_errors(lambda: SectorHeader.decode(raw))
    assert got is None
    if size > MAX_HEADER_BYTES:
        with pytest.raises(ProtocolError, match="limit"):
            SectorHeader.decode(raw)


# --- info messages -----------------------------------------------------------------------------------------


@PROPERTY
@given(infos, st.data())
def test_valid_info_messages_round_trip_in_every_encoding(info: ExpectMessage | EndMessage, data: st.DataObject):
    assert decode_info(info.encode()) == info
    obj = msgpack.unpackb(info.encode(), raw=False)
    if data.draw(st.booleans()):
        obj["future_field"] = data.draw(msgpack_objects)
    assert decode_info(_alt_pack(obj, data)) == info


@FEW
@given(infos)
def test_every_truncation_of_an_info_message_is_rejected(info: ExpectMessage | EndMessage) -> None:
    raw = info.encode()
    step = max(1, len(raw) // 64)  # long messages: a spread of cuts, always including the last byte
    for cut in sorted({*range(0, len(raw), step), len(raw) - 1}):
        with pytest.raises(ProtocolError) as exc:
            decode_info(raw[:cut])
        _check_error(exc.value)


@PROPERTY
@given(infos, st.data())
def test_edited_info_messages_decode_to_a_valid_message_or_raise_protocol_error(
    info: ExpectMessage | EndMessage, data: st.DataObject
) -> None:
    got = _only_protocol_errors(lambda: decode_info(_mutate(info.encode(), data)))
    if got is not None:
        assert decode_info(got.encode()) == got
        if isinstance(got, ExpectMessage):
            assert got.members and len(set(got.members)) == len(got.members)
            assert set(got.expected) <= set(got.members)


@PROPERTY
@given(
    st.sampled_from(["expect", "end"]),
    st.dictionaries(
        st.sampled_from(
            ["v", "producer", "scan", "sector", "threads", "scan_shape", "members", "expected", "sent", "lost"]
        ),
        msgpack_objects,
        min_size=2,
    ),
)
def test_info_messages_with_several_wrong_fields_raise_only_protocol_error(kind: str, changes: dict) -> None:
    base = (EXPECT if kind == "expect" else END).encode()
    obj = {**msgpack.unpackb(base, raw=False), **changes}
    got = _only_protocol_errors(lambda: decode_info(msgpack.packb(obj, use_bin_type=True)))
    if got is not None:
        assert decode_info(got.encode()) == got


EXPECT = ExpectMessage("p/0", 3, 1, 2, (4, 4), ("ng-a", "ng-b"), {"ng-a": 8})
END = EndMessage("p/0", 3, 1, {"ng-a": 8, "ng-b": 0}, 0)


_long_values = st.one_of(
    st.integers(0, 3000).map(lambda n: "x" * n),
    st.integers(0, 500).map(lambda n: [list(range(n))]),
    st.integers(0, 300).map(lambda n: {f"k{i}": i for i in range(n)}),
    st.binary(min_size=100, max_size=2000),
    msgpack_objects,
)


@PROPERTY
@given(_long_values)
def test_error_messages_stay_short_whatever_the_field_holds(value: Any) -> None:
    # The version and type fields end up quoted in the error message, which is logged.
    for obj in ({"v": value}, {"v": 1, "type": value}, {**msgpack.unpackb(END.encode()), "producer": value}):
        _only_protocol_errors(lambda obj=obj: decode_info(msgpack.packb(obj, use_bin_type=True)))
        _only_protocol_errors(lambda obj=obj: SectorHeader.decode(msgpack.packb(obj, use_bin_type=True)))


# --- NodeGroup fast path -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def nodegroup() -> Iterator[Any]:
    """A NodeGroup that is never started (no sockets, no store), with scan 5 begun: for its fast path."""
    from stemstream.nodes.consumer import NullConsumer
    from stemstream.plane.nodegroup import NodeGroup
    from stemstream.plane.nodescan import NodeGroupScan

    ng = NodeGroup(NullConsumer(), None, uid="ng-b")
    scan = NodeGroupScan(ExpectMessage("agg", 5, 0, 1, (4, 6), ("ng-a", "ng-b", "ng-c"), {}), "ng-b", 4, ng.frame_shape)
    scan.begun = True
    ng._scans[5] = scan
    try:
        yield ng
    finally:
        ng._ctx.term()


@PROPERTY
@given(st.integers(0, 23), st.integers(0, 3), st.integers(0, 3), st.data())
def test_nodegroup_fast_path_accepts_only_what_the_decoder_accepts(
    nodegroup: Any, frame: int, sector: int, socket_sector: int, data: st.DataObject
) -> None:
    raw = SectorHeader(5, frame, sector, (4, 6)).encode()
    if data.draw(st.booleans()):
        raw = _mutate(raw, data)
    size = data.draw(st.sampled_from([144 * 576 * 2, 144 * 576 * 2 - 2, 144 * 576, 0]))
    parts = [zmq.Frame(raw), zmq.Frame(bytes(size))]
    fast = nodegroup._fast_check(socket_sector, parts)
    if fast is None:
        return
    header, payload = decode_data_message(parts)  # raises if the fast path let a bad message through
    scan, f, view = fast
    assert (scan.number, f, header.sector) == (header.scan_number, header.frame_number, socket_sector)
    assert header.scan_shape == scan.scan_shape and f % scan.n_members == scan.my_index
    assert (header.sector_shape, header.n_sectors, header.dtype) == ((144, 576), 4, "<u2")
    assert view.nbytes == payload.nbytes == 144 * 576 * 2


# --- the store: kvmsg and the other messages a server reads ------------------------------------------------


@PROPERTY
@given(kvmsgs, st.booleans())
def test_valid_kvmsgs_round_trip(msg: KVMsg, as_frames: bool) -> None:
    frames: list[Any] = msg.frames()
    if as_frames:
        frames = [zmq.Frame(f) for f in frames]
    back = KVMsg.from_frames(frames, max_body=64)
    assert back == msg
    check_path(back.key)


def _kvmsg_or_kind(frames: list[Any], max_body: int | None = 64) -> KVMsg | None:
    try:
        return KVMsg.from_frames(frames, max_body=max_body)
    except KVMsgError as exc:
        assert exc.kind in KVMSG_KINDS, exc.kind
        _check_error(exc)
        return None


@PROPERTY
@given(kvmsgs, st.data())
def test_edited_kvmsgs_decode_or_raise_kvmsgerror_of_a_documented_kind(msg: KVMsg, data: st.DataObject) -> None:
    frames = msg.frames()
    how = data.draw(st.sampled_from(["edit", "drop", "add", "swap"]))
    if how == "edit":
        i = data.draw(st.integers(0, 4))
        frames[i] = _mutate(frames[i], data)
    elif how == "drop":
        del frames[data.draw(st.integers(0, 4))]
    elif how == "add":
        frames.insert(data.draw(st.integers(0, 5)), data.draw(st.binary(max_size=16)))
    else:
        i, j = data.draw(st.integers(0, 4)), data.draw(st.integers(0, 4))
        frames[i], frames[j] = frames[j], frames[i]
    got = _kvmsg_or_kind(frames)
    if got is not None:
        assert KVMsg.from_frames(got.frames(), max_body=64) == got


@PROPERTY
@given(
    st.lists(
        st.binary(max_size=8) | st.sampled_from([b"", bytes(8), bytes(16), b"/k", b"ttl=1\n"]), min_size=5, max_size=5
    ),
    st.integers(0, 2 * MAX_KEY_BYTES),
    st.integers(0, 2 * MAX_PROPERTIES_BYTES),
)
def test_oversized_kvmsg_frames_are_rejected_by_kind(frames: list[bytes], key_len: int, props_len: int) -> None:
    frames[0] = b"/" + b"k" * key_len
    frames[3] = (b"p=" + b"v" * props_len + b"\n") if props_len else b""
    got = _kvmsg_or_kind(frames, max_body=4)
    if key_len + 1 > MAX_KEY_BYTES or props_len + 3 > MAX_PROPERTIES_BYTES or len(frames[4]) > 4:
        assert got is None
    if got is not None:
        check_path(got.key)


@PROPERTY
@given(st.binary(max_size=64) | st.text(max_size=32).map(str.encode))
def test_properties_decode_to_a_map_that_encodes_back_or_raise_bad_properties(raw: bytes) -> None:
    try:
        props = decode_properties(raw)
    except KVMsgError as exc:
        assert exc.kind == "bad_properties"
        _check_error(exc)
        return
    assert decode_properties(encode_properties(props)) == props


@PROPERTY
@given(st.dictionaries(st.text(max_size=6), st.text(max_size=6), max_size=4))
def test_properties_that_would_not_decode_back_are_not_encoded(props: dict[str, str]) -> None:
    try:
        raw = encode_properties(props)
    except KVMsgError as exc:
        assert exc.kind == "bad_properties"
        assert any(not k or "=" in k or "\n" in k + v for k, v in props.items())
        return
    assert decode_properties(raw) == props


@PROPERTY
@given(
    st.text(max_size=16)
    | st.text("0123456789_. eE+-\u0665\uff15", max_size=8)
    | st.floats().map(repr)
    | st.floats(0, MAX_TTL_S).map(str)
)
def test_ttl_is_positive_finite_decimal_text_or_bad_ttl(text: str) -> None:
    try:
        ttl = parse_ttl(text)
    except KVMsgError as exc:
        assert exc.kind == "bad_ttl"
        _check_error(exc)
        return
    assert 0 < ttl <= MAX_TTL_S
    assert text.isascii() and text.strip() == text and "_" not in text  # decimal text, as docs/store.md says


@PROPERTY
@given(st.floats(1e-6, MAX_TTL_S) | st.integers(1, int(MAX_TTL_S)))
def test_format_ttl_round_trips(ttl: float) -> None:
    assert parse_ttl(format_ttl(ttl)) == pytest.approx(ttl, rel=1e-12)


@PROPERTY
@given(st.binary(max_size=2 * MAX_KEY_BYTES))
def test_keys_decode_or_raise_bad_key(raw: bytes) -> None:
    try:
        key = decode_key(raw)
        check_path(key)
    except KVMsgError as exc:
        assert exc.kind == "bad_key"
        _check_error(exc)


_request_frames = st.lists(
    st.sampled_from([ICANHAZ, b"", b"/", b"ICANHAZ", b"\xff\xfe", b"/" * (MAX_KEY_BYTES + 1)]) | st.binary(max_size=12),
    max_size=MAX_SUBTREES + 3,
)


@PROPERTY
@given(st.binary(min_size=1, max_size=8), _request_frames)
def test_snapshot_requests_decode_or_raise_bad_request_or_bad_command(identity: bytes, rest: list[bytes]) -> None:
    frames = [identity, *rest]
    try:
        got_identity, subtrees = decode_request(frames)
    except KVMsgError as exc:
        assert exc.kind in ("bad_request", "bad_command")
        _check_error(exc)
        if exc.kind == "bad_command":
            assert frames[1] != ICANHAZ
        return
    assert got_identity == identity and rest[0] == ICANHAZ and 1 <= len(rest) <= 1 + MAX_SUBTREES
    assert subtrees == (tuple(f.decode() for f in rest[1:]) or ("",))
    assert all(len(t.encode()) <= MAX_KEY_BYTES for t in subtrees)


@PROPERTY
@given(st.lists(st.binary(max_size=6), max_size=3))
def test_subscriptions_decode_or_raise_bad_subscription(frames: list[bytes]) -> None:
    try:
        subscribe, topic = decode_subscription(frames)
    except KVMsgError as exc:
        assert exc.kind == "bad_subscription"
        return
    assert len(frames) == 1 and frames[0] == (b"\x01" if subscribe else b"\x00") + topic


@PROPERTY
@given(st.lists(st.binary(max_size=3) | st.sampled_from([b"1", b"2", b"3", b"4", b"5", b"0", b" 3"]), max_size=3))
def test_peer_states_decode_or_raise_bad_peer(frames: list[bytes]) -> None:
    try:
        state = decode_peer_state(frames)
    except KVMsgError as exc:
        assert exc.kind == "bad_peer"
        _check_error(exc)
        return
    assert frames == [str(state).encode()] and 1 <= state <= 4


@PROPERTY
@given(msgpack_objects | st.binary(max_size=32))
def test_bodies_decode_to_a_value_or_raw_bytes_and_records_validate(obj: Any) -> None:
    body = obj if isinstance(obj, bytes) else msgpack.packb(obj, use_bin_type=True)
    value = decode_value(body)  # never raises: foreign bodies come back as bytes
    try:
        record = Record.from_dict(value)
    except ProtocolError as exc:
        _check_error(exc)
        return
    assert Record.from_dict(msgpack.unpackb(msgpack.packb(record.to_dict()))) == record


@PROPERTY
@given(
    st.fixed_dictionaries(
        {"uid": st.text(max_size=4), "role": st.text(max_size=4)},
        optional={
            k: msgpack_objects
            for k in ("status", "scan_number", "counts", "endpoints", "host", "pid", "heartbeat", "started", "extra")
        },
    )
)
def test_registry_records_with_wrong_fields_raise_only_protocol_error(data: dict[str, Any]) -> None:
    try:
        Record.from_dict(decode_value(msgpack.packb(data, use_bin_type=True)))
    except ProtocolError as exc:
        _check_error(exc)

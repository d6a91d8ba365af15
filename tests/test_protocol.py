"""The wire protocol: round trips, and every malformed input raises ProtocolError and nothing else."""

from __future__ import annotations

import contextlib
import struct
from typing import Any

import msgpack
import numpy as np
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stemstream.errors import ProtocolError
from stemstream.wire.protocol import (
    MAX_HEADER_BYTES,
    MAX_INFO_BYTES,
    PROTOCOL_VERSION,
    EndMessage,
    ExpectMessage,
    SectorHeader,
    decode_data_message,
    decode_info,
    peek_frame_number,
    route,
)

HEADER = SectorHeader(scan_number=7, frame_number=1234, sector=2, scan_shape=(64, 32), timestamp_ns=123456789)
PAYLOAD_NBYTES = 144 * 576 * 2


def _header_map(**changes: Any) -> dict[str, Any]:
    obj = msgpack.unpackb(HEADER.encode(), raw=False)
    obj.update(changes)
    return obj


def _pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def _payload(nbytes: int = PAYLOAD_NBYTES) -> bytes:
    return np.random.default_rng(3).integers(0, 2**16, nbytes // 2, dtype=np.uint16).tobytes()


EXPECT = ExpectMessage(
    producer="rs-2/t1",
    scan_number=7,
    sector=2,
    threads=4,
    scan_shape=(64, 32),
    members=("ng-a", "ng-b", "ng-c"),
    expected={"ng-a": 171, "ng-b": 171, "ng-c": 170},
)
END = EndMessage(producer="rs-2/t1", scan_number=7, sector=2, sent={"ng-a": 171, "ng-b": 1}, lost_upstream=3)


# --- round trips -------------------------------------------------------------------------------------------


def test_sector_header_round_trip() -> None:
    raw = HEADER.encode()
    assert len(raw) < MAX_HEADER_BYTES
    assert SectorHeader.decode(raw) == HEADER
    assert SectorHeader.decode(memoryview(raw)) == HEADER
    assert peek_frame_number(raw) == 1234
    assert HEADER.payload_nbytes == PAYLOAD_NBYTES
    assert HEADER.n_frames == 64 * 32


def test_sector_header_wire_keys_are_the_documented_ones() -> None:
    # docs/protocol.md names these keys and types; a C++ producer is written from it.
    obj = msgpack.unpackb(HEADER.encode(), raw=False)
    assert obj == {
        "v": PROTOCOL_VERSION,
        "scan": 7,
        "frame": 1234,
        "sector": 2,
        "nsec": 4,
        "scan_shape": [64, 32],
        "shape": [144, 576],
        "dtype": "<u2",
        "ts": 123456789,
    }


def test_the_docs_hex_example_decodes() -> None:
    # The example header of docs/protocol.md, byte for byte.
    example = bytes.fromhex(
        "89a17601a47363616e07a56672616d65cd04d2a6736563746f7202a46e736563"
        "04aa7363616e5f7368617065924020a5736861706592cc90cd0240a56474797065"
        "a33c7532a27473ce075bcd15"
    )
    assert SectorHeader.decode(example) == HEADER
    assert HEADER.encode() == example
    # The same header with an acquisition id, as docs/protocol.md shows it.
    with_start = bytes.fromhex(
        "8aa17601a47363616e07a56672616d65cd04d2a6736563746f7202a46e736563"
        "04aa7363616e5f7368617065924020a5736861706592cc90cd0240a56474797065"
        "a33c7532a27473ce075bcd15a57374617274b8323032363036313254313031"
        "3533303132335a2d61336639"
    )
    header = SectorHeader.decode(with_start)
    assert header.start == "20260612T101530123Z-a3f9" and len(with_start) == 108
    assert header.encode() == with_start


def test_every_hex_example_in_the_docs_is_a_valid_header() -> None:
    # Any byte dump in docs/protocol.md's code blocks: an external producer may copy it.
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "protocol.md").read_text()
    dumps = re.findall(r"```\n((?:[0-9a-f]{2}[ \n])+)```", text)
    headers = [SectorHeader.decode(bytes.fromhex(d.replace("\n", " "))) for d in dumps]
    assert headers == [
        HEADER,
        SectorHeader(7, 1234, 2, (64, 32), timestamp_ns=123456789, start="20260612T101530123Z-a3f9"),
    ]


def test_data_message_round_trip_with_bytes_and_zmq_frames() -> None:
    payload = _payload()
    header, view = decode_data_message([HEADER.encode(), payload])
    assert header == HEADER
    assert view.nbytes == PAYLOAD_NBYTES and bytes(view) == payload
    header2, view2 = decode_data_message([zmq.Frame(HEADER.encode()), zmq.Frame(payload)])
    assert header2 == HEADER and bytes(view2) == payload
    # A numpy sector (what the simulator hands out) is a valid payload as it is.
    sector = np.frombuffer(payload, dtype="<u2").reshape(144, 576)
    header3, view3 = decode_data_message((HEADER.encode(), sector))
    assert header3 == HEADER and bytes(view3) == payload


def test_info_round_trips() -> None:
    assert decode_info(EXPECT.encode()) == EXPECT
    assert decode_info(memoryview(END.encode())) == END
    assert decode_info(zmq.Frame(END.encode()).buffer) == END


def test_the_acquisition_id_is_optional_and_round_trips() -> None:
    # Scan numbers are reused (a DAQ restart resets its counter): "start" names the acquisition. Without it a
    # message means the newest acquisition of its scan number, and the encoding is what it always was.
    start = "20260612T101530123Z-a3f9"
    header = SectorHeader(7, 1234, 2, (64, 32), timestamp_ns=123456789, start=start)
    assert SectorHeader.decode(header.encode()) == header
    assert msgpack.unpackb(header.encode(), raw=False)["start"] == start
    assert "start" not in msgpack.unpackb(HEADER.encode(), raw=False) and HEADER.start == ""
    for message in (EXPECT, END):
        with_start = type(message)(**{**{f: getattr(message, f) for f in message.__slots__}, "start": start})
        assert decode_info(with_start.encode()) == with_start
        assert decode_info(message.encode()).start == ""


def test_minted_acquisition_ids_sort_in_time_order() -> None:
    from stemstream.wire.protocol import START_RE, new_start_id, start_time

    ids = [new_start_id(t) for t in (1.7e9, 1.7e9 + 0.001, 1.7e9 + 86400)]
    assert ids == sorted(ids) and all(START_RE.fullmatch(i) for i in ids)
    assert [start_time(i) for i in ids] == pytest.approx([1.7e9, 1.7e9 + 0.001, 1.7e9 + 86400])
    assert start_time("my-daq-run-7") is None


def test_route_spreads_frames_over_members() -> None:
    assert [route(f, 3) for f in range(7)] == [0, 1, 2, 0, 1, 2, 0]


# --- malformed input ---------------------------------------------------------------------------------------

BAD_HEADERS: dict[str, Any] = {
    "empty": b"",
    "truncated": HEADER.encode()[:-3],
    "garbage": b"\xc1\xff\x00garbage",
    "extra bytes": HEADER.encode() + b"\x00",
    "not a map": _pack([1, 2, 3]),
    "int": _pack(5),
    "oversized": _pack({**_header_map(), "pad": "x" * MAX_HEADER_BYTES}),
    "unknown version": _pack(_header_map(v=2)),
    "version true": _pack(_header_map(v=True)),
    "version float": _pack(_header_map(v=1.0)),
    "version missing": _pack({k: v for k, v in _header_map().items() if k != "v"}),
    "frame missing": _pack({k: v for k, v in _header_map().items() if k != "frame"}),
    "shape missing": _pack({k: v for k, v in _header_map().items() if k != "shape"}),
    "frame str": _pack(_header_map(frame="12")),
    "frame float": _pack(_header_map(frame=12.0)),
    "frame bool": _pack(_header_map(frame=True)),
    "frame negative": _pack(_header_map(frame=-1)),
    "frame outside scan": _pack(_header_map(frame=64 * 32)),
    "scan too big": _pack(_header_map(scan=2**32)),
    "sector outside nsec": _pack(_header_map(sector=4)),
    "nsec zero": _pack(_header_map(nsec=0)),
    "scan_shape one int": _pack(_header_map(scan_shape=[64])),
    "scan_shape strings": _pack(_header_map(scan_shape=["64", "32"])),
    "scan_shape zero": _pack(_header_map(scan_shape=[0, 32])),
    "shape map": _pack(_header_map(shape={"rows": 144})),
    "dtype unknown": _pack(_header_map(dtype="<f8")),
    "dtype bytes": _pack(_header_map(dtype=b"<u2")),
    "dtype empty": _pack(_header_map(dtype="")),
    "ts negative": _pack(_header_map(ts=-5)),
    "int keys": msgpack.packb({1: 2}),
    "nested garbage": _pack({"v": 1, "frame": [[[[]]]]}),
    "start empty": _pack(_header_map(start="")),
    "start int": _pack(_header_map(start=5)),
    "start bytes": _pack(_header_map(start=b"a1")),
    "start with a slash": _pack(_header_map(start="../etc")),
    "start too long": _pack(_header_map(start="a" * 65)),
    "start with a newline": _pack(_header_map(start="a1\n")),
}


@pytest.mark.parametrize("raw", BAD_HEADERS.values(), ids=BAD_HEADERS.keys())
def test_bad_header_raises_protocol_error(raw: bytes) -> None:
    with pytest.raises(ProtocolError):
        SectorHeader.decode(raw)
    with pytest.raises(ProtocolError):
        decode_data_message([raw, _payload()])


@pytest.mark.parametrize("bad", [None, 12, "text", 3.5, object()], ids=["None", "int", "str", "float", "obj"])
def test_header_of_wrong_type_raises_protocol_error(bad: Any) -> None:
    with pytest.raises(ProtocolError):
        SectorHeader.decode(bad)
    with pytest.raises(ProtocolError):
        decode_info(bad)
    with pytest.raises(ProtocolError):
        peek_frame_number(bad)


BAD_MESSAGES: dict[str, Any] = {
    "no parts": [],
    "one part": [HEADER.encode()],
    "three parts": [HEADER.encode(), _payload(), b""],
    "payload short": [HEADER.encode(), _payload(PAYLOAD_NBYTES - 2)],
    "payload long": [HEADER.encode(), _payload(PAYLOAD_NBYTES + 2)],
    "payload empty": [HEADER.encode(), b""],
    "payload str": [HEADER.encode(), "x" * PAYLOAD_NBYTES],
    "payload int": [HEADER.encode(), 5],
    "payload None": [HEADER.encode(), None],
    "header None": [None, _payload()],
    "payload not contiguous": [HEADER.encode(), np.zeros((144, 1152), np.uint16)[:, ::2]],
    "not a list": None,
    "bytes, not a list": b"ab",
    "an int": 2,
}


@pytest.mark.parametrize("parts", BAD_MESSAGES.values(), ids=BAD_MESSAGES.keys())
def test_bad_data_message_raises_protocol_error(parts: Any) -> None:
    with pytest.raises(ProtocolError):
        decode_data_message(parts)


def _expect_map(**changes: Any) -> dict[str, Any]:
    obj = msgpack.unpackb(EXPECT.encode(), raw=False)
    obj.update(changes)
    return obj


def _end_map(**changes: Any) -> dict[str, Any]:
    obj = msgpack.unpackb(END.encode(), raw=False)
    obj.update(changes)
    return obj


BAD_INFO: dict[str, Any] = {
    "empty": b"",
    "garbage": b"\x93\x01",
    "truncated": EXPECT.encode()[:-1],
    "oversized": _pack({**_end_map(), "pad": "x" * MAX_INFO_BYTES}),
    "not a map": _pack(["expect"]),
    "no type": _pack({k: v for k, v in _end_map().items() if k != "type"}),
    "unknown type": _pack(_end_map(type="start")),
    "type int": _pack(_end_map(type=1)),
    "version 0": _pack(_end_map(v=0)),
    "expect members missing": _pack({k: v for k, v in _expect_map().items() if k != "members"}),
    "expect members empty": _pack(_expect_map(members=[], expected={})),
    "expect members not strings": _pack(_expect_map(members=[1, 2])),
    "expect members duplicate": _pack(_expect_map(members=["ng-a", "ng-a"])),
    "expect expected not a map": _pack(_expect_map(expected=[1, 2])),
    "expect expected stranger": _pack(_expect_map(expected={"ng-z": 1})),
    "expect expected negative": _pack(_expect_map(expected={"ng-a": -1})),
    "expect threads zero": _pack(_expect_map(threads=0)),
    "expect producer empty": _pack(_expect_map(producer="")),
    "expect producer missing": _pack({k: v for k, v in _expect_map().items() if k != "producer"}),
    "expect scan_shape short": _pack(_expect_map(scan_shape=[4])),
    "end sent missing": _pack({k: v for k, v in _end_map().items() if k != "sent"}),
    "end sent bad count": _pack(_end_map(sent={"ng-a": "1"})),
    "end sent empty uid": _pack(_end_map(sent={"": 1})),
    "end lost float": _pack(_end_map(lost=1.5)),
    "end sector too big": _pack(_end_map(sector=64)),
    "expect start empty": _pack(_expect_map(start="")),
    "expect start not a string": _pack(_expect_map(start=["a"])),
    "end start with a space": _pack(_end_map(start="a b")),
}


@pytest.mark.parametrize("raw", BAD_INFO.values(), ids=BAD_INFO.keys())
def test_bad_info_raises_protocol_error(raw: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode_info(raw)


def test_big_payload_header_is_rejected_before_unpacking() -> None:
    raw = struct.pack(">BI", 0xDB, 2**31) + b"x" * MAX_HEADER_BYTES  # str32 claiming 2 GB
    with pytest.raises(ProtocolError, match="limit"):
        SectorHeader.decode(raw)


# --- properties --------------------------------------------------------------------------------------------

_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=12)
    | st.binary(max_size=12)
)
_values = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
_header_keys = st.sampled_from(["v", "scan", "frame", "sector", "nsec", "scan_shape", "shape", "dtype", "ts"])
_info_keys = st.sampled_from(
    [
        "v",
        "type",
        "producer",
        "scan",
        "sector",
        "threads",
        "scan_shape",
        "members",
        "expected",
        "sent",
        "lost",
    ]
)
# Sized to keep this file well under 20 s on a loaded 2-core machine.
_PROPERTY = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _decode_everything(raw: bytes) -> None:
    """Every decoder either returns a valid object (that re-encodes to itself) or raises ProtocolError."""
    try:
        header = SectorHeader.decode(raw)
    except ProtocolError:
        pass
    else:
        assert SectorHeader.decode(header.encode()) == header
        assert 0 <= header.sector < header.n_sectors and header.frame_number < header.n_frames
    try:
        info = decode_info(raw)
    except ProtocolError:
        pass
    else:
        assert decode_info(info.encode()) == info
    with contextlib.suppress(ProtocolError):
        decode_data_message([raw, raw])
    with contextlib.suppress(ProtocolError):
        peek_frame_number(raw)


@_PROPERTY
@given(st.binary(max_size=256))
def test_random_bytes_only_raise_protocol_error(raw: bytes) -> None:
    _decode_everything(raw)


@settings(_PROPERTY, max_examples=80)
@given(st.dictionaries(_header_keys | st.text(max_size=6), _values, max_size=10))
def test_random_maps_only_raise_protocol_error(obj: dict[str, Any]) -> None:
    _decode_everything(_pack(obj))


@_PROPERTY
@given(_header_keys, _values)
def test_a_header_with_one_random_field_decodes_or_raises_protocol_error(key: str, value: Any) -> None:
    raw = _pack(_header_map(**{key: value}))
    _decode_everything(raw)
    try:
        header = SectorHeader.decode(raw)
    except ProtocolError:
        return
    # It decoded: then the field held a value of the right type and range.
    assert msgpack.unpackb(header.encode(), raw=False)[key] == value


@_PROPERTY
@given(st.sampled_from(["expect", "end"]), _info_keys, _values)
def test_an_info_message_with_one_random_field_decodes_or_raises_protocol_error(
    kind: str, key: str, value: Any
) -> None:
    base = _expect_map() if kind == "expect" else _end_map()
    _decode_everything(_pack({**base, key: value}))

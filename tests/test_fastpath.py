"""The aggregator's fast header check (wire/fastpath.py): what it passes, the full decoder passes alike."""

from __future__ import annotations

import time

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stemstream.errors import ProtocolError
from stemstream.wire.fastpath import HeaderTemplate, add_template, match
from stemstream.wire.protocol import SectorHeader

SHAPE = (300, 300)  # 90,000 frames: frame numbers of 1, 2, 3 and 5 bytes on the wire
HEADER = SectorHeader(7, 0, 2, SHAPE, start="20260612T101530123Z-a3f9")


def template(header: SectorHeader = HEADER) -> HeaderTemplate:
    t = HeaderTemplate.of(header)
    assert t is not None
    return t


@pytest.mark.parametrize("frame", [0, 1, 127, 128, 255, 256, 65535, 65536, SHAPE[0] * SHAPE[1] - 1])
@pytest.mark.parametrize("ts", [0, 1, 200, 70_000, 2**32, 2**63 - 1, None])
def test_a_header_of_the_scan_gives_its_frame_number(frame: int, ts: int | None):
    header = SectorHeader(7, frame, 2, SHAPE, timestamp_ns=time.time_ns() if ts is None else ts, start=HEADER.start)
    assert template().frame_of(header.encode()) == frame


def test_a_header_without_start_has_its_own_template():
    plain = SectorHeader(7, 5, 2, SHAPE)
    assert template().frame_of(plain.encode()) == -1
    assert template(plain).frame_of(plain.encode()) == 5


def _packed(obj: dict) -> bytes:
    return msgpack.packb(obj)


def _fields(**change: object) -> dict:
    obj = msgpack.unpackb(SectorHeader(7, 300, 2, SHAPE, timestamp_ns=123, start=HEADER.start).encode())
    obj.update(change)
    return obj


@pytest.mark.parametrize(
    "raw",
    [
        SectorHeader(8, 3, 2, SHAPE, start=HEADER.start).encode(),  # another scan
        SectorHeader(7, 3, 1, SHAPE, start=HEADER.start).encode(),  # another sector
        SectorHeader(7, 3, 2, (300, 301), start=HEADER.start).encode(),  # another scan shape
        SectorHeader(7, 3, 2, SHAPE, start="other").encode(),  # another acquisition
        _packed(_fields(frame=SHAPE[0] * SHAPE[1])),  # out of the scan
        _packed(_fields(frame=-1)),
        _packed(_fields(frame=2**32)),
        _packed(_fields(frame=True)),
        _packed(_fields(frame=3.0)),
        _packed(_fields(ts=-5)),
        _packed(_fields(ts=2**63)),
        _packed(_fields(ts=1.5)),
        _packed(_fields(extra=1)),  # a key more
        _packed(dict(reversed(list(_fields().items())))),  # another key order: the full decoder's to judge
        SectorHeader(7, 3, 2, SHAPE, start=HEADER.start).encode()[:-1],  # cut short
        SectorHeader(7, 3, 2, SHAPE, start=HEADER.start).encode() + b"\x00",  # trailing byte
        b"",
    ],
)
def test_anything_else_takes_the_full_decoder(raw: bytes):
    assert template().frame_of(raw) == -1


def test_another_key_order_is_still_valid_on_the_full_path():
    raw = _packed(dict(reversed(list(_fields().items()))))
    assert SectorHeader.decode(raw).frame_number == 300


@settings(max_examples=400, deadline=None)
@given(
    frame=st.integers(0, SHAPE[0] * SHAPE[1] - 1),
    ts=st.integers(0, 2**63 - 1),
    edits=st.lists(st.tuples(st.integers(0, 200), st.integers(0, 255)), max_size=3),
    cut=st.integers(0, 3),
)
def test_what_passes_the_fast_path_passes_the_decoder_with_the_same_fields(frame, ts, edits, cut):
    raw = bytearray(SectorHeader(7, frame, 2, SHAPE, timestamp_ns=ts, start=HEADER.start).encode())
    for at, value in edits:
        if at < len(raw):
            raw[at] = value
    data = bytes(raw[: len(raw) - cut] if cut < 3 else raw + b"\x01")
    f = template().frame_of(data)
    if f < 0:
        return
    try:
        decoded = SectorHeader.decode(data)
    except ProtocolError as exc:
        pytest.fail(f"the fast path passed a header the decoder rejects: {exc}")
    assert decoded.frame_number == f
    assert (decoded.scan_number, decoded.sector, decoded.scan_shape, decoded.start) == (7, 2, SHAPE, HEADER.start)
    assert (decoded.sector_shape, decoded.n_sectors, decoded.dtype) == (HEADER.sector_shape, 4, "<u2")


def test_match_finds_the_scan_whose_template_fits():
    first, second = object(), object()
    templates = add_template([], first, HEADER)
    other = SectorHeader(9, 0, 2, (4, 4))
    templates = add_template(templates, second, other)
    assert add_template(templates, first, HEADER) is templates  # one per scan
    assert match(templates, SectorHeader(9, 15, 2, (4, 4)).encode()) == (second, 15)
    assert match(templates, SectorHeader(7, 15, 2, SHAPE, start=HEADER.start).encode()) == (first, 15)
    assert match(templates, SectorHeader(9, 16, 2, (4, 4)).encode()) == (None, -1)

"""Wire protocol of the data and info channels (see docs/protocol.md, which is the normative text).

Data channel: a two-part ZeroMQ message ``[header, payload]``; the header is a msgpack map
(:class:`SectorHeader`), the payload the sector's raw pixels, C order, little-endian.

Info channel: one-part messages, a msgpack map with a ``type`` tag: ``expect`` (how many data messages
each NodeGroup will get from one producer thread) and ``end`` (the producer thread has sent its last
message of the scan). Decoding validates everything and raises :class:`ProtocolError`, never anything
else. Nothing is ever pickled.
"""

from __future__ import annotations

import calendar
import re
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

import msgpack

from stemstream.errors import ProtocolError

PROTOCOL_VERSION = 1

# The 4D Camera: four sectors of 144 rows x 576 columns make one 576 x 576 uint16 frame.
FRAME_SHAPE = (576, 576)
N_SECTORS = 4
SECTOR_SHAPE = (144, 576)
DTYPE = "<u2"
_DTYPE_SIZES = {"<u2": 2, "<u1": 1, "<u4": 4}

# Upper bound on a header's encoded size; anything larger is rejected before unpacking.
MAX_HEADER_BYTES = 4096
MAX_INFO_BYTES = 1 << 20
# Receivers have ZeroMQ refuse any single part larger than this on an info socket (and, on a data socket,
# larger than MAX_HEADER_BYTES + a sector): the sender is disconnected and the part is never read.
MAX_INFO_PART_BYTES = 4 * MAX_INFO_BYTES
_UINT32_MAX = 2**32 - 1
# A scan's acquisition id (``start``): which acquisition of a scan number a message belongs to. Scan numbers
# are reused (a DAQ restart resets its counter); ``(scan, start)`` is unique. Optional on the wire: a message
# without it means the newest acquisition of its scan number the receiver knows. Safe in file names.
START_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")


def _short(value: Any, limit: int = 40) -> str:
    """``repr(value)`` cut to ``limit`` characters: error messages (and so log lines) stay short whatever
    a sender put in a field."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _unpack_map(raw: bytes | memoryview, limit: int, what: str) -> dict[str, Any]:
    try:
        size = memoryview(raw).nbytes  # len() of a non-byte memoryview counts items, not bytes
    except TypeError:
        raise ProtocolError(f"{what}: a {type(raw).__name__} is not a buffer") from None
    if size > limit:
        raise ProtocolError(f"{what}: {size} bytes is over the {limit}-byte limit")
    try:
        obj = msgpack.unpackb(raw, raw=False, strict_map_key=True, use_list=True)
    except Exception as exc:  # msgpack raises several unrelated types for garbage
        raise ProtocolError(f"{what}: not msgpack ({type(exc).__name__}: {str(exc)[:80]})") from None
    if not isinstance(obj, dict):
        raise ProtocolError(f"{what}: expected a msgpack map, got {type(obj).__name__}")
    version = obj.get("v")
    if type(version) is not int or version != PROTOCOL_VERSION:  # True and 1.0 compare equal to 1
        raise ProtocolError(f"{what}: protocol version {_short(version)}, this build speaks {PROTOCOL_VERSION}")
    return obj


SCAN_NUMBER_MAX = _UINT32_MAX  # the raw files' header holds it as a uint32


def check_scan_number(value: Any, what: str = "scan number") -> int:
    """The one check of a scan number, wherever one comes from (wire, control request, command line): an
    integer in 0 .. 2**32-1; anything else is a one-line ProtocolError."""
    if type(value) is not int:
        raise ProtocolError(f"{what} must be an integer, got {type(value).__name__}")
    if not 0 <= value <= SCAN_NUMBER_MAX:
        raise ProtocolError(f"{what} {value} is outside 0..{SCAN_NUMBER_MAX}")
    return value


def _scan(obj: dict[str, Any], what: str) -> int:
    if "scan" not in obj:
        raise ProtocolError(f"{what}: missing field 'scan'")
    return check_scan_number(obj["scan"], f"{what}: field 'scan'")


def _int(obj: dict[str, Any], key: str, what: str, lo: int = 0, hi: int = _UINT32_MAX) -> int:
    if key not in obj:
        raise ProtocolError(f"{what}: missing field {key!r}")
    value = obj[key]
    if type(value) is not int:
        raise ProtocolError(f"{what}: field {key!r} must be an integer, got {type(value).__name__}")
    if not lo <= value <= hi:
        raise ProtocolError(f"{what}: field {key!r}={value} outside {lo}..{hi}")
    return value


def _str(obj: dict[str, Any], key: str, what: str, max_len: int = 256) -> str:
    if key not in obj:
        raise ProtocolError(f"{what}: missing field {key!r}")
    value = obj[key]
    if not isinstance(value, str) or not 0 < len(value) <= max_len:
        raise ProtocolError(f"{what}: field {key!r} must be a non-empty string of at most {max_len} chars")
    return value


def _start(obj: dict[str, Any], what: str) -> str:
    """The optional ``start`` field ("" when absent): 1..64 characters of ``A-Z a-z 0-9 . _ -``."""
    if "start" not in obj:
        return ""
    value = obj["start"]
    if not isinstance(value, str) or not START_RE.fullmatch(value):
        raise ProtocolError(f"{what}: field 'start' must be 1..64 characters of A-Z a-z 0-9 . _ -, got {_short(value)}")
    return value


def check_start(start: str) -> str:
    """``start`` if it is a valid acquisition id or "" (none); ProtocolError otherwise."""
    if start and not START_RE.fullmatch(start):
        raise ProtocolError(f"acquisition id {_short(start)}: use 1..64 characters of A-Z a-z 0-9 . _ -")
    return start


def new_start_id(now: float | None = None) -> str:
    """A fresh acquisition id: the UTC time it was minted to the millisecond, and 16 random bits, e.g.
    ``20260612T101530123Z-a3f9``. Ids minted this way sort in time order (:func:`start_time`)."""
    t = time.time() if now is None else now
    ms = int(t * 1000) % 1000
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime(t)) + f"{ms:03d}Z-{secrets.token_hex(2)}"


_MINTED = re.compile(r"(\d{8}T\d{6})(\d{3})Z-[0-9a-f]{4}")


def start_time(start: str) -> float | None:
    """When an id from :func:`new_start_id` was minted (unix seconds); None for any other id."""
    m = _MINTED.fullmatch(start)
    if m is None:
        return None
    return calendar.timegm(time.strptime(m.group(1), "%Y%m%dT%H%M%S")) + int(m.group(2)) / 1000


def _pair(obj: dict[str, Any], key: str, what: str, lo: int = 1, hi: int = 65535) -> tuple[int, int]:
    if key not in obj:
        raise ProtocolError(f"{what}: missing field {key!r}")
    value = obj[key]
    if not isinstance(value, list) or len(value) != 2 or any(type(v) is not int for v in value):
        raise ProtocolError(f"{what}: field {key!r} must be an array of two integers")
    if not all(lo <= v <= hi for v in value):
        raise ProtocolError(f"{what}: field {key!r}={value} outside {lo}..{hi}")
    return value[0], value[1]


@dataclass(frozen=True, slots=True)
class SectorHeader:
    """Part 1 of a data-channel message: which sector of which frame of which scan the payload is."""

    scan_number: int
    frame_number: int  # 0-based position in the scan, row-major: frame = y * scan_width + x
    sector: int  # 0..n_sectors-1; rows sector*rows .. (sector+1)*rows-1 of the frame
    scan_shape: tuple[int, int]  # (height, width) in probe positions
    sector_shape: tuple[int, int] = SECTOR_SHAPE  # (rows, cols) of the payload
    n_sectors: int = N_SECTORS
    dtype: str = DTYPE
    timestamp_ns: int = 0  # when the receiving server had the sector (0 = unknown)
    start: str = ""  # the acquisition of ``scan_number`` ("": the newest one; on the wire only when set)

    @property
    def payload_nbytes(self) -> int:
        return self.sector_shape[0] * self.sector_shape[1] * _DTYPE_SIZES[self.dtype]

    @property
    def n_frames(self) -> int:
        return self.scan_shape[0] * self.scan_shape[1]

    def encode(self) -> bytes:
        obj: dict[str, Any] = {
            "v": PROTOCOL_VERSION,
            "scan": self.scan_number,
            "frame": self.frame_number,
            "sector": self.sector,
            "nsec": self.n_sectors,
            "scan_shape": list(self.scan_shape),
            "shape": list(self.sector_shape),
            "dtype": self.dtype,
            "ts": self.timestamp_ns,
        }
        if self.start:
            obj["start"] = self.start
        return msgpack.packb(obj)

    @classmethod
    def decode(cls, raw: bytes | memoryview) -> SectorHeader:
        what = "data header"
        obj = _unpack_map(raw, MAX_HEADER_BYTES, what)
        n_sectors = _int(obj, "nsec", what, 1, 64)
        scan_shape = _pair(obj, "scan_shape", what)
        header = cls(
            scan_number=_scan(obj, what),
            frame_number=_int(obj, "frame", what),
            sector=_int(obj, "sector", what, 0, n_sectors - 1),
            scan_shape=scan_shape,
            sector_shape=_pair(obj, "shape", what),
            n_sectors=n_sectors,
            dtype=_str(obj, "dtype", what, 8),
            timestamp_ns=_int(obj, "ts", what, 0, 2**63 - 1),
            start=_start(obj, what),
        )
        if header.dtype not in _DTYPE_SIZES:
            raise ProtocolError(f"{what}: dtype {header.dtype!r} not one of {sorted(_DTYPE_SIZES)}")
        if header.frame_number >= header.n_frames:
            shape = f"{scan_shape[0]}x{scan_shape[1]}"
            raise ProtocolError(f"{what}: frame {header.frame_number} outside a {shape} scan")
        return header


def decode_data_message(parts: list[Any]) -> tuple[SectorHeader, memoryview]:
    """Validate a received ``[header, payload]`` message (bytes or zmq.Frame parts)."""
    if not isinstance(parts, list | tuple):
        raise ProtocolError(f"data message: expected a list of parts, got {type(parts).__name__}")
    if len(parts) != 2:
        raise ProtocolError(f"data message: expected 2 parts, got {len(parts)}")
    header = SectorHeader.decode(_buffer(parts[0]))
    payload = _buffer(parts[1])
    if payload.nbytes != header.payload_nbytes:
        expected = header.payload_nbytes
        raise ProtocolError(f"data message: payload of {payload.nbytes} bytes, header says {expected}")
    return header, payload


def peek_frame_number(raw: bytes | memoryview) -> int:
    """The aggregator's fast path: the frame number from a header, validated as an integer."""
    obj = _unpack_map(raw, MAX_HEADER_BYTES, "data header")
    return _int(obj, "frame", "data header")


def _buffer(part: Any) -> memoryview:
    buf = getattr(part, "buffer", part)  # zmq.Frame exposes .buffer; bytes are fine as they are
    try:
        return memoryview(buf).cast("B")
    except (TypeError, ValueError, NotImplementedError) as exc:  # not a buffer, not contiguous, odd format
        raise ProtocolError(f"message part is not a buffer: {exc}") from None


@dataclass(frozen=True, slots=True)
class ExpectMessage:
    """Info channel, at scan start: how many data messages each NodeGroup gets from one producer thread.

    ``members`` is the ordered NodeGroup membership fixed for this scan (routing is
    ``members[frame % len(members)]``); ``expected`` maps NodeGroup UID -> message count.
    ``threads`` is how many producer threads of the same receiving server send an ``expect`` for
    this scan, so that the aggregator knows how many to combine.
    """

    producer: str
    scan_number: int
    sector: int
    threads: int
    scan_shape: tuple[int, int]
    members: tuple[str, ...]
    expected: dict[str, int] = field(default_factory=dict)
    start: str = ""  # the acquisition of ``scan_number`` ("": the newest one; on the wire only when set)

    def encode(self) -> bytes:
        return _info(
            self,
            "expect",
            threads=self.threads,
            scan_shape=list(self.scan_shape),
            members=list(self.members),
            expected=dict(self.expected),
        )


@dataclass(frozen=True, slots=True)
class EndMessage:
    """Info channel, after a producer thread's last data message of a scan: what it sent, and what
    was lost upstream (sectors the receiving server never got from the detector)."""

    producer: str
    scan_number: int
    sector: int
    sent: dict[str, int]
    lost_upstream: int = 0
    start: str = ""  # the acquisition of ``scan_number`` ("": the newest one; on the wire only when set)

    def encode(self) -> bytes:
        return _info(self, "end", sent=dict(self.sent), lost=self.lost_upstream)


InfoMessage = ExpectMessage | EndMessage


def _info(msg: ExpectMessage | EndMessage, kind: str, **fields: Any) -> bytes:
    """An info message's msgpack map: the fields every kind has, then ``fields`` (the order as documented)."""
    obj: dict[str, Any] = {
        "v": PROTOCOL_VERSION,
        "type": kind,
        "producer": msg.producer,
        "scan": msg.scan_number,
        "sector": msg.sector,
        **fields,
    }
    if msg.start:
        obj["start"] = msg.start  # on the wire only when set
    return msgpack.packb(obj)


def _count_map(obj: dict[str, Any], key: str, what: str) -> dict[str, int]:
    value = obj.get(key)
    if not isinstance(value, dict):
        raise ProtocolError(f"{what}: field {key!r} must be a map of UID -> count")
    out: dict[str, int] = {}
    for uid, count in value.items():
        if not isinstance(uid, str) or not uid or type(count) is not int or not 0 <= count <= _UINT32_MAX:
            raise ProtocolError(f"{what}: field {key!r} must map non-empty strings to counts 0..2^32-1")
        out[uid] = count
    return out


def decode_info(raw: bytes | memoryview) -> InfoMessage:
    """Decode one info-channel message."""
    obj = _unpack_map(raw, MAX_INFO_BYTES, "info message")
    kind = obj.get("type")
    if kind == "expect":
        what = "info expect"
        members = obj.get("members")
        if not isinstance(members, list) or not all(isinstance(m, str) and m for m in members):
            raise ProtocolError(f"{what}: field 'members' must be an array of UID strings")
        if not members:  # route() divides by len(members)
            raise ProtocolError(f"{what}: field 'members' is empty")
        if len(set(members)) != len(members):
            raise ProtocolError(f"{what}: field 'members' has duplicates")
        expected = _count_map(obj, "expected", what)
        if not set(expected) <= set(members):
            raise ProtocolError(f"{what}: 'expected' names NodeGroups that are not in 'members'")
        return ExpectMessage(
            producer=_str(obj, "producer", what),
            scan_number=_scan(obj, what),
            sector=_int(obj, "sector", what, 0, 63),
            threads=_int(obj, "threads", what, 1, 1024),
            scan_shape=_pair(obj, "scan_shape", what),
            members=tuple(members),
            expected=expected,
            start=_start(obj, what),
        )
    if kind == "end":
        what = "info end"
        return EndMessage(
            producer=_str(obj, "producer", what),
            scan_number=_scan(obj, what),
            sector=_int(obj, "sector", what, 0, 63),
            sent=_count_map(obj, "sent", what),
            lost_upstream=_int(obj, "lost", what),
            start=_start(obj, what),
        )
    raise ProtocolError(f"info message: unknown type {_short(kind)} (expected 'expect' or 'end')")


def route(frame_number: int, n_members: int) -> int:
    """Index of the NodeGroup that receives ``frame_number``: all sectors of a frame meet there."""
    return frame_number % n_members

"""Key-value messages of the Clone store, wire-compatible with the zguide's ``kvmsg`` (chapter 5).

One message is five ZeroMQ frames::

    [key, sequence (8 bytes, big-endian signed), uuid (16 bytes, or empty), properties, body]

``properties`` is UTF-8 text of ``name=value`` lines, each ended by ``\\n``; the only property the store
interprets is ``ttl`` (seconds, decimal text). An empty body means "delete the key". The store never looks
inside bodies; :func:`encode_value` / :func:`decode_value` are the msgpack convention our clients use.

Decoding validates every frame and raises :class:`KVMsgError` (a ``ProtocolError``) whose ``kind`` names
what was wrong, so a server can count rejects by kind without parsing messages. The other messages a server
reads are decoded here too, with the same error type: snapshot requests (:func:`decode_request`),
subscriptions on the update port (:func:`decode_subscription`) and Binary Star state messages
(:func:`decode_peer_state`).
"""

from __future__ import annotations

import math
import os
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack
import zmq

from stemstream.errors import ProtocolError, StoreError

# Control keys of the protocol; data keys are paths starting with "/", so the two never collide.
HUGZ = "HUGZ"
KTHXBAI = "KTHXBAI"
ICANHAZ = b"ICANHAZ?"

N_FRAMES = 5
UUID_BYTES = 16
MAX_KEY_BYTES = 1024
MAX_PROPERTIES_BYTES = 4096
# What the server adds to properties it stores and publishes (writer, prev, last): room it keeps for itself.
SERVER_PROPERTIES_BYTES = 4096
# Subtrees one snapshot request may name.
MAX_SUBTREES = 16
# Properties the server sets: the previous sequence of an update's segment, and in HUGZ / KTHXBAI the last
# sequence of each segment ("/scans/:12 /nodegroups/:40").
PREV = "prev"
LAST = "last"
DEFAULT_MAX_BODY = 1 << 20
# A month: long enough for anything ephemeral, short enough that a typo (ms for s) is caught.
MAX_TTL_S = 30 * 24 * 3600.0

_SEQ = struct.Struct(">q")  # the zguide's int64_t in network order
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# Decimal text, as docs/store.md says (and C clients parse): no signs, blanks, "_" or non-ASCII digits.
_DECIMAL = re.compile(r"(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?", re.ASCII)
# Binary Star states a peer may announce (bstar.State: primary, backup, active, passive).
_PEER_STATES = (b"1", b"2", b"3", b"4")


class KVMsgError(ProtocolError):
    """A kvmsg that cannot be accepted; ``kind`` is the stats counter it is counted under."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def new_uuid() -> bytes:
    """16 random bytes: all the store needs of a UUID is that it is unique (the hot path: no UUID object)."""
    return os.urandom(UUID_BYTES)


@dataclass(slots=True)
class KVMsg:
    """One key-value update (or snapshot entry, or control message) of the Clone protocol."""

    key: str
    sequence: int = 0
    body: bytes = b""
    properties: dict[str, str] = field(default_factory=dict)
    uuid: bytes = field(default_factory=new_uuid)

    @property
    def is_delete(self) -> bool:
        return not self.body

    @property
    def ttl(self) -> float | None:
        """The ``ttl`` property in seconds, or None; raises KVMsgError if it is not a positive number."""
        text = self.properties.get("ttl")
        return None if text is None else parse_ttl(text)

    def frames(self) -> list[bytes]:
        return [
            self.key.encode(),
            _SEQ.pack(self.sequence),
            self.uuid,
            encode_properties(self.properties),
            self.body,
        ]

    def send(self, sock: zmq.Socket, flags: int = 0, prefix: Sequence[bytes] = (), copy: bool | None = None) -> None:
        """Send as one multipart message, after ``prefix`` frames (a ROUTER's routing identity).

        Large bodies go zero-copy: they are immutable bytes kept in the server's state anyway. ``copy=False``
        sends every body zero-copy (a queued message then holds a reference, not a copy)."""
        if copy is None:
            copy = len(self.body) < 65536
        if copy:
            sock.send_multipart([*prefix, *self.frames()], flags=flags)
            return
        frames = self.frames()
        for part in (*prefix, *frames[:-1]):
            sock.send(part, flags | zmq.SNDMORE)
        sock.send(zmq.Frame(frames[-1], copy=False), flags)

    @classmethod
    def from_frames(cls, frames: Sequence[bytes], *, max_body: int | None = DEFAULT_MAX_BODY) -> KVMsg:
        """Decode and validate five frames; ``max_body=None`` accepts any size (trusted senders: a server,
        whose properties may also hold what it added, up to :data:`SERVER_PROPERTIES_BYTES` more)."""
        if len(frames) != N_FRAMES:
            raise KVMsgError("bad_frames", f"kvmsg has {len(frames)} frames, expected {N_FRAMES}")
        raw_key, raw_seq, raw_uuid, raw_props, body = (bytes(f) for f in frames)
        key = decode_key(raw_key)
        if len(raw_seq) != _SEQ.size:
            raise KVMsgError("bad_sequence", f"sequence frame is {len(raw_seq)} bytes, expected {_SEQ.size}")
        (sequence,) = _SEQ.unpack(raw_seq)
        if sequence < 0:
            raise KVMsgError("bad_sequence", f"negative sequence {sequence}")
        if len(raw_uuid) not in (0, UUID_BYTES):
            raise KVMsgError("bad_uuid", f"uuid frame is {len(raw_uuid)} bytes, expected {UUID_BYTES} or 0")
        if max_body is not None and len(body) > max_body:
            raise KVMsgError("oversized", f"body of {key[:64]!r} is {len(body)} bytes, over {max_body}")
        limit = MAX_PROPERTIES_BYTES + (SERVER_PROPERTIES_BYTES if max_body is None else 0)
        return cls(key, sequence, body, decode_properties(raw_props, limit), raw_uuid)

    def __repr__(self) -> str:
        return f"KVMsg({self.key!r}, seq={self.sequence}, {len(self.body)} bytes, {self.properties})"


def decode_key(raw: bytes) -> str:
    if len(raw) > MAX_KEY_BYTES:
        raise KVMsgError("bad_key", f"key is {len(raw)} bytes, over the {MAX_KEY_BYTES}-byte limit")
    try:
        return raw.decode()
    except UnicodeDecodeError:
        raise KVMsgError("bad_key", "key is not UTF-8") from None


def check_path(key: str) -> None:
    """Data keys are paths: start with "/", no control characters (they would break ``ls`` output)."""
    if not key.startswith("/"):
        raise KVMsgError("bad_key", f"key {key[:64]!r} does not start with '/'")
    if _CONTROL.search(key):
        raise KVMsgError("bad_key", f"key {key[:64]!r} contains control characters")
    if len(key.encode()) > MAX_KEY_BYTES:
        raise KVMsgError("bad_key", f"key is over the {MAX_KEY_BYTES}-byte limit")


def encode_properties(props: dict[str, str]) -> bytes:
    """``name=value\\n`` lines; raises KVMsgError (``bad_properties``) for what would not decode back."""
    for name, value in props.items():
        if not isinstance(name, str) or not isinstance(value, str):
            raise KVMsgError("bad_properties", f"property {name!r}: names and values must be strings")
        if not name or "=" in name or "\n" in name or "\n" in value:
            raise KVMsgError("bad_properties", f"property {name[:64]!r}: no '=' or newline in names or values")
    return "".join(f"{name}={value}\n" for name, value in props.items()).encode()


def decode_properties(raw: bytes, limit: int = MAX_PROPERTIES_BYTES) -> dict[str, str]:
    if len(raw) > limit:
        raise KVMsgError("bad_properties", f"properties are {len(raw)} bytes, over {limit}")
    try:
        text = raw.decode()
    except UnicodeDecodeError:
        raise KVMsgError("bad_properties", "properties are not UTF-8") from None
    props: dict[str, str] = {}
    for line in text.split("\n"):
        if not line:
            continue
        name, eq, value = line.partition("=")
        if not eq or not name:
            raise KVMsgError("bad_properties", f"property line {line[:64]!r} is not name=value")
        props[name] = value
    return props


def segment_of(key: str) -> str:
    """A path's top-level segment (``/scans/7/counted`` -> ``/scans/``; a key with no second ``/`` is its own
    segment): the unit of gap detection for clients that follow subtrees (docs/store.md, Lost updates)."""
    end = key.find("/", 1)
    return key if end < 0 else key[: end + 1]


def format_last(segments: dict[str, int], max_bytes: int = 2048) -> str:
    """The ``last`` property: ``/scans/:12 /nodegroups/:40``, at most ``max_bytes`` long; segments with a
    blank or ``:``, or over 128 bytes, are left out."""
    items, size = [], 0
    for seg, seq in segments.items():
        if " " in seg or ":" in seg or len(seg.encode()) > 128:
            continue
        item = f"{seg}:{seq}"
        size += len(item.encode()) + 1
        if size > max_bytes:
            break
        items.append(item)
    return " ".join(items)


def parse_last(text: str) -> dict[str, int]:
    """The ``last`` property back to {segment: sequence}; malformed items are skipped."""
    out = {}
    for item in text.split():
        seg, _, seq = item.rpartition(":")
        if seg and seq.isdigit():
            out[seg] = int(seq)
    return out


def parse_ttl(text: str) -> float:
    if not _DECIMAL.fullmatch(text):
        raise KVMsgError("bad_ttl", f"ttl {text[:32]!r} is not a decimal number")
    ttl = float(text)
    if not (math.isfinite(ttl) and 0 < ttl <= MAX_TTL_S):
        raise KVMsgError("bad_ttl", f"ttl {text[:32]!r} is outside (0, {MAX_TTL_S:g}] seconds")
    return ttl


def format_ttl(ttl: float) -> str:
    """Whole seconds as integers, as the zguide's C clients (which parse with atoi) expect."""
    parse_ttl(repr(float(ttl)))  # same validation as the server's
    return str(int(ttl)) if float(ttl).is_integer() else repr(float(ttl))


def decode_request(frames: Sequence[bytes]) -> tuple[bytes, tuple[str, ...]]:
    """A snapshot request as the server's ROUTER hands it over, ``[identity, ICANHAZ?, subtree...]``: no
    subtree frame means ``""`` (everything), a zguide client sends one, ours up to :data:`MAX_SUBTREES`;
    returns ``(identity, subtrees)``. Raises KVMsgError ``bad_request`` (wrong number of frames, a subtree
    not UTF-8 or too long) or ``bad_command``."""
    if not 2 <= len(frames) <= 2 + MAX_SUBTREES:
        raise KVMsgError("bad_request", f"{max(0, len(frames) - 1)} frames, expected 1 to {1 + MAX_SUBTREES}")
    identity, command = bytes(frames[0]), bytes(frames[1])
    if command != ICANHAZ:
        raise KVMsgError("bad_command", f"unknown command {command[:32]!r}")
    subtrees = []
    for frame in frames[2:] or [b""]:
        raw_subtree = bytes(frame)
        if len(raw_subtree) > MAX_KEY_BYTES:
            raise KVMsgError("bad_request", f"subtree is {len(raw_subtree)} bytes, over {MAX_KEY_BYTES}")
        try:
            subtrees.append(raw_subtree.decode())
        except UnicodeDecodeError:
            raise KVMsgError("bad_request", "subtree is not UTF-8") from None
    return identity, tuple(subtrees)


def snapshot_tag(subtrees: Sequence[str]) -> bytes:
    """The body of the ``KTHXBAI`` that ends a snapshot of ``subtrees``: the subtree itself for one (as in
    the zguide), the subtrees joined by newlines for several."""
    return "\n".join(subtrees).encode()


def decode_subscription(frames: Sequence[bytes]) -> tuple[bool, bytes]:
    """What an XPUB hands over: one frame, ``\\x01`` + topic (subscribe) or ``\\x00`` + topic
    (unsubscribe); returns ``(subscribe, topic)``. Raises KVMsgError ``bad_subscription``."""
    first = bytes(frames[0][:1]) if len(frames) == 1 else b""
    if first not in (b"\x00", b"\x01"):
        raise KVMsgError("bad_subscription", f"{len(frames)} frame(s) that are no (un)subscription")
    return first == b"\x01", bytes(frames[0][1:])


def decode_peer_state(frames: Sequence[bytes]) -> int:
    """A Binary Star state message from the peer server: one frame, ``1`` .. ``4`` as decimal text.
    Raises KVMsgError ``bad_peer``."""
    raw = bytes(frames[0]) if len(frames) == 1 else b""
    if raw not in _PEER_STATES:
        what = f"{raw[:16]!r}" if len(frames) == 1 else f"{len(frames)} frames"
        raise KVMsgError("bad_peer", f"{what} is not a Binary Star state")
    return int(raw)


def encode_value(value: Any, *, max_body: int = DEFAULT_MAX_BODY, key: str = "") -> bytes:
    """msgpack-encode ``value``; raises StoreError if it cannot be encoded or is over ``max_body``."""
    try:
        body = msgpack.packb(value, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as exc:
        raise StoreError(f"value for {key!r} cannot be msgpack-encoded: {exc}") from None
    if len(body) > max_body:
        raise StoreError(f"value for {key!r} is {len(body)} bytes encoded, over the {max_body}-byte limit")
    return body


def decode_value(body: bytes) -> Any:
    """The msgpack value of ``body``; bodies written by non-msgpack clients come back as raw bytes."""
    try:
        return msgpack.unpackb(body, raw=False, strict_map_key=False)
    except Exception:  # msgpack raises several unrelated types for foreign bodies
        return body

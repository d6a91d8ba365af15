"""The aggregator's fast path: a data header compared byte for byte with its scan's header template.

Within one scan and sector every header a producer sends is the same bytes but for the frame number and the
timestamp (docs/protocol.md, "Data channel"). :class:`HeaderTemplate` holds those fixed bytes, taken from the
canonical encoding (:meth:`SectorHeader.encode`) of the scan's header, and :meth:`HeaderTemplate.frame_of`
checks a header against them without unpacking it: no dict, no strings, no dataclass, no allocation but
the header's ``bytes``. A header that differs in any other byte (another key order, a wider integer than
needed for a fixed field, an extra key, another scan) is not an error here: it goes through the full
validating decoder (:meth:`SectorHeader.decode`), which accepts or names what is wrong. What passes here
would pass there: the frame number and timestamp must be msgpack unsigned integers, in range.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from stemstream.wire.protocol import MAX_HEADER_BYTES, SectorHeader

__all__ = ["HeaderTemplate", "add_template", "match"]

_NO = -1
_TS_MAX_TOP = 0x7F  # a timestamp is below 2**63: the top byte of a uint64 at most 0x7f


def _first_difference(a: bytes, b: bytes) -> int:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return min(len(a), len(b))


class HeaderTemplate:
    """The fixed bytes of one scan's data headers on one sector; :meth:`frame_of` matches a header."""

    __slots__ = ("middle", "n_frames", "prefix", "suffix")

    def __init__(self, prefix: bytes, middle: bytes, suffix: bytes, n_frames: int) -> None:
        self.prefix = prefix  # up to the frame number's value
        self.middle = middle  # between the frame number and the timestamp
        self.suffix = suffix  # after the timestamp
        self.n_frames = n_frames

    @classmethod
    def of(cls, header: SectorHeader) -> HeaderTemplate | None:
        """The template of every header like ``header`` (frame and timestamp aside); None when the canonical
        encoding does not put the frame number before the timestamp (then every header takes the full path)."""
        base = replace(header, frame_number=0, timestamp_ns=0).encode()
        frame_at = _first_difference(base, replace(header, frame_number=1, timestamp_ns=0).encode())
        ts_at = _first_difference(base, replace(header, frame_number=0, timestamp_ns=1).encode())
        if not frame_at < ts_at < len(base):
            return None
        return cls(base[:frame_at], base[frame_at + 1 : ts_at], base[ts_at + 1 :], header.n_frames)

    def frame_of(self, raw: bytes) -> int:
        """The frame number of header ``raw`` if it is this template's with a valid frame number and timestamp;
        -1 for anything else (take the full decoder)."""
        if len(raw) > MAX_HEADER_BYTES or not raw.startswith(self.prefix):
            return _NO
        p = len(self.prefix)
        try:
            kind = raw[p]
            if kind < 0x80:  # positive fixint
                frame, p = kind, p + 1
            elif kind == 0xCC:
                frame, p = raw[p + 1], p + 2
            elif kind == 0xCD:
                frame, p = raw[p + 1] << 8 | raw[p + 2], p + 3
            elif kind == 0xCE:
                frame, p = raw[p + 1] << 24 | raw[p + 2] << 16 | raw[p + 3] << 8 | raw[p + 4], p + 5
            else:
                return _NO
            if frame >= self.n_frames or not raw.startswith(self.middle, p):
                return _NO
            p += len(self.middle)
            kind = raw[p]
            if kind < 0x80:
                p += 1
            elif kind == 0xCC:
                p += 2
            elif kind == 0xCD:
                p += 3
            elif kind == 0xCE:
                p += 5
            elif kind == 0xCF and raw[p + 1] <= _TS_MAX_TOP:
                p += 9
            else:
                return _NO
        except IndexError:  # cut short
            return _NO
        if len(raw) != p + len(self.suffix) or not raw.startswith(self.suffix, p):
            return _NO
        return frame


def match(templates: list[tuple[HeaderTemplate, Any]], raw: bytes) -> tuple[Any, int]:
    """``(scan, frame)`` of the first template that ``raw`` matches; ``(None, -1)`` when none does."""
    for template, scan in templates:
        frame = template.frame_of(raw)
        if frame >= 0:
            return scan, frame
    return None, _NO


def add_template(
    templates: list[tuple[HeaderTemplate, Any]], scan: Any, header: SectorHeader
) -> list[tuple[HeaderTemplate, Any]]:
    """``templates`` with ``scan``'s, made from ``header`` (one the full decoder passed), unless it has one."""
    if any(s is scan for _, s in templates):
        return templates
    template = HeaderTemplate.of(header)
    return templates if template is None else [*templates, (template, scan)]

"""What one router thread of the aggregator holds: its PUSH sockets to each NodeGroup (:class:`RoutePeer`)
and, per scan, the expects, ends and routed frames (:class:`RouteScan`)."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import zmq

from stemstream.wire.protocol import EndMessage, ExpectMessage


@dataclass
class RoutePeer:
    """The PUSH sockets of one router thread to one NodeGroup."""

    uid: str
    endpoints: tuple[str, str]
    data: zmq.Socket
    info: zmq.Socket
    dead: bool = False
    # Set when the NodeGroup's registry record goes (it died) or the aggregator stops: a send blocked on
    # it gives up at once instead of holding the sector's thread, and every other NodeGroup, for the
    # whole send timeout.
    abort: threading.Event = field(default_factory=threading.Event)

    def close(self) -> None:
        self.data.close()
        self.info.close()


class RouteScan:
    """One scan (one acquisition of a scan number) as seen by one router thread."""

    def __init__(self, number: int, start: str) -> None:
        self.number = number
        self.start = start
        self.expects: dict[str, ExpectMessage] = {}
        self.ends: dict[str, EndMessage] = {}
        self.threads = 0
        self.members: tuple[str, ...] = ()
        self.scan_shape = (0, 0)
        self.n_frames = 0
        self.expected: dict[str, int] = {}
        self.active = False
        self.peers: list[RoutePeer | None] = []
        self.routed: list[int] = []
        self.routed_total = 0
        self.sent: dict[str, int] = {}
        self.sent_total: int | None = None
        self.lost = 0
        self.rejected = 0
        self.started = time.time()
        self.touched = time.monotonic()
        self._routed_frames = bytearray()  # bit f: frame f routed; grows with the frames seen, not the scan

    def routed_already(self, frame: int) -> bool:
        i = frame >> 3
        return i < len(self._routed_frames) and bool(self._routed_frames[i] >> (frame & 7) & 1)

    def mark_routed(self, frame: int) -> None:
        i, seen = frame >> 3, self._routed_frames
        if i >= len(seen):
            seen.extend(bytes(max(i + 1 - len(seen), len(seen), 64)))
        seen[i] |= 1 << (frame & 7)

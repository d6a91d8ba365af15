"""A scan as one NodeGroup assembles it: per-sector progress, the frames being assembled, and the fast
header check of its data messages."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np

from stemstream.nodes.consumer import ScanInfo
from stemstream.wire.protocol import DTYPE, MAX_HEADER_BYTES, PROTOCOL_VERSION, ExpectMessage


@dataclass(frozen=True)
class HeaderTemplate:
    """The fixed fields every data header of this NodeGroup carries."""

    n_sectors: int
    sector_shape: list[int]
    sector_nbytes: int


def _same(value: Any, want: int) -> bool:
    """``value == want`` for integers only (``True == 1`` and ``4.0 == 4`` in Python; not on the wire)."""
    return type(value) is int and value == want


def _same_pair(value: Any, want: list[int]) -> bool:
    return type(value) is list and len(value) == 2 and _same(value[0], want[0]) and _same(value[1], want[1])


class Assembly:
    """A frame being assembled: its buffer (set once its first sector is in it) and how many sectors are in.

    The first sector's thread gets the buffer from the consumer (which may block) and copies its sector
    before publishing the buffer; the other sectors' threads wait for it on the NodeGroup's condition.
    """

    __slots__ = ("buffer", "failed", "have")

    def __init__(self) -> None:
        self.buffer: np.ndarray | None = None
        self.have = 0
        self.failed = False  # the consumer raised instead of giving a buffer


class NodeGroupScan:
    """One scan on one NodeGroup. Mutable fields are guarded by the NodeGroup's lock."""

    def __init__(
        self, msg: ExpectMessage, uid: str, n_sectors: int, frame_shape: tuple[int, int], start: str = ""
    ) -> None:
        self.number = msg.scan_number
        self.start = start  # the acquisition (the expect's, or the newest of the number when it named none)
        self.scan_shape = msg.scan_shape
        self.scan_shape_list = list(msg.scan_shape)  # as a header carries it
        self.members = msg.members
        self.n_members = len(msg.members)
        self.my_index = msg.members.index(uid)
        self.n_frames = msg.scan_shape[0] * msg.scan_shape[1]
        self.info = ScanInfo(
            self.number,
            self.scan_shape,
            frame_shape,
            n_sectors,
            self.members,
            self.my_index,
            start,
        )
        self.expected: list[int | None] = [None] * n_sectors  # this NodeGroup's share, per sector
        self.sent: list[int | None] = [None] * n_sectors  # from the aggregator's end
        self.received = [0] * n_sectors
        self.rejected: dict[str, int] = {}
        self.share = len(range(self.my_index, self.n_frames, self.n_members))  # this NodeGroup's frames
        # Sectors claimed, by local index (frame // members), grown to the highest frame that data arrived for:
        # memory follows what came, not what the expect declared (a 65535 x 65535 scan costs nothing until then).
        self.mask = np.zeros(0, dtype=np.uint8 if n_sectors <= 8 else np.uint64)
        self.assembling: dict[int, Assembly] = {}
        # Per sector: the slowest other sector's progress when a bounded-assembly wait of this sector last
        # timed out (-1: none did). While the others have not moved past it, waiting again cannot help.
        self.lag_stuck = [-1.0] * n_sectors
        self.n_complete = 0
        self.in_flight = 0  # frame_ready calls under way
        self.busy = 0  # receiving threads in the consumer for a sector of this scan (claimed, not done)
        self.begun = False  # consumer.begin_scan has returned
        self.closing = False
        self.first_ts: float | None = None
        self.last_ts: float | None = None
        self.touched = time.monotonic()

    def bits(self, f: int) -> int:
        """The sectors of frame ``f`` claimed so far. Caller holds the lock."""
        k = f // self.n_members
        return int(self.mask[k]) if k < len(self.mask) else 0

    def claim(self, f: int, bits: int) -> None:
        """Set frame ``f``'s claimed sectors (growing the mask, doubling, up to the share). Caller holds the lock."""
        k = f // self.n_members
        if k >= len(self.mask):
            grown = np.zeros(min(self.share, max(k + 1, 2 * len(self.mask), 1024)), dtype=self.mask.dtype)
            grown[: len(self.mask)] = self.mask
            self.mask = grown
        self.mask[k] = bits

    def never_seen(self, limit: int) -> list[int]:
        """Up to ``limit`` frames of this NodeGroup's share that no sector arrived for, in order."""
        if limit <= 0:
            return []
        local = np.flatnonzero(self.mask == 0)[:limit].tolist()
        local += range(len(self.mask), min(self.share, len(self.mask) + limit - len(local)))
        return [self.my_index + k * self.n_members for k in local]

    @property
    def n_seen(self) -> int:
        """Frames of the share that at least one sector arrived for. Caller holds the lock."""
        return int(np.count_nonzero(self.mask))

    def all_in(self) -> bool:
        for m, sent in enumerate(self.sent):
            if sent is None or self.expected[m] is None or self.received[m] < sent:
                return False
        return True

    def slowest(self, m: int) -> float:
        """The least progress (received / expected) among the sectors other than ``m``; a sector whose
        expect is not in yet is at 0. Caller holds the lock."""
        slowest = 1.0
        for k, expected in enumerate(self.expected):
            if k != m:
                progress = 0.0 if expected is None else 1.0 if expected == 0 else self.received[k] / expected
                slowest = min(slowest, progress)
        return slowest

    def ahead(self, m: int, slowest: float, max_lag: int) -> bool:
        """Whether sector ``m`` is more than ``max_lag`` messages ahead of the slowest other sector (whose
        progress is ``slowest``, from :meth:`slowest`). Caller holds the lock."""
        expected_m = self.expected[m]
        if not expected_m:
            return False
        return self.received[m] - slowest * expected_m > max_lag


def fast_check(
    scans: dict[int, NodeGroupScan], m: int, parts: list[Any], template: HeaderTemplate
) -> tuple[NodeGroupScan, int, memoryview] | None:
    """The common case in a few microseconds: a header whose fixed fields equal those of a scan that
    has begun. Anything else (None) goes through the NodeGroup's full check, where the protocol's decoder
    validates it and says what is wrong; what passes here would pass there."""
    if len(parts) != 2:
        return None
    raw = getattr(parts[0], "buffer", parts[0])
    if len(raw) > MAX_HEADER_BYTES:
        return None
    try:
        obj = msgpack.unpackb(raw, raw=False, strict_map_key=True, use_list=True)
        scan_number, f, sector, ts = obj["scan"], obj["frame"], obj["sector"], obj["ts"]
    except Exception:  # garbage of any kind: the full check names it
        return None
    if not all(type(v) is int for v in (scan_number, f, sector, ts)):
        return None
    scan = scans.get(scan_number)
    if scan is None or not scan.begun or sector != m or not 0 <= ts < 2**63:
        return None
    start = obj.get("start")  # absent: the newest acquisition of the number, the one under way
    if start is not None and start != scan.start:
        return None
    if not 0 <= f < scan.n_frames or f % scan.n_members != scan.my_index:
        return None
    if not (
        _same(obj.get("v"), PROTOCOL_VERSION)
        and _same(obj.get("nsec"), template.n_sectors)
        and _same_pair(obj.get("shape"), template.sector_shape)
        and obj.get("dtype") == DTYPE
        and _same_pair(obj.get("scan_shape"), scan.scan_shape_list)
    ):
        return None
    payload = memoryview(getattr(parts[1], "buffer", parts[1])).cast("B")
    if payload.nbytes != template.sector_nbytes:
        return None
    return scan, f, payload

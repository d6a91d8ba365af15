"""One scan's sector as a producer's :class:`~stemstream.plane.retention.ScanKeeper` holds it, and how a
held sector is read back from the DAQ's ring with a check that the ring has not wrapped over it."""

from __future__ import annotations

import threading
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from stemstream.plane.diskwriter import SectorDiskWriter
from stemstream.scans.records import ROUTE_DISK, ProducerScanRecord, ScanPlan

SectorSource = Callable[[int], Any]  # frame number -> the sector's buffer (the DAQ's RAM)


class HeldScan:
    """One scan's sector as this producer holds it. Fields are guarded by the keeper's lock; disk writes
    by ``io``."""

    def __init__(self, plan: ScanPlan, directory: Path, source: SectorSource | None) -> None:
        self.plan = plan
        self.number = plan.scan_number
        self.start = plan.start
        self.key = (plan.scan_number, plan.start)  # a scan number may be held twice: acquisitions differ
        self.directory = directory
        self.source = source
        self.generation: Callable[[int], int] | None = getattr(source, "generation", None)
        self.ram: dict[int, Any] = {}  # frame -> buffer, or (with a source) its generation or CRC-32 when sent
        self.nbytes = 0
        self.on_disk = 0
        self.writer: SectorDiskWriter | None = None
        self.paths: list[Path] = []
        self.must_write = plan.route == ROUTE_DISK  # everything goes to disk: disk route, degraded, replay
        self.spilled = False
        self.sending = True
        self.state = "sending"
        self.reason = ""
        self.error: str | None = None
        self.failed_at = 0.0  # last disk failure (monotonic)
        self.record: ProducerScanRecord | None = None  # this producer's /scans/<n>/producers/<uid> record
        self.unprotected = 0
        self.wrapped = 0  # sectors whose ring slot changed before they could be written
        self.progress = b""
        self.progress_at = time.monotonic()
        self.gone_since: float | None = None
        self.io = threading.Lock()
        self.settled = threading.Event()

    def check(self, frame: int, buffer: Any) -> int | None:
        """With a source: what tells, when the sector is read from the DAQ's ring again, whether its slot
        still holds it (the ring's generation of the frame, else a CRC-32 of the pixels as sent)."""
        if self.source is None:
            return None
        if self.generation is not None:
            return int(self.generation(frame))
        return zlib.crc32(memoryview(buffer).cast("B"))

    def read_back(self, frame: int, entry: Any) -> Any:
        """The pixels of ``frame`` to write, given its RAM ``entry``: the buffer itself, or a copy from the
        DAQ's ring checked against what was sent; None when the ring slot holds something else by now."""
        if self.source is None:
            return entry
        before = int(self.generation(frame)) if self.generation is not None else None
        data = bytes(memoryview(self.source(frame)).cast("B"))  # a copy: the slot may change under us
        if self.generation is not None:
            ok = before == entry == int(self.generation(frame))
        else:
            ok = zlib.crc32(data) == entry
        return data if ok else None

"""Recorded raw files streamed through the live pipeline as the four producers would (``stemstream replay``).

Commissioning a site, or reproducing a problem with real data: the raw files of one acquisition of a scan
(``data_scan<n>_module<m>.data``, docs/protocol.md "Raw files") are indexed (each record's frame number and
file offset; nothing is read into memory but the headers), and one :class:`~stemstream.plane.producer.Producer`
per sector, in this process, plans and streams the scan exactly as a receiving server does: sector 0's is
the leader that plans it, each has ``threads`` sender threads, frames a sector's files do not have are lost
upstream, and each sector is read from its file when it is sent (and again if the scan must be replayed from
the producers' hold: the files do not change, so the source says generation 0 for every frame). ``rate``
paces each sector at that many frames per second (None: as fast as the plane takes them). Run it instead of
the site's producers: it registers its own four, ``replay-<m>-<pid>``.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from stemstream.errors import RawFileError
from stemstream.plane.producer import Producer
from stemstream.plane.session import ProducerScanResult
from stemstream.transport.actor import Worker, run_workers
from stemstream.wire.protocol import N_SECTORS, SECTOR_SHAPE
from stemstream.wire.rawfile import find_acquisitions, index_records

logger = logging.getLogger(__name__)

_SECTOR_BYTES = SECTOR_SHAPE[0] * SECTOR_SHAPE[1] * 2


@dataclass
class RecordedScan:
    """One acquisition's raw files, indexed: per sector, frame -> (file, offset of its payload)."""

    scan_number: int
    scan_shape: tuple[int, int]
    start: str
    sectors: list[dict[int, tuple[Path, int]]]


def index_scan(directory: Path | str, scan_number: int, start: str | None = None) -> RecordedScan:
    """Index the raw files of ``scan_number`` in ``directory`` (the newest acquisition, or ``start``'s).
    Raises RawFileError (one line) for no files, a truncated record, or records that disagree."""
    found = find_acquisitions(directory, scan_number)
    chosen = [a for a in found if start is None or a.start == start]
    if not chosen:
        have = ", ".join(a.start or "(no id)" for a in found) or "none"
        what = f"acquisition {start} of scan {scan_number}" if start else f"raw files of scan {scan_number}"
        raise RawFileError(f"no {what} in {directory} (acquisitions there: {have})")
    acquisition = chosen[-1]
    sectors: list[dict[int, tuple[Path, int]]] = [{} for _ in range(N_SECTORS)]
    shape: tuple[int, int] | None = None
    for rec in index_records(acquisition.paths):  # validated: one scan, one size, whole records
        shape = rec.scan_shape
        sectors[rec.sector].setdefault(rec.frame_number, (rec.path, rec.payload_offset))  # stempy keeps the first too
    if shape is None:
        raise RawFileError(f"the raw files of scan {scan_number} in {directory} hold no records")
    return RecordedScan(scan_number, shape, acquisition.start, sectors)


class FileSectors:
    """Sector ``m`` of a recorded scan by frame number, read from its file when asked (a producer's source)."""

    def __init__(self, index: dict[int, tuple[Path, int]]) -> None:
        self.index = index
        self._fds: dict[Path, int] = {}
        self._lock = threading.Lock()

    def __call__(self, frame: int) -> np.ndarray:
        path, offset = self.index[frame]
        with self._lock:
            fd = self._fds.get(path)
            if fd is None:
                fd = self._fds[path] = os.open(path, os.O_RDONLY)
        data = os.pread(fd, _SECTOR_BYTES, offset)
        if len(data) != _SECTOR_BYTES:
            raise RawFileError(f"{path}: the record at byte {offset} was cut short since it was indexed")
        return np.frombuffer(data, dtype="<u2").reshape(SECTOR_SHAPE)

    def generation(self, frame: int) -> int:
        """The files do not change: every frame is as first read (no CRC needed to replay from the hold)."""
        return 0

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()


def replay_scan(
    store: Any,
    directory: Path | str,
    scan_number: int,
    *,
    as_scan: int | None = None,
    start: str | None = None,
    rate: float | None = None,
    threads: int = 1,
    stop: threading.Event | None = None,
    drain_timeout: float | None = None,
) -> list[ProducerScanResult]:
    """Stream the recorded scan through the live pipeline (as scan ``as_scan``, default its own number);
    returns each sector's result once the producers have let go of it (acknowledged, or written to disk)."""
    recorded = index_scan(directory, scan_number, start)
    number = scan_number if as_scan is None else as_scan
    stop = stop or threading.Event()
    sources = [FileSectors(index) for index in recorded.sectors]
    producers = [Producer(store, m, threads=threads, uid=f"replay-{m}-{os.getpid()}", leader=m == 0)
                 for m in range(N_SECTORS)]  # fmt: skip
    results: list[ProducerScanResult | None] = [None] * N_SECTORS
    try:
        for p in producers:
            p.start()
        workers = [
            Worker(f"replay-{m}", lambda m=m: _sector(producers[m], sources[m], number, recorded, rate, stop, results))
            for m in range(N_SECTORS)
        ]
        run_workers(workers)
    finally:
        for p in producers:
            p.close(drain_timeout=0.0 if stop.is_set() else drain_timeout)
        for s in sources:
            s.close()
    return [r for r in results if r is not None]


def _sector(
    producer: Producer,
    source: FileSectors,
    number: int,
    recorded: RecordedScan,
    rate: float | None,
    stop: threading.Event,
    results: list[ProducerScanResult | None],
) -> None:
    session = producer.begin_scan(number, recorded.scan_shape, source=source)
    m = producer.sector

    def send(t: int) -> None:
        frames = [f for f in session.share(t) if f in source.index]
        began = time.monotonic()
        with session.sender(t, frames) as tx:
            for f in frames:
                if rate:  # frame f of the scan at f / rate seconds, as the detector would have it
                    wait = began + f / rate - time.monotonic()
                    if wait > 0 and stop.wait(wait):
                        return
                elif stop.is_set():
                    return
                tx.send(f, source(f))

    senders = [Worker(f"replay-{m}-{t}", lambda t=t: send(t)) for t in range(producer.threads)]
    run_workers(senders)
    result = session.finish()
    results[m] = result
    route = "streamed" if result.route == "stream" else "wrote"
    what = "replay of scan %d sector %d: %s %d sectors (%d lost upstream)"
    logger.info(what, number, m, route, result.sent_total, result.lost_upstream)


__all__ = ["FileSectors", "RecordedScan", "index_scan", "replay_scan"]

"""Scan-level acknowledgement and replay: nothing a producer streamed is let go before it is safe.

A receiving server holds a scan in RAM anyway. A :class:`ScanKeeper` (one per producer) keeps every sector
it streamed (a reference to the DAQ's buffer, or, with a *source*, only the frame number: the DAQ's ring
has the pixels) until the scan is **acknowledged** through the store:

* ``ack = "counted"`` (a NodeGroup counts): ``/scans/<n>/counted`` says ``counted`` and the NodeGroups
  received exactly what the producers report sent (``messages.received == sum(sent_total)``);
* ``ack = "received"`` (NodeGroups whose consumer keeps the frames, e.g. tests): every member's
  ``/scans/<n>/nodegroups/<uid>`` is ``received`` and the received total equals the sent total.

The plan (``/scans/<n>``) fixes which of the two applies, from the members' registry records.

A scan is **replayed**, i.e. this producer writes its whole sector of the scan to disk in the raw format,
when the acknowledgement cannot come: a producer could not stream its sector (the aggregator stopped taking
data: it *degraded* to disk), the counted file is ``partial`` or ``failed``, the accounting does not add
up (received != sent), a member NodeGroup left the registry before the scan was counted, or nothing about
the scan changed in the store for ``ack_timeout_s``. Each producer writes ``/scans/<n>/replay/<sector>``;
the leader then marks ``/scans/<n>`` ``on_disk`` with ``replayed: true`` and the paths, which is what the
session flow counts with ``count_fallback_scan``.

Memory is bounded (``hold_bytes``), and no sector goes unprotected while the disk works: when a new sector
would exceed the bound, the oldest held scans are *spilled* (their sectors written to disk now) until it
fits; a spilled scan, the current one included, is *written through* from then on: each of its sectors goes
to disk as it is sent. A spilled scan's files are deleted again if it is acknowledged; if it is replayed,
the replay completes from there. When the disk cannot take a sector (full, read-only) the error says what
to free, the sector stays in RAM while the bound allows, and writes are retried every ``retry_s``; only a
sector that neither RAM nor disk can take is *unprotected* (counted, and logged as an error).
Disk-route scans use the same machinery: a sector the disk refuses stays in RAM and is written on retry.

With a ``source`` (frame number -> the sector in the DAQ's RAM ring) the keeper holds frame numbers and a
check of each sector as it was sent: the ring's ``generation(frame)`` when the source has one, else a CRC-32
of the pixels. A sector whose ring slot changed before it was written (the ring wrapped) is reported
(``wrapped``) and never written: wrong pixels under the right frame number would be worse than a gap.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import msgpack

from stemstream.errors import FallbackError, StemstreamError, WaitTimeout
from stemstream.log import RateLimitedLog
from stemstream.plane.diskwriter import SectorDiskWriter
from stemstream.plane.heldscan import HeldScan, SectorSource
from stemstream.plane.replaymark import ReplayMarker, scan_items, store_set
from stemstream.scans import keys
from stemstream.scans.ack import ACK, REPLAY, ack_verdict
from stemstream.scans.plan import KeyValue, Members
from stemstream.scans.records import (
    ROUTE_DISK,
    ROUTE_STREAM,
    ProducerScanRecord,
    ReplayRecord,
    ScanPlan,
)
from stemstream.transport.actor import Worker

logger = logging.getLogger(__name__)
_rlog = RateLimitedLog(logger)


class ScanKeeper:
    """Holds one producer's streamed sectors until their scan is acknowledged; replays the rest to disk."""

    def __init__(
        self,
        store: KeyValue,
        registry: Members,
        sector: int,
        *,
        producer_uid: str,
        sector_nbytes: int,
        n_sectors: int,
        sector_shape: tuple[int, int],
        leader: bool,
        hold_bytes: int,
        ack_timeout_s: float,
        retry_s: float = 2.0,
        gone_grace_s: float = 3.0,
        poll_s: float = 0.2,
        on_release: Callable[[int], None] | None = None,
    ) -> None:
        self.store = store
        self.registry = registry
        self.sector = sector
        self.producer_uid = producer_uid
        self.sector_nbytes = sector_nbytes
        self.n_sectors = n_sectors
        self.sector_shape = sector_shape
        self.leader = leader
        self.hold_bytes = hold_bytes
        self.ack_timeout_s = ack_timeout_s
        self.retry_s = retry_s
        self.gone_grace_s = gone_grace_s
        self.poll_s = poll_s
        self.on_release = on_release
        self._lock = threading.Lock()
        # Held scans by (scan number, acquisition): a reused scan number may be held twice at once (its earlier
        # acquisition not yet acknowledged when the DAQ begins it again).
        self._scans: OrderedDict[tuple[int, str], HeldScan] = OrderedDict()
        self._settled: OrderedDict[tuple[int, str], str] = OrderedDict()  # recently settled scans: final state
        self._to_mark = ReplayMarker(store, n_sectors, ack_timeout_s)  # leader: replayed scans to mark
        self._bytes = 0
        self._stop = threading.Event()
        self._disk_failed_at = 0.0
        self._last_disk_error: str | None = None
        self._spilling = threading.Lock()  # one sender thread makes room at a time
        self.counts = {
            "acked": 0,
            "replayed": 0,
            "spilled": 0,
            "written_through": 0,
            "unprotected": 0,
            "wrapped": 0,
            "disk_errors": 0,
            "sectors_on_disk": 0,
        }
        self._worker = Worker("scan-keeper", self._run)

    # ---- life cycle

    def start(self) -> ScanKeeper:
        self._worker.start()
        return self

    def close(self, timeout: float) -> None:
        """Wait up to ``timeout`` for held scans to be acknowledged, then write what is left to disk, saying
        what it writes and how far it got (about once a second)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.pending():
            self._worker.maybe_raise()
            time.sleep(self.poll_s)
        with self._lock:
            left = [h for h in self._scans.values() if h.state in ("sending", "waiting")]
            held_sectors = sum(len(h.ram) for h in self._scans.values())
            held_mb = self._bytes / 1e6
            scans = sorted({h.number for h in self._scans.values() if not h.settled.is_set()})
        if scans:
            logger.warning("sector %d: shutting down with %d held sectors (%.0f MB) of scan(s) %s not "
                           "acknowledged: writing them to disk", self.sector, held_sectors, held_mb, scans)  # fmt: skip
        for held in left:
            self._replay(held, "the producer is shutting down before the scan was acknowledged")
        # Writing what is left: wait while the disk takes it (a failing disk gets two more tries).
        started = time.monotonic()
        written, since, said = -1, started, started
        while self._writing_left():
            with self._lock:
                now_written = self.counts["sectors_on_disk"]
                remaining = sum(len(h.ram) for h in self._scans.values())
            now = time.monotonic()
            if now_written != written:
                written, since = now_written, now
            elif now - since > 2 * self.retry_s + 1:
                break
            if now - said >= 1.0:
                said = now
                logger.warning("sector %d: shutting down: %d sectors left to write", self.sector, remaining)
            time.sleep(self.poll_s)
        if scans:
            logger.warning("sector %d: held scans written in %.1f s", self.sector, time.monotonic() - started)
        # Leader: mark the replayed scans on_disk once every sector's replay record is in (seconds at most:
        # the other producers write theirs as they finish). The scan's closing record is not waited for: the
        # NodeGroups may never report, and the closer thread ends with this process.
        marking = time.monotonic()
        while self._to_mark and time.monotonic() - marking < 3.0:
            with contextlib.suppress(StemstreamError):
                self._to_mark.run(shutting_down=True)
            if self._to_mark:
                time.sleep(self.poll_s)
        self._stop.set()
        if self._worker.is_alive():
            self._worker.join(10.0)
        with self._lock:
            stuck = [h for h in self._scans.values() if h.ram]
        for held in stuck:
            logger.error(
                "scan %d sector %d: %d sectors could not be written to %s (%s) and are lost at shutdown",
                held.number, self.sector, len(held.ram), held.directory, held.error,
            )  # fmt: skip

    def maybe_raise(self) -> None:
        self._worker.maybe_raise()

    def pending(self) -> list[int]:
        """Scans held and not settled yet (acknowledged, or entirely on disk)."""
        with self._lock:
            return [h.number for h in self._scans.values() if not h.settled.is_set()]

    def _writing_left(self) -> bool:
        with self._lock:
            return any(not h.settled.is_set() for h in self._scans.values())

    def wait_settled(self, scan_number: int, timeout: float, start: str | None = None) -> str:
        """Block until ``scan_number`` (its newest acquisition held here, or ``start``) is acknowledged or on
        disk: "acked" or "on_disk" (TimeoutError)."""
        with self._lock:
            held = final = None
            for key, h in self._scans.items():
                if key[0] == scan_number and (start is None or key[1] == start):
                    held = h
            if held is None:
                for key, state in self._settled.items():
                    if key[0] == scan_number and (start is None or key[1] == start):
                        final = state
        if final is not None:
            return final
        if held is None:
            raise KeyError(f"scan {scan_number} is not held by this producer")
        if not held.settled.wait(timeout):
            raise WaitTimeout(f"scan {scan_number}: not acknowledged or on disk within {timeout:.0f} s")
        return held.state

    def _settle(self, held: HeldScan, state: str) -> None:
        """Caller holds the lock."""
        held.state = state
        if self._scans.get(held.key) is held:
            del self._scans[held.key]
        self._settled[held.key] = state
        while len(self._settled) > 1024:
            self._settled.popitem(last=False)
        held.settled.set()

    def held_bytes(self) -> int:
        with self._lock:
            return self._bytes

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            out = dict(self.counts)
            out["held_bytes"] = self._bytes
            out["held_scans"] = sum(1 for h in self._scans.values() if h.ram)
            return out

    # ---- called by the producer's sender threads

    def open(self, plan: ScanPlan, directory: Path, source: SectorSource | None = None) -> HeldScan:
        held = HeldScan(plan, directory, source)
        with self._lock:
            self._scans[held.key] = held
        return held

    def keep(self, held: HeldScan, frame: int, buffer: Any) -> None:
        """A sector that was streamed: hold it until the scan is acknowledged. Past the RAM bound the oldest
        held scans are spilled to disk, and a spilled scan's sectors are written through as they are sent;
        only a sector that neither RAM nor disk can take is unprotected (and said so, loudly)."""
        if held.must_write:
            self.write(held, frame, buffer)
            return
        if not held.spilled:
            check = held.check(frame, buffer)
            with self._lock:
                if self._fits():
                    self._hold(held, frame, buffer, check)
                    return
            self._make_room(held)
            with self._lock:
                if not held.spilled and self._fits():
                    self._hold(held, frame, buffer, check)
                    return
        if self._write_through(held, frame, buffer):
            return
        check = held.check(frame, buffer)
        with self._lock:  # the disk refused it: RAM while the bound allows, retried from there
            if self._fits():
                self._hold(held, frame, buffer, check)
                return
            held.unprotected += 1
            self.counts["unprotected"] += 1
        _rlog.error(
            "unprotected",
            "sector %d: UNPROTECTED: the RAM hold is full (%d MB) and %s refuses writes (%s): scan %d frame %d "
            "is streamed but neither held nor on disk, as is every sector streamed until space is freed there",
            self.sector, self.hold_bytes >> 20, held.directory, self._last_disk_error or "disk error",
            held.number, frame,
        )  # fmt: skip

    def write(self, held: HeldScan, frame: int, buffer: Any) -> None:
        """A sector that must go to disk now; when the disk refuses it, it stays in RAM (up to the bound)
        and is written on retry. Raises FallbackError only when it can be neither written nor held."""
        try:
            with held.io:
                self._writer(held).write(frame, buffer)
            with self._lock:
                held.on_disk += 1
                self.counts["sectors_on_disk"] += 1
            return
        except FallbackError as exc:
            self._disk_failed(held, exc)
        check = held.check(frame, buffer)
        with self._lock:
            if self._fits():
                self._hold(held, frame, buffer, check)
                return
        raise FallbackError(f"{held.error}; the RAM hold ({self.hold_bytes >> 20} MB) is full too")

    def degrade(self, held: HeldScan, reason: str) -> None:
        """The scan could not be streamed: everything of it goes to disk (held sectors in the background)."""
        with self._lock:
            if held.must_write:
                return
            held.must_write = True
            held.reason = reason
            self.counts["replayed"] += 1
        logger.error("scan %d sector %d: %s; writing the sector to disk", held.number, self.sector, reason)

    def sending_done(self, held: HeldScan, record: ProducerScanRecord) -> ProducerScanRecord:
        """The producer's threads are done with the scan; ``record`` is its producer record, completed here
        with what is held and on disk (and re-set by the keeper when the disk catches up)."""
        with self._lock:
            held.sending = False
            held.record = record
            held.state = "writing" if held.must_write else "waiting"
            held.progress_at = time.monotonic()
            direct = held.plan.route == ROUTE_DISK and not held.ram
        if direct:  # a disk scan the disk took whole: close its files now, the record names them
            with held.io:
                try:
                    held.paths = held.writer.close() if held.writer is not None else []
                    held.writer = None
                except FallbackError as exc:
                    self._disk_failed(held, exc)
                    direct = False
        with self._lock:
            if direct:
                self._settle(held, "on_disk")
            record = self._with_holding(held, record)
            if held.plan.route == ROUTE_DISK and not direct:
                record = replace(record, status="held")
            held.record = record
        if direct and self.on_release is not None:
            self.on_release(held.number)
        return record

    # ---- internals

    def _fits(self) -> bool:
        """Caller holds the lock."""
        return self._bytes + self.sector_nbytes <= self.hold_bytes

    def _hold(self, held: HeldScan, frame: int, buffer: Any, check: int | None = None) -> None:
        """Caller holds the lock."""
        held.ram[frame] = buffer if held.source is None else check
        held.nbytes += self.sector_nbytes
        self._bytes += self.sector_nbytes

    def _drop(self, held: HeldScan, frame: int) -> None:
        """Let go of ``frame``'s RAM (written, or lost to the ring). Caller holds the lock."""
        if frame in held.ram:
            del held.ram[frame]
            held.nbytes -= self.sector_nbytes
            self._bytes -= self.sector_nbytes

    def _from_ram(self, held: HeldScan, frame: int) -> Any:
        """A held sector's pixels to write (see :meth:`HeldScan.read_back`); None, and reported, when the
        DAQ's ring slot holds something else by now."""
        with self._lock:
            entry = held.ram.get(frame)
        data = held.read_back(frame, entry)
        if data is not None or held.source is None:
            return data
        with self._lock:
            self._drop(held, frame)
            held.wrapped += 1
            self.counts["wrapped"] += 1
        logger.error(
            "scan %d sector %d frame %d: the DAQ's ring slot no longer holds this sector (the ring wrapped before "
            "it was written): not written; %d such sector(s) in this scan",
            held.number, self.sector, frame, held.wrapped,
        )  # fmt: skip
        return None

    def _writer(self, held: HeldScan) -> SectorDiskWriter:
        if held.writer is None:
            held.writer = SectorDiskWriter(
                held.directory,
                held.number,
                held.plan.scan_shape,
                self.sector,
                n_sectors=self.n_sectors,
                sector_shape=self.sector_shape,
                start=held.start,
            )
        return held.writer

    def _disk_failed(self, held: HeldScan, exc: StemstreamError) -> None:
        with self._lock:
            held.error = self._last_disk_error = str(exc)
            held.failed_at = self._disk_failed_at = time.monotonic()
            self.counts["disk_errors"] += 1
        _rlog.error("disk", "sector %d: %s; the data stays in RAM (%d MB held) and is retried every %.0f s",
                    self.sector, exc, self.held_bytes() >> 20, self.retry_s)  # fmt: skip

    def _make_room(self, current: HeldScan) -> None:
        """Spill held scans, oldest first, until a sector of ``current`` fits in RAM; when none is left to
        spill, ``current`` itself is spilled (its sectors are written through from then on). Nothing is
        spilled while the disk failed within ``retry_s`` (the sector goes to disk or RAM in ``keep``)."""
        with self._spilling:
            while True:
                with self._lock:
                    if self._fits() or current.spilled:
                        return
                    if time.monotonic() - self._disk_failed_at < self.retry_s:
                        return
                    victims = [h for h in self._scans.values() if h.ram and not h.must_write and not h.spilled]
                    victim = victims[0] if victims else current
                    victim.spilled = True
                    self.counts["spilled"] += 1
                then = "; its sectors are written through from now on" if victim is current else ""
                logger.warning("sector %d: RAM hold full (%d MB); spilling scan %d to %s%s",
                               self.sector, self.hold_bytes >> 20, victim.number, victim.directory, then)  # fmt: skip
                if not self._flush(victim):
                    return

    def _write_through(self, held: HeldScan, frame: int, buffer: Any) -> bool:
        """A sector of a spilled scan, straight to disk; False when the disk refused it."""
        try:
            with held.io:
                self._writer(held).write(frame, buffer)
        except FallbackError as exc:
            self._disk_failed(held, exc)
            return False
        with self._lock:
            held.on_disk += 1
            self.counts["sectors_on_disk"] += 1
            self.counts["written_through"] += 1
        return True

    def _flush(self, held: HeldScan) -> bool:
        """Write ``held``'s RAM sectors to disk; True when all went. Frames stay in RAM on failure; a frame
        whose ring slot was overwritten meanwhile is dropped, and reported, instead of written."""
        with held.io:
            with self._lock:
                frames = sorted(held.ram)
            for frame in frames:
                buffer = self._from_ram(held, frame)
                if buffer is None:
                    continue
                try:
                    self._writer(held).write(frame, buffer)
                except FallbackError as exc:
                    self._disk_failed(held, exc)
                    return False
                with self._lock:
                    self._drop(held, frame)
                    held.on_disk += 1
                    self.counts["sectors_on_disk"] += 1
        with self._lock:
            held.error = None
        return True

    def _with_holding(self, held: HeldScan, record: ProducerScanRecord) -> ProducerScanRecord:
        """The producer record with what this keeper holds of the scan and where its files are."""
        return replace(
            record,
            held_bytes=held.nbytes,
            on_disk=held.on_disk,
            unprotected=held.unprotected,
            wrapped=held.wrapped,
            disk_error=held.error,
            paths=tuple(str(p) for p in held.paths),
        )

    def _replay(self, held: HeldScan, reason: str) -> None:
        with self._lock:
            if held.state not in ("sending", "waiting"):
                return
            held.must_write = True
            held.reason = reason
            held.state = "writing" if not held.sending else "sending"
            self.counts["replayed"] += 1
        logger.error("scan %d sector %d: replaying to disk: %s", held.number, self.sector, reason)

    def _release(self, held: HeldScan, why: str) -> None:
        """Acknowledged: let go of the RAM and of any spilled files."""
        with held.io:
            paths: list[Path] = []
            if held.writer is not None:
                paths = held.writer.discard()
                held.writer = None
        with self._lock:
            self._bytes -= held.nbytes
            held.nbytes = 0
            held.ram.clear()
            self.counts["acked"] += 1
            self._settle(held, "acked")
        logger.info("scan %d sector %d acknowledged (%s)%s", held.number, self.sector, why,
                    f"; {len(paths)} spilled file(s) deleted" if paths else "")  # fmt: skip
        if self.on_release is not None:
            self.on_release(held.number)

    def _finish_disk(self, held: HeldScan) -> None:
        """Everything of ``held`` is on disk: close the files, say so in the store, let go."""
        with held.io:
            try:
                held.paths = held.writer.close() if held.writer is not None else []
            except FallbackError as exc:
                self._disk_failed(held, exc)
                return
            held.writer = None
        with self._lock:
            self._settle(held, "on_disk")
        plan = held.plan
        paths = [str(p) for p in held.paths]
        if plan.route == ROUTE_STREAM:
            replay = ReplayRecord(
                self.sector,
                self.producer_uid,
                held.reason or "",
                held.on_disk,
                tuple(paths),
                time.time(),
                start=held.start,
                wrapped=held.wrapped,
            )
            store_set(self.store, keys.replay(held.number, self.sector), replay.to_record())
            if self.leader:
                self._to_mark.add(plan, held.reason)
        if held.record is not None and (held.record.status == "held" or plan.route == ROUTE_STREAM):
            record = self._with_holding(held, held.record)
            if record.status == "held":
                record = replace(record, status="done")
            held.record = record
            store_set(self.store, keys.producer(held.number, self.producer_uid), record.to_record())
        logger.warning("scan %d sector %d: %d sectors on disk in %s", held.number, self.sector, held.on_disk,
                       held.directory)  # fmt: skip
        if self.on_release is not None:
            self.on_release(held.number)

    def _judge(self, held: HeldScan, live: dict[str, float], now: float) -> None:
        items = scan_items(self.store, held.number)
        token = hashlib.blake2b(msgpack.packb(sorted(items.items()), default=str), digest_size=8).digest()
        if token != held.progress:
            held.progress, held.progress_at = token, now
        verdict, why = ack_verdict(held.plan, items, live)
        if verdict == REPLAY and why.startswith("NodeGroup(s)"):
            held.gone_since = held.gone_since or now
            if now - held.gone_since < self.gone_grace_s:
                return  # a NodeGroup leaving just after its rank 0 wrote the file: give the record a moment
        if verdict == ACK:
            self._release(held, why)
        elif verdict == REPLAY:
            self._replay(held, why)
        elif now - held.progress_at > self.ack_timeout_s:
            self._replay(held, f"nothing about the scan changed in the store for {self.ack_timeout_s:.0f} s")

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            now = time.monotonic()
            with self._lock:
                scans = list(self._scans.values())
            live: dict[str, float] | None = None
            for held in scans:
                try:
                    if held.state == "waiting":
                        if live is None:
                            live = {r.uid: float(r.started) for r in self.registry.members("nodegroup")}
                        self._judge(held, live, now)
                    due = now - held.failed_at >= self.retry_s
                    if held.state == "writing" and due and self._flush(held):
                        self._finish_disk(held)
                    elif held.spilled and held.ram and due and held.state in ("sending", "waiting"):
                        self._flush(held)  # a spilled scan's sectors the disk refused: written once it can
                except StemstreamError as exc:  # the store is away: try again next round
                    _rlog.warning("keeper", "scan %d sector %d: %s", held.number, self.sector, exc)
            if self._to_mark:
                try:
                    self._to_mark.run()
                except StemstreamError as exc:
                    _rlog.warning("keeper-mark", "marking replayed scans: %s", exc)

"""One scan on one producer: the :class:`ScanSession` (its plan, its slots' shares, its hold) and the
:class:`SectorSender` each DAQ thread sends its share of the sector through (``expect``, data, ``end``)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import numpy as np

from stemstream.log import RateLimitedLog
from stemstream.plane.retention import SectorSource
from stemstream.scans import keys
from stemstream.scans.plan import share_counts
from stemstream.scans.records import ROUTE_STREAM, ProducerScanRecord, ScanPlan
from stemstream.transport.actor import SendAborted, send_parts
from stemstream.wire.protocol import (
    EndMessage,
    ExpectMessage,
    SectorHeader,
)

if TYPE_CHECKING:
    from stemstream.plane.producer import Producer

logger = logging.getLogger(__name__)
_rlog = RateLimitedLog(logger)


@dataclass
class ProducerScanResult:
    """What one producer did with one scan."""

    scan_number: int
    sector: int
    route: str
    sent: dict[str, int]  # NodeGroup UID -> data messages (stream) or {"disk": n} (disk)
    lost_upstream: int
    paths: list[Path]
    seconds: float

    @property
    def sent_total(self) -> int:
        return sum(self.sent.values())


class ScanSession:
    """One scan of one producer: a :class:`SectorSender` per thread slot, then :meth:`finish`."""

    def __init__(self, producer: Producer, plan: ScanPlan, source: SectorSource | None = None) -> None:
        if producer.keeper is None:
            raise RuntimeError("Producer.start() first")
        self.producer = producer
        self.plan = plan
        self.scan_number = plan.scan_number
        self.scan_shape = plan.scan_shape
        self.started = time.time()
        self._lock = threading.Lock()
        self._done: dict[int, tuple[dict[str, int], int]] = {}  # slot -> (sent per uid, lost upstream)
        self._front = threading.Condition()
        self._at: dict[int, int] = {}  # slot -> frame it is sending, while it is sending
        self._result: ProducerScanResult | None = None
        self.degraded: str | None = None  # why the rest of this scan goes to disk
        directory = producer.raw_directory(plan)  # checked: the plan's directory may be anyone's choice
        self.keeper = producer.keeper
        self.held = producer.keeper.open(plan, directory, source)

    @property
    def route(self) -> str:
        return self.plan.route

    def share(self, t: int) -> range:
        """The frames thread slot ``t`` is responsible for."""
        return range(t, self.plan.n_frames, self.producer.threads)

    def sender(self, t: int, frames: Iterable[int] | np.ndarray | None = None) -> SectorSender:
        """The sender of thread slot ``t``; ``frames``: the frames of its share it will send (default: all).

        Use it as a context manager from the thread that sends: entering announces the counts
        (``expect``), leaving reports what was sent (``end``), even when the thread fails.
        """
        if not 0 <= t < self.producer.threads:
            raise ValueError(f"thread slot {t} outside 0..{self.producer.threads - 1}")
        with self._lock:
            if t in self._done:
                raise RuntimeError(f"scan {self.scan_number}: slot {t} has already sent")
        arr = np.asarray(
            self.share(t) if frames is None else np.fromiter(frames, dtype=np.int64),
            dtype=np.int64,
        )
        return SectorSender(self, t, arr)

    def _pace(self, t: int, frame: int) -> None:
        """Slot ``t`` is about to send ``frame``: wait while it is more than ``max_skew`` frames ahead of
        the slowest sibling that is sending (the slowest never waits; the wait is bounded by
        ``skew_wait_s``). Siblings share one aggregator thread and one NodeGroup socket per sector, so
        their skew is what the NodeGroups would otherwise have to hold in memory."""
        p = self.producer
        with self._front:
            self._at[t] = frame
            self._front.notify_all()
            if p.max_skew is None:
                return
            give_up = None
            while True:
                # Recomputed on every wake-up: a sibling may have finished meanwhile (then it holds no one).
                slowest = min((v for k, v in self._at.items() if k != t), default=frame)
                if frame - slowest <= p.max_skew or p._stop.is_set():
                    return
                now = time.monotonic()
                give_up = give_up or now + p.skew_wait_s
                if now >= give_up:
                    p._counts["skew_timeouts"] += 1
                    _rlog.warning("skew", "scan %d slot %d: its siblings are %d frames behind; going on",
                                  self.scan_number, t, frame - slowest)  # fmt: skip
                    return
                self._front.wait(min(0.1, give_up - now))

    def _leave(self, t: int) -> None:
        with self._front:
            self._at.pop(t, None)
            self._front.notify_all()

    def _sender_done(self, t: int, sent: dict[str, int], lost: int) -> None:
        with self._lock:
            self._done[t] = (sent, lost)

    def degrade(self, reason: str) -> None:
        """Streaming this scan failed: every slot writes the rest to disk, held sectors are written too."""
        with self._lock:
            if self.degraded is None:
                self.degraded = reason
        self.keeper.degrade(self.held, reason)

    def finish(self) -> ProducerScanResult:
        """Close the scan for this producer: slots that never sent announce an empty share (all lost),
        the disk files are closed, ``/scans/<n>/producers/<uid>`` is written."""
        if self._result is not None:
            return self._result
        for t in range(self.producer.threads):
            with self._lock:
                missing = t not in self._done
            if missing:
                logger.warning("scan %d: slot %d sent nothing; its share counts as lost", self.scan_number, t)
                with self.sender(t, frames=()):
                    pass
        sent: dict[str, int] = {}
        lost = 0
        for per_uid, n_lost in self._done.values():
            for uid, n in per_uid.items():
                sent[uid] = sent.get(uid, 0) + n
            lost += n_lost
        # A stream scan's "sent" counts what went to the NodeGroups; sectors written instead are "written".
        streamed = {k: v for k, v in sent.items() if k != "disk"} if self.route == ROUTE_STREAM else sent
        record = ProducerScanRecord(
            producer=self.producer.uid,
            sector=self.producer.sector,
            status="done",
            route=self.route,
            threads=self.producer.threads,
            sent=streamed,
            sent_total=sum(streamed.values()),
            written=sent.get("disk", 0),
            lost_upstream=lost,
            started=self.started,
            finished=time.time(),
            degraded=self.degraded is not None,
            error=self.degraded,
            start=self.plan.start,
        )
        record = self.keeper.sending_done(self.held, record)
        paths = [Path(x) for x in record.paths]
        result = ProducerScanResult(
            self.scan_number, self.producer.sector, self.route, sent, lost, paths, time.time() - self.started
        )
        self.producer.store.set(keys.producer(self.scan_number, self.producer.uid), record.to_record())
        self._result = result
        self.producer._scan_finished(self, result)
        return result


class SectorSender:
    """Thread slot ``t`` of one scan: ``send(frame, buffer)`` for each announced frame, in any order."""

    def __init__(self, session: ScanSession, t: int, frames: np.ndarray) -> None:
        p = session.producer
        self._session = session
        self._producer = p
        self._slot = p._slots[t]
        self.t = t
        share = session.share(t)
        n_frames = session.plan.n_frames
        if frames.size and (frames.min() < 0 or frames.max() >= n_frames or np.any(frames % p.threads != t)):
            raise ValueError(f"slot {t}: frames must be in 0..{n_frames - 1} with frame % {p.threads} == {t}")
        if np.unique(frames).size != frames.size:
            raise ValueError(f"slot {t}: frames listed twice")
        self.frames = frames
        self.lost_upstream = len(share) - frames.size
        plan = session.plan
        self._members = plan.members
        self._n = len(plan.members)
        if plan.route == ROUTE_STREAM:
            counts = share_counts(frames, self._n)
            self.expected = {uid: int(counts[i]) for i, uid in enumerate(plan.members)}
        else:
            self.expected = {"disk": int(frames.size)}
        self._sent = [0] * max(self._n, 1)
        self._written = 0  # sectors written to disk instead (disk route, or the scan degraded)
        self._unsent = set(frames.tolist())  # announced, not sent yet
        self._header_base = (plan.scan_number, p.sector, plan.scan_shape, p.sector_shape, p.n_sectors)
        self._start = plan.start
        self._open = False

    @property
    def producer_id(self) -> str:
        return f"{self._producer.uid}/{self.t}"

    def __enter__(self) -> SectorSender:
        self._slot.lock.acquire()
        try:
            if self._session.route == ROUTE_STREAM and self._session.degraded is None:
                try:
                    self._open_stream()
                except SendAborted as exc:
                    # The planned aggregator is not there (died, or a stale record), or the producer is
                    # stopping: this scan goes to disk.
                    self._abandon_stream(self._why(exc))
        except BaseException:
            self._slot.lock.release()
            raise
        self._open = True
        return self

    def _open_stream(self) -> None:
        p, plan = self._producer, self._session.plan
        m = p.sector
        eps = plan.aggregator_endpoints
        self._slot.connect(p._ctx, p.settings, eps[f"data_{m}"], eps[f"info_{m}"], plan.aggregator_server_key)
        expect = ExpectMessage(
            producer=self.producer_id,
            scan_number=plan.scan_number,
            sector=m,
            threads=p.threads,
            scan_shape=plan.scan_shape,
            members=plan.members,
            expected=self.expected,
            start=plan.start,
        )
        assert self._slot.info is not None
        send_parts(self._slot.info, [expect.encode()], stop=p._stop, timeout=p.send_timeout, what="expect")

    def send(self, frame_number: int, buffer: Any) -> None:
        """Send (or write) one sector: ``buffer`` is not copied and must not change until it is sent."""
        if not self._open:
            raise RuntimeError("use the sender as a context manager")
        i = frame_number % self._n if self._n else 0
        if frame_number not in self._unsent:
            raise ValueError(f"frame {frame_number}: not announced by slot {self.t}, or sent twice")
        self._session._pace(self.t, frame_number)
        scan, sector, scan_shape, sector_shape, n_sectors = self._header_base
        session, keeper = self._session, self._session.keeper
        if self._n and session.degraded is None and self._slot.data is not None:
            header = SectorHeader(
                scan,
                frame_number,
                sector,
                scan_shape,
                sector_shape,
                n_sectors,
                timestamp_ns=time.time_ns(),
                start=self._start,
            ).encode()
            try:
                send_parts(
                    self._slot.data,
                    (header, buffer),
                    stop=self._producer._stop,
                    timeout=self._producer.send_timeout,
                    what=f"scan {scan} frame {frame_number}",
                    meter=self._slot.meter,
                )
            except SendAborted as exc:
                # Not sent: this sector, and the rest of the scan, go to disk (a stop included: what the
                # producer was given entered, and it writes it before it exits).
                self._abandon_stream(self._why(exc))
                keeper.write(session.held, frame_number, buffer)
                self._written += 1
            else:
                keeper.keep(session.held, frame_number, buffer)
                self._sent[i] += 1
        else:
            if self._n and self._slot.data is not None:
                self._abandon_stream(session.degraded or "streaming failed")
            keeper.write(session.held, frame_number, buffer)
            self._written += 1
        self._unsent.discard(frame_number)

    def _why(self, exc: Exception) -> str:
        if self._producer._stop.is_set():
            return "the producer stopped before the scan was sent"
        return f"could not stream to the aggregator: {exc}"

    def _abandon_stream(self, reason: str) -> None:
        """This slot stops streaming the scan: its sockets (with what is queued in them) are closed, and the
        scan degrades to disk for every slot."""
        self._session.degrade(reason)
        self._slot.close()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            lost = self.lost_upstream + len(self._unsent)
            if self._n:
                sent = {uid: self._sent[i] for i, uid in enumerate(self._members)}
                end = EndMessage(
                    self.producer_id,
                    self._session.scan_number,
                    self._producer.sector,
                    sent,
                    lost + self._written,  # what went to disk instead never reaches a NodeGroup
                    start=self._start,
                )
                if self._slot.info is not None:
                    try:
                        send_parts(
                            self._slot.info,
                            [end.encode()],
                            stop=self._producer._stop,
                            timeout=self._producer.send_timeout,
                            what="end",
                        )
                    except SendAborted as exc:
                        self._abandon_stream(self._why(exc))
                if self._written:
                    sent = {**sent, "disk": self._written}
            else:
                sent = {"disk": self._written}
            if len(self._unsent):
                logger.warning(
                    "scan %d slot %d: %d announced frames were not sent",
                    self._session.scan_number,
                    self.t,
                    len(self._unsent),
                )
            self._session._sender_done(self.t, sent, lost)
        finally:
            self._session._leave(self.t)
            self._open = False
            self._slot.lock.release()

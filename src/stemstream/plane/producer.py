"""Producers: the DAQ side of the data plane, one per detector sector (receiving server).

A receiving server runs ``T`` sender threads. Thread ``t`` owns the frames ``f`` with ``f % T == t``
(its *share*); frames the server never got from the detector are *lost upstream*. Per scan::

    producer = Producer(store_client, sector=m, threads=T).start()
    session = producer.begin_scan(scan_number, (h, w))            # plan: stream or disk
    # in DAQ thread t:
    with session.sender(t, frames=present_frames_of_t) as tx:    # sends `expect`
        for f in present_frames_of_t:
            tx.send(f, sector_buffer)                              # zero-copy; `end` sent on exit
    result = session.finish()                                      # /scans/<n>/producers/<uid>
    producer.close()

Streaming: each thread has a data PUSH and an info PUSH connected to the aggregator's ``data_<m>`` and
``info_<m>`` endpoints (from the plan). It sends one ``expect`` (NodeGroup UID -> messages it will send,
``members[f % len(members)]`` for each present frame) before its data and one ``end`` (what it sent, how
many of its share were lost upstream) after. Sends block at the HWM and never drop.

Disk fallback: the same calls write the sector with :class:`~stemstream.scans.plan.SectorDiskWriter`.

Sockets live as long as the producer (closing one with messages still queued could drop them after
LINGER): the thread that first uses slot ``t`` creates its sockets, the slot's lock hands them from
thread to thread (a full memory barrier, as ZeroMQ requires), and :meth:`Producer.close` closes them once
the aggregator has reported the last streamed scan routed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import socket as _socket
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

import numpy as np
import zmq

from stemstream.config import Settings, get_settings
from stemstream.errors import ProtocolError
from stemstream.log import RateLimitedLog
from stemstream.plane.retention import ScanKeeper, SectorSource
from stemstream.scans import keys
from stemstream.scans.plan import (
    ROUTE_STREAM,
    KeyValue,
    ScanPlan,
    close_scan_record,
    decide_plan,
    share_counts,
    wait_plan,
)
from stemstream.transport.actor import SendAborted, Worker, send_parts
from stemstream.transport.sockets import make_socket
from stemstream.wire.protocol import (
    N_SECTORS,
    SECTOR_SHAPE,
    EndMessage,
    ExpectMessage,
    SectorHeader,
)

logger = logging.getLogger(__name__)
_rlog = RateLimitedLog(logger)


class Registrar(Protocol):
    """The registry calls a producer makes (``Registry`` has them)."""

    def register(self, role: str, uid: str | None = None, **fields: Any) -> Any: ...
    def members(self, role: str, status: str | None = None) -> list[Any]: ...


# --------------------------------------------------------------------------------------- scan requests


@dataclass(frozen=True)
class ScanRequest:
    """A request to acquire a scan, as written to ``/control/scan``: how tests, demos and flows start one.

    ``extra`` carries what the source of the data needs (the simulator's ``seed``, ``loss_rate``...).
    """

    scan_number: int
    scan_shape: tuple[int, int]
    fallback_dir: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_value(self) -> dict[str, Any]:
        return {
            **self.extra,
            "scan": self.scan_number,
            "scan_shape": list(self.scan_shape),
            "fallback_dir": self.fallback_dir,
            "requested_at": time.time(),
        }

    @classmethod
    def from_value(cls, value: Any) -> ScanRequest:
        if not isinstance(value, Mapping):
            raise ProtocolError(f"scan request: expected a map, got {type(value).__name__}")
        try:
            scan = int(value["scan"])
            h, w = (int(v) for v in value["scan_shape"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ProtocolError(f"scan request: needs 'scan' and 'scan_shape' [h, w] ({exc})") from None
        if scan < 0 or h < 1 or w < 1:
            raise ProtocolError(f"scan request: scan={scan} scan_shape={h}x{w} is not a scan")
        fallback = value.get("fallback_dir")
        extra = {k: v for k, v in value.items() if k not in ("scan", "scan_shape", "fallback_dir")}
        return cls(scan, (h, w), str(fallback) if fallback else None, extra)


def request_scan(
    store: KeyValue,
    scan_number: int,
    scan_shape: tuple[int, int],
    *,
    fallback_dir: str | None = None,
    **extra: Any,
) -> ScanRequest:
    """Ask every watching producer to acquire a scan (writes ``/control/scan``)."""
    req = ScanRequest(scan_number, (int(scan_shape[0]), int(scan_shape[1])), fallback_dir, extra)
    store.set(keys.CONTROL_SCAN, req.to_value())
    return req


class Watchable(Protocol):
    def get(self, key: str, default: Any = None) -> Any: ...
    def watch(self, callback: Any, prefix: str = "/") -> Any: ...


class ScanRequests:
    """New scan requests from ``/control/scan``, in order; a request present before :meth:`start` is old."""

    def __init__(self, store: Watchable, key: str = keys.CONTROL_SCAN) -> None:
        self._store = store
        self._key = key
        self._queue: queue.Queue[ScanRequest] = queue.Queue()
        self._seen: set[int] = set()
        self._lock = threading.Lock()
        self._unsubscribe: Any = None

    def start(self) -> ScanRequests:
        current = self._store.get(self._key)
        if current is not None:
            with contextlib.suppress(ProtocolError):
                self._seen.add(ScanRequest.from_value(current).scan_number)
        self._unsubscribe = self._store.watch(self._on_change, prefix=self._key)
        return self

    def _on_change(self, key: str, value: Any) -> None:
        if key != self._key or value is None:
            return
        try:
            req = ScanRequest.from_value(value)
        except ProtocolError as exc:
            logger.warning("ignoring %s: %s", key, exc)
            return
        with self._lock:
            if req.scan_number in self._seen:
                return
            self._seen.add(req.scan_number)
        self._queue.put(req)

    def get(self, timeout: float) -> ScanRequest | None:
        """The next new request, or None after ``timeout`` seconds."""
        try:
            return self._queue.get(timeout=timeout)
        except queue.Empty:
            return None

    def close(self) -> None:
        if callable(self._unsubscribe):
            self._unsubscribe()
        self._unsubscribe = None


# --------------------------------------------------------------------------------------- producer


class _Slot:
    """Sender thread slot ``t``: its sockets, reused from scan to scan; one thread at a time (lock)."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.lock = threading.Lock()
        self.endpoints: tuple[str, str] | None = None
        self.data: zmq.Socket | None = None
        self.info: zmq.Socket | None = None

    def connect(self, ctx: zmq.Context, settings: Settings, data_ep: str, info_ep: str) -> None:
        if self.endpoints == (data_ep, info_ep):
            return
        self.close()
        self.data = make_socket(ctx, zmq.PUSH, settings=settings, role="client")
        self.info = make_socket(ctx, zmq.PUSH, settings=settings, role="client")
        self.data.connect(data_ep)
        self.info.connect(info_ep)
        self.endpoints = (data_ep, info_ep)

    def close(self) -> None:
        for sock in (self.data, self.info):
            if sock is not None:
                sock.close()
        self.data = self.info = None
        self.endpoints = None


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


class Producer:
    """The data-plane side of one receiving server (sector ``sector``), with ``threads`` sender slots."""

    def __init__(
        self,
        store: Any,
        sector: int,
        *,
        threads: int | None = None,
        uid: str | None = None,
        registry: Registrar | None = None,
        n_sectors: int = N_SECTORS,
        sector_shape: tuple[int, int] = SECTOR_SHAPE,
        leader: bool | None = None,
        fallback_dir: Path | None = None,
        settings: Settings | None = None,
        plan_timeout: float = 30.0,
        send_timeout: float | None = None,
        max_skew: int | None = 64,
        skew_wait_s: float = 1.0,
        hold_bytes: int | None = None,
        ack_timeout_s: float | None = None,
        on_release: Any = None,
    ) -> None:
        self.settings = settings or get_settings()
        if not 0 <= sector < n_sectors:
            raise ValueError(f"sector {sector} outside 0..{n_sectors - 1}")
        self.store = store
        self.sector = sector
        self.threads = threads or self.settings.producer_threads
        self.n_sectors = n_sectors
        self.sector_shape = sector_shape
        self.leader = (sector == 0) if leader is None else leader
        self.fallback_dir = Path(fallback_dir or self.settings.fallback_dir)
        self.plan_timeout = plan_timeout
        self.max_skew = max_skew
        self.skew_wait_s = skew_wait_s
        self.send_timeout = send_timeout if send_timeout is not None else self.settings.scan_timeout_s
        self._uid = uid or f"producer-{sector}-{_socket.gethostname()}-{os.getpid()}"
        self._registry = registry
        self._registration: Any = None
        self._ctx = zmq.Context()
        self._slots = [_Slot(t) for t in range(self.threads)]
        self._stop = threading.Event()
        self._closers: list[Worker] = []
        self._last_streamed: int | None = None
        self.hold_bytes = hold_bytes if hold_bytes is not None else self.settings.hold_bytes
        self.ack_timeout_s = ack_timeout_s if ack_timeout_s is not None else self.settings.ack_timeout_s
        self._on_release = on_release
        self.keeper: ScanKeeper | None = None
        self._counts = {
            "sent": 0,
            "lost_upstream": 0,
            "written": 0,
            "scans_streamed": 0,
            "scans_on_disk": 0,
            "skew_timeouts": 0,
        }

    @property
    def uid(self) -> str:
        return self._uid

    def start(self) -> Producer:
        """Register as ``/producers/<uid>`` (status "ready")."""
        if self._registry is None:
            from stemstream.store import Registry

            self._registry = Registry(self.store, ttl=self.settings.store_ttl_s)
        self.keeper = ScanKeeper(
            self.store,
            self._registry,
            self.sector,
            producer_uid=self._uid,
            sector_nbytes=self.sector_shape[0] * self.sector_shape[1] * 2,
            n_sectors=self.n_sectors,
            sector_shape=self.sector_shape,
            leader=self.leader,
            hold_bytes=self.hold_bytes,
            ack_timeout_s=self.ack_timeout_s,
            on_release=self._released,
        ).start()
        self._registration = self._registry.register(
            "producer", self._uid, status="ready", sector=self.sector, threads=self.threads
        )
        return self

    # ---- scans

    def begin_scan(
        self,
        scan_number: int,
        scan_shape: tuple[int, int],
        *,
        fallback_dir: str | Path | None = None,
        source: SectorSource | None = None,
    ) -> ScanSession:
        """Plan the scan (the leader decides, the others read its decision) and open a session.

        The producer holds every streamed sector until the scan is acknowledged (``plane.retention``):
        by reference to the buffer passed to ``send``, which must then stay unchanged until the scan is
        released (``on_release(scan_number)``), or, with ``source`` (frame number -> the sector's buffer in
        the DAQ's RAM), by frame number only.
        """
        if self._registry is None:
            raise RuntimeError("Producer.start() first")
        scan_shape = (int(scan_shape[0]), int(scan_shape[1]))
        if self.leader:
            plan = decide_plan(
                self._registry,
                scan_number,
                scan_shape,
                decided_by=self._uid,
                fallback_dir=str(fallback_dir) if fallback_dir else None,
                n_sectors=self.n_sectors,
            )
            self.store.set(keys.scan(scan_number), plan.to_record())
        else:
            plan = wait_plan(self.store, scan_number, self.plan_timeout)
        if plan.scan_shape != scan_shape:
            have = f"this producer has {scan_shape}"
            raise ProtocolError(f"scan {scan_number}: planned as {plan.scan_shape}, {have}")
        logger.info(
            "scan %d (%dx%d): route=%s %s",
            scan_number,
            *scan_shape,
            plan.route,
            f"members={list(plan.members)}" if plan.route == ROUTE_STREAM else f"({plan.reason})",
        )
        self._update(status="streaming" if plan.route == ROUTE_STREAM else "writing", scan_number=scan_number)
        return ScanSession(self, plan, source)

    def _scan_finished(self, session: ScanSession, result: ProducerScanResult) -> None:
        self._counts["sent"] += sum(n for k, n in result.sent.items() if k != "disk")
        self._counts["written"] += result.sent.get("disk", 0)
        self._counts["lost_upstream"] += result.lost_upstream
        self._counts["scans_streamed" if result.route == ROUTE_STREAM else "scans_on_disk"] += 1
        if result.route == ROUTE_STREAM:
            self._last_streamed = result.scan_number
        self._update(status="ready", counts=self.counts())
        if self.leader:
            plan = session.plan
            closer = Worker(
                f"close-scan-{plan.scan_number}",
                lambda: close_scan_record(self.store, plan, self.settings.scan_timeout_s),
            )
            closer.start()
            self._closers = [c for c in self._closers if c.is_alive()] + [closer]

    def _update(self, **fields: Any) -> None:
        if self._registration is not None:
            self._registration.update(**fields)

    def _released(self, scan_number: int) -> None:
        """The keeper let go of a scan (acknowledged, or on disk): the registry shows it, the DAQ hears it."""
        self._update(counts=self.counts())
        if self._on_release is not None:
            self._on_release(scan_number)

    def counts(self) -> dict[str, int]:
        """Sent, written, lost upstream, scans, and the keeper's: held_bytes, acked, replayed, spilled, ..."""
        out = dict(self._counts)
        if self.keeper is not None:
            out.update(self.keeper.snapshot())
        return out

    def wait_closed(self, timeout: float | None = None) -> None:
        """Wait for the leader's scan closers (``/scans/<n>`` totals written)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for closer in self._closers:
            closer.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
            closer.maybe_raise()

    def drain(self, timeout: float) -> bool:
        """Wait until the aggregator reports this sector of the last streamed scan routed."""
        if self._last_streamed is None:
            return True
        key = keys.aggregator(self._last_streamed, self.sector)

        def routed(items: dict[str, Any]) -> bool:
            rec = items.get(key)
            return isinstance(rec, Mapping) and rec.get("status") == "done"

        try:
            self.store.wait_for(routed, prefix=key, timeout=timeout)
            return True
        except TimeoutError:
            logger.warning(
                "scan %d: the aggregator did not confirm sector %d routed",
                self._last_streamed,
                self.sector,
            )
            return False

    def close(self, drain_timeout: float | None = None) -> None:
        """Wait for the last streamed scan to be routed and the held scans to be acknowledged (what is not
        is written to disk), close the sockets, deregister."""
        timeout = drain_timeout if drain_timeout is not None else self.settings.scan_timeout_s
        self.drain(timeout)
        self.wait_closed(timeout)
        if self.keeper is not None:
            self.keeper.close(timeout)
        self._stop.set()
        for slot in self._slots:
            with slot.lock:
                slot.close()
        self._ctx.term()
        if self._registration is not None:
            self._registration.close()
            self._registration = None

    def abort(self) -> None:
        """Make blocked sends give up (they raise SendAborted)."""
        self._stop.set()

    def __enter__(self) -> Producer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


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
        directory = Path(plan.fallback_dir) if plan.fallback_dir else producer.fallback_dir
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
        record: dict[str, Any] = {
            "producer": self.producer.uid,
            "sector": self.producer.sector,
            "threads": self.producer.threads,
            "route": self.route,
            "sent": streamed,
            "sent_total": sum(streamed.values()),
            "written": sent.get("disk", 0),
            "lost_upstream": lost,
            "started": self.started,
            "finished": time.time(),
            "status": "done",
        }
        if self.degraded is not None:
            record.update(degraded=True, error=self.degraded)
        record = self.keeper.sending_done(self.held, record)
        paths = [Path(x) for x in record.get("paths") or ()]
        result = ProducerScanResult(
            self.scan_number, self.producer.sector, self.route, sent, lost, paths, time.time() - self.started
        )
        self.producer.store.set(keys.producer(self.scan_number, self.producer.uid), record)
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
                    if self._producer._stop.is_set():
                        raise
                    # The planned aggregator is not there (died, or a stale record): this scan goes to disk.
                    self._abandon_stream(f"could not stream to the aggregator: {exc}")
        except BaseException:
            self._slot.lock.release()
            raise
        self._open = True
        return self

    def _open_stream(self) -> None:
        p, plan = self._producer, self._session.plan
        m = p.sector
        self._slot.connect(
            p._ctx, p.settings, plan.aggregator_endpoints[f"data_{m}"], plan.aggregator_endpoints[f"info_{m}"]
        )
        expect = ExpectMessage(
            producer=self.producer_id,
            scan_number=plan.scan_number,
            sector=m,
            threads=p.threads,
            scan_shape=plan.scan_shape,
            members=plan.members,
            expected=self.expected,
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
                scan, frame_number, sector, scan_shape, sector_shape, n_sectors, timestamp_ns=time.time_ns()
            ).encode()
            try:
                send_parts(
                    self._slot.data,
                    (header, buffer),
                    stop=self._producer._stop,
                    timeout=self._producer.send_timeout,
                    what=f"scan {scan} frame {frame_number}",
                )
            except SendAborted as exc:
                if self._producer._stop.is_set():
                    raise
                self._abandon_stream(f"could not stream to the aggregator: {exc}")
                keeper.write(session.held, frame_number, buffer)
            else:
                keeper.keep(session.held, frame_number, buffer)
                self._sent[i] += 1
        else:
            if self._n and self._slot.data is not None:
                self._abandon_stream(session.degraded or "streaming failed")
            keeper.write(session.held, frame_number, buffer)
            self._written += 1
        self._unsent.discard(frame_number)

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
                        if self._producer._stop.is_set():
                            raise
                        self._abandon_stream(f"could not stream to the aggregator: {exc}")
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

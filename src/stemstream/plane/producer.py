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

Disk fallback: the same calls write the sector with :class:`~stemstream.plane.diskwriter.SectorDiskWriter`.

Sockets live as long as the producer (closing one with messages still queued could drop them after
LINGER): the thread that first uses slot ``t`` creates its sockets, the slot's lock hands them from
thread to thread (a full memory barrier, as ZeroMQ requires), and :meth:`Producer.close` closes them once
the aggregator has reported the last streamed scan routed.
"""

from __future__ import annotations

import logging
import os
import socket as _socket
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import zmq

from stemstream.config import Settings, get_settings
from stemstream.errors import ProtocolError
from stemstream.log import RateLimitedLog
from stemstream.plane.retention import ScanKeeper, SectorSource
from stemstream.plane.session import ProducerScanResult, ScanSession
from stemstream.scans import keys
from stemstream.scans.plan import ScanPlanError, close_scan_record, decide_plan, new_acquisition, wait_plan
from stemstream.scans.records import ROUTE_STREAM, ScanPlan, scan_metadata
from stemstream.transport.actor import SendMeter, Worker
from stemstream.transport.sockets import make_socket
from stemstream.wire.paths import UnsafePath, under_roots
from stemstream.wire.protocol import (
    N_SECTORS,
    SECTOR_SHAPE,
    check_scan_number,
)

logger = logging.getLogger(__name__)
_rlog = RateLimitedLog(logger)


class Registrar(Protocol):
    """The registry calls a producer makes (``Registry`` has them)."""

    def register(self, role: str, uid: str | None = None, **fields: Any) -> Any: ...
    def members(self, role: str, status: str | None = None) -> list[Any]: ...


# --------------------------------------------------------------------------------------- producer


class _Slot:
    """Sender thread slot ``t``: its sockets, reused from scan to scan; one thread at a time (lock)."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.lock = threading.Lock()
        self.endpoints: tuple[str, str] | None = None
        self.data: zmq.Socket | None = None
        self.info: zmq.Socket | None = None
        self.meter = SendMeter()  # data sends of this slot (one thread at a time, under the lock)

    def connect(
        self, ctx: zmq.Context, settings: Settings, data_ep: str, info_ep: str, server_key: str | None = None
    ) -> None:
        if self.endpoints == (data_ep, info_ep):
            return
        self.close()
        self.data = make_socket(ctx, zmq.PUSH, settings=settings, role="client", server_key=server_key)
        self.info = make_socket(ctx, zmq.PUSH, settings=settings, role="client", server_key=server_key)
        self.data.connect(data_ep)
        self.info.connect(info_ep)
        self.endpoints = (data_ep, info_ep)

    def close(self, linger_ms: int | None = None) -> None:
        for sock in (self.data, self.info):
            if sock is not None:
                sock.close(linger=linger_ms)
        self.data = self.info = None
        self.endpoints = None


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
        # The only directories a scan request or plan may send raw files to (wire.paths).
        self.fallback_roots = (self.settings.fallback_root or self.fallback_dir, self.fallback_dir)
        self.plan_timeout = plan_timeout
        self.max_skew = max_skew
        self.skew_wait_s = skew_wait_s
        self.send_timeout = send_timeout if send_timeout is not None else self.settings.scan_timeout_s
        self._uid = uid or f"producer-{sector}-{_socket.gethostname()}-{os.getpid()}"
        self._registry = registry
        self._registration: Any = None
        self._advertised: dict[str, str] = {}
        self._ctx = zmq.Context()
        self._slots = [_Slot(t) for t in range(self.threads)]
        self._stop = threading.Event()
        self._closers: list[Worker] = []
        self._last_streamed: int | None = None
        self.hold_bytes = hold_bytes if hold_bytes is not None else self.settings.hold_bytes
        self.ack_timeout_s = ack_timeout_s if ack_timeout_s is not None else self.settings.ack_timeout_s
        self._on_release = on_release
        self._taken: OrderedDict[int, set[str]] = OrderedDict()  # acquisitions of a scan number taken part in
        self._planned: dict[int, tuple[float, str]] = {}  # scan number -> (when, start) of the last plan taken
        self.keeper: ScanKeeper | None = None
        self._counts = {
            "sent": 0,
            "lost_upstream": 0,
            "written": 0,
            "scans_streamed": 0,
            "scans_on_disk": 0,
            "skew_timeouts": 0,
            "refused_paths": 0,
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
            "producer", self._uid, status="ready", endpoints=self._advertised, sector=self.sector, threads=self.threads
        )
        return self

    def advertise(self, name: str, endpoint: str) -> None:
        """Add ``name: endpoint`` (e.g. ``metrics``) to this producer's registry record."""
        self._advertised[name] = endpoint
        if self._registration is not None:
            self._registration.update(endpoints={name: endpoint})

    # ---- scans

    def begin_scan(
        self,
        scan_number: int,
        scan_shape: tuple[int, int],
        *,
        fallback_dir: str | Path | None = None,
        source: SectorSource | None = None,
        start: str | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> ScanSession:
        """Plan the scan (the leader decides, the others read its decision) and open a session.

        Scan numbers may be reused (a DAQ restart resets its counter): every acquisition is a new scan,
        named by ``(scan_number, start)``. The leader mints ``start`` unless the DAQ passes one (the same
        to the four producers); without it, the other producers take the newest plan of the number that is
        not closed and that they have not acquired already.

        The producer holds every streamed sector until the scan is acknowledged (``plane.retention``):
        by reference to the buffer passed to ``send``, which must then stay unchanged until the scan is
        released (``on_release(scan_number)``), or, with ``source`` (frame number -> the sector's buffer in
        the DAQ's RAM ring), by frame number only. A ring can wrap before a replay reads it: give the source
        a ``generation(frame) -> int`` method (how often the slot of that frame was written) and a changed
        slot is detected from it; without one, the keeper keeps a CRC-32 of each sector as it was sent.
        ``metadata`` (the leader's; ``scans.records.scan_metadata``) goes into the plan, the counted file and
        the catalog.
        """
        if self._registry is None:
            raise RuntimeError("Producer.start() first")
        check_scan_number(scan_number, "begin_scan: scan number")
        scan_shape = (int(scan_shape[0]), int(scan_shape[1]))
        if self.leader:
            if fallback_dir:
                fallback_dir = self._checked(fallback_dir, f"scan {scan_number}: fallback_dir of the request")
            start, raw_dir = new_acquisition(self.store, scan_number, start)
            plan = decide_plan(
                self._registry,
                scan_number,
                scan_shape,
                decided_by=self._uid,
                fallback_dir=str(fallback_dir) if fallback_dir else None,
                n_sectors=self.n_sectors,
                start=start,
                raw_dir=raw_dir,
                metadata=scan_metadata(metadata),
            )
            self.store.set(keys.scan(scan_number), plan.to_record())
        else:
            plan = self._wait_plan(scan_number, start)
        taken = self._taken.setdefault(scan_number, set())
        taken.add(plan.start)
        self._planned[scan_number] = (time.time(), plan.start)
        self._taken.move_to_end(scan_number)
        while len(self._taken) > 4096:
            number, _ = self._taken.popitem(last=False)
            self._planned.pop(number, None)
        if plan.scan_shape != scan_shape:
            have = f"this producer has {scan_shape}"
            raise ProtocolError(f"scan {scan_number}: planned as {plan.scan_shape}, {have}")
        logger.info(
            "scan %d (%dx%d, acquisition %s): route=%s %s",
            scan_number,
            *scan_shape,
            plan.start or "-",
            plan.route,
            f"members={list(plan.members)}" if plan.route == ROUTE_STREAM else f"({plan.reason})",
        )
        self._update(status="streaming" if plan.route == ROUTE_STREAM else "writing", scan_number=scan_number)
        return ScanSession(self, plan, source)

    def planned_start(self, request: Any) -> str:
        """The acquisition id of the plan this producer last took for ``request``'s scan number, if it took
        one after the request was made ("" otherwise): what a record of a failed scan names."""
        started, number = float(getattr(request, "requested_at", 0.0)), int(request.scan_number)
        last = self._planned.get(number)
        return last[1] if last is not None and last[0] >= started else ""

    def _wait_plan(self, scan_number: int, start: str | None) -> Any:
        """A follower waits for the leader's plan, in short steps so that a stop is heard within a second."""
        deadline = time.monotonic() + self.plan_timeout
        taken = set(self._taken.get(scan_number, ()))
        while True:
            step = min(1.0, max(0.0, deadline - time.monotonic()))
            try:
                return wait_plan(self.store, scan_number, step, start=start, taken=taken)
            except ScanPlanError:
                if self._stop.is_set() or time.monotonic() >= deadline:
                    raise

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

    def raw_directory(self, plan: ScanPlan) -> Path:
        """Where this producer writes ``plan``'s raw files: the plan's directory if it lies under this producer's
        fallback roots, else (refused, counted, logged) this producer's own fallback directory."""
        what = f"scan {plan.scan_number}: fallback directory of the plan"
        base = self._checked(plan.fallback_dir, what) if plan.fallback_dir else None
        base = Path(base) if base else self.fallback_dir
        if plan.raw_dir and self._checked(base / plan.raw_dir, what, roots=(base,)) is not None:
            return base / plan.raw_dir
        return base

    def _checked(self, path: str | Path, what: str, roots: tuple[Path, ...] | None = None) -> str | None:
        """``path`` if it lies under ``roots`` (default: the fallback roots), else None: refused and counted."""
        try:
            return str(under_roots(path, roots or self.fallback_roots, what))
        except UnsafePath as exc:
            self._counts["refused_paths"] += 1
            _rlog.error(
                "refused_path", "producer %s: refused %s; raw files go to %s", self._uid, exc, self.fallback_dir
            )
            return None

    def counts(self) -> dict[str, int]:
        """Sent, written, lost upstream, scans, and the keeper's: held_bytes, acked, replayed, spilled, ..."""
        out = dict(self._counts)
        if self.keeper is not None:
            out.update(self.keeper.snapshot())
        meters = [slot.meter for slot in self._slots]  # live, while a scan streams
        out["data_messages"] = sum(m.messages for m in meters)
        out["data_bytes"] = sum(m.bytes for m in meters)
        out["blocked_sends"] = sum(m.blocked for m in meters)
        out["blocked_us"] = sum(int(m.blocked_s * 1e6) for m in meters)
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
        is written to disk), close the sockets, deregister. With ``drain_timeout=0`` (a stop) it waits for
        nothing but the disk: what it holds is written, and it says so as it goes."""
        started = time.monotonic()
        timeout = drain_timeout if drain_timeout is not None else self.settings.scan_timeout_s
        logger.info("producer %s closing (waiting up to %.0f s for the last scans)", self._uid, timeout)
        self.drain(timeout)
        self.wait_closed(timeout)
        if self.keeper is not None:
            self.keeper.close(timeout)
        self._stop.set()
        for slot in self._slots:
            with slot.lock:
                # What may still be queued belongs to scans written to disk just now (acknowledged scans
                # arrived whole): nothing to wait for, however long LINGER is.
                slot.close(linger_ms=0)
        self._ctx.term()
        if self._registration is not None:
            self._registration.close()
            self._registration = None
        logger.info("producer %s closed in %.1f s", self._uid, time.monotonic() - started)

    def abort(self) -> None:
        """Make blocked sends give up (they raise SendAborted)."""
        self._stop.set()

    def __enter__(self) -> Producer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

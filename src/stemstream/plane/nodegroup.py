"""NodeGroups: the receiving end on the compute nodes, assembling frames for a :class:`FrameConsumer`.

A NodeGroup binds one data PULL per sector (registry endpoints ``data_0`` .. ``data_<n-1>``, one per
aggregator router thread) and one info PULL (``info``), and registers ``/nodegroups/<uid>`` with status
"ready". One receiving thread per data socket, one info thread.

Assembly: the first sector of a frame to arrive asks the consumer for the frame's buffer
(:meth:`FrameConsumer.frame_buffer`, which may block: back-pressure); every sector payload is copied once,
straight from the ZeroMQ message into its rows of that buffer. The sector that completes a frame hands
it over (:meth:`FrameConsumer.frame_ready`). A scan is *all in* when, for every sector, the aggregator's
``expect`` and ``end`` have arrived and as many messages were received as the ``end`` says were sent;
then the frames still being assembled (sectors lost upstream) are zero-filled where missing and handed
over with their missing sectors, frames of this NodeGroup's share that never appeared at all likewise,
and :meth:`FrameConsumer.end_scan` gets the :class:`ScanSummary`.

Memory is bounded by what is being assembled: frames leave as soon as they are complete, and a sector
thread that is more than ``max_lag`` messages ahead of the slowest sector (progress = received / expected)
waits before it starts a new frame, so the sectors of one NodeGroup advance together and a slow consumer
holds every sector back (and, through the HWMs, the producers); the wait is bounded by ``lag_wait_s``
(counted as ``lag_timeouts``) so that it can never deadlock, and a wait that timed out is not repeated until
the slowest sector moves (its data may never come). Frames with sectors lost upstream stay
until the scan's end (about ``loss rate x 4 x frames``). A data message whose scan has no ``expect`` yet is
held by its receiving thread (which stops reading meanwhile, so the sender blocks) until the expect comes
or ``expect_timeout`` passes; that wait is counted from the first message of the scan number, so the
other messages of a scan that never gets an expect (an unknown scan number) are rejected at once, and once
such a wait ran out, new unknown numbers are rejected at once for ``expect_timeout`` (many cost one wait).

The info thread's half (expects, ends, closing a scan, and what a declared scan may cost) is
:mod:`stemstream.plane.nodelife`.

Bad input (malformed, wrong size or shape, wrong sector, not this NodeGroup's frame, duplicate, late) is
rejected, counted per kind (registry counts ``rejected.<kind>``) and logged, rate-limited (one line per kind
per 10 s). ZeroMQ refuses a part larger than a header plus a sector (data) or ``MAX_INFO_PART_BYTES`` (info).

Several NodeGroups can run in one process (each has its own context, sockets and threads).
"""

from __future__ import annotations

import logging
import os
import socket as _socket
import threading
import time
from collections import OrderedDict
from functools import partial
from typing import Any

import numpy as np
import zmq

from stemstream.config import Settings
from stemstream.errors import ProtocolError, WaitTimeout
from stemstream.nodes.consumer import FrameConsumer, ScanSummary
from stemstream.plane.nodelife import _FINISHED_KEPT, ScanLife
from stemstream.plane.nodescan import Assembly, HeaderTemplate, NodeGroupScan, fast_check
from stemstream.plane.receiver import Every, Receiver, drain
from stemstream.transport.actor import POLL_MS
from stemstream.wire.protocol import (
    DTYPE,
    MAX_HEADER_BYTES,
    MAX_INFO_PART_BYTES,
    N_SECTORS,
    SECTOR_SHAPE,
    decode_data_message,
)

logger = logging.getLogger(__name__)


class NodeGroup(ScanLife, Receiver):
    """Receives its share of every scan's frames and hands them, assembled, to ``consumer``."""

    role = "nodegroup"

    def __init__(
        self,
        consumer: FrameConsumer,
        store: Any,
        *,
        uid: str | None = None,
        registry: Any = None,
        host: str | None = None,
        settings: Settings | None = None,
        n_sectors: int = N_SECTORS,
        sector_shape: tuple[int, int] = SECTOR_SHAPE,
        expect_timeout: float | None = None,
        scan_timeout_s: float | None = None,
        max_lag: int = 64,
        lag_wait_s: float = 1.0,
        max_scan_frames: int | None = None,
        publish_interval: float = 0.5,
        job: str | None = None,
        job_size: int | None = None,
    ) -> None:
        super().__init__(
            store,
            uid=uid or f"nodegroup-{_socket.gethostname()}-{os.getpid()}-{id(self) & 0xFFFF:04x}",
            registry=registry,
            host=host,
            settings=settings,
            n_sectors=n_sectors,
            curve_roles=("server",),
            publish_interval=publish_interval,
        )
        self.consumer = consumer
        # NodeGroups of one MPI job share ``job``: a scan goes to one job's NodeGroups (fallback.decide_plan).
        self._job = {"job": job, "job_size": job_size or 1} if job else {}
        self.max_lag = max_lag
        self.lag_wait_s = lag_wait_s
        self.sector_shape = (int(sector_shape[0]), int(sector_shape[1]))
        self.frame_shape = (self.sector_shape[0] * n_sectors, self.sector_shape[1])
        self._sector_nbytes = self.sector_shape[0] * self.sector_shape[1] * np.dtype(DTYPE).itemsize
        self._template = HeaderTemplate(n_sectors, list(self.sector_shape), self._sector_nbytes)
        self.scan_timeout_s = scan_timeout_s or self.settings.scan_timeout_s
        self.max_scan_frames = max_scan_frames or self.settings.max_scan_frames
        self.max_open_scans = self.settings.max_open_scans
        self.expect_timeout = expect_timeout or self.scan_timeout_s
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        # The acquisition of each scan number under way (scan numbers are reused: a new acquisition of a number
        # closes the one before, as a timeout), the finished ones by (scan, start), and the newest acquisition
        # of each number, which a message without a ``start`` belongs to (docs/protocol.md).
        self._scans: dict[int, NodeGroupScan] = {}
        self._finished: OrderedDict[tuple[int, str], ScanSummary] = OrderedDict()
        self._newest: OrderedDict[int, str] = OrderedDict()
        self._rejected: dict[str, int] = {}
        self._unknown: OrderedDict[tuple[int, str], float] = OrderedDict()  # unnamed scan -> its first data
        self._no_expect_until = 0.0  # until then, data of a scan number no expect named is rejected at once
        self._totals = {
            "received": 0,
            "frames_complete": 0,
            "frames_incomplete": 0,
            "lost_upstream": 0,
            "scans": 0,
        }
        self._last_scan: int | None = None
        self._peak = 0  # most frames ever in assembly at once (all scans)
        self._lag_timeouts = 0
        self._bytes = [0] * n_sectors  # payload bytes assembled, per sector (metrics)
        for m in range(n_sectors):
            self._add_worker(f"ng-data-{m}", lambda bound, m=m: self._receive(m, bound))
        self._add_worker("ng-info", self._info_loop)

    # ---- life cycle

    def _registry_fields(self) -> dict[str, Any]:
        # "ack": what tells the producers they may let go of a scan (docs/reliability.md).
        # A consumer may add fields of its own (the counting service: its live view's address).
        extra = getattr(self.consumer, "registry_fields", None) or {}
        return {"ack": getattr(self.consumer, "acknowledges", "received"), **self._job, **extra}

    def wait_scan(self, scan_number: int, timeout: float, start: str | None = None) -> ScanSummary:
        """Block until ``scan_number`` (its newest acquisition, or ``start``) is handed over completely; its
        summary (raises TimeoutError)."""
        deadline = time.monotonic() + timeout

        def finished() -> ScanSummary | None:
            for (n, s), summary in reversed(self._finished.items()):
                if n == scan_number and (start is None or s == start):
                    return summary
            return None

        while True:
            with self._cond:
                summary = finished()
                left = deadline - time.monotonic()
                if summary is None and left > 0:
                    self._cond.wait(min(left, 0.2))
                    summary = finished()
            if summary is not None:
                return summary
            self.maybe_raise()
            if left <= 0:
                raise WaitTimeout(f"NodeGroup {self._uid}: scan {scan_number} not in within {timeout:.1f} s")

    def counts(self) -> dict[str, int]:
        """Totals: received, frames_complete, frames_incomplete, lost_upstream, scans, rejected(.<kind>),
        assembling (frames in assembly now) and assembling_peak (the most at once)."""
        with self._lock:
            out = dict(self._totals)
            for scan in self._scans.values():
                out["received"] += sum(scan.received)
                out["frames_complete"] += scan.n_complete
            out["assembling"] = sum(len(s.assembling) for s in self._scans.values())
            out["assembling_peak"] = self._peak
            out["lag_timeouts"] = self._lag_timeouts
            out["received_bytes"] = sum(self._bytes)
            out["scans_open"] = len(self._scans)
            out["rejected"] = sum(self._rejected.values())
            out.update({f"rejected.{k}": v for k, v in self._rejected.items()})
        return out

    def _snapshot(self) -> dict[str, Any]:
        snap = super()._snapshot()
        if self._last_scan is not None:
            snap["scan_number"] = self._last_scan
        return snap

    # ---- receiving threads

    def _receive(self, m: int, bound: threading.Event) -> None:
        sock = self._bind_pull(f"data_{m}", MAX_HEADER_BYTES + self._sector_nbytes)
        bound.set()
        handle = partial(self._on_data, m)
        try:
            while not self._stop.is_set():
                if sock.poll(POLL_MS):
                    drain(sock, handle)
        finally:
            sock.close()

    def _info_loop(self, bound: threading.Event) -> None:
        sock = self._bind_pull("info", MAX_INFO_PART_BYTES)
        bound.set()
        try:
            housekeeping = Every(0.5)
            while not self._stop.is_set():
                if sock.poll(POLL_MS):
                    drain(sock, self._on_info)
                now = time.monotonic()
                if housekeeping.due(now):
                    self._housekeeping(now)
        finally:
            sock.close()

    # ---- data

    def _on_data(self, m: int, parts: list[zmq.Frame]) -> None:
        checked = self._fast_check(m, parts) or self._full_check(m, parts)
        if checked is not None:
            self._assemble(m, *checked)

    def _fast_check(self, m: int, parts: list[Any]) -> tuple[NodeGroupScan, int, memoryview] | None:
        return fast_check(self._scans, m, parts, self._template)

    def _full_check(self, m: int, parts: list[zmq.Frame]) -> tuple[NodeGroupScan, int, memoryview] | None:
        """Decode and check a data message with the protocol's decoder; reject (and count) what is wrong.
        Waits, bounded, for the expect of a scan that has not begun yet."""
        try:
            header, payload = decode_data_message(parts)
        except ProtocolError as exc:
            self._reject(None, "malformed", "%s", exc)
            return None
        if header.sector != m:
            self._reject(None, "wrong_sector", "sector %d on the socket of sector %d", header.sector, m)
            return None
        geometry = (header.sector_shape, header.n_sectors, header.dtype)
        if geometry != (self.sector_shape, self.n_sectors, DTYPE):
            self._reject(
                None,
                "wrong_shape",
                "sector of %s %s x%d, expected %s %s x%d",
                header.sector_shape,
                header.dtype,
                header.n_sectors,
                self.sector_shape,
                DTYPE,
                self.n_sectors,
            )
            return None
        scan = self._scan_for(header.scan_number, header.start)
        if scan is None:
            return None
        f = header.frame_number
        if header.scan_shape != scan.scan_shape:
            what = "scan %d is %s, header says %s"
            self._reject(scan, "wrong_shape", what, scan.number, scan.scan_shape, header.scan_shape)
            return None
        if f % scan.n_members != scan.my_index:
            owner = scan.members[f % scan.n_members]
            self._reject(scan, "not_mine", "scan %d frame %d belongs to NodeGroup %s", scan.number, f, owner)
            return None
        return scan, f, payload

    def _assemble(self, m: int, scan: NodeGroupScan, f: int, payload: memoryview) -> None:
        """Copy sector ``m`` of frame ``f`` into the frame's buffer; hand the frame over if it is whole."""
        bit = 1 << m
        problem = None
        buf: np.ndarray | None = None
        with self._cond:
            # Bounded assembly: a sector that is ahead of the slowest one waits before starting a new frame
            # (the slowest never waits). The wait is bounded (lag_wait_s), so that no cycle of waits through
            # the aggregator's shared sector threads can hold the data plane still.
            #
            # A wait that timed out while the slowest sector did not move at all is not repeated until it
            # moves: its data may never come (the aggregator died mid-scan, its sector thread's queue lost),
            # and this thread may hold hundreds of queued messages of the scan (RCVHWM). Waiting lag_wait_s
            # for each of them held this socket (so every later scan's data on it) for minutes, kept the
            # scan "touched" so that its scan timeout never came, and stalled the next scan behind it.
            give_up = None
            while f not in scan.assembling and not scan.closing:
                slowest = scan.slowest(m)
                if not scan.ahead(m, slowest, self.max_lag) or slowest <= scan.lag_stuck[m]:
                    break
                now = time.monotonic()
                give_up = give_up or now + self.lag_wait_s
                if self._stop.is_set():
                    return
                if now >= give_up:
                    self._lag_timeouts += 1
                    scan.lag_stuck[m] = slowest
                    self._rlog.warning("lag", "NodeGroup %s: sector %d waited %.1f s for the others; going on",
                                  self._uid, m, self.lag_wait_s)  # fmt: skip
                    break
                self._cond.wait(min(POLL_MS / 1000, give_up - now))
            bits = scan.bits(f)
            if scan.closing:
                problem = "late"
            elif bits & bit:
                problem = "duplicate"
            else:
                scan.claim(f, bits | bit)
                scan.busy += 1  # in the consumer for this scan: closing it waits for us (_finalize)
                asm = scan.assembling.get(f)
                creator = asm is None
                if asm is None:
                    asm = scan.assembling[f] = Assembly()
                    self._peak = max(self._peak, len(scan.assembling))
                else:
                    while asm.buffer is None:  # its first sector's thread is still getting the buffer
                        if asm.failed or self._stop.is_set():
                            scan.busy -= 1
                            self._cond.notify_all()
                            return
                        self._cond.wait(POLL_MS / 1000)
                    buf = asm.buffer
        if problem == "late":
            self._reject(scan, "late", "scan %d frame %d sector %d after the scan closed", scan.number, f, m)
            return
        if problem == "duplicate":
            self._reject(scan, "duplicate", "scan %d frame %d sector %d received twice", scan.number, f, m)
            return
        try:
            self._fill(m, scan, f, payload, asm, buf, creator)
        finally:
            with self._cond:
                scan.busy -= 1
                self._cond.notify_all()
        self._maybe_finish(scan)

    def _fill(
        self,
        m: int,
        scan: NodeGroupScan,
        f: int,
        payload: memoryview,
        asm: Assembly,
        buf: np.ndarray | None,
        creator: bool,
    ) -> None:
        """Copy sector ``m`` into frame ``f``'s buffer (getting it from the consumer if it is the frame's first
        sector); hand the frame over when it is whole."""
        if buf is None:
            try:
                buf = self.consumer.frame_buffer(scan.number, f)
                if buf.shape != self.frame_shape or buf.dtype != np.uint16 or not buf.flags.c_contiguous:
                    need = f"C-contiguous {self.frame_shape} uint16"
                    raise ValueError(f"frame_buffer gave {buf.shape} {buf.dtype}; need {need}")
            except BaseException:
                with self._cond:
                    asm.failed = True
                    self._cond.notify_all()
                raise
        rows = self.sector_shape[0]
        buf[m * rows : (m + 1) * rows] = np.frombuffer(payload, dtype=DTYPE).reshape(self.sector_shape)
        now = time.time()
        with self._cond:
            if creator:
                asm.buffer = buf
            asm.have += 1
            scan.received[m] += 1
            self._bytes[m] += payload.nbytes
            self._cond.notify_all()  # the buffer is there; a sector waiting in _ahead may go on
            if scan.first_ts is None:
                scan.first_ts = now
            scan.last_ts = now
            scan.touched = time.monotonic()
            complete = asm.have == self.n_sectors
            if complete:
                del scan.assembling[f]
                scan.n_complete += 1
                scan.in_flight += 1
        if complete:
            try:
                self.consumer.frame_ready(scan.number, f, ())
            finally:
                with self._lock:
                    scan.in_flight -= 1

    def _scan_for(self, scan_number: int, start: str = "") -> NodeGroupScan | None:
        """The scan of a data message once its consumer scan has begun; waits for the expect (bounded).
        ``start``: the acquisition the message names ("": the newest of its scan number).

        For a scan that no expect has named, the wait is counted from the first data of that scan number
        (shared by its messages and sectors): a sender that sends an unknown scan number holds a socket for
        ``expect_timeout`` once, not once per message. Once the expect is in, the wait starts over.

        A wait that ran out (no expect came) starts a penalty of ``expect_timeout``: meanwhile data of a scan
        number seen for the first time is rejected at once, so that a thousand unknown scan numbers cannot hold
        a socket a thousand times ``expect_timeout``. Honest data never waits that long: the aggregator sends
        a scan's expect before its data."""
        deadline: float | None = None
        known = False
        with self._cond:
            while True:
                scan = self._scans.get(scan_number)
                this = scan is not None and (not start or scan.start == start)
                if scan is not None and this and scan.begun:
                    return scan
                if (scan_number, start or self._newest.get(scan_number, "")) in self._finished:
                    late = True
                    break
                if self._stop.is_set():
                    return None
                now = time.monotonic()
                if not this:
                    # Under penalty (an unknown scan number ran out lately), a new one has no time to wait.
                    new_at = now if now >= self._no_expect_until else now - self.expect_timeout
                    first = self._unknown.setdefault((scan_number, start), new_at)
                    while len(self._unknown) > _FINISHED_KEPT:
                        self._unknown.popitem(last=False)
                    deadline = first + self.expect_timeout
                elif not known:  # its expect came (begin_scan is under way): a full wait from now
                    known, deadline = True, now + self.expect_timeout
                assert deadline is not None
                if now >= deadline:
                    late = False
                    if not this:
                        self._no_expect_until = now + self.expect_timeout
                    break
                self._cond.wait(min(deadline - now, POLL_MS / 1000))
        name = f"{scan_number} ({start})" if start else str(scan_number)
        if late:
            self._reject(None, "late", "data for scan %s, which is closed", name)
        else:
            self._reject(None, "no_expect", "data for scan %s, no expect in %.0f s", name, self.expect_timeout)
        return None

    def _reject(self, scan: NodeGroupScan | None, kind: str, msg: str, *args: object) -> None:
        with self._lock:
            self._rejected[kind] = self._rejected.get(kind, 0) + 1
            if scan is not None:
                scan.rejected[kind] = scan.rejected.get(kind, 0) + 1
        self._rlog.warning(kind, "NodeGroup %s: rejected (%s): " + msg, self._uid, kind, *args)

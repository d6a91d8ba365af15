"""A NodeGroup's scans from begin to end: the aggregator's ``expect`` and ``end`` messages (the info socket) and
closing a scan (all in, superseded by a new acquisition, or timed out): :class:`ScanLife`, a part of
:class:`stemstream.plane.nodegroup.NodeGroup`.

Work follows what arrived, not what was declared (docs/security.md): an expect whose scan has more frames than
``Settings.max_scan_frames`` is rejected (``info_too_large``), as is one that would open more than
``Settings.max_open_scans`` scans at once (``info_too_many_scans``: each begins a scan in the consumer); a scan's
claimed-sector mask grows with the frames that data arrived for (:class:`NodeGroupScan`); and at the close, frames
of the share that no sector ever arrived for are handed to the consumer (zero-filled, every sector missing) only as
many as frames that data did arrive for (plus ``max_lag``). The rest are *absent*: counted in the summary
(``absent``, and in ``frames_incomplete``, as in the NodeGroup's scan record) but not handed over, so that a few
info messages declaring a huge scan cost nothing. Without it, 8 info messages declaring 1024 x 1024 made a
NodeGroup hand 1,048,576 empty frames to its consumer (15 s of CPU, +447 MB).
"""

from __future__ import annotations

import logging
import time
from functools import partial
from typing import Any

import zmq

from stemstream.errors import ProtocolError
from stemstream.nodes.consumer import ScanSummary
from stemstream.plane.nodescan import NodeGroupScan
from stemstream.plane.receiver import decode_info_parts
from stemstream.scans import keys
from stemstream.scans.records import NodeGroupScanRecord
from stemstream.transport.actor import POLL_MS
from stemstream.wire.protocol import EndMessage, ExpectMessage

logger = logging.getLogger(__name__)

_FINISHED_KEPT = 256
_INCOMPLETE_IN_STORE = 1000  # at most this many (frame, missing) pairs in /scans/<n>/nodegroups/<uid>


class ScanLife:
    """The info thread's and the closing half of a NodeGroup (a mixin: the NodeGroup holds the state)."""

    # Set by NodeGroup.__init__.
    _scans: dict[int, NodeGroupScan]
    max_scan_frames: int
    max_open_scans: int
    max_lag: int
    _uid: str
    n_sectors: int
    consumer: Any
    # ---- info

    def _on_info(self, parts: list[zmq.Frame]) -> None:
        try:
            msg = decode_info_parts(parts)
        except ProtocolError as exc:
            self._reject(None, "info_malformed", "%s", exc)
            return
        if msg.sector >= self.n_sectors:
            self._reject(None, "info_wrong_sector", "info for sector %d", msg.sector)
        elif isinstance(msg, ExpectMessage):
            self._on_expect(msg)
        else:
            self._on_end(msg)

    def _on_expect(self, msg: ExpectMessage) -> None:
        n, m = msg.scan_number, msg.sector
        self._supersede(msg)
        begin: NodeGroupScan | None = None
        problem: tuple[str, str] | None = None
        with self._cond:
            start = msg.start or self._newest.get(n, "")
            scan = self._scans.get(n)
            if (n, start) in self._finished:
                problem = ("info_late", f"expect for scan {n}, which is closed")
            elif msg.scan_shape[0] * msg.scan_shape[1] > self.max_scan_frames:
                problem = (
                    "info_too_large",
                    f"expect for scan {n} of {msg.scan_shape[0]}x{msg.scan_shape[1]} frames, more than "
                    f"{self.max_scan_frames} (STEMSTREAM_MAX_SCAN_FRAMES)",
                )
            elif self._uid not in msg.members:
                problem = (
                    "info_not_member",
                    f"expect for scan {n}, whose members do not include this NodeGroup",
                )
            elif scan is not None and scan.start != start:
                problem = ("info_late", f"expect for scan {n} ({start}) while acquisition {scan.start} closes")
                scan = None
            elif scan is None and len(self._scans) >= self.max_open_scans:
                problem = (
                    "info_too_many_scans",
                    f"expect for scan {n}: {len(self._scans)} scans open, the most taken (STEMSTREAM_MAX_OPEN_SCANS)",
                )
            elif scan is None:
                scan = begin = self._scans[n] = NodeGroupScan(
                    msg, self._uid, self.n_sectors, self.frame_shape, start=start
                )
                self._newest[n] = start
                self._newest.move_to_end(n)
                while len(self._newest) > _FINISHED_KEPT:
                    self._newest.popitem(last=False)
                self._unknown.pop((n, msg.start), None)
                self._unknown.pop((n, ""), None)
                self._last_scan = n
            elif (scan.members, scan.scan_shape) != (msg.members, msg.scan_shape):
                problem = (
                    "info_inconsistent",
                    f"scan {n}: sector {m}'s expect disagrees on members or shape",
                )
            if problem is None and scan is not None:
                if scan.expected[m] is not None:
                    problem = ("info_duplicate", f"scan {n}: a second expect for sector {m}")
                else:
                    scan.expected[m] = msg.expected.get(self._uid, 0)
                    scan.touched = time.monotonic()
                    self._cond.notify_all()
        if problem is not None:
            self._reject(scan if problem[0] != "info_late" else None, problem[0], "%s", problem[1])
            return
        if begin is not None:
            self.consumer.begin_scan(begin.info)
            with self._cond:
                begin.begun = True
                self._cond.notify_all()
            logger.info(
                "scan %d%s: %dx%d, NodeGroup %d of %d",
                n,
                f" (acquisition {start})" if start else "",
                *begin.scan_shape,
                begin.my_index + 1,
                begin.n_members,
            )
        assert scan is not None
        self._maybe_finish(scan)

    def _supersede(self, msg: ExpectMessage) -> None:
        """An expect of a new acquisition of a scan number this NodeGroup still has open (the DAQ restarted
        and reused the number): the open one is over; it is closed as a timeout (what came is handed over,
        the rest replayed by its producers) before the new one begins, so that the consumer never sees the
        two at once."""
        n = msg.scan_number
        with self._cond:
            start = msg.start or self._newest.get(n, "")
            old = self._scans.get(n)
            if old is None or old.start == start or (n, start) in self._finished or self._uid not in msg.members:
                return
            mine = not old.closing
            old.closing = True
        if mine:
            self._rlog.error("superseded", "scan %d: a new acquisition (%s) began while acquisition %s was open; "
                             "closing that one", n, start or "-", old.start or "-")  # fmt: skip
            self._finalize(old, "timeout")
        deadline = time.monotonic() + self.scan_timeout_s
        with self._cond:  # closed by another thread (its last message, or the watchdog): wait until it is out
            while self._scans.get(n) is old and time.monotonic() < deadline and not self._stop.is_set():
                self._cond.wait(POLL_MS / 1000)

    def _on_end(self, msg: EndMessage) -> None:
        n, m = msg.scan_number, msg.sector
        with self._lock:
            start = msg.start or self._newest.get(n, "")
            scan = self._scans.get(n)
            if scan is None or scan.start != start:
                closed = (n, start) in self._finished
                problem = ("info_late", f"end for scan {n}, which is {'closed' if closed else 'unknown'}")
                scan = None
            elif scan.sent[m] is not None:
                problem = ("info_duplicate", f"scan {n}: a second end for sector {m}")
            else:
                problem = None
                scan.sent[m] = msg.sent.get(self._uid, 0)
                scan.touched = time.monotonic()
                if scan.expected[m] is not None and scan.sent[m] != scan.expected[m]:
                    logger.warning(
                        "scan %d sector %d: %d announced, %d sent",
                        n,
                        m,
                        scan.expected[m],
                        scan.sent[m],
                    )
        if problem is not None:
            self._reject(scan, problem[0], "%s", problem[1])
            return
        assert scan is not None
        self._maybe_finish(scan)

    # ---- closing a scan

    def _maybe_finish(self, scan: NodeGroupScan) -> None:
        with self._lock:
            if scan.closing or not scan.begun or scan.in_flight or not scan.all_in():
                return
            scan.closing = True
        self._finalize(scan, "received")

    def _finalize(self, scan: NodeGroupScan, status: str) -> None:
        """Hand over the incomplete frames and the summary; called once per scan (``closing`` set)."""
        n, rows = scan.number, self.sector_shape[0]
        all_sectors = tuple(range(self.n_sectors))
        deadline = time.monotonic() + self.scan_timeout_s
        with self._cond:
            # Receiving threads that claimed a sector of this scan before it was closed finish with the
            # consumer first: after end_scan the consumer may begin a new acquisition of the same number.
            while (scan.busy or scan.in_flight) and time.monotonic() < deadline and not self._stop.is_set():
                self._cond.wait(POLL_MS / 1000)
            leftovers = sorted(scan.assembling.items())
            scan.assembling = {}
        incomplete: list[tuple[int, tuple[int, ...]]] = []
        for f, asm in leftovers:
            if asm.buffer is None:
                continue  # its first sector never got a buffer (consumer failure, or stopping)
            bits = scan.bits(f)
            missing = tuple(s for s in all_sectors if not bits >> s & 1)
            for s in missing:
                asm.buffer[s * rows : (s + 1) * rows] = 0
            self.consumer.frame_ready(n, f, missing)
            incomplete.append((f, missing))
        # Frames no sector arrived for: handed over (empty) only as many as frames that data came for, so that
        # the work of a close follows the data, not the expect's declared shape; the rest are counted as absent.
        with self._lock:
            seen = scan.n_seen
        empties = scan.never_seen(seen + self.max_lag)
        for f in empties:
            buf = self.consumer.frame_buffer(n, f)
            buf[...] = 0
            self.consumer.frame_ready(n, f, all_sectors)
            incomplete.append((f, all_sectors))
        absent = scan.share - seen - len(empties)
        if absent:
            self._rlog.warning("absent", "scan %d: %d of the %d frames here never arrived and are not handed over",
                               n, absent, scan.share)  # fmt: skip
        incomplete.sort()
        sent = [s if s is not None else (e or 0) for s, e in zip(scan.sent, scan.expected, strict=True)]
        summary = ScanSummary(
            expected=sum(e or 0 for e in scan.expected),
            received=sum(scan.received),
            frames_complete=scan.n_complete,
            frames_incomplete=len(incomplete) + absent,
            incomplete=incomplete,
            absent=absent,
            lost_upstream=scan.share * self.n_sectors - sum(sent),
            rejected=dict(scan.rejected),
            first_ts=scan.first_ts,
            last_ts=scan.last_ts,
            status=status,
        )
        self.consumer.end_scan(n, summary)
        record = NodeGroupScanRecord(
            uid=self._uid,
            status=summary.status,
            index=scan.my_index,
            members=scan.members,
            expected=summary.expected,
            received=summary.received,
            sent=sum(sent),
            frames_complete=summary.frames_complete,
            frames_incomplete=summary.frames_incomplete,
            incomplete=tuple(summary.incomplete[:_INCOMPLETE_IN_STORE]),
            lost_upstream=summary.lost_upstream,
            rejected=dict(summary.rejected),
            first_ts=summary.first_ts,
            last_ts=summary.last_ts,
            closed_at=time.time(),
            start=scan.start,
        )
        self._publisher.put(keys.nodegroup(n, self._uid), record.to_record())
        self._publisher.put("", None)
        with self._cond:
            self._totals["received"] += summary.received
            self._totals["frames_complete"] += summary.frames_complete
            self._totals["frames_incomplete"] += summary.frames_incomplete
            self._totals["lost_upstream"] += summary.lost_upstream
            self._totals["scans"] += 1
            if self._scans.get(n) is scan:
                del self._scans[n]
            self._finished[(n, scan.start)] = summary
            while len(self._finished) > _FINISHED_KEPT:
                self._finished.popitem(last=False)
            self._cond.notify_all()
        # Rate-limited unless received: scans closed by the watchdog may be many (anyone may open one).
        log = logger.info if status == "received" else partial(self._rlog.error, "closed_" + status)
        log(
            "scan %d %s: %d frames complete, %d incomplete, %d of %d messages, %d rejected",
            n,
            status,
            summary.frames_complete,
            summary.frames_incomplete,
            summary.received,
            sum(sent),
            summary.n_rejected,
        )

    def _housekeeping(self, now: float) -> None:
        stale: list[NodeGroupScan] = []
        with self._lock:
            for scan in self._scans.values():
                if scan.begun and not scan.closing and now - scan.touched > self.scan_timeout_s:
                    scan.closing = True
                    stale.append(scan)
        for scan in stale:
            self._rlog.error(
                "timeout",
                "scan %d: nothing for %.0f s; closing it with what came",
                scan.number,
                self.scan_timeout_s,
            )
            self._finalize(scan, "timeout")

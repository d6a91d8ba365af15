"""One router thread of the aggregator: sector ``m``'s producers in, every member NodeGroup out.

Per scan it collects the ``expect`` messages of the sector's sender threads, connects to the members and
forwards the combined ``expect``; routes each data message to ``members[frame % len(members)]``; once every
``end`` is in and everything reported sent is routed, forwards the combined ``end`` and writes
``/scans/<n>/aggregator/<m>`` (docs/dataplane.md).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import zmq

from stemstream.errors import ProtocolError
from stemstream.plane.admission import MemberResolver, OpenScans, admit_expect, make_room
from stemstream.plane.receiver import Every, decode_info_parts, drain
from stemstream.scans import keys
from stemstream.scans.records import AggregatorScanRecord
from stemstream.transport.actor import POLL_MS, SendAborted, SendMeter, send_parts
from stemstream.transport.sockets import make_socket
from stemstream.wire.protocol import (
    DTYPE,
    MAX_HEADER_BYTES,
    MAX_INFO_PART_BYTES,
    EndMessage,
    ExpectMessage,
    SectorHeader,
)

if TYPE_CHECKING:
    from stemstream.plane.aggregator import Aggregator


def _name(key: ScanKey) -> str:
    """A scan in log lines: its number, and its acquisition when it has one."""
    return f"{key[0]} ({key[1]})" if key[1] else str(key[0])


logger = logging.getLogger(__name__)

FINISHED_KEPT = 1024
ScanKey = tuple[int, str]  # (scan number, acquisition id): scan numbers are reused, acquisitions are not
_Held = tuple[float, ScanKey, SectorHeader, list[zmq.Frame]]  # (arrival, (scan, start as sent), header, parts)


@dataclass
class _Peer:
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


class _Scan:
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
        self.peers: list[_Peer | None] = []
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


class Router:
    """Router thread of sector ``m`` (an actor: its sockets are made, used and closed in its thread)."""

    def __init__(self, agg: Aggregator, sector: int) -> None:
        self.agg = agg
        self.m = sector
        self.scans: dict[ScanKey, _Scan] = {}
        self.finished: OrderedDict[ScanKey, None] = OrderedDict()
        # The newest acquisition of each scan number (by its first expect): what a message without a
        # ``start`` belongs to (docs/protocol.md).
        self.newest: OrderedDict[int, str] = OrderedDict()
        self.pending: deque[_Held] = deque()
        self.unknown: OrderedDict[ScanKey, float] = OrderedDict()  # scan no expect named -> its first data
        self.peers: dict[str, _Peer] = {}
        self.received = 0
        self.routed: dict[str, int] = {}  # per NodeGroup, scans closed (counts() adds the open ones)
        self.rejected: dict[str, int] = {}
        self.received_bytes = 0  # payload bytes of every data message read (metrics)
        self.meter = SendMeter()  # routed data: messages, payload bytes, time blocked on a NodeGroup
        # What one message may cost this thread (plane.admission): no wait on the registry, bounded open scans.
        self.resolver = MemberResolver(self._registered, agg.resolve_timeout)
        self.open = OpenScans(agg.settings.max_open_scans, agg.settings.max_expect_bytes)
        self.worker = agg._add_worker(f"router-{sector}", self._run)

    # ---- loop

    def _run(self, bound: threading.Event) -> None:
        agg = self.agg
        data = agg._bind_pull(f"data_{self.m}", MAX_HEADER_BYTES + agg.sector_nbytes)
        try:
            info = agg._bind_pull(f"info_{self.m}", MAX_INFO_PART_BYTES)
        except BaseException:
            data.close()
            raise
        try:
            bound.set()
            poller = zmq.Poller()
            poller.register(info, zmq.POLLIN)
            poller.register(data, zmq.POLLIN)
            reading = True
            housekeeping = Every(0.5)
            while not agg._stop.is_set():
                events = dict(poller.poll(POLL_MS))
                if info in events:
                    drain(info, self._on_info)
                if data in events:
                    drain(data, self._on_data, room=self._room)
                if len(self.resolver):
                    self._resolved()
                want = self._room()
                if want != reading:
                    poller.modify(data, zmq.POLLIN if want else 0)
                    reading = want
                now = time.monotonic()
                if housekeeping.due(now):
                    self._housekeeping(now)
        finally:
            data.close()
            info.close()
            for peer in self.peers.values():
                peer.close()

    def _room(self) -> bool:
        """Whether data may be read (plane.admission.make_room: room is made by dropping unnamed scans' data)."""
        return make_room(self)

    def _registered(self) -> set[str]:
        return {r.uid for r in self.agg._registry.members("nodegroup")}

    def _resolved(self) -> None:
        """Activate the scans whose members are registered now, or that waited ``resolve_timeout`` for them."""
        for key in self.resolver.ready():
            scan = self.scans.get(key)
            if scan is not None and not scan.active:
                self._activate(scan, resolved=True)

    def _on_info(self, parts: list[zmq.Frame]) -> None:
        size = sum(len(p) for p in parts)
        try:
            msg = decode_info_parts(parts)
        except ProtocolError as exc:
            self._reject(None, "info_malformed", "%s", exc)
            return
        if msg.sector != self.m:
            self._reject(None, "info_wrong_sector", "info for sector %d on sector %d's socket", msg.sector, self.m)
        elif isinstance(msg, ExpectMessage):
            self._on_expect(msg, size)
        else:
            self._on_end(msg)

    # ---- data

    def _on_data(self, parts: list[zmq.Frame]) -> None:
        self.received += 1
        self.received_bytes += len(parts[-1])
        if len(parts) != 2:
            self._reject(None, "malformed", "data message of %d parts", len(parts))
            return
        try:
            header = SectorHeader.decode(parts[0].buffer)
        except ProtocolError as exc:
            self._reject(None, "malformed", "%s", exc)
            return
        if header.sector != self.m:
            self._reject(None, "wrong_sector", "sector %d on the socket of sector %d", header.sector, self.m)
            return
        if header.dtype != DTYPE or header.payload_nbytes != self.agg.sector_nbytes:
            what = "header says %s %s (%d bytes); a sector is %s, %d bytes"
            args = (header.sector_shape, header.dtype, header.payload_nbytes, DTYPE, self.agg.sector_nbytes)
            self._reject(None, "wrong_shape", what, *args)
            return
        if len(parts[1]) != self.agg.sector_nbytes:
            self._reject(
                None,
                "wrong_size",
                "payload of %d bytes, a sector is %d",
                len(parts[1]),
                self.agg.sector_nbytes,
            )
            return
        sent_as = (header.scan_number, header.start)
        key = self._key(*sent_as)
        scan = self.scans.get(key)
        if scan is not None and scan.active:
            self._route(scan, header, parts)
        elif key in self.finished:
            self._reject(None, "late", "data for scan %s, which is closed", _name(key))
        elif scan is None and self._unknown_for(sent_as) > self.agg.expect_grace_s:
            what = "data for scan %s, which no expect named in %.1f s"
            self._reject(None, "no_expect", what, _name(sent_as), self.agg.expect_grace_s)
        else:
            self.pending.append((time.monotonic(), sent_as, header, parts))

    def _key(self, number: int, start: str) -> ScanKey:
        """The acquisition a message means: its ``start``, or without one the newest of its scan number."""
        return (number, start or self.newest.get(number, ""))

    def _unknown_for(self, sent_as: ScanKey) -> float:
        """Seconds since the first data of a scan that no expect has named yet."""
        now = time.monotonic()
        first = self.unknown.setdefault(sent_as, now)
        while len(self.unknown) > FINISHED_KEPT:
            self.unknown.popitem(last=False)
        return now - first

    def _route(self, scan: _Scan, header: SectorHeader, parts: list[zmq.Frame]) -> None:
        frame = header.frame_number
        if frame >= scan.n_frames:
            self._reject(scan, "frame_range", "frame %d outside scan %d", frame, scan.number)
            return
        if header.scan_shape != scan.scan_shape:
            what = "scan %d is %s, header says %s"
            self._reject(scan, "wrong_shape", what, scan.number, scan.scan_shape, header.scan_shape)
            return
        if scan.routed_already(frame):
            self._reject(scan, "duplicate", "scan %d frame %d routed already", scan.number, frame)
            return
        i = frame % len(scan.members)
        peer = scan.peers[i]
        if peer is None or peer.dead:
            self._reject(
                scan,
                "no_route",
                "scan %d: no connection to NodeGroup %s",
                scan.number,
                scan.members[i],
            )
            return
        try:
            send_parts(
                peer.data, parts, stop=peer.abort, timeout=self.agg.scan_timeout_s, what=peer.uid, meter=self.meter
            )
        except SendAborted as exc:
            if self.agg._stop.is_set():
                raise
            logger.error(
                "sector %d: NodeGroup %s stopped taking data (%s); rejecting its messages",
                self.m,
                peer.uid,
                exc,
            )
            peer.dead = True
            self._reject(scan, "no_route", "scan %d: NodeGroup %s is not taking data", scan.number, peer.uid)
            return
        scan.mark_routed(frame)
        scan.routed[i] += 1
        scan.routed_total += 1
        scan.touched = time.monotonic()
        if scan.sent_total is not None and scan.routed_total >= scan.sent_total:
            self._finish(scan)

    # ---- info

    def _on_expect(self, msg: ExpectMessage, size: int = 0) -> None:
        n = msg.scan_number
        key = self._key(n, msg.start)
        if key in self.finished:
            self._reject(None, "info_late", "expect for scan %s, which is closed", _name(key))
            return
        scan = self.scans.get(key)
        if (why := admit_expect(self, msg, key, size, new=scan is None)) is not None:
            self._reject(scan, why[0], "scan %s: %s", _name(key), why[1])
            return
        if scan is None:
            for other in [s for s in self.scans.values() if s.number == n]:
                self._supersede(other, key[1])
            scan = self.scans[key] = _Scan(*key)
            self.newest[n] = key[1]
            self.newest.move_to_end(n)
            while len(self.newest) > FINISHED_KEPT:
                self.newest.popitem(last=False)
            self.unknown.pop((n, msg.start), None)
            self.unknown.pop((n, ""), None)
        if scan.active or msg.producer in scan.expects:
            self._reject(scan, "info_duplicate", "scan %d: a second expect from %s", n, msg.producer)
            return
        if not msg.members:
            self._reject(scan, "info_malformed", "scan %d: expect without members", n)
            return
        if scan.expects:
            first = next(iter(scan.expects.values()))
            if (first.threads, first.members, first.scan_shape) != (msg.threads, msg.members, msg.scan_shape):
                logger.error(
                    "sector %d scan %d: %s disagrees with %s on threads/members/shape; ignored",
                    self.m,
                    n,
                    msg.producer,
                    first.producer,
                )
                self._reject(scan, "info_inconsistent", "scan %d: inconsistent expect", n)
                return
        scan.expects[msg.producer] = msg
        scan.touched = time.monotonic()
        if len(scan.expects) == msg.threads:
            self._activate(scan)

    def _activate(self, scan: _Scan, resolved: bool = False) -> None:
        first = next(iter(scan.expects.values()))
        key = (scan.number, scan.start)
        if not resolved and not self.resolver.known(first.members):
            # Some member is not in the registry (yet): the scan waits, its data in the pending buffer, while
            # this thread goes on routing the others (_resolved, on each turn of the loop).
            self.resolver.wait(key, first.members)
            return
        scan.threads = first.threads
        scan.members = first.members
        scan.scan_shape = first.scan_shape
        scan.n_frames = first.scan_shape[0] * first.scan_shape[1]
        scan.expected = {uid: 0 for uid in scan.members}
        for e in scan.expects.values():
            for uid, count in e.expected.items():
                scan.expected[uid] += count
        scan.peers = self._connect(scan.members)
        scan.routed = [0] * len(scan.members)
        expect = ExpectMessage(
            producer=self.agg.uid,
            scan_number=scan.number,
            sector=self.m,
            threads=scan.threads,
            scan_shape=scan.scan_shape,
            members=scan.members,
            expected=scan.expected,
            start=scan.start,
        ).encode()
        for peer in scan.peers:
            if peer is not None:
                self._send_info(peer, expect, scan.number)
        scan.active = True
        self._publish(scan, "routing")
        logger.info(
            "sector %d scan %d: %d expects combined, %d messages for %d NodeGroup(s)",
            self.m,
            scan.number,
            scan.threads,
            sum(scan.expected.values()),
            len(scan.members),
        )
        if self.pending:
            keep: deque[_Held] = deque()
            for entry in self.pending:
                if self._key(*entry[1]) != (scan.number, scan.start):
                    keep.append(entry)
                elif (scan.number, scan.start) in self.scans:
                    self._route(scan, entry[2], entry[3])
                else:
                    self._reject(None, "late", "data for scan %s, which is closed", _name(entry[1]))
            self.pending = keep
        self._check_ends(scan)

    def _on_end(self, msg: EndMessage) -> None:
        n = msg.scan_number
        key = self._key(n, msg.start)
        if key in self.finished:
            self._reject(None, "info_late", "end for scan %s, which is closed", _name(key))
            return
        scan = self.scans.get(key)
        if scan is None or msg.producer not in scan.expects:
            # A producer thread sends its expect before its end on the same socket: this one never did.
            self._reject(scan, "info_no_expect", "scan %d: an end from %s, which sent no expect", n, msg.producer)
            return
        if msg.producer in scan.ends:
            self._reject(scan, "info_duplicate", "scan %d: a second end from %s", n, msg.producer)
            return
        scan.ends[msg.producer] = msg
        scan.touched = time.monotonic()
        self._check_ends(scan)

    def _check_ends(self, scan: _Scan) -> None:
        if not scan.active or scan.sent_total is not None or len(scan.ends) < scan.threads:
            return
        sent = dict.fromkeys(scan.members, 0)
        for e in scan.ends.values():
            for uid, count in e.sent.items():
                sent[uid] = sent.get(uid, 0) + count
        scan.sent = sent
        scan.sent_total = sum(sent.values())
        scan.lost = sum(e.lost_upstream for e in scan.ends.values())
        if scan.routed_total >= scan.sent_total:
            self._finish(scan)

    def _finish(self, scan: _Scan, status: str = "done") -> None:
        end = EndMessage(self.agg.uid, scan.number, self.m, dict(scan.sent), scan.lost, start=scan.start).encode()
        for peer in scan.peers:
            if peer is not None:
                self._send_info(peer, end, scan.number)
        self._publish(scan, status)
        del self.scans[(scan.number, scan.start)]
        for i, uid in enumerate(scan.members):
            self.routed[uid] = self.routed.get(uid, 0) + scan.routed[i]
        self._finished(scan)
        self.agg._sector_done(scan.number, scan.start, self.m)

    def _finished(self, scan: _Scan) -> None:
        self.open.close((scan.number, scan.start))
        self.resolver.forget((scan.number, scan.start))
        self.finished[(scan.number, scan.start)] = None
        while len(self.finished) > FINISHED_KEPT:
            self.finished.popitem(last=False)

    def _supersede(self, old: _Scan, start: str) -> None:
        """A new acquisition of ``old``'s scan number began (a DAQ restart reset the counter): ``old`` is
        over. Closed with what was routed, as a scan that timed out."""
        self.agg._rlog.error(f"superseded.{self.m}", "sector %d scan %s: a new acquisition of the number (%s) "
                             "began; closing this one with %d of %s routed",
                             self.m, _name((old.number, old.start)), start or "-", old.routed_total,
                     old.sent_total if old.sent_total is not None else "?")  # fmt: skip
        if old.active:
            self._close_timed_out(old)
        else:
            del self.scans[(old.number, old.start)]
            self._finished(old)

    def _send_info(self, peer: _Peer, message: bytes, scan_number: int) -> None:
        if peer.dead:
            return
        try:
            send_parts(
                peer.info,
                [message],
                stop=peer.abort,
                timeout=self.agg.scan_timeout_s,
                what=peer.uid,
            )
        except SendAborted:
            if self.agg._stop.is_set():
                raise
            logger.error(
                "sector %d scan %d: NodeGroup %s takes no info messages",
                self.m,
                scan_number,
                peer.uid,
            )
            peer.dead = True

    # ---- peers, bookkeeping

    def _connect(self, members: tuple[str, ...]) -> list[_Peer | None]:
        """PUSH sockets to each member's ``data_<m>`` and ``info``, from its registry record."""
        agg = self.agg
        records = {r.uid: r for r in agg._registry.members("nodegroup")}  # the local replica: no waiting here
        peers: list[_Peer | None] = []
        for uid in members:
            rec = records.get(uid)
            eps = (
                (
                    rec.endpoints.get(f"data_{self.m}"),
                    rec.endpoints.get("info"),
                )
                if rec is not None
                else (None, None)
            )
            if eps[0] is None or eps[1] is None:
                agg._rlog.error(f"no_member.{self.m}", "sector %d: NodeGroup %s is not in the registry (or has no "
                                "data_%d)", self.m, uid, self.m)  # fmt: skip
                peers.append(None)
                continue
            peer = self.peers.get(uid)
            if peer is None or peer.endpoints != eps or peer.dead:
                if peer is not None:
                    peer.close()
                key = rec.server_key if rec is not None else None  # the NodeGroup's published server key
                data = make_socket(agg._ctx, zmq.PUSH, settings=agg.settings, role="client", server_key=key)
                info = make_socket(agg._ctx, zmq.PUSH, settings=agg.settings, role="client", server_key=key)
                data.connect(eps[0])
                info.connect(eps[1])
                peer = self.peers[uid] = _Peer(uid, (eps[0], eps[1]), data, info)
            peers.append(peer)
        busy = {u for s in self.scans.values() for u in s.members} | set(members)
        for uid in [u for u in self.peers if u not in records and u not in busy]:
            self.peers.pop(uid).close()  # a NodeGroup that left
        return peers

    def _housekeeping(self, now: float) -> None:
        timeout = self.agg.scan_timeout_s
        while self.pending and now - self.pending[0][0] > timeout:
            _, sent_as, _, _ = self.pending.popleft()
            self._reject(None, "no_expect", "data for scan %s never got its expect messages", _name(sent_as))
        if any(self._key(*entry[1]) not in self.scans for entry in self.pending):
            keep: deque[_Held] = deque()
            for entry in self.pending:  # data of scans no expect has named, held past the grace period
                sent_as = entry[1]
                unnamed = self._key(*sent_as) not in self.scans
                if unnamed and now - self.unknown.get(sent_as, entry[0]) > self.agg.expect_grace_s:
                    what = "data for scan %s, which no expect named in %.1f s"
                    self._reject(None, "no_expect", what, _name(sent_as), self.agg.expect_grace_s)
                else:
                    keep.append(entry)
            self.pending = keep
        for scan in list(self.scans.values()):
            if now - scan.touched <= timeout:
                continue
            if scan.active:
                self.agg._rlog.error(
                    f"timeout.{self.m}",
                    "sector %d scan %s: nothing for %.0f s; closing with %d of %s routed",
                    self.m,
                    _name((scan.number, scan.start)),
                    timeout,
                    scan.routed_total,
                    scan.sent_total if scan.sent_total is not None else "?",
                )
                self._close_timed_out(scan)
            else:
                self.agg._rlog.error(
                    f"dropped.{self.m}",
                    "sector %d scan %d: %d of %s expect messages after %.0f s; dropping the scan",
                    self.m,
                    scan.number,
                    len(scan.expects),
                    scan.threads or "?",
                    timeout,
                )
                del self.scans[(scan.number, scan.start)]
                self._finished(scan)

    def _close_timed_out(self, scan: _Scan) -> None:
        """Close an active scan that will get no more (its producers went quiet, or it was superseded)."""
        if scan.sent_total is None:
            scan.sent = {uid: scan.routed[i] for i, uid in enumerate(scan.members)}
            scan.lost = scan.n_frames - scan.routed_total
        self._finish(scan, status="timeout")

    def _reject(self, scan: _Scan | None, kind: str, msg: str, *args: object) -> None:
        self.rejected[kind] = self.rejected.get(kind, 0) + 1
        if scan is not None:
            scan.rejected += 1
        # Rate-limited per kind and sector: one sector's flood does not hide another's.
        self.agg._rlog.warning(f"{kind}.{self.m}", "aggregator sector %d: rejected (%s): " + msg, self.m, kind, *args)

    def _publish(self, scan: _Scan, status: str) -> None:
        record = AggregatorScanRecord(
            aggregator=self.agg.uid,
            sector=self.m,
            status=status,
            threads=scan.threads,
            members=scan.members,
            expected=dict(scan.expected),
            expected_total=sum(scan.expected.values()),
            sent=dict(scan.sent),
            sent_total=scan.sent_total or 0,
            routed={uid: scan.routed[i] for i, uid in enumerate(scan.members)},
            routed_total=scan.routed_total,
            lost_upstream=scan.lost,
            rejected=scan.rejected,
            started=scan.started,
            updated=time.time(),
            start=scan.start,
        )
        self.agg._publisher.put(keys.aggregator(scan.number, self.m), record.to_record())

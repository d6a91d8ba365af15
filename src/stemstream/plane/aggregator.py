"""The aggregator: one router thread per detector sector between the producers and the NodeGroups.

Thread ``m`` binds a data PULL and an info PULL (registry endpoints ``data_<m>`` and ``info_<m>``) that
the ``T`` sender threads of sector ``m``'s producer connect to. Per scan it

1. collects the ``T`` ``expect`` messages, sums their NodeGroup UID -> count maps, connects a PUSH to
   each member NodeGroup's ``data_<m>`` (and one to its ``info``), and forwards the combined ``expect``;
2. runs a tight pull -> peek -> push loop: the frame number is read from the header (no payload decode,
   no copy) and the two frames go to ``members[frame % len(members)]``;
3. once all ``T`` ``end`` messages are in and everything they report sent is routed, forwards the
   combined ``end`` and writes ``/scans/<n>/aggregator/<m>``.

Info and data travel on different sockets, so data can overtake its ``expect``: such messages wait in a
bounded buffer (``pending_limit``); when it is full the thread stops reading data until the expects are in.
Data of a scan that no ``expect`` has named waits at most ``expect_grace_s`` (counted from the first such
message of that scan number; later ones are rejected at once), so unknown scan numbers cannot hold a sector.
Bad messages are rejected, counted per kind (registry counts ``rejected.<kind>``) and logged, rate-limited
(one line per kind per 10 s). Every header is fully decoded; a frame is routed at most once per scan (the
scan closes when as many messages are routed as the producers say they sent, so a duplicate routed would
close it early).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket as _socket
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any

import zmq

from stemstream.config import Settings, get_settings
from stemstream.errors import ProtocolError, WaitTimeout
from stemstream.log import RateLimitedLog
from stemstream.scans import keys
from stemstream.store.registry import record_key, role_prefix
from stemstream.transport.actor import POLL_MS, Publisher, SendAborted, Worker, send_parts
from stemstream.transport.security import curve_security
from stemstream.transport.sockets import bind_random, make_socket, term_context
from stemstream.wire.protocol import (
    DTYPE,
    MAX_HEADER_BYTES,
    MAX_INFO_PART_BYTES,
    N_SECTORS,
    SECTOR_SHAPE,
    EndMessage,
    ExpectMessage,
    SectorHeader,
    decode_info,
)

logger = logging.getLogger(__name__)

BURST = 256  # messages handled per socket before looking at the other one
_FINISHED_KEPT = 1024
_Held = tuple[float, int, SectorHeader, list[zmq.Frame]]  # (arrival, scan number, header, parts)


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
    """One scan as seen by one router thread."""

    def __init__(self, number: int) -> None:
        self.number = number
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


class _Router:
    """Router thread of sector ``m`` (an actor: its sockets are made, used and closed in its thread)."""

    def __init__(self, agg: Aggregator, sector: int) -> None:
        self.agg = agg
        self.m = sector
        self.endpoints: dict[str, str] = {}
        self.bound = threading.Event()
        self.scans: dict[int, _Scan] = {}
        self.finished: OrderedDict[int, None] = OrderedDict()
        self.pending: deque[_Held] = deque()
        self.unknown: OrderedDict[int, float] = OrderedDict()  # scan no expect named -> its first data
        self.peers: dict[str, _Peer] = {}
        self.received = 0
        self.routed: dict[str, int] = {}  # per NodeGroup, scans closed (counts() adds the open ones)
        self.rejected: dict[str, int] = {}
        self.worker = Worker(f"router-{sector}", self._run)

    # ---- loop

    def _run(self) -> None:
        agg = self.agg
        data = make_socket(agg._ctx, zmq.PULL, settings=agg.settings, role="server")
        info = make_socket(agg._ctx, zmq.PULL, settings=agg.settings, role="server")
        try:
            self.endpoints = {
                f"data_{self.m}": bind_random(data, agg.host, max_msg_size=MAX_HEADER_BYTES + agg.sector_nbytes),
                f"info_{self.m}": bind_random(info, agg.host, max_msg_size=MAX_INFO_PART_BYTES),
            }
            self.bound.set()
            poller = zmq.Poller()
            poller.register(info, zmq.POLLIN)
            poller.register(data, zmq.POLLIN)
            reading = True
            housekeeping = time.monotonic() + 0.5
            while not agg._stop.is_set():
                events = dict(poller.poll(POLL_MS))
                if info in events:
                    self._drain_info(info)
                if data in events:
                    self._drain_data(data)
                want = len(self.pending) < agg.pending_limit
                if want != reading:
                    poller.modify(data, zmq.POLLIN if want else 0)
                    reading = want
                now = time.monotonic()
                if now >= housekeeping:
                    self._housekeeping(now)
                    housekeeping = now + 0.5
        finally:
            data.close()
            info.close()
            for peer in self.peers.values():
                peer.close()

    def _drain_data(self, data: zmq.Socket) -> None:
        for _ in range(BURST):
            if len(self.pending) >= self.agg.pending_limit:
                return
            try:
                parts = data.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            self.received += 1
            self._on_data(parts)

    def _drain_info(self, info: zmq.Socket) -> None:
        for _ in range(BURST):
            try:
                parts = info.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            if len(parts) != 1:
                self._reject(None, "info_malformed", "info message of %d parts", len(parts))
                continue
            try:
                msg = decode_info(parts[0].buffer)
            except ProtocolError as exc:
                self._reject(None, "info_malformed", "%s", exc)
                continue
            if msg.sector != self.m:
                self._reject(
                    None,
                    "info_wrong_sector",
                    "info for sector %d on sector %d's socket",
                    msg.sector,
                    self.m,
                )
            elif isinstance(msg, ExpectMessage):
                self._on_expect(msg)
            else:
                self._on_end(msg)

    # ---- data

    def _on_data(self, parts: list[zmq.Frame]) -> None:
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
        scan_number = header.scan_number
        scan = self.scans.get(scan_number)
        if scan is not None and scan.active:
            self._route(scan, header, parts)
        elif scan_number in self.finished:
            self._reject(None, "late", "data for scan %d, which is closed", scan_number)
        elif scan is None and self._unknown_for(scan_number) > self.agg.expect_grace_s:
            what = "data for scan %d, which no expect named in %.1f s"
            self._reject(None, "no_expect", what, scan_number, self.agg.expect_grace_s)
        else:
            self.pending.append((time.monotonic(), scan_number, header, parts))

    def _unknown_for(self, scan_number: int) -> float:
        """Seconds since the first data of ``scan_number``, a scan that no expect has named yet."""
        now = time.monotonic()
        first = self.unknown.setdefault(scan_number, now)
        while len(self.unknown) > _FINISHED_KEPT:
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
            send_parts(peer.data, parts, stop=peer.abort, timeout=self.agg.scan_timeout_s, what=peer.uid)
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

    def _on_expect(self, msg: ExpectMessage) -> None:
        n = msg.scan_number
        if n in self.finished:
            self._reject(None, "info_late", "expect for scan %d, which is closed", n)
            return
        scan = self.scans.get(n)
        if scan is None:
            scan = self.scans[n] = _Scan(n)
            self.unknown.pop(n, None)
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

    def _activate(self, scan: _Scan) -> None:
        first = next(iter(scan.expects.values()))
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
                if entry[1] != scan.number:
                    keep.append(entry)
                elif scan.number in self.scans:
                    self._route(scan, entry[2], entry[3])
                else:
                    self._reject(None, "late", "data for scan %d, which is closed", scan.number)
            self.pending = keep
        self._check_ends(scan)

    def _on_end(self, msg: EndMessage) -> None:
        n = msg.scan_number
        if n in self.finished:
            self._reject(None, "info_late", "end for scan %d, which is closed", n)
            return
        scan = self.scans.get(n)
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
        end = EndMessage(self.agg.uid, scan.number, self.m, dict(scan.sent), scan.lost).encode()
        for peer in scan.peers:
            if peer is not None:
                self._send_info(peer, end, scan.number)
        self._publish(scan, status)
        del self.scans[scan.number]
        for i, uid in enumerate(scan.members):
            self.routed[uid] = self.routed.get(uid, 0) + scan.routed[i]
        self.finished[scan.number] = None
        while len(self.finished) > _FINISHED_KEPT:
            self.finished.popitem(last=False)
        self.agg._sector_done(scan.number, self.m)

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
        records = {r.uid: r for r in agg._registry.members("nodegroup")}
        missing = [u for u in members if u not in records]
        if missing:
            wanted = [record_key("nodegroup", u) for u in missing]
            with contextlib.suppress(TimeoutError):
                agg.store.wait_for(
                    lambda items: all(k in items for k in wanted),
                    role_prefix("nodegroup"),
                    agg.resolve_timeout,
                )
            records = {r.uid: r for r in agg._registry.members("nodegroup")}
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
                logger.error(
                    "sector %d: NodeGroup %s is not in the registry (or has no data_%d)",
                    self.m,
                    uid,
                    self.m,
                )
                peers.append(None)
                continue
            peer = self.peers.get(uid)
            if peer is None or peer.endpoints != eps or peer.dead:
                if peer is not None:
                    peer.close()
                data = make_socket(agg._ctx, zmq.PUSH, settings=agg.settings, role="client")
                info = make_socket(agg._ctx, zmq.PUSH, settings=agg.settings, role="client")
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
            _, n, _, _ = self.pending.popleft()
            self._reject(None, "no_expect", "data for scan %d never got its expect messages", n)
        if any(entry[1] not in self.scans for entry in self.pending):
            keep: deque[_Held] = deque()
            for entry in self.pending:  # data of scans no expect has named, held past the grace period
                n = entry[1]
                if n not in self.scans and now - self.unknown.get(n, entry[0]) > self.agg.expect_grace_s:
                    what = "data for scan %d, which no expect named in %.1f s"
                    self._reject(None, "no_expect", what, n, self.agg.expect_grace_s)
                else:
                    keep.append(entry)
            self.pending = keep
        for scan in list(self.scans.values()):
            if now - scan.touched <= timeout:
                continue
            if scan.active:
                logger.error(
                    "sector %d scan %d: nothing for %.0f s; closing with %d of %s routed",
                    self.m,
                    scan.number,
                    timeout,
                    scan.routed_total,
                    scan.sent_total if scan.sent_total is not None else "?",
                )
                if scan.sent_total is None:
                    scan.sent = {uid: scan.routed[i] for i, uid in enumerate(scan.members)}
                    scan.lost = scan.n_frames - scan.routed_total
                self._finish(scan, status="timeout")
            else:
                logger.error(
                    "sector %d scan %d: %d of %s expect messages after %.0f s; dropping the scan",
                    self.m,
                    scan.number,
                    len(scan.expects),
                    scan.threads or "?",
                    timeout,
                )
                del self.scans[scan.number]
                self.finished[scan.number] = None

    def _reject(self, scan: _Scan | None, kind: str, msg: str, *args: object) -> None:
        self.rejected[kind] = self.rejected.get(kind, 0) + 1
        if scan is not None:
            scan.rejected += 1
        self.agg._rlog.warning(kind, "aggregator sector %d: rejected (%s): " + msg, self.m, kind, *args)

    def _publish(self, scan: _Scan, status: str) -> None:
        self.agg._publisher.put(
            keys.aggregator(scan.number, self.m),
            {
                "aggregator": self.agg.uid,
                "sector": self.m,
                "status": status,
                "threads": scan.threads,
                "members": list(scan.members),
                "expected": dict(scan.expected),
                "expected_total": sum(scan.expected.values()),
                "sent": dict(scan.sent),
                "sent_total": scan.sent_total or 0,
                "routed": {uid: scan.routed[i] for i, uid in enumerate(scan.members)},
                "routed_total": scan.routed_total,
                "lost_upstream": scan.lost,
                "rejected": scan.rejected,
                "started": scan.started,
                "updated": time.time(),
            },
        )


class Aggregator:
    """The central router: ``n_sectors`` router threads, registered as ``/aggregators/<uid>``."""

    def __init__(
        self,
        store: Any,
        *,
        n_sectors: int = N_SECTORS,
        uid: str | None = None,
        registry: Any = None,
        host: str | None = None,
        settings: Settings | None = None,
        sector_nbytes: int | None = None,
        pending_limit: int = 64,
        scan_timeout_s: float | None = None,
        expect_grace_s: float | None = None,
        resolve_timeout: float = 10.0,
        publish_interval: float = 0.5,
    ) -> None:
        self.settings = settings or get_settings()
        self.store = store
        self.n_sectors = n_sectors
        self.host = host or self.settings.bind_host
        security = curve_security(self.settings, hosts=(self.host,))  # CURVE: a problem is an error now
        if security is not None:
            security.check("server", "client")
        self.sector_nbytes = sector_nbytes or SECTOR_SHAPE[0] * SECTOR_SHAPE[1] * 2
        self.pending_limit = pending_limit
        self.scan_timeout_s = scan_timeout_s or self.settings.scan_timeout_s
        # Data of a scan no expect has named waits this long (its expect may be a little behind on the wire).
        self.expect_grace_s = expect_grace_s or min(10.0, self.scan_timeout_s)
        self.resolve_timeout = resolve_timeout
        self._rlog = RateLimitedLog(logger)  # bad input: one line per kind per 10 s
        self._uid = uid or f"aggregator-{_socket.gethostname()}-{os.getpid()}"
        self._registry = registry
        self._registration: Any = None
        self._ctx = zmq.Context()
        self._stop = threading.Event()
        self._routers = [_Router(self, m) for m in range(n_sectors)]
        self._publisher = Publisher(
            store,
            None,
            self._snapshot,
            interval=publish_interval,
            name="agg-publisher",
        )
        self._done: dict[int, set[int]] = {}
        self._done_cond = threading.Condition()
        self._started = False
        self._unwatch: Any = None

    @property
    def uid(self) -> str:
        return self._uid

    @property
    def endpoints(self) -> dict[str, str]:
        return {k: v for r in self._routers for k, v in r.endpoints.items()}

    def start(self, timeout: float = 10.0) -> Aggregator:
        """Bind every sector's sockets, register with the endpoints, status "ready"."""
        if self._registry is None:
            from stemstream.store import Registry

            self._registry = Registry(self.store, ttl=self.settings.store_ttl_s)
        for r in self._routers:
            r.worker.start()
        deadline = time.monotonic() + timeout
        for r in self._routers:
            while not r.bound.wait(0.1):
                r.worker.maybe_raise()
                if time.monotonic() > deadline:
                    raise WaitTimeout(f"router {r.m} did not bind within {timeout:.0f} s")
        self._started = True
        self._registration = self._registry.register(
            "aggregator", self._uid, status="ready", endpoints=self.endpoints, sectors=self.n_sectors
        )
        self._publisher._registration = self._registration
        self._publisher.start()
        self._unwatch = self.store.watch(self._on_nodegroup_change, prefix=role_prefix("nodegroup"))
        logger.info("aggregator %s ready: %s", self._uid, self.endpoints)
        return self

    def _on_nodegroup_change(self, key: str, value: Any) -> None:
        """A NodeGroup's record went (it stopped, or died and expired): stop waiting on it."""
        if value is not None:
            return
        uid = key.rsplit("/", 1)[-1]
        for router in self._routers:
            peer = router.peers.get(uid)
            if peer is not None and not peer.abort.is_set():
                logger.warning("sector %d: NodeGroup %s left the registry; no more sends to it", router.m, uid)
                peer.abort.set()

    def counts(self) -> dict[str, int]:
        """Totals over the sector threads: received, routed, routed.<uid>, rejected, rejected.<kind>, ..."""
        out: dict[str, int] = {"received": 0, "routed": 0, "rejected": 0, "pending": 0, "scans_done": 0}
        for r in self._routers:
            out["received"] += r.received
            out["pending"] += len(r.pending)
            routed = dict(r.routed)  # closed scans, plus the scans being routed:
            for scan in list(r.scans.values()):
                for uid, n in zip(scan.members, list(scan.routed), strict=False):
                    routed[uid] = routed.get(uid, 0) + n
            for uid, n in routed.items():
                out["routed"] += n
                out[f"routed.{uid}"] = out.get(f"routed.{uid}", 0) + n
            for kind, n in dict(r.rejected).items():
                out["rejected"] += n
                out[f"rejected.{kind}"] = out.get(f"rejected.{kind}", 0) + n
        with self._done_cond:
            out["scans_done"] = sum(1 for s in self._done.values() if len(s) == self.n_sectors)
        return out

    def _snapshot(self) -> dict[str, Any]:
        return {"counts": self.counts()}

    def _sector_done(self, scan_number: int, sector: int) -> None:
        with self._done_cond:
            done = self._done.setdefault(scan_number, set())
            done.add(sector)
            while len(self._done) > _FINISHED_KEPT:
                del self._done[next(iter(self._done))]
            self._done_cond.notify_all()
            complete = len(done) == self.n_sectors
        if complete:
            self._publisher.put("", None)  # refresh the registry counts now

    def wait_scan(self, scan_number: int, timeout: float) -> None:
        """Block until every sector thread has closed ``scan_number`` (raises TimeoutError)."""
        deadline = time.monotonic() + timeout
        with self._done_cond:
            while len(self._done.get(scan_number, ())) < self.n_sectors:
                self.maybe_raise()
                left = deadline - time.monotonic()
                if left <= 0:
                    raise WaitTimeout(f"aggregator: scan {scan_number} not routed within {timeout:.0f} s")
                self._done_cond.wait(min(left, 0.2))

    def maybe_raise(self) -> None:
        """Re-raise, on the calling thread, the exception that ended a worker thread."""
        for r in self._routers:
            r.worker.maybe_raise()
        self._publisher.maybe_raise()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._unwatch is not None:
            self._unwatch()
        for r in self._routers:
            for peer in list(r.peers.values()):
                peer.abort.set()
        for r in self._routers:
            if r.worker.is_alive():
                r.worker.join(timeout)
        if self._started:
            self._publisher.flush(timeout)
            self._publisher.stop(timeout)
        if self._registration is not None:
            self._registration.close()
            self._registration = None
        term_context(self._ctx)

    def __enter__(self) -> Aggregator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

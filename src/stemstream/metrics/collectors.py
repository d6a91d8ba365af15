"""Collectors: at scrape time they read the counters the components keep anyway (``counts()``, a store
server's ``status()``, the store's scan records) and turn them into the families of ``catalog.SPECS``.

Nothing here runs on a data path: a scrape (every 15 s or so) reads a few dictionaries. A component that is
gone (stopped) still answers with its last counts.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import KW_ONLY, dataclass
from typing import Any, ClassVar, Protocol

from prometheus_client.core import Metric

from stemstream.metrics.catalog import BY_ROLE, SPECS
from stemstream.scans import keys
from stemstream.scans.records import ROUTE_DISK, ROUTE_STREAM, CountedRecord, ScanRecord
from stemstream.store.registry import Registry

logger = logging.getLogger(__name__)

# Registry roles counted in stemstream_registry_members: the data plane's (a session's record is not a
# registry record: /sessions/<uid> is written by the session itself).
MEMBER_ROLES = ("producer", "aggregator", "nodegroup")


class Counted(Protocol):
    """A component that keeps counters (Producer, Aggregator, NodeGroup, CountingService)."""

    def counts(self) -> dict[str, int]: ...


class _Families:
    """The families of one scrape, made on first use, in catalogue order."""

    def __init__(self, names: tuple[str, ...]) -> None:
        self._names = names
        self._made: dict[str, Metric] = {}

    def add(self, name: str, labels: list[str], value: float) -> None:
        family = self._made.get(name)
        if family is None:
            family = self._made[name] = SPECS[name].family()
        family.add_metric(labels, value)

    def __iter__(self) -> Iterator[Metric]:
        for name in self._names:  # every family of the role, even one without samples this time
            yield self._made.get(name) or SPECS[name].family()


def _rejected(counts: dict[str, int]) -> dict[str, int]:
    return {k.split(".", 1)[1]: v for k, v in counts.items() if k.startswith("rejected.")}


class ProducerCollector:
    """A producer's counts (``Producer.counts()``): sent, lost upstream, back-pressure, the hold."""

    def __init__(self, producer: Any) -> None:
        self.producer = producer

    def collect(self) -> Iterator[Metric]:
        p = self.producer
        c = p.counts()
        base = ["producer", p.uid]
        out = _Families(BY_ROLE["producer"])
        out.add("stemstream_messages_sent_total", base, c.get("data_messages", 0))
        out.add("stemstream_bytes_sent_total", base, c.get("data_bytes", 0))
        out.add("stemstream_sectors_lost_upstream_total", base, c.get("lost_upstream", 0))
        out.add("stemstream_send_blocked_total", base, c.get("blocked_sends", 0))
        out.add("stemstream_send_blocked_seconds_total", base, c.get("blocked_us", 0) / 1e6)
        for outcome, key in (
            ("streamed", "scans_streamed"),
            ("on_disk", "scans_on_disk"),
            ("acked", "acked"),
            ("replayed", "replayed"),
            ("spilled", "spilled"),
        ):
            out.add("stemstream_scans_handled_total", [*base, outcome], c.get(key, 0))
        out.add("stemstream_pacing_timeouts_total", base, c.get("skew_timeouts", 0))
        out.add("stemstream_hold_bytes", base, c.get("held_bytes", 0))
        out.add("stemstream_hold_limit_bytes", base, p.hold_bytes)
        out.add("stemstream_held_scans", base, c.get("held_scans", 0))
        out.add("stemstream_sectors_on_disk_total", base, c.get("sectors_on_disk", 0))
        out.add("stemstream_sectors_unprotected_total", base, c.get("unprotected", 0))
        out.add("stemstream_disk_errors_total", base, c.get("disk_errors", 0))
        yield from out


class AggregatorCollector:
    """The aggregator's counts (``Aggregator.counts()``), summed over its sector threads."""

    def __init__(self, aggregator: Any) -> None:
        self.aggregator = aggregator

    def collect(self) -> Iterator[Metric]:
        a = self.aggregator
        c = a.counts()
        base = ["aggregator", a.uid]
        out = _Families(BY_ROLE["aggregator"])
        out.add("stemstream_messages_received_total", base, c.get("received", 0))
        out.add("stemstream_bytes_received_total", base, c.get("received_bytes", 0))
        out.add("stemstream_messages_sent_total", base, c.get("routed", 0))
        out.add("stemstream_bytes_sent_total", base, c.get("routed_bytes", 0))
        for kind, n in sorted(_rejected(c).items()):
            out.add("stemstream_messages_rejected_total", [*base, kind], n)
        out.add("stemstream_send_blocked_total", base, c.get("blocked_sends", 0))
        out.add("stemstream_send_blocked_seconds_total", base, c.get("blocked_us", 0) / 1e6)
        out.add("stemstream_queue_depth", [*base, "pending"], c.get("pending", 0))
        out.add("stemstream_scans_open", base, c.get("scans_open", 0))
        out.add("stemstream_nodegroups_lost_total", base, c.get("nodegroups_lost", 0))
        yield from out


class NodeGroupCollector:
    """The NodeGroups of one process (``NodeGroup.counts()`` each, labelled by UID)."""

    def __init__(self) -> None:
        self.groups: list[Any] = []

    def collect(self) -> Iterator[Metric]:
        out = _Families(BY_ROLE["nodegroup"])
        for g in list(self.groups):
            c = g.counts()
            base = ["nodegroup", g.uid]
            out.add("stemstream_messages_received_total", base, c.get("received", 0))
            out.add("stemstream_bytes_received_total", base, c.get("received_bytes", 0))
            for kind, n in sorted(_rejected(c).items()):
                out.add("stemstream_messages_rejected_total", [*base, kind], n)
            out.add("stemstream_sectors_lost_upstream_total", base, c.get("lost_upstream", 0))
            out.add("stemstream_frames_assembled_total", [*base, "true"], c.get("frames_complete", 0))
            out.add("stemstream_frames_assembled_total", [*base, "false"], c.get("frames_incomplete", 0))
            out.add("stemstream_assembling_peak_frames", base, c.get("assembling_peak", 0))
            out.add("stemstream_queue_depth", [*base, "assembling"], c.get("assembling", 0))
            out.add("stemstream_scans_open", base, c.get("scans_open", 0))
            out.add("stemstream_scans_handled_total", [*base, "received"], c.get("scans", 0))
            out.add("stemstream_pacing_timeouts_total", base, c.get("lag_timeouts", 0))
        yield from out


class CountingCollector:
    """A NodeGroup process's counting service (``CountingService.counts()``)."""

    def __init__(self, service: Any) -> None:
        self.service = service

    def collect(self) -> Iterator[Metric]:
        s = self.service
        c = s.counts()
        base = ["counting", "+".join(s.uids)]
        ranked = [*base, str(s.rank)]
        out = _Families(BY_ROLE["counting"])
        out.add("stemstream_frames_counted_total", ranked, c.get("frames_counted", 0))
        out.add("stemstream_frames_count_failed_total", ranked, c.get("frames_failed", 0))
        out.add("stemstream_counting_backlog_frames", ranked, c.get("frames_to_count", 0))
        out.add("stemstream_counting_lag_seconds", ranked, c.get("lag_ms", 0) / 1000)
        out.add("stemstream_scans_open", base, c.get("scans_open", 0))
        files = {k.split(".", 1)[1]: v for k, v in c.items() if k.startswith("files.")}
        if s.rank == 0:
            files = {"counted": 0, "partial": 0, "failed": 0, **files}
        for status, n in sorted(files.items()):
            out.add("stemstream_counted_files_total", [*base, status], n)
        yield from out


class StoreCollector:
    """A Clone store server (``StoreServer.status()``): sequence, keys, Binary Star state, counters."""

    def __init__(self, server: Any) -> None:
        self.server = server

    def collect(self) -> Iterator[Metric]:
        out = _Families(BY_ROLE["store"])
        try:
            st = self.server.status()
        except Exception as exc:  # not started, or stopped: no samples rather than a failed scrape
            logger.debug("store status unavailable: %s", exc)
            yield from out
            return
        base = ["store", st["role"]]
        counters = dict(st.get("counters") or {})
        peer = st.get("peer")
        out.add("stemstream_store_sequence", base, st.get("sequence", 0))
        out.add("stemstream_store_keys", base, st.get("keys", 0))
        out.add("stemstream_store_pending_updates", base, st.get("pending", 0))
        out.add("stemstream_store_active", base, 1 if st.get("state") == "active" else 0)
        out.add("stemstream_store_peer_configured", base, 0 if peer is None else 1)
        out.add("stemstream_store_peer_alive", base, 1 if st.get("peer_alive") else 0)
        out.add("stemstream_store_failovers_total", base, counters.pop("failovers", 0))
        for kind, n in sorted(counters.items()):
            out.add("stemstream_store_events_total", [*base, kind], n)
        yield from out


def scan_outcome(record: ScanRecord, raw: dict[str, Any], counted: CountedRecord | None) -> str:
    """What became of a scan so far: ``replayed``, ``on_disk``, the counted file's status (``counted``,
    ``partial``, ``failed``), ``received`` (streamed to NodeGroups that do not count), or ``open``."""
    if record.replayed:
        return "replayed"
    if record.route == ROUTE_DISK:
        return "on_disk" if record.landed_on_disk else "open"
    if counted is not None and counted.status:
        return counted.status
    if record.route == ROUTE_STREAM and record.closed and raw.get("ack") == "received":
        return "received"
    return "open"


@dataclass(eq=False)  # registered by identity in prometheus_client
class ScanCollector:
    """Scans in the store by outcome, the age of the oldest open one, and the live registry: for the
    process that plans and closes every scan (the leader producer) and for a session (its scans only).

    ``client``: a store client (``items(prefix)``); ``since``: only scans decided after this time.
    """

    OUTCOMES: ClassVar[tuple[str, ...]] = ("open", "received", "counted", "partial", "failed", "on_disk", "replayed")

    client: Any
    role: str
    uid: str
    _: KW_ONLY
    since: float = 0.0
    clock: Callable[[], float] = time.time

    def collect(self) -> Iterator[Metric]:
        base = [self.role, self.uid]
        out = _Families(BY_ROLE["leader"])
        by_outcome = dict.fromkeys(self.OUTCOMES, 0)
        oldest: float | None = None
        for key in self.client.keys(keys.SCANS):  # decode the scan records only, not their (large) sub-records
            n = keys.scan_number_of(key)
            if n is None:
                continue
            value = self.client.get(key)
            record = ScanRecord.parse(value)
            if record is None or record.decided_at < self.since:
                continue
            outcome = scan_outcome(record, value, CountedRecord.parse(self.client.get(keys.counted(n))))
            by_outcome[outcome] = by_outcome.get(outcome, 0) + 1
            if outcome == "open":
                oldest = record.decided_at if oldest is None else min(oldest, record.decided_at)
        for outcome, count in by_outcome.items():
            out.add("stemstream_scans", [*base, outcome], count)
        age = 0.0 if oldest is None else max(0.0, self.clock() - oldest)
        out.add("stemstream_scan_open_oldest_seconds", base, age)
        registry = Registry(self.client)
        for member in MEMBER_ROLES:
            out.add("stemstream_registry_members", [*base, member], len(registry.members(member)))
        yield from out


class SessionCollector:
    """A streaming session: how many NodeGroups it asked for (next to ``stemstream_registry_members``, the
    ones live: fewer for long means one is gone and not back)."""

    def __init__(self, uid: str, nodegroups: int) -> None:
        self.uid = uid
        self.nodegroups = nodegroups

    def collect(self) -> Iterator[Metric]:
        out = _Families(("stemstream_session_nodegroups_expected",))
        out.add("stemstream_session_nodegroups_expected", ["session", self.uid], self.nodegroups)
        yield from out

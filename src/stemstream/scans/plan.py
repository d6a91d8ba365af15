"""Where a scan goes, streamed to NodeGroups or written to disk; closing its ``/scans/<n>`` record.

The four producers of a scan (one per sector) must agree on one plan: the same route and, when
streaming, the same ordered NodeGroup membership, or the sectors of a frame would meet on different
NodeGroups. One producer, the *leader* (sector 0 by default), decides from the registry and writes
``/scans/<n>``; the others wait for that record. Streaming needs a ready aggregator and at least one
ready NodeGroup; otherwise the scan goes to disk (``plane.diskwriter``) and the next scan looks again.

``/scans/<n>`` is written by the leader only (plan, then the totals when the scan is closed); every other
writer has its own sub-key (scans/keys.py), so no two processes write the same key. The records are typed
in scans/records.py.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection, Mapping
from typing import Any, Protocol

import numpy as np

from stemstream.errors import StemstreamError
from stemstream.scans import keys
from stemstream.scans.records import (
    AGGREGATOR_DONE,
    NODEGROUP_DONE,
    PRODUCER_DONE,
    ROUTE_DISK,
    ROUTE_STREAM,
    STATUS_INCOMPLETE,
    STATUS_ON_DISK,
    STATUS_RECEIVED,
    AggregatorScanRecord,
    NodeGroupScanRecord,
    ProducerScanRecord,
    ScanPlan,
    ScanTotals,
    closed_scan_record,
)
from stemstream.wire.protocol import N_SECTORS, START_RE, check_start, new_start_id
from stemstream.wire.rawfile import acquisition_dir

logger = logging.getLogger(__name__)


class KeyValue(Protocol):
    """The store calls used here (``StoreClient`` has them)."""

    def get(self, key: str, default: Any = None) -> Any: ...
    def set(self, key: str, value: Any, ttl: float | None = None) -> None: ...
    def items(self, prefix: str = "/") -> dict[str, Any]: ...
    def wait_for(
        self, predicate: Callable[[dict[str, Any]], bool], prefix: str = "/", timeout: float = 10.0
    ) -> dict[str, Any]: ...


class Members(Protocol):
    """The registry call used to decide a plan (``Registry`` has it)."""

    def members(self, role: str, status: str | None = None) -> list[Any]: ...


def decide_plan(
    registry: Members,
    scan_number: int,
    scan_shape: tuple[int, int],
    *,
    decided_by: str,
    fallback_dir: str | None = None,
    n_sectors: int = N_SECTORS,
    start: str = "",
    raw_dir: str = "",
    metadata: dict[str, Any] | None = None,
) -> ScanPlan:
    """The leader's decision: stream to the ready NodeGroups (sorted by UID), each sector through the first ready
    aggregator that has an endpoint pair for it (one aggregator for every sector when one has them all; else
    several, each serving some sectors: ``stemstream aggregator --processes N``), or go to disk when no NodeGroup
    is ready or a sector has no aggregator.
    ``start`` and ``raw_dir`` name the acquisition and where its raw files go (:func:`new_acquisition`).

    Counting NodeGroups gather a scan's events within their MPI job, so a scan goes to one job's NodeGroups
    only (registry field ``job``): the newest job that has all its NodeGroups ready (``job_size``), else the
    newest job. NodeGroups without a job (test consumers) form one group of their own.
    """
    nodegroups, job = _one_job(registry.members("nodegroup", status="ready"))
    aggregators = _sector_aggregators(registry.members("aggregator", status="ready"), n_sectors)
    common = {
        "scan_number": scan_number,
        "scan_shape": (int(scan_shape[0]), int(scan_shape[1])),
        "fallback_dir": fallback_dir,
        "n_sectors": n_sectors,
        "decided_by": decided_by,
        "decided_at": time.time(),
        "start": start,
        "raw_dir": raw_dir,
        "metadata": dict(metadata or {}),
    }
    if nodegroups and aggregators:
        agg = aggregators[0]
        sharded = any(a is not agg for a in aggregators)
        endpoints = {}
        for m, a in enumerate(aggregators):
            endpoints.update({f"data_{m}": a.endpoints[f"data_{m}"], f"info_{m}": a.endpoints[f"info_{m}"]})
        return ScanPlan(
            route=ROUTE_STREAM,
            members=tuple(sorted(r.uid for r in nodegroups)),
            aggregator=agg.uid,
            aggregator_endpoints=endpoints,
            aggregator_server_key=getattr(agg, "server_key", None),
            sector_aggregators={str(m): a.uid for m, a in enumerate(aggregators)} if sharded else {},
            aggregator_server_keys={a.uid: a.server_key for a in aggregators if getattr(a, "server_key", None)}
            if sharded
            else {},
            reason=f"{len(nodegroups)} NodeGroup(s) ready" + (f" (job {job})" if job else ""),
            # A scan is acknowledged by its counted file when the NodeGroups count (docs/reliability.md).
            ack="counted" if any(r.extra.get("ack") == "counted" for r in nodegroups) else "received",
            member_started={r.uid: float(r.started) for r in nodegroups},
            **common,
        )
    reason = "no NodeGroup is ready" if not nodegroups else "no aggregator is ready"
    return ScanPlan(route=ROUTE_DISK, reason=reason, **common)


def _sector_aggregators(ready: list[Any], n_sectors: int) -> list[Any]:
    """Per sector, the aggregator record that serves it: the first (registry order) that serves every sector,
    else for each sector the first that has its endpoint pair; [] when a sector has none."""

    def serves(a: Any, m: int) -> bool:
        return f"data_{m}" in a.endpoints and f"info_{m}" in a.endpoints

    whole = [a for a in ready if all(serves(a, m) for m in range(n_sectors))]
    if whole:
        return [whole[0]] * n_sectors
    chosen = [next((a for a in ready if serves(a, m)), None) for m in range(n_sectors)]
    return [] if any(a is None for a in chosen) else chosen


def _one_job(nodegroups: list[Any]) -> tuple[list[Any], str | None]:
    """The NodeGroups of the job a scan goes to, and that job (None: NodeGroups without a job)."""
    jobs: dict[str | None, list[Any]] = {}
    for record in nodegroups:
        job = record.extra.get("job")
        jobs.setdefault(str(job) if job else None, []).append(record)
    if len(jobs) <= 1:
        return nodegroups, next(iter(jobs), None)

    def preference(item: tuple[str | None, list[Any]]) -> tuple[bool, float]:
        job, records = item
        complete = job is None or len(records) >= int(records[0].extra.get("job_size") or 1)
        return complete, max(float(r.started) for r in records)

    job, chosen = max(jobs.items(), key=preference)
    return chosen, job


def new_acquisition(store: KeyValue, scan_number: int, start: str | None = None) -> tuple[str, str]:
    """The leader, before it plans ``scan_number``: (the acquisition's id, its raw files' directory).

    The id is ``start`` when the DAQ gives one, else a fresh one. A scan number the store has seen before
    (a DAQ restart reset its counter) is a new scan: its raw files go to a directory of their own, and the
    earlier acquisition's ``/scans/<n>`` record is kept under ``/scans/<n>/acquisitions/<its start>``.
    """
    start = check_start(start or "") or new_start_id()
    previous = store.get(keys.scan(scan_number))
    if previous is None:
        return start, ""
    before = str(previous.get("start") or "") if isinstance(previous, Mapping) else ""
    if before == start:
        raise ScanPlanError(f"scan {scan_number}: acquisition {start} was planned already")
    if isinstance(previous, Mapping):
        name = before if START_RE.fullmatch(before) else "earlier"
        store.set(keys.acquisition(scan_number, name), dict(previous))
    logger.warning("scan %d was acquired before (acquisition %s): this is a new scan, acquisition %s",
                   scan_number, before or "without an id", start)  # fmt: skip
    return start, acquisition_dir(scan_number, start)


class ScanPlanError(StemstreamError):
    """No plan for a scan came from the leader producer in time."""


def wait_plan(
    store: KeyValue, scan_number: int, timeout: float, *, start: str | None = None, taken: Collection[str] = ()
) -> ScanPlan:
    """Wait for the leader's plan of ``scan_number`` (raises :class:`ScanPlanError`).

    A scan number may have been acquired before: the plan wanted is that of ``start`` when the DAQ names
    the acquisition, else the newest plan that is not closed yet and not one of ``taken`` (acquisitions
    of this number the producer took part in already)."""
    key = keys.scan(scan_number)

    def planned(items: dict[str, Any]) -> bool:
        rec = items.get(key)
        if not isinstance(rec, Mapping) or "route" not in rec:
            return False
        if start:
            return rec.get("start") == start
        return "closed_at" not in rec and (rec.get("start") or "") not in taken

    try:
        items = store.wait_for(planned, prefix=key, timeout=timeout)
    except TimeoutError:
        raise ScanPlanError(
            f"scan {scan_number}: no {'plan of acquisition ' + start if start else 'new plan'} in {key} after "
            f"{timeout:.0f} s; is the leader producer (sector 0) running and registered with this store?"
        ) from None
    return ScanPlan.from_record(items[key])


def sub_records(
    scan_number: int, items: Mapping[str, Any], start: str | None = None
) -> tuple[dict[str, ProducerScanRecord], dict[int, AggregatorScanRecord], dict[str, NodeGroupScanRecord]]:
    """The valid sub-records of a scan among ``items``: (producers by UID, aggregator threads by sector,
    NodeGroups by UID). Records that do not parse are left out (and logged by whoever wrote them); with
    ``start``, so are records of another acquisition of the scan number."""
    producers: dict[str, ProducerScanRecord] = {}
    sectors: dict[int, AggregatorScanRecord] = {}
    groups: dict[str, NodeGroupScanRecord] = {}
    for key, value in items.items():
        where = keys.sub_record_of(key)
        if where is None or where[0] != scan_number:
            continue
        _, kind, name = where
        record: ProducerScanRecord | AggregatorScanRecord | NodeGroupScanRecord | None = None
        if kind == "producers":
            record = ProducerScanRecord.parse(value)
        elif kind == "aggregator" and name.isdigit():
            record = AggregatorScanRecord.parse(value)
        elif kind == "nodegroups":
            record = NodeGroupScanRecord.parse(value)
        if record is None or (start is not None and record.start != start):
            continue
        if isinstance(record, ProducerScanRecord):
            producers[name] = record
        elif isinstance(record, AggregatorScanRecord):
            sectors[int(name)] = record
        else:
            groups[name] = record
    return producers, sectors, groups


def summarize_scan(plan: ScanPlan, items: Mapping[str, Any]) -> dict[str, Any]:
    """Totals of a scan from its sub-records (``items`` under ``/scans/<n>/``), and its closing status
    (a :class:`ScanTotals` record)."""
    producers, sectors, groups = sub_records(plan.scan_number, items, plan.start)
    done_producers = [p for p in producers.values() if p.status == "done"]
    sent = sum(p.sent_total for p in producers.values())
    common = {
        "sent": sent,
        "lost_upstream": sum(p.lost_upstream for p in producers.values()),
        "producers_done": len(done_producers),
        "fallback_paths": tuple(sorted(x for p in producers.values() for x in p.paths)),
    }
    complete = len(done_producers) >= plan.n_sectors
    if plan.route != ROUTE_STREAM:
        return ScanTotals(status=STATUS_ON_DISK if complete else STATUS_INCOMPLETE, **common).to_record()
    received = sum(g.received for g in groups.values())
    complete = complete and set(plan.members) <= {u for u, g in groups.items() if g.status == "received"}
    totals = ScanTotals(
        status=STATUS_RECEIVED if complete and received == sent else STATUS_INCOMPLETE,
        routed=sum(s.routed_total for s in sectors.values()),
        received=received,
        frames_complete=sum(g.frames_complete for g in groups.values()),
        frames_incomplete=sum(g.frames_incomplete for g in groups.values()),
        rejected=sum(s.rejected for s in sectors.values()) + sum(sum(g.rejected.values()) for g in groups.values()),
        nodegroups_done=sum(1 for g in groups.values() if g.status in NODEGROUP_DONE),
        **common,
    )
    return totals.to_record()


def scan_closed_inputs(plan: ScanPlan) -> Callable[[dict[str, Any]], bool]:
    """Predicate over ``/scans/<n>/`` items: every record the leader waits for before closing the scan."""

    def ready(items: dict[str, Any]) -> bool:
        producers, sectors, groups = sub_records(plan.scan_number, items, plan.start)
        finished = [p for p in producers.values() if p.status in PRODUCER_DONE]
        if len(finished) < plan.n_sectors:
            return False
        if plan.route == ROUTE_DISK or any(p.status == "failed" for p in finished):
            return True  # a failed producer: the NodeGroups will not get everything; close it now
        members = [groups.get(uid) for uid in plan.members]
        if not all(g is not None and g.status in NODEGROUP_DONE for g in members):
            return False
        if all(g is not None and g.status == "received" for g in members):
            # Everything arrived, so every aggregator thread has routed its share; its closing record is
            # published after it sends the end messages, and can land after the NodeGroups' records.
            routed = [sectors.get(m) for m in range(plan.n_sectors)]
            return all(a is not None and a.status in AGGREGATOR_DONE for a in routed)
        return True

    return ready


def close_scan_record(store: KeyValue, plan: ScanPlan, timeout: float) -> dict[str, Any]:
    """The leader's last write of a scan: wait (up to ``timeout``) for every producer, and when streaming
    every NodeGroup of the plan, then write the totals and the closing status into ``/scans/<n>``."""
    prefix = keys.scan_prefix(plan.scan_number)
    try:
        items = store.wait_for(scan_closed_inputs(plan), prefix=prefix, timeout=timeout)
    except TimeoutError:
        items = store.items(prefix)
        logger.warning(
            "scan %d: not every record came within %.0f s; closing it as is",
            plan.scan_number,
            timeout,
        )
    totals = ScanTotals.from_record(summarize_scan(plan, items))
    record = closed_scan_record(plan, totals, time.time())
    current = store.get(keys.scan(plan.scan_number))
    if isinstance(current, Mapping) and (current.get("start") or "") != plan.start:
        # A newer acquisition of the number took /scans/<n> over: this one's record is kept apart.
        logger.warning("scan %d: acquisition %s closed after a newer one began", plan.scan_number, plan.start)
        store.set(keys.acquisition(plan.scan_number, plan.start or "earlier"), record)
        return record
    store.set(keys.scan(plan.scan_number), record)
    logger.info(
        "scan %d closed: route=%s status=%s sent=%d lost_upstream=%d",
        plan.scan_number,
        plan.route,
        totals.status,
        totals.sent,
        totals.lost_upstream,
    )
    return record


def scan_details(store: KeyValue, scan_number: int) -> dict[str, Any]:
    """``/scans/<n>`` and its sub-records, grouped: {"scan", "producers", "aggregator", "nodegroups"}."""
    items = store.items(keys.scan(scan_number))
    out: dict[str, Any] = {
        "scan": items.get(keys.scan(scan_number)),
        "producers": {},
        "aggregator": {},
        "nodegroups": {},
    }
    for key, value in items.items():
        where = keys.sub_record_of(key)
        if where is not None and where[0] == scan_number and where[1] in ("producers", "aggregator", "nodegroups"):
            out[where[1]][where[2]] = value
    return out


def share_counts(frames: np.ndarray, n_members: int) -> np.ndarray:
    """How many of ``frames`` each member gets (``frame % n_members``), as an array of ``n_members``."""
    if frames.size == 0:
        return np.zeros(n_members, dtype=np.int64)
    return np.bincount(frames % n_members, minlength=n_members)

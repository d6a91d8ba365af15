"""Where a scan goes, streamed to NodeGroups or written to disk, and the ``/scans`` records.

The four producers of a scan (one per sector) must agree on one plan: the same route and, when
streaming, the same ordered NodeGroup membership, or the sectors of a frame would meet on different
NodeGroups. One producer, the *leader* (sector 0 by default), decides from the registry and writes
``/scans/<n>``; the others wait for that record. Streaming needs a ready aggregator and at least one
ready NodeGroup; otherwise the scan goes to disk (:class:`SectorDiskWriter`) and the next scan looks again.

Keys (see docs/dataplane.md, "Scan records"): ``/scans/<n>`` is written by the leader only (plan, then the
totals when the scan is closed); every other writer has its own sub-key, so no two processes write
the same key: ``/scans/<n>/producers/<uid>``, ``/scans/<n>/aggregator/<sector>``,
``/scans/<n>/nodegroups/<uid>``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from stemstream.errors import FallbackError, ProtocolError, StemstreamError
from stemstream.scans import keys
from stemstream.wire.protocol import N_SECTORS, SECTOR_SHAPE

logger = logging.getLogger(__name__)

ROUTE_STREAM = "stream"
ROUTE_DISK = "disk"

# /scans/<n> status values, in the order a scan goes through them.
STATUS_STREAMING = "streaming"  # planned and streaming
STATUS_WRITING = "writing"  # planned for disk, producers writing
STATUS_RECEIVED = "received"  # every NodeGroup of the plan received all that was sent
STATUS_ON_DISK = "on_disk"  # every producer closed its sector files
STATUS_INCOMPLETE = "incomplete"  # closed with something missing or late (see the counts)
NODEGROUP_DONE = ("received", "timeout")
PRODUCER_DONE = ("done", "failed")
AGGREGATOR_DONE = ("done", "timeout")


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


@dataclass(frozen=True)
class ScanPlan:
    """The route of one scan, decided once by the leader producer and read by everyone else."""

    scan_number: int
    scan_shape: tuple[int, int]
    route: str  # ROUTE_STREAM or ROUTE_DISK
    members: tuple[str, ...] = ()  # NodeGroup UIDs in routing order (stream only)
    aggregator: str | None = None
    aggregator_endpoints: dict[str, str] = field(default_factory=dict)  # data_<m>, info_<m>
    fallback_dir: str | None = None  # from the scan request; None: each producer's own default
    n_sectors: int = N_SECTORS
    decided_by: str = ""
    decided_at: float = 0.0
    reason: str = ""
    ack: str = "received"  # what acknowledges the scan: "counted" (a member counts) or "received"
    # When each member registered: a NodeGroup restarted under the same UID is another process, which
    # does not have this scan (plane.retention treats the member as gone).
    member_started: dict[str, float] = field(default_factory=dict)

    @property
    def n_frames(self) -> int:
        return self.scan_shape[0] * self.scan_shape[1]

    def to_record(self) -> dict[str, Any]:
        return {
            "scan": self.scan_number,
            "scan_shape": list(self.scan_shape),
            "n_frames": self.n_frames,
            "n_sectors": self.n_sectors,
            "route": self.route,
            "members": list(self.members),
            "aggregator": self.aggregator,
            "aggregator_endpoints": dict(self.aggregator_endpoints),
            "fallback_dir": self.fallback_dir,
            "decided_by": self.decided_by,
            "decided_at": self.decided_at,
            "reason": self.reason,
            "ack": self.ack,
            "member_started": dict(self.member_started),
            "status": STATUS_STREAMING if self.route == ROUTE_STREAM else STATUS_WRITING,
        }

    @classmethod
    def from_record(cls, rec: Mapping[str, Any]) -> ScanPlan:
        try:
            plan = cls(
                scan_number=int(rec["scan"]),
                scan_shape=(int(rec["scan_shape"][0]), int(rec["scan_shape"][1])),
                route=str(rec["route"]),
                members=tuple(str(m) for m in rec.get("members") or ()),
                aggregator=rec.get("aggregator"),
                aggregator_endpoints=dict(rec.get("aggregator_endpoints") or {}),
                fallback_dir=rec.get("fallback_dir"),
                n_sectors=int(rec.get("n_sectors", N_SECTORS)),
                decided_by=str(rec.get("decided_by", "")),
                decided_at=float(rec.get("decided_at", 0.0)),
                reason=str(rec.get("reason", "")),
                ack=str(rec.get("ack", "received")),
                member_started={str(k): float(v) for k, v in (rec.get("member_started") or {}).items()},
            )
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise ProtocolError(f"scan record: not a plan ({type(exc).__name__}: {exc})") from None
        if plan.route not in (ROUTE_STREAM, ROUTE_DISK):
            raise ProtocolError(f"scan record: route {plan.route!r} is neither 'stream' nor 'disk'")
        if plan.route == ROUTE_STREAM and not plan.members:
            raise ProtocolError("scan record: route 'stream' without members")
        return plan


def decide_plan(
    registry: Members,
    scan_number: int,
    scan_shape: tuple[int, int],
    *,
    decided_by: str,
    fallback_dir: str | None = None,
    n_sectors: int = N_SECTORS,
) -> ScanPlan:
    """The leader's decision: stream to the ready NodeGroups (sorted by UID) through the first ready
    aggregator that has an endpoint pair for every sector, or go to disk when either is missing.

    Counting NodeGroups gather a scan's events within their MPI job, so a scan goes to one job's NodeGroups
    only (registry field ``job``): the newest job that has all its NodeGroups ready (``job_size``), else the
    newest job. NodeGroups without a job (test consumers) form one group of their own.
    """
    nodegroups, job = _one_job(registry.members("nodegroup", status="ready"))
    aggregators = [
        a
        for a in registry.members("aggregator", status="ready")
        if all(f"data_{m}" in a.endpoints and f"info_{m}" in a.endpoints for m in range(n_sectors))
    ]
    common = {
        "scan_number": scan_number,
        "scan_shape": (int(scan_shape[0]), int(scan_shape[1])),
        "fallback_dir": fallback_dir,
        "n_sectors": n_sectors,
        "decided_by": decided_by,
        "decided_at": time.time(),
    }
    if nodegroups and aggregators:
        agg = aggregators[0]
        return ScanPlan(
            route=ROUTE_STREAM,
            members=tuple(sorted(r.uid for r in nodegroups)),
            aggregator=agg.uid,
            aggregator_endpoints={k: v for k, v in agg.endpoints.items() if k.startswith(("data_", "info_"))},
            reason=f"{len(nodegroups)} NodeGroup(s) ready" + (f" (job {job})" if job else ""),
            # A scan is acknowledged by its counted file when the NodeGroups count (docs/reliability.md).
            ack="counted" if any(r.extra.get("ack") == "counted" for r in nodegroups) else "received",
            member_started={r.uid: float(r.started) for r in nodegroups},
            **common,
        )
    reason = "no NodeGroup is ready" if not nodegroups else "no aggregator is ready"
    return ScanPlan(route=ROUTE_DISK, reason=reason, **common)


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


class ScanPlanError(StemstreamError):
    """No plan for a scan came from the leader producer in time."""


def wait_plan(store: KeyValue, scan_number: int, timeout: float) -> ScanPlan:
    """Wait for the leader's plan of ``scan_number`` (raises :class:`ScanPlanError`)."""
    key = keys.scan(scan_number)

    def planned(items: dict[str, Any]) -> bool:
        rec = items.get(key)
        return isinstance(rec, Mapping) and "route" in rec

    try:
        items = store.wait_for(planned, prefix=key, timeout=timeout)
    except TimeoutError:
        raise ScanPlanError(
            f"scan {scan_number}: no plan in {key} after {timeout:.0f} s; is the leader producer (sector 0) "
            "running and registered with this store?"
        ) from None
    return ScanPlan.from_record(items[key])


class SectorDiskWriter:
    """One producer's sector of a scan written as 4D Camera raw files (thread-safe ``write``)."""

    def __init__(
        self,
        directory: Path,
        scan_number: int,
        scan_shape: tuple[int, int],
        sector: int,
        *,
        n_sectors: int = N_SECTORS,
        sector_shape: tuple[int, int] = SECTOR_SHAPE,
    ) -> None:
        from stemstream.wire.rawfile import RawScanWriter

        self.sector = sector
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise FallbackError(f"cannot create fallback directory {directory}: {exc.strerror}") from None
        self._writer = RawScanWriter(
            directory,
            scan_number,
            scan_shape,
            n_sectors=n_sectors,
            sector_shape=sector_shape,
        )
        self._lock = threading.Lock()
        self.written = 0

    def write(self, frame_number: int, buffer: Any) -> None:
        with self._lock:
            self._writer.write(frame_number, self.sector, buffer)
            self.written += 1

    def close(self) -> list[Path]:
        with self._lock:
            self._writer.close()
            return [Path(p) for p in self._writer.paths]


def summarize_scan(plan: ScanPlan, items: Mapping[str, Any]) -> dict[str, Any]:
    """Totals of a scan from its sub-records (``items`` under ``/scans/<n>/``), and its closing status."""
    base = keys.scan(plan.scan_number) + "/"
    producers = [v for k, v in items.items() if k.startswith(base + "producers/") and isinstance(v, Mapping)]
    sectors = [v for k, v in items.items() if k.startswith(base + "aggregator/") and isinstance(v, Mapping)]
    groups = {
        k.rsplit("/", 1)[1]: v
        for k, v in items.items()
        if k.startswith(base + "nodegroups/") and isinstance(v, Mapping)
    }
    done_producers = [p for p in producers if p.get("status") == "done"]
    out: dict[str, Any] = {
        "sent": sum(int(p.get("sent_total", 0)) for p in producers),
        "lost_upstream": sum(int(p.get("lost_upstream", 0)) for p in producers),
        "producers_done": len(done_producers),
        "fallback_paths": sorted(str(x) for p in producers for x in p.get("paths") or ()),
    }
    complete = len(done_producers) >= plan.n_sectors
    if plan.route == ROUTE_STREAM:
        received = sum(int(g.get("received", 0)) for g in groups.values())
        out.update(
            routed=sum(int(s.get("routed_total", 0)) for s in sectors),
            received=received,
            frames_complete=sum(int(g.get("frames_complete", 0)) for g in groups.values()),
            frames_incomplete=sum(int(g.get("frames_incomplete", 0)) for g in groups.values()),
            rejected=sum(int(s.get("rejected", 0)) for s in sectors)
            + sum(sum((g.get("rejected") or {}).values()) for g in groups.values()),
            nodegroups_done=sum(1 for g in groups.values() if g.get("status") in NODEGROUP_DONE),
        )
        complete = (
            complete
            and set(plan.members) <= {u for u, g in groups.items() if g.get("status") == "received"}
            and received == out["sent"]
        )
        out["status"] = STATUS_RECEIVED if complete else STATUS_INCOMPLETE
    else:
        out["status"] = STATUS_ON_DISK if complete else STATUS_INCOMPLETE
    return out


def scan_closed_inputs(plan: ScanPlan) -> Callable[[dict[str, Any]], bool]:
    """Predicate over ``/scans/<n>/`` items: every record the leader waits for before closing the scan."""
    base = keys.scan(plan.scan_number) + "/"

    def ready(items: dict[str, Any]) -> bool:
        finished = [
            v
            for k, v in items.items()
            if k.startswith(base + "producers/")
            and isinstance(
                v,
                Mapping,
            )
            and v.get("status") in PRODUCER_DONE
        ]
        if len(finished) < plan.n_sectors:
            return False
        if plan.route == ROUTE_DISK or any(v.get("status") == "failed" for v in finished):
            return True  # a failed producer: the NodeGroups will not get everything; close it now
        groups = [items.get(keys.nodegroup(plan.scan_number, uid)) for uid in plan.members]
        if not all(isinstance(g, Mapping) and g.get("status") in NODEGROUP_DONE for g in groups):
            return False
        if all(g["status"] == "received" for g in groups):
            # Everything arrived, so every aggregator thread has routed its share; its closing record is
            # published after it sends the end messages, and can land after the NodeGroups' records.
            sectors = [items.get(keys.aggregator(plan.scan_number, m)) for m in range(plan.n_sectors)]
            return all(isinstance(a, Mapping) and a.get("status") in AGGREGATOR_DONE for a in sectors)
        return True

    return ready


def close_scan_record(store: KeyValue, plan: ScanPlan, timeout: float) -> dict[str, Any]:
    """The leader's last write of a scan: wait (up to ``timeout``) for every producer, and when streaming
    every NodeGroup of the plan, then write the totals and the closing status into ``/scans/<n>``."""
    prefix = keys.scan(plan.scan_number) + "/"
    try:
        items = store.wait_for(scan_closed_inputs(plan), prefix=prefix, timeout=timeout)
    except TimeoutError:
        items = store.items(prefix)
        logger.warning(
            "scan %d: not every record came within %.0f s; closing it as is",
            plan.scan_number,
            timeout,
        )
    record = {**plan.to_record(), **summarize_scan(plan, items), "closed_at": time.time()}
    store.set(keys.scan(plan.scan_number), record)
    logger.info(
        "scan %d closed: route=%s status=%s sent=%d lost_upstream=%d",
        plan.scan_number,
        plan.route,
        record["status"],
        record["sent"],
        record["lost_upstream"],
    )
    return record


def scan_details(store: KeyValue, scan_number: int) -> dict[str, Any]:
    """``/scans/<n>`` and its sub-records, grouped: {"scan", "producers", "aggregator", "nodegroups"}."""
    base = keys.scan(scan_number)
    items = store.items(base)
    out: dict[str, Any] = {"scan": items.get(base), "producers": {}, "aggregator": {}, "nodegroups": {}}
    for key, value in items.items():
        parts = key[len(base) :].strip("/").split("/")
        if len(parts) == 2 and parts[0] in ("producers", "aggregator", "nodegroups"):
            out[parts[0]][parts[1]] = value
    return out


def share_counts(frames: np.ndarray, n_members: int) -> np.ndarray:
    """How many of ``frames`` each member gets (``frame % n_members``), as an array of ``n_members``."""
    if frames.size == 0:
        return np.zeros(n_members, dtype=np.int64)
    return np.bincount(frames % n_members, minlength=n_members)

"""The typed records of a scan's life in the store: one frozen dataclass per key (scans/keys.py says where).

Every record goes into the store as ``to_record()`` (a msgpack-able map) and comes out through
``from_record(value)``, which validates field types (pydantic) and raises a one-line :class:`ProtocolError`
for anything else: a record in the store may be stale, written by a newer version, or forged, so readers
never index raw maps. Unknown fields are ignored (newer writers); a missing field takes its default, which
never reads as success (an empty status, no path).
``parse(value)`` is ``from_record`` that answers None instead of raising, for readers that skip bad records.

docs/dataplane.md ("Scan records") and docs/counting.md list the fields.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from functools import cache
from typing import Any, Self

import numpy as np
from pydantic import TypeAdapter, ValidationError

from stemstream.errors import ProtocolError
from stemstream.scans import keys
from stemstream.wire.protocol import N_SECTORS, START_RE, check_scan_number, check_start

ROUTE_STREAM = "stream"
ROUTE_DISK = "disk"

# /scans/<n> status values, in the order a scan goes through them.
STATUS_STREAMING = "streaming"  # planned and streaming
STATUS_WRITING = "writing"  # planned for disk, producers writing
STATUS_RECEIVED = "received"  # every NodeGroup of the plan received all that was sent
STATUS_ON_DISK = "on_disk"  # every producer closed its sector files
STATUS_INCOMPLETE = "incomplete"  # closed with something missing or late (see the counts)

ACK_COUNTED = "counted"  # a scan is acknowledged by its counted file
ACK_RECEIVED = "received"  # ... or by every NodeGroup having received it

NODEGROUP_DONE = ("received", "timeout")
PRODUCER_DONE = ("done", "failed")
AGGREGATOR_DONE = ("done", "timeout")


@cache
def _adapter(cls: type) -> TypeAdapter[Any]:
    return TypeAdapter(cls)


def _plain(value: Any) -> Any:
    """Tuples as lists, recursively: what msgpack gives back, so a record compares equal after a round trip."""
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


class Record:
    """What every record type has: ``to_record``, ``from_record``, ``parse``."""

    def to_record(self) -> dict[str, Any]:
        return {f.name: _plain(getattr(self, f.name)) for f in fields(self)}  # type: ignore[arg-type]

    @classmethod
    def from_record(cls, value: Any) -> Self:
        if not isinstance(value, Mapping):
            raise ProtocolError(f"{cls.__name__}: expected a map, got {type(value).__name__}")
        try:
            return _adapter(cls).validate_python(dict(value))
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(x) for x in first["loc"]) or "?"
            raise ProtocolError(f"{cls.__name__}: field {where}: {first['msg']}") from None

    @classmethod
    def parse(cls, value: Any) -> Self | None:
        try:
            return cls.from_record(value)
        except ProtocolError:
            return None


# ------------------------------------------------------------------------------------------ /scans/<n>

# The DAQ's metadata of a scan (beam energy, step size, camera length...): a bounded flat map, since it comes
# from the wire and goes into every counted file and the catalog.
METADATA_KEYS = 32
METADATA_KEY_RE = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,63}")
METADATA_STR = 256


def _metadata_value_ok(item: Any) -> bool:
    if isinstance(item, bool):
        return True
    if isinstance(item, int):
        return -(2**63) <= item < 2**63
    if isinstance(item, float):
        return math.isfinite(item)
    return isinstance(item, str) and len(item) <= METADATA_STR


def scan_metadata(value: Any) -> dict[str, Any]:
    """``value`` checked as scan metadata (docs/dataplane.md, Scan requests): at most 32 entries, keys of 1 to 64
    letters, digits, ``_.-`` (a letter first), values a bool, an integer of 64 bits, a finite float or a string of
    at most 256 characters. Anything else is a one-line :class:`ProtocolError`."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ProtocolError(f"metadata: expected a map, got {type(value).__name__}")
    if len(value) > METADATA_KEYS:
        raise ProtocolError(f"metadata: {len(value)} entries, at most {METADATA_KEYS}")
    out: dict[str, Any] = {}
    for key, item in value.items():
        if not isinstance(key, str) or not METADATA_KEY_RE.fullmatch(key):
            raise ProtocolError(f"metadata: key {str(key)[:70]!r} is not 1-64 of A-Z a-z 0-9 _ . - (a letter first)")
        if _metadata_value_ok(item):
            out[key] = item
        else:
            raise ProtocolError(
                f"metadata {key}: {type(item).__name__} {repr(item)[:40]} is not a bool, an int64, a finite float "
                f"or a string of at most {METADATA_STR} characters"
            )
    return out


@dataclass(frozen=True)
class ScanPlan(Record):
    """The route of one scan, decided once by the leader producer and read by everyone else."""

    scan_number: int
    scan_shape: tuple[int, int]
    route: str  # ROUTE_STREAM or ROUTE_DISK
    members: tuple[str, ...] = ()  # NodeGroup UIDs in routing order (stream only)
    aggregator: str | None = None  # the aggregator of sector 0 (of every sector unless sector_aggregators says)
    aggregator_endpoints: dict[str, str] = field(default_factory=dict)  # data_<m>, info_<m>: each its sector's
    aggregator_server_key: str | None = None  # CURVE: the key ``aggregator`` published with its endpoints
    # Sharded routing: sector ("0".."n-1") -> the UID of the aggregator that serves it, and each of those
    # aggregators' published CURVE key. Empty: ``aggregator`` serves every sector (plans before sharding).
    sector_aggregators: dict[str, str] = field(default_factory=dict)
    aggregator_server_keys: dict[str, str] = field(default_factory=dict)
    fallback_dir: str | None = None  # from the scan request; None: each producer's own default
    n_sectors: int = N_SECTORS
    decided_by: str = ""
    decided_at: float = 0.0
    reason: str = ""
    ack: str = ACK_RECEIVED  # what acknowledges the scan: ACK_COUNTED (a member counts) or ACK_RECEIVED
    # When each member registered: a NodeGroup restarted under the same UID is another process, which
    # does not have this scan (plane.retention treats the member as gone).
    member_started: dict[str, float] = field(default_factory=dict)
    # The acquisition: scan numbers are reused (a DAQ restart resets the counter), (scan_number, start) is
    # unique. Minted by the leader (wire.protocol.new_start_id) unless the DAQ gave one; every record of
    # the acquisition carries it, and records of another acquisition of the number are never read as its.
    start: str = ""
    # Where the acquisition's raw files go, relative to the fallback directory: "" (the directory itself)
    # for a scan number seen for the first time, its own directory (rawfile.acquisition_dir) when reused.
    raw_dir: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)  # the DAQ's, from the request (scan_metadata)

    @property
    def n_frames(self) -> int:
        return self.scan_shape[0] * self.scan_shape[1]

    def aggregator_of(self, sector: int) -> str | None:
        """The UID of the aggregator that routes ``sector`` of this scan."""
        return self.sector_aggregators.get(str(sector), self.aggregator)

    def server_key_of(self, sector: int) -> str | None:
        """The CURVE key of ``sector``'s aggregator (None: CURVE off, or none published)."""
        uid = self.aggregator_of(sector)
        if uid is not None and uid in self.aggregator_server_keys:
            return self.aggregator_server_keys[uid]
        return self.aggregator_server_key if uid == self.aggregator else None

    def to_record(self) -> dict[str, Any]:
        record = super().to_record()
        record["scan"] = record.pop("scan_number")
        record["n_frames"] = self.n_frames
        record["status"] = STATUS_STREAMING if self.route == ROUTE_STREAM else STATUS_WRITING
        return record

    @classmethod
    def from_record(cls, value: Any) -> Self:
        if isinstance(value, Mapping) and "scan" in value:
            value = {**value, "scan_number": value["scan"]}
        plan = super().from_record(value)
        if plan.route not in (ROUTE_STREAM, ROUTE_DISK):
            raise ProtocolError(f"scan record: route {plan.route!r} is neither 'stream' nor 'disk'")
        if plan.route == ROUTE_STREAM and not plan.members:
            raise ProtocolError("scan record: route 'stream' without members")
        check_start(plan.start)
        if plan.raw_dir and (plan.raw_dir.startswith(".") or not START_RE.fullmatch(plan.raw_dir)):
            raise ProtocolError(f"scan record: raw_dir {plan.raw_dir!r} is not a directory name")
        scan_metadata(plan.metadata)
        return plan


@dataclass(frozen=True)
class ScanTotals(Record):
    """What the leader adds to ``/scans/<n>`` when it closes the scan: totals over the sub-records."""

    status: str
    sent: int = 0
    lost_upstream: int = 0
    producers_done: int = 0
    fallback_paths: tuple[str, ...] = ()
    # stream only
    routed: int = 0
    received: int = 0
    frames_complete: int = 0
    frames_incomplete: int = 0
    rejected: int = 0
    nodegroups_done: int = 0


@dataclass(frozen=True)
class ScanRecord(Record):
    """``/scans/<n>`` as a reader sees it: the plan's fields, the status, and later the totals (once
    ``closed_at`` is set) and the replay (``replayed``)."""

    scan: int
    scan_shape: tuple[int, int]
    route: str
    status: str
    n_frames: int = 0
    members: tuple[str, ...] = ()
    decided_at: float = 0.0
    reason: str = ""
    fallback_paths: tuple[str, ...] = ()
    sent: int = 0
    lost_upstream: int = 0
    frames_incomplete: int = 0
    closed_at: float | None = None
    replayed: bool = False
    replay_reason: str | None = None
    replayed_at: float | None = None
    start: str = ""  # the acquisition (see ScanPlan.start)
    metadata: dict[str, Any] = field(default_factory=dict)  # the DAQ's (see ScanPlan.metadata)

    @property
    def closed(self) -> bool:
        return self.closed_at is not None

    @property
    def landed_on_disk(self) -> bool:
        """A disk-route scan whose producers closed their files, or a streamed scan the producers replayed
        to disk because it could not be counted (docs/reliability.md)."""
        if self.route == ROUTE_DISK:
            return self.status in (STATUS_ON_DISK, STATUS_INCOMPLETE)
        return self.replayed and self.status == STATUS_ON_DISK


def closed_scan_record(plan: ScanPlan, totals: ScanTotals, closed_at: float) -> dict[str, Any]:
    """The leader's closing write of ``/scans/<n>``: the plan, the totals (with the closing status)."""
    return {**plan.to_record(), **totals.to_record(), "closed_at": closed_at}


def replayed_scan_record(
    current: Mapping[str, Any], reason: str, paths: list[str], replayed_at: float
) -> dict[str, Any]:
    """``/scans/<n>`` once every producer replayed its sector to disk: ``on_disk`` with the files."""
    return {
        **current,
        "status": STATUS_ON_DISK,
        "replayed": True,
        "replay_reason": reason,
        "fallback_paths": list(paths),
        "replayed_at": replayed_at,
    }


# ------------------------------------------------------------------------------------- sub-records


@dataclass(frozen=True)
class ProducerScanRecord(Record):
    """``/scans/<n>/producers/<uid>``: one producer's sector of the scan."""

    producer: str = ""
    sector: int = -1
    status: str = ""  # "done" | "failed" | "held" (disk scan whose sectors wait in RAM for the disk)
    route: str = ""
    threads: int = 1
    sent: dict[str, int] = field(default_factory=dict)  # per NodeGroup UID (or {"disk": n})
    sent_total: int = 0
    written: int = 0
    lost_upstream: int = 0
    started: float = 0.0
    finished: float = 0.0
    paths: tuple[str, ...] = ()
    degraded: bool = False
    error: str | None = None
    # What the producer holds (plane.retention): filled in by its keeper.
    held_bytes: int = 0
    on_disk: int = 0
    unprotected: int = 0  # streamed sectors neither RAM nor disk could take (both failed)
    wrapped: int = 0  # held sectors whose slot in the DAQ's ring was overwritten before they were written
    disk_error: str | None = None
    start: str = ""  # the acquisition (see ScanPlan.start): records of another one are not this scan's


@dataclass(frozen=True)
class AggregatorScanRecord(Record):
    """``/scans/<n>/aggregator/<sector>``: one router thread's routing of the scan."""

    aggregator: str = ""
    sector: int = -1
    status: str = ""  # "routing" | "done" | "timeout"
    threads: int = 0
    members: tuple[str, ...] = ()
    expected: dict[str, int] = field(default_factory=dict)
    expected_total: int = 0
    sent: dict[str, int] = field(default_factory=dict)
    sent_total: int = 0
    routed: dict[str, int] = field(default_factory=dict)
    routed_total: int = 0
    lost_upstream: int = 0
    rejected: int = 0
    started: float = 0.0
    updated: float = 0.0
    start: str = ""  # the acquisition (see ScanPlan.start): records of another one are not this scan's


@dataclass(frozen=True)
class NodeGroupScanRecord(Record):
    """``/scans/<n>/nodegroups/<uid>``: what one NodeGroup received of its share (its ScanSummary)."""

    uid: str = ""
    status: str = ""  # "received" | "timeout"
    index: int = 0
    members: tuple[str, ...] = ()
    expected: int = 0
    received: int = 0
    sent: int = 0
    frames_complete: int = 0
    frames_incomplete: int = 0
    incomplete: tuple[tuple[int, tuple[int, ...]], ...] = ()  # the first 1,000 (frame, missing sectors)
    lost_upstream: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    first_ts: float | None = None
    last_ts: float | None = None
    closed_at: float = 0.0
    start: str = ""  # the acquisition (see ScanPlan.start): records of another one are not this scan's


@dataclass(frozen=True)
class CountedRecord(Record):
    """``/scans/<n>/counted``: the counted file, written by rank 0 of the counting job (docs/counting.md)."""

    scan: int = -1
    status: str = ""  # "counted" | "partial" (a rank never reported) | "failed"
    path: str | None = None
    error: str | None = None
    frames: int = 0
    frames_incomplete: int = 0
    events: int = 0
    engine: str = ""
    thresholds: dict[str, Any] | None = None
    background_n_sigma: float | None = None
    members: tuple[str, ...] = ()
    ranks: int = 0
    ranks_missing: tuple[int, ...] = ()
    first_frame: float | None = None
    last_frame: float | None = None
    messages: dict[str, int] = field(default_factory=dict)  # expected, received, lost_upstream, ...
    engine_seconds: float = 0.0
    first_count: float | None = None
    last_count: float | None = None
    thresholds_at: float | None = None
    written_at: float | None = None
    seconds_after_last_frame: float | None = None
    host: str = ""
    start: str = ""  # the acquisition (see ScanPlan.start): records of another one are not this scan's

    @property
    def ok(self) -> bool:
        return self.status == "counted" and bool(self.path)


@dataclass(frozen=True)
class PreviewRecord(Record):
    """``/scans/<n>/preview/<rank>``: one rank's live view of the scan (about once a second)."""

    rank: int
    counted: int  # frames counted, with those that had nothing to count
    share: int  # frames routed to this rank's NodeGroups
    shape: tuple[int, int]  # of ``bf``: the scan binned to at most 256 a side
    bf: bytes  # uint32 bright-field events per (binned) probe position so far
    final: bool = False
    at: float = 0.0
    start: str = ""  # the acquisition (see ScanPlan.start): records of another one are not this scan's
    # The scan's (background, x-ray) thresholds once known, and the stability figure: the same from each
    # half of the threshold sample (docs/counting.md, Threshold sampling); NaN for a half without thresholds.
    thresholds: tuple[float, float] | None = None
    threshold_halves: tuple[tuple[float, float], ...] = ()

    def image(self) -> np.ndarray | None:
        part = np.frombuffer(self.bf, np.uint32)
        if part.size != self.shape[0] * self.shape[1]:
            return None
        return part.reshape(self.shape)


@dataclass(frozen=True)
class AnalysesRecord(Record):
    """``/scans/<n>/analyses``: the scan's live analyses (rank 0 of the counting job, docs/analyses.md): the
    parameters of each, every detector-settings change that applied to the scan, where its PNGs are."""

    scan: int = -1
    status: str = ""  # "streaming", then the counted record's status
    params: dict[str, dict[str, Any]] = field(default_factory=dict)
    history: tuple[dict[str, Any], ...] = ()  # {at, source, version, settings}
    pngs: str | None = None
    at: float = 0.0


@dataclass(frozen=True)
class ReplayRecord(Record):
    """``/scans/<n>/replay/<sector>``: a streamed sector that its producer wrote to disk after all."""

    sector: int
    producer: str
    reason: str
    sectors: int
    paths: tuple[str, ...] = ()
    at: float = 0.0
    start: str = ""  # the acquisition (see ScanPlan.start): records of another one are not this scan's
    wrapped: int = 0  # sectors not written: the DAQ's ring slot no longer held them


def preview_image(
    items: Mapping[str, Any], scan_number: int, start: str | None = None
) -> tuple[np.ndarray | None, int, int]:
    """From store items under ``/scans/<n>/preview/``: (bright-field image so far, frames counted, frames);
    with ``start``, only the previews of that acquisition."""
    prefix = keys.preview_prefix(scan_number)
    image = None
    counted = share = 0
    for key, value in items.items():
        record = PreviewRecord.parse(value) if key.startswith(prefix) else None
        if record is not None and start is not None and record.start != start:
            continue
        part = record.image() if record is not None else None
        if record is None or part is None:
            continue
        image = part.astype(np.float64) if image is None else image + part
        counted += record.counted
        share += record.share
    return image, counted, share


# ------------------------------------------------------------------------------ sessions and control


@dataclass(frozen=True)
class SessionRecord(Record):
    """``/sessions/<uid>``: a streaming session, written by the session itself."""

    status: str  # "running" | "ended" | "cancelled" | "failed"
    members: tuple[str, ...] = ()
    ends_at: float | None = None
    ended_at: float | None = None
    scans: tuple[int, ...] = ()
    metrics: str | None = None  # while running: its Prometheus endpoint (stemstream metrics targets reads it)


@dataclass(frozen=True)
class ScanRequest(Record):
    """``/control/scan``: a request to acquire a scan; how tests, demos and flows start one.

    ``extra`` carries what the source of the data needs (the simulator's ``seed``, ``loss_rate``...); on the
    store it is flattened into the map beside the named fields.
    """

    scan_number: int
    scan_shape: tuple[int, int]
    fallback_dir: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    requested_at: float = 0.0
    metadata: dict[str, Any] = field(default_factory=dict)  # the DAQ's (scan_metadata): into the file, catalog

    def to_record(self) -> dict[str, Any]:
        return {
            **self.extra,
            "scan": self.scan_number,
            "scan_shape": list(self.scan_shape),
            "fallback_dir": self.fallback_dir,
            "requested_at": self.requested_at,
            "metadata": dict(self.metadata),
        }

    @classmethod
    def from_record(cls, value: Any) -> Self:
        if not isinstance(value, Mapping):
            raise ProtocolError(f"scan request: expected a map, got {type(value).__name__}")
        named = ("scan", "scan_shape", "fallback_dir", "requested_at", "metadata")
        extra = {k: v for k, v in value.items() if k not in named}
        request = super().from_record(
            {
                "scan_number": value.get("scan"),
                "scan_shape": value.get("scan_shape"),
                "fallback_dir": value.get("fallback_dir") or None,
                "requested_at": value.get("requested_at") or 0.0,
                "extra": extra,
                "metadata": scan_metadata(value.get("metadata")),
            }
        )
        check_scan_number(request.scan_number, "scan request: scan")
        h, w = request.scan_shape
        if h < 1 or w < 1:
            raise ProtocolError(f"scan request: scan={request.scan_number} scan_shape={h}x{w} is not a scan")
        return request

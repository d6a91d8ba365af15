"""Streaming sessions, as a library: parameters, the checks that come first, and watching scans.

No Prefect here: ``stemstream.tasks`` wraps these calls and ``stemstream.flows`` sequences them.
"""

from __future__ import annotations

import logging
import math
import re
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from stemstream.allocation import AllocationRequest, Allocator, get_allocator
from stemstream.archive import Archiver, get_archiver
from stemstream.config import get_settings
from stemstream.errors import ConfigError, StoreUnavailable

logger = logging.getLogger(__name__)

SESSION_STOP_KEY = "/control/session/{uid}/stop"
_KEY_SCAN = re.compile(r"^/scans/(\d+)$")
_KEY_COUNTED = re.compile(r"^/scans/(\d+)/counted$")


class SessionParams(BaseModel):
    """What a microscopist chooses for a streaming session (the gateway's form), and where things go."""

    model_config = ConfigDict(extra="forbid")

    machine: str = Field("local", description="compute machine: 'local', or e.g. 'perlmutter'")
    backend: Literal["local", "slurm", "sfapi"] = "local"
    n_nodes: int = Field(1, ge=1, le=256, description="compute nodes")
    nodegroups_per_node: int = Field(2, ge=1, le=128, description="NodeGroups (MPI ranks) per node")
    background_n_sigma: float = Field(4.0, ge=0.5, le=20, description="background threshold, sigmas")
    minutes: float = Field(60.0, gt=0, le=24 * 60, description="session length")
    engine: Literal["stempy", "cpu", "gpu", "auto"] = "stempy"
    output_dir: str = Field("", description="counted files (default STEMSTREAM_OUTPUT_DIR)")
    archive: Literal["local", "globus"] = "local"
    archive_dir: str = Field("./data/archive", description="local archive destination")
    aggregator: Literal["local", "external"] = Field(
        "local", description="local: the session runs and supervises an aggregator here; external: one runs"
    )
    account: str | None = None
    qos: str = "realtime"
    constraint: str = "cpu"
    uid: str = Field("", description="session UID (default: made up)")

    def request(self, store_address: str) -> AllocationRequest:
        return AllocationRequest(
            machine=self.machine,
            n_nodes=self.n_nodes,
            nodegroups_per_node=self.nodegroups_per_node,
            minutes=max(1, math.ceil(self.minutes)),
            store_address=store_address,
            output_dir=str(Path(self.output_dir).absolute()),
            background_n_sigma=self.background_n_sigma,
            engine=self.engine,
            account=self.account,
            qos=self.qos,
            constraint=self.constraint,
            extra_env={"STEMSTREAM_LOG_LEVEL": "INFO"},
        )

    @property
    def n_nodegroups(self) -> int:
        return self.n_nodes * self.nodegroups_per_node


_HINTS = {
    "minutes": "the session length in minutes, e.g. 60",
    "background_n_sigma": "usually 4 or 4.5",
    "n_nodes": "at least 1",
    "nodegroups_per_node": "at least 1",
}


def session_params(**values: Any) -> SessionParams:
    """Validated :class:`SessionParams`; a bad value raises a one-line :class:`ConfigError` saying what to do."""
    try:
        params = SessionParams(**values)
    except ValidationError as err:
        first = err.errors()[0]
        name = ".".join(str(x) for x in first["loc"]) or "?"
        hint = _HINTS.get(name, "")
        raise ConfigError(
            f"session parameter {name}={first.get('input')!r}: {first['msg']}" + (f" ({hint})" if hint else "")
        ) from None
    if not params.output_dir:
        params.output_dir = str(get_settings().output_dir)
    if not params.uid:
        params.uid = f"session-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    return params


def make_allocator(params: SessionParams, **options: Any) -> Allocator:
    """The backend's allocator, after checking that it knows ``params.machine`` (one-line error if not)."""
    allocator = get_allocator(params.backend, **options)
    allocator.check_machine(params.machine)
    return allocator


def make_archiver(params: SessionParams, **options: Any) -> Archiver:
    if params.archive == "local":
        options.setdefault("destination_dir", params.archive_dir)
    return get_archiver(params.archive, **options)


def check_store(address: str, timeout: float = 5.0) -> None:
    """Raise a one-line :class:`StoreUnavailable` when nothing answers at ``address``."""
    from stemstream.streaming.store import StoreClient

    try:
        with StoreClient(address, timeout=timeout) as client:
            client.items("/registry-probe/")
    except StoreUnavailable:
        raise StoreUnavailable(
            f"no Clone store answers at {address}; start one with `stemstream store serve` "
            "or set STEMSTREAM_STORE_HOST / STEMSTREAM_STORE_PORT to where it runs"
        ) from None


@dataclass
class ScanView:
    """What the store says about one scan, for the flows."""

    number: int
    record: dict[str, Any]  # /scans/<n>
    counted: dict[str, Any] | None  # /scans/<n>/counted
    preview: tuple[np.ndarray | None, int, int] = (None, 0, 0)  # image so far, frames counted, frames

    @property
    def route(self) -> str:
        return str(self.record.get("route", ""))

    @property
    def on_disk(self) -> bool:
        """Landed on disk: a disk-route scan, or a streamed one the producers replayed to disk because it
        could not be counted (a NodeGroup died, the counted file is partial: docs/reliability.md)."""
        return _landed_on_disk(self.record)

    @property
    def n_frames(self) -> int:
        return int(self.record.get("n_frames") or 0)


@dataclass
class ScanWatcher:
    """Reports each scan once when it is counted (or landed on disk), and the live state of the others."""

    client: Any
    since: float = field(default_factory=time.time)
    seen_counted: set[int] = field(default_factory=set)
    seen_disk: set[int] = field(default_factory=set)

    def poll(self) -> tuple[list[ScanView], list[ScanView], list[ScanView]]:
        """(newly counted, newly on disk, still streaming) scans decided after ``since``."""
        from stemstream.streaming.counting import preview_image

        items = self.client.items("/scans/")
        counted, disk, live = [], [], []
        for key, record in items.items():
            m = _KEY_SCAN.match(key)
            if not m or not isinstance(record, dict) or float(record.get("decided_at") or 0) < self.since:
                continue
            n = int(m.group(1))
            view = ScanView(n, record, items.get(f"/scans/{n}/counted"))
            if view.on_disk and record.get("replayed"):  # its counted file, if any, is partial: count again
                if n not in self.seen_disk:
                    self.seen_disk.add(n)
                    disk.append(view)
            elif view.counted is not None:
                if n not in self.seen_counted:
                    self.seen_counted.add(n)
                    counted.append(view)
            elif view.on_disk:
                if n not in self.seen_disk:
                    self.seen_disk.add(n)
                    disk.append(view)
            elif view.route == "stream":
                view.preview = preview_image(items, n)
                live.append(view)
        return sorted(counted, key=_num), sorted(disk, key=_num), sorted(live, key=_num)


def _num(view: ScanView) -> int:
    return view.number


def _landed_on_disk(record: dict[str, Any]) -> bool:
    status = record.get("status")
    return (record.get("route") == "disk" and status in ("on_disk", "incomplete")) or (
        bool(record.get("replayed")) and status == "on_disk"
    )


def wait_counted(client: Any, scan_number: int, timeout: float) -> dict[str, Any]:
    """Wait for ``/scans/<n>/counted`` (streamed) or a disk landing; returns the scan's record set."""
    from stemstream.streaming.counting import counted_key

    key, scan_key = counted_key(scan_number), f"/scans/{scan_number}"

    def done(items: dict[str, Any]) -> bool:
        return key in items or _landed_on_disk(items.get(scan_key) or {})

    items = client.wait_for(done, prefix=scan_key, timeout=timeout)
    return {"record": items.get(scan_key) or {}, "counted": items.get(key)}

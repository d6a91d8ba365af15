"""Streaming sessions, as a library: parameters, the checks that come first, and watching scans.

No Prefect here: ``stemstream.tasks`` wraps these calls and ``stemstream.flows`` sequences them.
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from stemstream.allocation import AllocationRequest, Allocator, get_allocator
from stemstream.archive import Archiver, get_archiver
from stemstream.config import get_settings
from stemstream.errors import ConfigError, StoreUnavailable
from stemstream.scans import keys

logger = logging.getLogger(__name__)


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
    from stemstream.store import StoreClient

    try:
        with StoreClient(address, timeout=timeout) as client:
            client.items(keys.SESSIONS)
    except StoreUnavailable:
        raise StoreUnavailable(
            f"no Clone store answers at {address}; start one with `stemstream store serve` "
            "or set STEMSTREAM_STORE_HOST / STEMSTREAM_STORE_PORT to where it runs"
        ) from None

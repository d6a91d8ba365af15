"""``SessionParams``: what a microscopist chooses for a streaming session (the Prefect form), and the checks
and backends that follow from it. No Prefect here."""

from __future__ import annotations

import logging
import math
import time
import uuid
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from stemstream.allocation import AllocationRequest, Allocator, get_allocator
from stemstream.archive import Archiver, get_archiver
from stemstream.config import Settings, get_settings, validated
from stemstream.counting.params import CountingParams
from stemstream.errors import StoreUnavailable
from stemstream.scans import keys

logger = logging.getLogger(__name__)

# Backend options are stored with the flow run: credentials never go there, but in the settings.
_CREDENTIAL_WORDS = ("secret", "password", "token", "private_key")


class SessionParams(BaseModel):
    """What a microscopist chooses for a streaming session (the Prefect form), and where things go.

    Fields left empty take the site's settings when the session starts: ``counting`` (STEMSTREAM_BACKGROUND_N_SIGMA,
    ...), ``output_dir`` (STEMSTREAM_OUTPUT_DIR), ``archive_dir`` (STEMSTREAM_ARCHIVE_DIR), ``account``
    (STEMSTREAM_ACCOUNT); ``uid`` is made up.
    """

    model_config = ConfigDict(extra="forbid")

    machine: str = Field("local", description="compute machine: 'local', or e.g. 'perlmutter'")
    backend: Literal["local", "slurm", "sfapi"] = "local"
    n_nodes: int = Field(1, ge=1, le=256, description="compute nodes")
    nodegroups_per_node: int = Field(2, ge=1, le=128, description="NodeGroups (MPI ranks) per node")
    minutes: float = Field(60.0, gt=0, le=24 * 60, description="session length")
    counting: CountingParams = Field(
        default_factory=CountingParams, description="thresholds, engine, references (empty: the site's settings)"
    )
    output_dir: str = Field("", description="counted files (default STEMSTREAM_OUTPUT_DIR)")
    archive: Literal["local", "globus"] = "local"
    archive_dir: str = Field("", description="local archive destination (default STEMSTREAM_ARCHIVE_DIR)")
    aggregator: Literal["local", "external"] = Field(
        "local", description="local: the session runs and supervises an aggregator here; external: one runs"
    )
    account: str | None = Field(None, description="NERSC project, for slurm/sfapi (default STEMSTREAM_ACCOUNT)")
    qos: str = "realtime"
    constraint: str = "cpu"
    uid: str = Field("", description="session UID (default: made up)")
    ready_timeout_s: float = Field(300.0, gt=0, description="seconds the NodeGroups may take to come up")
    scan_workers: int = Field(4, ge=1, le=64, description="scans archived and catalogued at once")
    allocator_options: dict[str, Any] = Field(
        default_factory=dict, description="allocation backend options (no credentials: those are settings)"
    )
    archive_options: dict[str, Any] = Field(
        default_factory=dict, description="archive backend options, e.g. Globus endpoints (no credentials)"
    )

    @field_validator("allocator_options", "archive_options")
    @classmethod
    def _no_credentials(cls, options: dict[str, Any]) -> dict[str, Any]:
        found = [k for k in options if any(word in k.lower() for word in _CREDENTIAL_WORDS)]
        if found:
            raise ValueError(
                f"option {found[0]!r} is a credential, stored with the run: set it where the session runs instead "
                "(STEMSTREAM_SFAPI_SECRET, STEMSTREAM_GLOBUS_CLIENT_SECRET or their _FILE variants)"
            )
        return options

    @model_validator(mode="after")
    def _site_defaults(self) -> SessionParams:
        settings = get_settings()
        if not self.output_dir:
            self.output_dir = str(settings.output_dir)
        if not self.archive_dir:
            self.archive_dir = str(settings.archive_dir)
        if self.account is None:
            self.account = settings.account
        if not self.uid:
            self.uid = f"session-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
        return self

    def request(self, settings: Settings) -> AllocationRequest:
        """The NodeGroups' allocation: everything they need, the store and its backup included."""
        from stemstream.store.client import store_addresses

        address, backup = store_addresses(settings)
        return AllocationRequest(
            machine=self.machine,
            n_nodes=self.n_nodes,
            nodegroups_per_node=self.nodegroups_per_node,
            minutes=max(1, math.ceil(self.minutes)),
            store_address=address,
            store_backup=backup,
            output_dir=str(Path(self.output_dir).absolute()),
            counting=self.counting,
            account=self.account,
            qos=self.qos,
            constraint=self.constraint,
            extra_env={"STEMSTREAM_LOG_LEVEL": settings.log_level},
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
    return validated(
        SessionParams, values, "session parameter", _HINTS, hidden=("allocator_options", "archive_options")
    )


def make_allocator(params: SessionParams) -> Allocator:
    """The backend's allocator, after checking that it knows ``params.machine`` (one-line error if not)."""
    allocator = get_allocator(params.backend, **params.allocator_options)
    allocator.check_machine(params.machine)
    return allocator


def make_archiver(params: SessionParams) -> Archiver:
    options = dict(params.archive_options)
    if params.archive == "local":
        options.setdefault("destination_dir", params.archive_dir)
    return get_archiver(params.archive, **options)


def check_store(settings: Settings | None = None, timeout: float = 5.0) -> None:
    """Raise a one-line :class:`StoreUnavailable` when neither the store nor its backup answers."""
    from stemstream.store import StoreClient

    settings = settings or get_settings()
    try:
        with StoreClient.from_settings(settings, subtree=keys.SESSIONS, timeout=timeout) as client:
            client.items(keys.SESSIONS)
    except StoreUnavailable:
        raise StoreUnavailable(
            f"no Clone store answers at {settings.store_address}; start one with `stemstream store serve` "
            "or set STEMSTREAM_STORE_HOST / STEMSTREAM_STORE_PORT to where it runs"
        ) from None

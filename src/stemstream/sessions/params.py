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
from pydantic.json_schema import SkipJsonSchema

from stemstream.allocation import AllocationRequest, Allocator, get_allocator
from stemstream.archive import Archiver, get_archiver
from stemstream.config import Settings, get_settings, validated
from stemstream.counting.params import CountingParams
from stemstream.errors import StoreUnavailable
from stemstream.scans import keys

logger = logging.getLogger(__name__)

# Backend options are stored with the flow run: credentials never go there, but in the settings.
_CREDENTIAL_WORDS = ("secret", "password", "token", "private_key")


class SiteParams(BaseModel):
    """Where a session runs and where its scans go: the deployment's and the site's, not the microscopist's (they
    are not on the session form). Each machine's values come from STEMSTREAM_SITES (see
    :attr:`stemstream.config.Settings.sites`); empty paths and the account take the site's settings."""

    model_config = ConfigDict(extra="forbid")

    backend: Literal["local", "slurm", "sfapi"] = Field("local", description="how the NodeGroups' job is submitted")
    account: str | None = Field(None, description="NERSC project, for slurm/sfapi (default STEMSTREAM_ACCOUNT)")
    qos: str = Field("realtime", max_length=64, description="Slurm QOS")
    constraint: str = Field("cpu", max_length=64, description="Slurm constraint")
    aggregator: Literal["local", "external"] = Field(
        "local", description="local: the session runs and supervises an aggregator here; external: one runs"
    )
    output_dir: str = Field("", description="counted files (default STEMSTREAM_OUTPUT_DIR)")
    archive: Literal["local", "globus"] = "local"
    archive_dir: str = Field("", description="local archive destination (default STEMSTREAM_ARCHIVE_DIR)")
    ready_timeout_s: float = Field(300.0, gt=0, le=3600, description="seconds the NodeGroups may take to come up")
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
    def _site_defaults(self) -> SiteParams:
        settings = get_settings()
        if not self.output_dir:
            self.output_dir = str(settings.output_dir)
        if not self.archive_dir:
            self.archive_dir = str(settings.archive_dir)
        if self.account is None:
            self.account = settings.account
        return self


_SITE_FIELDS = frozenset(SiteParams.model_fields)


def _counting_defaults(schema: dict[str, Any]) -> None:
    """The form's counting defaults: the site's settings (STEMSTREAM_BACKGROUND_N_SIGMA, ...) of the process that
    makes the schema (the one serving the deployments)."""
    schema["default"] = CountingParams().model_dump(mode="json")


def _known_machines(schema: dict[str, Any]) -> None:
    """The form's machine choices: the site's machines (STEMSTREAM_SITES), when the schema is made."""
    schema["enum"] = sorted(get_settings().sites)


class SessionParams(BaseModel):
    """A streaming session: the form a microscopist fills in (Prefect renders it from this model).

    Counting parameters left out take the site's settings (STEMSTREAM_BACKGROUND_N_SIGMA, ...); ``uid`` is made
    up. The infrastructure (:class:`SiteParams`: backend, QOS, directories, archive, allocator options) is not on
    the form: it is the machine's, from STEMSTREAM_SITES and the settings; code and tests may still give it as
    ``site`` (or as its fields, which go there)."""

    model_config = ConfigDict(extra="forbid", title="Streaming session")

    machine: str = Field(
        "local",
        title="Machine",
        description="where the detector's data are counted: this computer (local) or an HPC machine",
        json_schema_extra=_known_machines,
    )
    minutes: float = Field(
        60.0, gt=0, le=12 * 60, title="Length (minutes)", description="how long the nodes are held, at most 12 hours"
    )
    n_nodes: int = Field(1, ge=1, le=64, title="Compute nodes", description="HPC nodes counting the scans")
    nodegroups_per_node: int = Field(
        2, ge=1, le=32, title="NodeGroups per node", description="counting processes (MPI ranks) per node"
    )
    counting: CountingParams = Field(
        default_factory=CountingParams,
        title="Counting",
        description="thresholds, engine and dark reference; what is left out takes the site's defaults",
        json_schema_extra=_counting_defaults,
    )
    notes: str = Field(
        "", max_length=2000, title="Notes", description="kept with every scan of the session in the scan catalog"
    )
    uid: str = Field(
        "",
        max_length=128,
        pattern=r"^$|^[A-Za-z0-9][A-Za-z0-9_.:@+-]*$",
        title="Session name",
        description="unique name of the session (empty: made up from the date and time)",
    )
    site: SkipJsonSchema[SiteParams] = Field(default_factory=SiteParams, exclude=False)

    @model_validator(mode="before")
    @classmethod
    def _site_fields(cls, values: Any) -> Any:
        """The machine's site (STEMSTREAM_SITES), with what the caller gave (as ``site`` or as its fields)."""
        if not isinstance(values, dict):
            return values
        values = dict(values)
        given = values.pop("site", None)
        given = given.model_dump() if isinstance(given, SiteParams) else dict(given or {})
        for name in _SITE_FIELDS & set(values):
            given[name] = values.pop(name)
        machine = values.get("machine", "local")
        known = get_settings().sites.get(machine, {}) if isinstance(machine, str) else {}
        values["site"] = {**known, **given}
        return values

    @field_validator("machine")
    @classmethod
    def _known_machine(cls, machine: str) -> str:
        sites = get_settings().sites
        if machine not in sites:
            raise ValueError(f"unknown machine; choose one of {', '.join(sorted(sites))} (STEMSTREAM_SITES)")
        return machine

    @model_validator(mode="after")
    def _made_up_uid(self) -> SessionParams:
        if not self.uid:
            self.uid = f"session-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
        return self

    # The site's values the session's code reads (one home: ``site``).
    @property
    def backend(self) -> str:
        return self.site.backend

    @property
    def output_dir(self) -> str:
        return self.site.output_dir

    @property
    def archive_dir(self) -> str:
        return self.site.archive_dir

    @property
    def account(self) -> str | None:
        return self.site.account

    @property
    def aggregator(self) -> str:
        return self.site.aggregator

    @property
    def ready_timeout_s(self) -> float:
        return self.site.ready_timeout_s

    @property
    def scan_workers(self) -> int:
        return self.site.scan_workers

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
            output_dir=str(Path(self.site.output_dir).absolute()),
            counting=self.counting,
            account=self.site.account,
            qos=self.site.qos,
            constraint=self.site.constraint,
            extra_env={"STEMSTREAM_LOG_LEVEL": settings.log_level},
        )

    @property
    def n_nodegroups(self) -> int:
        return self.n_nodes * self.nodegroups_per_node


_HINTS = {
    "minutes": "the session length in minutes, at most 720, e.g. 60",
    "machine": "a machine of STEMSTREAM_SITES",
    "background_n_sigma": "usually 4 or 4.5",
    "n_nodes": "at least 1",
    "nodegroups_per_node": "at least 1",
}


def session_params(**values: Any) -> SessionParams:
    """Validated :class:`SessionParams`; a bad value raises a one-line :class:`ConfigError` saying what to do."""
    return validated(
        SessionParams,
        values,
        "session parameter",
        _HINTS,
        hidden=("allocator_options", "archive_options", "site"),
    )


def make_allocator(params: SessionParams) -> Allocator:
    """The backend's allocator, after checking that it knows ``params.machine`` (one-line error if not)."""
    allocator = get_allocator(params.site.backend, **params.site.allocator_options)
    allocator.check_machine(params.machine)
    return allocator


def make_archiver(params: SessionParams) -> Archiver:
    options = dict(params.site.archive_options)
    if params.site.archive == "local":
        options.setdefault("destination_dir", params.site.archive_dir)
    return get_archiver(params.site.archive, **options)


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

"""Settings from the environment (prefix ``STEMSTREAM_``), validated by pydantic-settings.

The only address a process needs is the store's; everything else is looked up in the store.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from stemstream.errors import ConfigError

ENV_PREFIX = "STEMSTREAM_"

# The counting parameters' types, bounds and descriptions: shared by Settings (the site defaults) and
# stemstream.counting.params.CountingParams (what a session or a count uses), so each has one range check.
EngineName = Literal["stempy", "cpu", "gpu", "auto"]
# stempy's whole-scan row-dark correction: none, or each half-row scaled by its mean or median (docs/counting.md).
RowDark = Literal["none", "mean", "median"]
BackgroundNSigma = Annotated[
    float,
    Field(
        ge=0.5,
        le=20,
        title="Background threshold (sigmas)",
        description="background threshold, sigmas above the noise mean (usually 4 or 4.5)",
    ),
]
XrayNSigma = Annotated[
    float, Field(ge=1, le=100, title="X-ray threshold (sigmas)", description="x-ray threshold, sigmas above the mean")
]
ThresholdSamples = Annotated[
    int, Field(ge=1, le=10_000, title="Threshold sample frames", description="frames sampled for the thresholds")
]
ThresholdWindow = Annotated[
    int, Field(ge=1, le=1 << 30, description="the threshold sample is spread over the first this many frames")
]
LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]


class Settings(BaseSettings):
    """Every tunable of stemstream; set any field as ``STEMSTREAM_<FIELD>`` (upper case)."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore")

    # The Clone store: the one address every process is configured with.
    store_host: str = "127.0.0.1"
    store_port: int = Field(5560, ge=1024, le=65000, description="base port; the server uses port..port+2")
    store_backup_host: str | None = None
    store_backup_port: int = Field(5570, ge=1024, le=65000)
    store_heartbeat_s: float = Field(1.0, gt=0, le=60)
    store_ttl_s: float = Field(5.0, gt=0, le=3600, description="lifetime of ephemeral registry records")

    # ZeroMQ socket options (see stemstream.transport.sockets).
    sndhwm: int = Field(1000, ge=1, le=1_000_000)
    rcvhwm: int = Field(1000, ge=1, le=1_000_000)
    linger_ms: int = Field(2000, ge=0, le=600_000, description="never infinite")
    # ZeroMQ I/O threads of an aggregator's or a NodeGroup's context (ZeroMQ's rule: about one per GB/s).
    # 0: sized by the process, one per two sectors it receives (an aggregator of 4 sectors: 2; of 1: 1).
    io_threads: int = Field(0, ge=0, le=16, description="ZeroMQ I/O threads per receiver (0: by its sectors)")
    bind_host: str = "127.0.0.1"
    # Ports this process may bind that others must find: "LO-HI", tried in order until one is free: the metrics
    # HTTP port (one per process), the live view's on rank 0 of a counting job (docs/analyses.md), the data
    # plane's bound sockets (transport.sockets.bind_in_range; docs/operations.md, section 10).
    port_range: str = Field("40000-40999", pattern=r"^\s*\d{1,5}\s*-\s*\d{1,5}\s*$", description="LO-HI")
    # Prometheus metrics (docs/operations.md): every long-lived process serves /metrics on a port of port_range.
    metrics: bool = Field(True, description="serve /metrics (STEMSTREAM_METRICS=off: not at all)")

    @property
    def ports(self) -> range:
        """The ports of ``port_range``, in the order they are tried."""
        lo, hi = (int(p) for p in self.port_range.split("-"))
        return range(lo, hi + 1)

    @field_validator("port_range")
    @classmethod
    def _port_range_in_order(cls, value: str) -> str:
        lo, hi = (int(p) for p in value.split("-"))
        if not 1024 <= lo <= hi <= 65535:
            raise ValueError("give LO-HI with 1024 <= LO <= HI <= 65535, e.g. 40000-40999")
        return f"{lo}-{hi}"

    # Transport security (ZeroMQ CURVE, docs/security.md). Only the key directory's path is held here,
    # never key material: the keys are read from the files when sockets are made.
    curve: Literal["auto", "on", "off"] = "auto"
    keys_dir: Path | None = Field(None, description="made by `stemstream keys init DIR`")
    key_name: str = Field(
        "stemstream", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.@+-]{0,63}$", description="client keypair used"
    )
    server_key_name: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.@+-]{0,63}$",
        description="this host's own server keypair (servers/NAME) for the sockets it binds; unset: the store's",
    )

    # Data plane.
    fallback_dir: Path = Path("./data/fallback")
    # Paths in the store are never trusted (docs/security.md): a scan request's fallback directory must lie under
    # this root (unset: under fallback_dir itself); a session archives only counted files under its output_dir
    # and raw files under these fallback directories.
    fallback_root: Path | None = Field(None, description="where scan requests may put raw files; unset: fallback_dir")
    output_dir: Path = Path("./data/counted")
    # The largest scan (frames) a NodeGroup or an aggregator takes: an expect declaring more is rejected. The
    # protocol allows 65535 x 65535; 2048 x 2048 is 4x a 1024 x 1024 scan.
    max_scan_frames: int = Field(2048 * 2048, ge=1, le=65535 * 65535, description="frames in the largest scan taken")
    # What an aggregator's sector thread (plane.admission) and a NodeGroup hold at once: open scans; and the
    # bytes of the expects an aggregator sector thread holds.
    max_open_scans: int = Field(64, ge=1, le=100_000, description="scans open at once per aggregator sector, NodeGroup")
    max_expect_bytes: int = Field(4 << 20, ge=1 << 16, description="bytes of expects held per aggregator sector")
    producer_threads: int = Field(2, ge=1, le=64)
    scan_timeout_s: float = Field(60.0, gt=0)
    # Scan-level acknowledgement (plane.retention): RAM a producer holds streamed sectors in until the
    # scan is counted, and how long a scan may make no progress in the store before it is replayed to disk.
    hold_bytes: int = Field(8 << 30, ge=0, description="bytes of streamed sectors held per producer")
    ack_timeout_s: float = Field(120.0, gt=0, description="seconds without progress before a replay")

    # Counting: the defaults of stemstream.counting.params.CountingParams.
    background_n_sigma: BackgroundNSigma = 4.0
    xray_n_sigma: XrayNSigma = 10.0
    threshold_samples: ThresholdSamples = 40
    threshold_window: ThresholdWindow = 40  # = threshold_samples: the first complete frames (docs/counting.md)
    engine: EngineName = Field(
        "auto", description="gpu when cupy and a GPU are usable, else cpu; stempy: the reference"
    )
    row_dark: RowDark = "none"
    dark: Path | None = Field(
        None, description='dark reference, a .npy of one 576x576 frame under dark_dir, or "latest"'
    )
    dark_dir: Path = Field(
        Path("./data/darks"), description="where `stemstream dark` writes and every dark reference must lie"
    )
    gain: Path | None = Field(None, description="gain reference, a .npy of one 576x576 frame")

    # Live analyses and the live view (docs/analyses.md).
    analyses: str = Field(
        "default", description="run while counting: default (the built-ins), all (every one installed), none, or names"
    )
    analysis_params: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description='JSON by analysis, e.g. {"virtual": {"detectors": {"bf": [0, 40]}}}'
    )
    view: bool = Field(True, description="rank 0 of a counting job serves the live view on bind_host, port_range")
    # A live preview (/scans/<n>/preview/<rank>, ~256 KiB) is ephemeral: without a TTL every scan's previews
    # stayed in the store and filled a counting job's store quota after a few hundred scans (docs/store.md).
    preview_ttl_s: float = Field(900.0, ge=10, le=86_400, description="lifetime of a preview record in the store")

    # Sessions, archive, catalog.
    catalog_url: str = "sqlite:///./data/catalog.sqlite"
    # The machines a session may run on, each with its infrastructure (stemstream.sessions.SiteParams' fields:
    # backend, qos, constraint, aggregator, archive, allocator_options...): the deployment's, not on the form.
    sites: dict[str, dict[str, Any]] = Field(
        default_factory=lambda: {
            "local": {"backend": "local", "aggregator": "local"},
            "perlmutter": {"backend": "sfapi", "aggregator": "external", "qos": "realtime", "constraint": "cpu"},
        },
        description='JSON by machine, e.g. {"perlmutter": {"backend": "slurm", "qos": "realtime"}}',
    )
    archive_dir: Path = Field(Path("./data/archive"), description="the local archive's destination")
    account: str | None = Field(None, description="NERSC project charged for sessions (slurm, sfapi)")
    experiment_cron: str = Field("0 8 * * *", description="schedule of the stability series (registered paused)")
    log_level: LogLevel = "INFO"

    # Credentials: a value (SecretStr: never printed, never logged) or a file holding it (e.g. 0600).
    sfapi_client_id: str | None = None
    sfapi_secret: SecretStr | None = Field(None, description="the Superfacility API client's private key")
    sfapi_secret_file: Path | None = None
    globus_client_id: str | None = None
    globus_client_secret: SecretStr | None = None
    globus_client_secret_file: Path | None = None

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.strip().upper() if isinstance(value, str) else value

    @property
    def store_address(self) -> str:
        return f"tcp://{self.store_host}:{self.store_port}"

    def secret(self, name: Literal["sfapi_secret", "globus_client_secret"]) -> str | None:
        """The credential ``name`` from STEMSTREAM_<NAME>, else from the file STEMSTREAM_<NAME>_FILE; None if
        neither is set. A file that cannot be read is a one-line ConfigError (naming the file, not the secret)."""
        value: SecretStr | None = getattr(self, name)
        if value is not None and value.get_secret_value():
            return value.get_secret_value()
        path: Path | None = getattr(self, f"{name}_file")
        if path is None:
            return None
        try:
            return path.read_text().strip() or None
        except OSError as exc:
            variable = f"{ENV_PREFIX}{name.upper()}_FILE"
            raise ConfigError(
                f"{variable}: cannot read {path} ({exc.strerror}); fix the path or its permissions"
            ) from None


_LOOPBACK_NAMES = ("localhost", "localhost.localdomain", "ip6-localhost")


def is_loopback(host: str) -> bool:
    """True for a loopback address (127.0.0.0/8, ::1) or the name ``localhost``; no DNS lookup."""
    host = host.strip().strip("[]").lower()
    if host in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name or a wildcard ("*", "0.0.0.0"): reachable from elsewhere


def curve_enabled(settings: Settings, hosts: Iterable[str | None] = ()) -> bool:
    """Whether this process's ZeroMQ sockets use CURVE: the one place the STEMSTREAM_CURVE decision is made.

    * ``off``: never (plaintext; for a trusted network).
    * ``on``: always; STEMSTREAM_KEYS_DIR must be set.
    * ``auto`` (the default): on when STEMSTREAM_KEYS_DIR is set. Without it, off when every host this
      process talks on is loopback (the settings' store host, store backup host and bind host, plus
      ``hosts``: those a component actually uses, e.g. from ``--host`` or ``--store``): the local demo
      and the tests. A host that is not loopback without keys is a ConfigError, so that nothing crosses
      a machine boundary in plaintext unless someone chose that.

    Raises a one-line ConfigError that says what to do. Host names are not resolved (only ``localhost``
    and its usual aliases count as loopback names).
    """
    if settings.curve == "off":
        return False
    if settings.keys_dir is not None:
        return True
    fix = (
        "run `stemstream keys init DIR` and set STEMSTREAM_KEYS_DIR=DIR, or set STEMSTREAM_CURVE=off "
        "to accept plaintext on a trusted network"
    )
    if settings.curve == "on":
        raise ConfigError(f"STEMSTREAM_CURVE=on needs STEMSTREAM_KEYS_DIR: {fix}")
    candidates = [settings.store_host, settings.store_backup_host, settings.bind_host, *hosts]
    remote = [h for h in candidates if h is not None and not is_loopback(h)]
    if remote:
        raise ConfigError(f"host {remote[0]!r} is not loopback and no CURVE keys are configured: {fix}")
    return False


def _one_line(err: ValidationError) -> str:
    first = err.errors()[0]
    field = str(first["loc"][0]) if first["loc"] else "?"
    shown = "<hidden>" if "secret" in field else repr(first.get("input"))
    return f"{ENV_PREFIX}{field.upper()}: {first['msg']} (got {shown})"


Model = TypeVar("Model", bound=BaseModel)


def validated(
    model: type[Model],
    values: Mapping[str, Any],
    what: str,
    hints: Mapping[str, str] | None = None,
    hidden: Iterable[str] = (),
) -> Model:
    """``model(**values)``; a bad value raises a one-line ConfigError: ``<what> <field>=<value>: <why> (<hint>)``.

    ``hints`` are keyed by the field's dotted name (``counting.background_n_sigma``) or its last part; the
    values of the ``hidden`` fields (and of any field named like a secret) are never shown."""
    hints = hints or {}
    try:
        return model(**values)
    except ValidationError as err:
        first = err.errors()[0]
        name = ".".join(str(x) for x in first["loc"]) or "?"
        hint = hints.get(name) or hints.get(name.rsplit(".", 1)[-1], "")
        secret = "secret" in name or any(str(part) in hidden for part in first["loc"])
        shown = "<hidden>" if secret else repr(first.get("input"))
        raise ConfigError(f"{what} {name}={shown}: {first['msg']}" + (f" ({hint})" if hint else "")) from None


def load_settings(**overrides: object) -> Settings:
    """Build settings from the environment plus ``overrides``; a bad value raises a one-line ConfigError."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as err:
        raise ConfigError(_one_line(err)) from None


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once."""
    return load_settings()


_ADDRESS = re.compile(r"^tcp://(?P<host>\[[^\]]+\]|[^:/\[\]]+):(?P<port>\d{1,5})$")


def store_overrides(address: str | None, backup: str | None = None) -> dict[str, Any]:
    """Settings overrides for a store given on a command line (``tcp://HOST:PORT``), for :func:`load_settings`:
    the primary from ``address``, the Binary Star backup from ``backup``; what is not given stays the settings'."""
    overrides: dict[str, Any] = {}
    for prefix, value in (("store", address), ("store_backup", backup)):
        if value is None:
            continue
        match = _ADDRESS.match(value)
        if match is None:
            raise ConfigError(f"store address {value!r} is not tcp://HOST:PORT")
        overrides[f"{prefix}_host"] = match["host"].strip("[]")
        overrides[f"{prefix}_port"] = int(match["port"])
    return overrides


@contextlib.contextmanager
def environment(**values: object) -> Iterator[Settings]:
    """Set ``STEMSTREAM_<NAME>`` for the block (None unsets it), with the process-wide settings re-read, and
    restore both after: for entry points that start their own services (``stemstream demo``) and tests."""
    saved = {name: os.environ.get(f"{ENV_PREFIX}{name.upper()}") for name in values}
    try:
        for name, value in values.items():
            _set_env(name, value)
        get_settings.cache_clear()
        yield get_settings()
    finally:
        for name, value in saved.items():
            _set_env(name, value)
        get_settings.cache_clear()


def _set_env(name: str, value: object) -> None:
    variable = f"{ENV_PREFIX}{name.upper()}"
    if value is None:
        os.environ.pop(variable, None)
    else:
        os.environ[variable] = str(value)

"""Settings from the environment (prefix ``STEMSTREAM_``), validated by pydantic-settings.

The only address a process needs is the store's; everything else is looked up in the store.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from stemstream.errors import ConfigError

ENV_PREFIX = "STEMSTREAM_"


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
    bind_host: str = "127.0.0.1"

    # Transport security (ZeroMQ CURVE, docs/security.md). Only the key directory's path is held here,
    # never key material: the keys are read from the files when sockets are made.
    curve: Literal["auto", "on", "off"] = "auto"
    keys_dir: Path | None = Field(None, description="made by `stemstream keys init DIR`")
    key_name: str = Field(
        "stemstream", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.@+-]{0,63}$", description="client keypair used"
    )

    # Data plane.
    fallback_dir: Path = Path("./data/fallback")
    output_dir: Path = Path("./data/counted")
    producer_threads: int = Field(2, ge=1, le=64)
    scan_timeout_s: float = Field(60.0, gt=0)
    # Scan-level acknowledgement (plane.retention): RAM a producer holds streamed sectors in until the
    # scan is counted, and how long a scan may make no progress in the store before it is replayed to disk.
    hold_bytes: int = Field(8 << 30, ge=0, description="bytes of streamed sectors held per producer")
    ack_timeout_s: float = Field(120.0, gt=0, description="seconds without progress before a replay")

    # Counting.
    background_n_sigma: float = Field(4.0, ge=0.5, le=20)
    xray_n_sigma: float = Field(10.0, ge=1, le=100)
    threshold_samples: int = Field(40, ge=1, le=10_000)
    engine: str = Field("stempy", pattern="^(stempy|cpu|gpu|auto)$")

    # Session / catalog.
    catalog_url: str = "sqlite:///./data/catalog.sqlite"

    @property
    def store_address(self) -> str:
        return f"tcp://{self.store_host}:{self.store_port}"


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
    return f"{ENV_PREFIX}{field.upper()}: {first['msg']} (got {first.get('input')!r})"


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

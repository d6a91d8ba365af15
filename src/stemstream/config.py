"""Settings from the environment (prefix ``STEMSTREAM_``), validated by pydantic-settings.

The only address a process needs is the store's; everything else is looked up in the store.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

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

    # ZeroMQ socket options (see stemstream.streaming.sockets).
    sndhwm: int = Field(1000, ge=1, le=1_000_000)
    rcvhwm: int = Field(1000, ge=1, le=1_000_000)
    linger_ms: int = Field(2000, ge=0, le=600_000, description="never infinite")
    bind_host: str = "127.0.0.1"

    # Data plane.
    fallback_dir: Path = Path("./data/fallback")
    output_dir: Path = Path("./data/counted")
    producer_threads: int = Field(2, ge=1, le=64)
    scan_timeout_s: float = Field(60.0, gt=0)

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

"""Prometheus file-based service discovery from the registry: ``stemstream metrics targets [--out FILE]``.

Every process that serves metrics says where in its record (``endpoints.metrics``: producers, aggregators,
NodeGroups; ``endpoints.metrics`` of ``/store/<role>/stats`` for the store servers; ``metrics`` of
``/sessions/<uid>`` for sessions). One target per endpoint (several NodeGroups of one process share theirs),
labelled ``service`` (what runs there) and ``host``: these never clash with the metrics' own ``role`` and
``uid`` labels. Prometheus re-reads the file when it changes (``file_sd_configs``); a systemd timer rewrites
it (``infra/systemd/stemstream-targets.timer``).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from stemstream.scans import keys
from stemstream.store.registry import Registry

PLANE_ROLES = ("producer", "aggregator", "nodegroup")
STORE_STATS = "/store/"


def scrape_targets(client: Any) -> list[dict[str, Any]]:
    """The file_sd target groups of every live metrics endpoint the store knows, sorted."""
    groups: dict[str, dict[str, Any]] = {}

    def add(url: Any, service: str, host: str) -> None:
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            return
        parts = urlsplit(url)
        labels = {"service": service, "host": host or (parts.hostname or "")}
        if parts.path and parts.path != "/metrics":
            labels["__metrics_path__"] = parts.path
        if parts.scheme == "https":
            labels["__scheme__"] = "https"
        groups.setdefault(parts.netloc, {"targets": [parts.netloc], "labels": labels})

    registry = Registry(client)
    for role in PLANE_ROLES:
        for record in registry.members(role):
            add(record.endpoints.get("metrics"), role, record.host)
    for key, value in client.items(STORE_STATS).items():
        if key.endswith("/stats") and isinstance(value, dict):
            add((value.get("endpoints") or {}).get("metrics"), "store", "")
    for value in client.items(keys.SESSIONS).values():
        if isinstance(value, dict):
            add(value.get("metrics"), "session", "")
    return [groups[k] for k in sorted(groups)]


def write_targets(groups: list[dict[str, Any]], path: Path) -> None:
    """Write ``groups`` to ``path`` atomically (Prometheus never reads half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as out:
            json.dump(groups, out, indent=2, sort_keys=True)
            out.write("\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise

"""A streaming session's metrics: its scans' outcomes (those decided since it started), the registry, and how
many NodeGroups it asked for, served like every other process's (docs/operations.md, "Watching it")."""

from __future__ import annotations

import time
from typing import Any

from stemstream.metrics.collectors import ScanCollector, SessionCollector
from stemstream.metrics.exporter import MetricsExporter, serve_metrics


def session_metrics(client: Any, uid: str, nodegroups: int, since: float | None = None) -> MetricsExporter:
    """Serve the session ``uid``'s metrics (``client``: its store client); put ``exporter.url`` in its record
    as ``metrics`` so that ``stemstream metrics targets`` finds it, and ``close()`` it when the session ends."""
    exporter = serve_metrics()
    exporter.add(ScanCollector(client, "session", uid, since=time.time() if since is None else since))
    exporter.add(SessionCollector(uid, nodegroups))
    return exporter

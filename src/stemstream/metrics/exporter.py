"""One process's ``/metrics``: a Prometheus HTTP endpoint on a port of ``STEMSTREAM_PORT_RANGE``.

Every long-lived process calls :func:`serve_metrics` once and hands it what it runs::

    metrics = serve_metrics(host)                  # binds the first free port of the range
    aggregator = Aggregator(client, ...).start()
    metrics.watch(aggregator)                      # its counters, and "metrics" in its registry record
    ...
    metrics.close()

The collectors read the components' own counters at scrape time; with ``STEMSTREAM_METRICS=off`` nothing is
served and ``watch`` only returns what it was given.
"""

from __future__ import annotations

import errno
import logging
import socket
import sys
import threading
from typing import Any, TypeVar

from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector
from prometheus_client.exposition import start_http_server

from stemstream.config import Settings, get_settings
from stemstream.errors import ConfigError

logger = logging.getLogger(__name__)

_WILDCARDS = ("*", "0.0.0.0", "::", "")
T = TypeVar("T")


def advertised_host(host: str) -> str:
    """The name others reach ``host`` by: the machine's name for a wildcard, brackets around IPv6."""
    if host in _WILDCARDS:
        return socket.gethostname()
    return f"[{host}]" if ":" in host else host


class MetricsExporter:
    """The metrics of one process: a collector registry and, once started, its HTTP server."""

    def __init__(self, host: str | None = None, settings: Settings | None = None) -> None:
        self.settings = settings or get_settings()
        self.host = host or self.settings.bind_host
        self.registry = CollectorRegistry(auto_describe=False)
        ProcessCollector(registry=self.registry)  # process_cpu_seconds_total, memory, open fds
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        self.port: int | None = None
        self.url: str | None = None  # http://host:port/metrics once serving
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self._nodegroups: Any = None

    @property
    def serving(self) -> bool:
        return self._server is not None

    def start(self) -> MetricsExporter:
        """Serve on the first free port of ``STEMSTREAM_PORT_RANGE`` (a one-line ConfigError when none is)."""
        bind = "0.0.0.0" if self.host == "*" else self.host
        for port in self.settings.ports:
            try:
                self._server, self._thread = start_http_server(port, addr=bind, registry=self.registry)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    continue
                raise ConfigError(f"metrics: cannot listen on {bind}:{port}: {exc.strerror or exc}") from None
            self.port = port
            self.url = f"http://{advertised_host(self.host)}:{port}/metrics"
            logger.info("metrics at %s", self.url)
            return self
        raise ConfigError(
            f"metrics: no free port in STEMSTREAM_PORT_RANGE={self.settings.port_range} on {bind}; "
            "widen the range, or set STEMSTREAM_METRICS=off"
        )

    def add(self, collector: Any) -> None:
        """Export what ``collector.collect()`` yields at every scrape."""
        self.registry.register(collector)

    def watch(self, component: T) -> T:
        """Export ``component``'s counters (a Producer, Aggregator, NodeGroup, CountingService or StoreServer)
        and put this endpoint in its registry record (a store server's in its stats record) as ``metrics``."""
        from stemstream.metrics import collectors as c

        if _is(component, "stemstream.plane.producer", "Producer"):
            self.add(c.ProducerCollector(component))
            if component.leader:  # type: ignore[attr-defined]  # it plans and closes every scan
                self.add(c.ScanCollector(component.store, "producer", component.uid))  # type: ignore[attr-defined]
        elif _is(component, "stemstream.plane.aggregator", "Aggregator"):
            self.add(c.AggregatorCollector(component))
        elif _is(component, "stemstream.plane.nodegroup", "NodeGroup"):
            if self._nodegroups is None:
                self._nodegroups = c.NodeGroupCollector()
                self.add(self._nodegroups)
            self._nodegroups.groups.append(component)
        elif _is(component, "stemstream.nodes.service", "CountingService"):
            self.add(c.CountingCollector(component))
            return component  # no registry record of its own (its NodeGroups have one each)
        elif _is(component, "stemstream.store.server", "StoreServer"):
            self.add(c.StoreCollector(component))
        else:
            raise TypeError(f"metrics: no collector for a {type(component).__name__}")
        if self.url is not None:
            component.advertise("metrics", self.url)
        return component

    def close(self) -> None:
        """Stop serving (the port is free again)."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(5.0)
            self._thread = None


def _is(component: Any, module: str, name: str) -> bool:
    """``isinstance(component, module.name)`` without importing ``module``: a process that never imported it
    (the store server and the counting engines, say) cannot have one."""
    loaded = sys.modules.get(module)
    return loaded is not None and isinstance(component, getattr(loaded, name))


def serve_metrics(host: str | None = None, *, settings: Settings | None = None) -> MetricsExporter:
    """This process's metrics endpoint on ``host`` (default ``STEMSTREAM_BIND_HOST``), serving unless
    ``STEMSTREAM_METRICS=off``. Call once per process; then :meth:`MetricsExporter.watch` what it runs."""
    exporter = MetricsExporter(host, settings)
    return exporter.start() if exporter.settings.metrics else exporter

"""Prometheus metrics, scrape targets and health checks for operators (docs/operations.md, "Watching it").

* ``metrics.exporter``: :func:`~stemstream.metrics.exporter.serve_metrics`, the one call a long-lived process
  makes to serve ``/metrics`` on a port of ``STEMSTREAM_PORT_RANGE``, and ``watch`` for what it runs;
* ``metrics.catalog``: every metric's name, kind and labels (the dashboard and the alerts use only these);
* ``metrics.collectors``: read the components' own counters at scrape time;
* ``metrics.targets``: Prometheus file-based service discovery from the registry;
* ``metrics.health``: ``stemstream health ROLE [UID]``.

Submodules are imported by name (``from stemstream.metrics.exporter import serve_metrics``): the CLI's
``health`` and ``targets`` do not load the data plane.
"""

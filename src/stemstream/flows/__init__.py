"""Prefect flows: they only sequence tasks. ``streaming_session``, ``process_scan``, ``count_fallback_scan``,
``multi_scan_experiment``; deployments are declared in ``deployments/``."""

from stemstream.flows.experiment import multi_scan_experiment
from stemstream.flows.scans import count_fallback_scan, process_scan
from stemstream.flows.session import streaming_session

__all__ = ["count_fallback_scan", "multi_scan_experiment", "process_scan", "streaming_session"]

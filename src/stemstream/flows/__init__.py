"""Prefect flows: they only sequence tasks (the loops, waits and store I/O are ``stemstream.sessions``'s).
``streaming_session``, ``process_scan``, ``count_fallback_scan``, ``multi_scan_experiment``; each session flow
takes one ``SessionParams`` (the UI's form); deployments are declared in ``deployments/``."""

from stemstream.flows.experiment import multi_scan_experiment
from stemstream.flows.scans import count_fallback_scan, process_scan
from stemstream.flows.session import streaming_session

__all__ = ["count_fallback_scan", "multi_scan_experiment", "process_scan", "streaming_session"]

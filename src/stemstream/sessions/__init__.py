"""Streaming sessions as a library: the parameters (the form), the session loop (``SessionRunner``), what happens
to each scan, multi-scan experiments. No Prefect here: ``stemstream.tasks`` wraps these calls,
``stemstream.flows`` sequences them."""

from stemstream.sessions.params import SessionParams, check_store, make_allocator, make_archiver, session_params
from stemstream.sessions.runner import ScanHandlers, SessionResult, SessionRunner, stop_on_sigterm
from stemstream.sessions.watcher import ScanView, ScanWatcher, live_view_url

__all__ = [
    "ScanHandlers",
    "ScanView",
    "ScanWatcher",
    "SessionParams",
    "SessionResult",
    "SessionRunner",
    "check_store",
    "live_view_url",
    "make_allocator",
    "make_archiver",
    "session_params",
    "stop_on_sigterm",
]

"""Streaming sessions as a library: the parameters (the form), the checks that come first, watching scans
and the session loop. No Prefect here: ``stemstream.tasks`` wraps these calls, ``stemstream.flows``
sequences them."""

from stemstream.sessions.params import SessionParams, check_store, make_allocator, make_archiver, session_params
from stemstream.sessions.watcher import ScanView, ScanWatcher

__all__ = [
    "ScanView",
    "ScanWatcher",
    "SessionParams",
    "check_store",
    "keys.session_stop",
    "make_allocator",
    "make_archiver",
    "session_params",
]

"""Logging set-up for entry points only: the library never configures logging at import."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys
import threading
import time

from stemstream.errors import ConfigError

_FORMAT = "%(asctime)s %(levelname)-7s %(processName)s %(name)s: %(message)s"


def configure_logging(level: str | int | None = None) -> None:
    """Configure the root logger for a CLI process (level from STEMSTREAM_LOG_LEVEL, default INFO).

    Bad settings leave the level at INFO here: the command reports them in one line when it reads them.
    """
    from stemstream.config import load_settings

    if not level:
        try:
            level = load_settings().log_level
        except ConfigError:
            level = "INFO"
    logging.basicConfig(level=level, format=_FORMAT)
    # HTTP clients log every request at INFO (Prefect's API calls among them): only their problems here.
    for noisy in ("httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


_PR_SET_NAME = 15


def name_native_threads() -> None:
    """Give every thread started from now on its Python name as its OS name (Linux, first 15 bytes), so that
    ``top -H``, ``/proc/<pid>/task/<tid>/comm`` and ``benchmarks/stages.py`` can tell the threads of a process
    apart (CPU per stage). A no-op where prctl is not there."""
    if not sys.platform.startswith("linux"):
        return
    try:
        prctl = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True).prctl
    except (OSError, AttributeError):
        return

    def hook(*_: object) -> None:
        # threading calls this in each new thread before its target: name it once, then stop profiling.
        sys.setprofile(None)
        prctl(_PR_SET_NAME, threading.current_thread().name.encode()[:15], 0, 0, 0)

    threading.setprofile(hook)


class RateLimitedLog:
    """Log each kind of problem at most once per ``interval`` seconds, counting what was suppressed.

    Long-lived services see bad input in bursts; one line per kind per interval keeps logs readable.
    """

    def __init__(self, logger: logging.Logger, interval: float = 10.0) -> None:
        self._logger = logger
        self._interval = interval
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}
        self._lock = threading.Lock()

    def warning(self, kind: str, msg: str, *args: object) -> None:
        self._log(logging.WARNING, kind, msg, *args)

    def error(self, kind: str, msg: str, *args: object) -> None:
        self._log(logging.ERROR, kind, msg, *args)

    def _log(self, level: int, kind: str, msg: str, *args: object) -> None:
        now = time.monotonic()
        with self._lock:
            last = self._last.get(kind)
            if last is not None and now - last < self._interval:
                self._suppressed[kind] = self._suppressed.get(kind, 0) + 1
                return
            suppressed = self._suppressed.pop(kind, 0)
            self._last[kind] = now
        if suppressed:
            self._logger.log(level, msg + " (%d more of this kind suppressed)", *args, suppressed)
        else:
            self._logger.log(level, msg, *args)

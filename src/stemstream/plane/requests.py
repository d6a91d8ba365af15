"""Scan requests through the store (``/control/scan``): how tests, demos, flows and the simulated DAQ
start a scan. ``request_scan`` writes one; :class:`ScanRequests` hands each new one to a producer, once."""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from typing import Any, Protocol

from stemstream.errors import ProtocolError
from stemstream.scans import keys
from stemstream.scans.plan import KeyValue
from stemstream.scans.records import ScanRequest, scan_metadata
from stemstream.wire.protocol import check_scan_number

logger = logging.getLogger(__name__)


def request_scan(
    store: KeyValue,
    scan_number: int,
    scan_shape: tuple[int, int],
    *,
    fallback_dir: str | None = None,
    metadata: dict[str, Any] | None = None,
    **extra: Any,
) -> ScanRequest:
    """Ask every watching producer to acquire a scan (writes ``/control/scan``); ``metadata`` is the DAQ's
    (beam energy, step size...: ``scans.records.scan_metadata``), for the counted file and the catalog."""
    check_scan_number(scan_number, "scan request: scan")  # the producers would refuse it: refuse it here
    shape = (int(scan_shape[0]), int(scan_shape[1]))
    req = ScanRequest(scan_number, shape, fallback_dir, extra, time.time(), scan_metadata(metadata))
    store.set(keys.CONTROL_SCAN, req.to_record())
    return req


def _identity(request: ScanRequest) -> tuple[int, float]:
    return request.scan_number, float(request.requested_at)


class Watchable(Protocol):
    def get(self, key: str, default: Any = None) -> Any: ...
    def watch(self, callback: Any, prefix: str = "/") -> Any: ...


class ScanRequests:
    """New scan requests from ``/control/scan``, in order; a request present before :meth:`start` is old.

    A request is new when its (scan number, time of request) is: a scan number may be asked for again (a
    DAQ restart resets its counter), and that is a new scan."""

    def __init__(self, store: Watchable, key: str = keys.CONTROL_SCAN) -> None:
        self._store = store
        self._key = key
        self._queue: queue.Queue[ScanRequest] = queue.Queue()
        self._seen: set[tuple[int, float]] = set()
        self._lock = threading.Lock()
        self._unsubscribe: Any = None

    def start(self) -> ScanRequests:
        current = self._store.get(self._key)
        if current is not None:
            with contextlib.suppress(ProtocolError):
                self._seen.add(_identity(ScanRequest.from_record(current)))
        self._unsubscribe = self._store.watch(self._on_change, prefix=self._key)
        return self

    def _on_change(self, key: str, value: Any) -> None:
        if key != self._key or value is None:
            return
        try:
            req = ScanRequest.from_record(value)
        except ProtocolError as exc:
            logger.warning("ignoring %s: %s", key, exc)
            return
        with self._lock:
            if _identity(req) in self._seen:
                return
            self._seen.add(_identity(req))
        self._queue.put(req)

    def get(self, timeout: float) -> ScanRequest | None:
        """The next new request, or None after ``timeout`` seconds."""
        try:
            return self._queue.get(timeout=timeout)
        except queue.Empty:
            return None

    def close(self) -> None:
        if callable(self._unsubscribe):
            self._unsubscribe()
        self._unsubscribe = None

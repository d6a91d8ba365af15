"""Small pieces the data-plane actors share: blocking sends that never drop, worker threads that keep
their exception for the main thread, and a publisher thread that owns a component's store writes."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import zmq

from stemstream.errors import StemstreamError

logger = logging.getLogger(__name__)

POLL_MS = 100  # every poller loop wakes at least this often to look at its stop event


class SendAborted(StemstreamError):
    """A blocked send was given up: a stop was requested, or the peer took no message within the timeout."""


class SendMeter:
    """What one sending thread pushed through :func:`send_parts`: messages, bytes of their last part (a data
    message's payload), and how often and how long it waited at the peer's high-water mark (back-pressure).

    One meter per thread (plain fields, no lock: one thread writes, a metrics scrape reads).
    """

    __slots__ = ("blocked", "blocked_s", "bytes", "messages")

    def __init__(self) -> None:
        self.messages = 0
        self.bytes = 0
        self.blocked = 0
        self.blocked_s = 0.0


def send_parts(
    sock: zmq.Socket,
    parts: Sequence[Any],
    *,
    stop: threading.Event | None = None,
    timeout: float | None = None,
    what: str = "message",
    meter: SendMeter | None = None,
) -> None:
    """Send a multipart message without copying, blocking while the peer is at its high-water mark.

    Never drops: it returns once ZeroMQ has taken the message, or raises :class:`SendAborted` when
    ``stop`` is set or nothing could be sent for ``timeout`` seconds. ZeroMQ checks the HWM on the first
    part only, so once that is in the rest of the message goes through. ``meter`` (the calling thread's)
    counts what was sent and the time spent blocked.
    """
    try:
        sock.send_multipart(parts, flags=zmq.NOBLOCK, copy=False)
    except zmq.Again:
        pass
    else:
        if meter is not None:
            meter.messages += 1
            meter.bytes += memoryview(parts[-1]).nbytes
        return
    blocked_at = time.monotonic()
    try:
        _send_blocking(sock, parts, stop, timeout, what, blocked_at)
    finally:
        if meter is not None:
            meter.blocked += 1
            meter.blocked_s += time.monotonic() - blocked_at
    if meter is not None:
        meter.messages += 1
        meter.bytes += memoryview(parts[-1]).nbytes


def _send_blocking(
    sock: zmq.Socket,
    parts: Sequence[Any],
    stop: threading.Event | None,
    timeout: float | None,
    what: str,
    since: float,
) -> None:
    deadline = None if timeout is None else since + timeout
    while True:
        if sock.poll(POLL_MS, zmq.POLLOUT):
            try:
                sock.send_multipart(parts, flags=zmq.NOBLOCK, copy=False)
                return
            except zmq.Again:
                continue
        if stop is not None and stop.is_set():
            raise SendAborted(f"{what}: stop requested while the peer was not taking messages")
        if deadline is not None and time.monotonic() > deadline:
            raise SendAborted(f"{what}: the peer took nothing for {timeout:.0f} s (is it running?)")


class Worker(threading.Thread):
    """A thread that stores the exception that ended it, for :meth:`maybe_raise` on the main thread."""

    def __init__(self, name: str, target: Callable[[], None]) -> None:
        super().__init__(name=name, daemon=True)
        self._target_fn = target
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self._target_fn()
        except BaseException as exc:
            self.error = exc
            logger.error("thread %s died: %s: %s", self.name, type(exc).__name__, exc, exc_info=True)

    def maybe_raise(self) -> None:
        if self.error is not None:
            raise self.error


def run_workers(workers: list[Worker]) -> None:
    """Start ``workers`` and wait for all (in short joins, so that signals reach the main thread); raise the
    first one's error."""
    for w in workers:
        w.start()
    for w in workers:
        while w.is_alive():
            w.join(0.2)
        w.maybe_raise()


class RecordWriter(Protocol):
    """The store calls a publisher needs (``StoreClient`` has them)."""

    def set(self, key: str, value: Any, ttl: float | None = None) -> None: ...


class Updatable(Protocol):
    """A registry record a publisher refreshes (``Registration`` is one)."""

    def update(self, **fields: Any) -> None: ...


class Publisher:
    """Owns a component's store writes: queued key writes, and ``registration.update(**snapshot())``
    every ``interval`` seconds. Keeps store latency off the data threads."""

    def __init__(
        self,
        store: RecordWriter,
        registration: Updatable | None,
        snapshot: Callable[[], dict[str, Any]],
        *,
        interval: float = 0.5,
        name: str = "publisher",
    ) -> None:
        self._store = store
        self._registration = registration
        self._snapshot = snapshot
        self._interval = interval
        self._queue: queue.Queue[tuple[str, Any] | None] = queue.Queue()
        self._last: dict[str, Any] | None = None
        self._worker = Worker(name, self._run)

    def start(self) -> None:
        self._worker.start()

    def put(self, key: str, value: Any) -> None:
        """Write ``key`` soon, from the publisher thread (writes keep their order)."""
        self._queue.put((key, value))

    def flush(self, timeout: float = 5.0) -> None:
        """Write what is queued and a fresh snapshot now; returns when done or after ``timeout``."""
        done = threading.Event()
        self._queue.put(("", done))
        done.wait(timeout)

    def stop(self, timeout: float = 5.0) -> None:
        self._queue.put(None)
        self._worker.join(timeout)

    def maybe_raise(self) -> None:
        self._worker.maybe_raise()

    def _refresh(self) -> None:
        if self._registration is None:
            return
        snap = self._snapshot()
        if snap != self._last:
            self._registration.update(**snap)
            self._last = snap

    def _handle(self, key: str, value: Any) -> None:
        try:
            if key:
                self._store.set(key, value)
            else:
                self._refresh()
        except StemstreamError as exc:  # the store is away: keep going, the next refresh retries
            logger.warning("store write failed: %s", exc)
        if isinstance(value, threading.Event):
            value.set()

    def _run(self) -> None:
        next_refresh = time.monotonic()
        while True:
            try:
                item = self._queue.get(timeout=max(0.0, next_refresh - time.monotonic()))
            except queue.Empty:
                item = ("", None)
            if item is None:
                self._drain()
                self._handle("", None)
                return
            self._handle(*item)
            if time.monotonic() >= next_refresh:
                self._handle("", None)
                next_refresh = time.monotonic() + self._interval

    def _drain(self) -> None:
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if item is not None:
                self._handle(*item)

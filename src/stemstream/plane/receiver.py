"""What the aggregator and a NodeGroup share: bound PULL sockets read in bursts by their own threads, every
bad message rejected (counted per kind, logged rate-limited), a registry record kept alive with counts by a
publisher thread, and one life cycle (start: bind, register "ready"; stop: "stopping", join, deregister).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import zmq

from stemstream.config import Settings, get_settings
from stemstream.errors import ProtocolError, WaitTimeout
from stemstream.log import RateLimitedLog
from stemstream.transport.actor import Publisher, Worker
from stemstream.transport.security import curve_security
from stemstream.transport.sockets import bind_in_range, make_socket, term_context
from stemstream.wire.protocol import InfoMessage, decode_info

logger = logging.getLogger(__name__)

BURST = 256  # messages read from one socket before looking at the others

Handler = Callable[[list[zmq.Frame]], None]


class Every:
    """A periodic chore inside a poll loop: ``due(now)`` is true once per ``period_s``."""

    def __init__(self, period_s: float) -> None:
        self.period_s = period_s
        self._next = time.monotonic() + period_s

    def due(self, now: float) -> bool:
        if now < self._next:
            return False
        self._next = now + self.period_s
        return True


def drain(sock: zmq.Socket, handle: Handler, room: Callable[[], bool] | None = None) -> None:
    """Hand up to BURST waiting messages of ``sock`` to ``handle`` (zero-copy frames), without blocking;
    stops early once ``room()`` says no."""
    for _ in range(BURST):
        if room is not None and not room():
            return
        try:
            parts = sock.recv_multipart(zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return
        handle(parts)


def decode_info_parts(parts: list[zmq.Frame]) -> InfoMessage:
    """The info message of a one-part ZeroMQ message (raises ProtocolError)."""
    if len(parts) != 1:
        raise ProtocolError(f"info message of {len(parts)} parts")
    return decode_info(parts[0].buffer)


class Receiver:
    """Base of :class:`~stemstream.plane.aggregator.Aggregator` and :class:`~stemstream.plane.nodegroup.NodeGroup`.

    Subclasses set ``role`` (their registry role), add their worker threads with :meth:`_add_worker` (each
    sets the event it gets once its sockets are bound), and give :meth:`counts`; extra registry fields
    come from :meth:`_registry_fields`.
    """

    role = "receiver"

    def __init__(
        self,
        store: Any,
        *,
        uid: str,
        registry: Any,
        host: str | None,
        settings: Settings | None,
        n_sectors: int,
        curve_roles: tuple[str, ...],
        publish_interval: float,
        n_receiving: int | None = None,
    ) -> None:
        self.settings = settings or get_settings()
        self.store = store
        self.n_sectors = n_sectors
        self.host = host or self.settings.bind_host
        security = curve_security(self.settings, hosts=(self.host,))  # CURVE: a problem is an error now
        if security is not None:
            security.check(*curve_roles)
        # Published with the endpoints: clients connect to them with this host's own server key.
        self._server_key = security.server_public if security is not None else None
        self._uid = uid
        self._registry = registry
        self._registration: Any = None
        # Sized (settings.io_threads, 0: one per two sectors received): one I/O thread moves about 1 GB/s.
        self._ctx = zmq.Context(io_threads=self.settings.io_threads or max(1, (n_receiving or n_sectors) // 2))
        self._stop = threading.Event()
        # Bad input: one line per kind per 10 s, on the component's own logger.
        self._rlog = RateLimitedLog(logging.getLogger(type(self).__module__))
        self._endpoints: dict[str, str] = {}
        self._workers: list[Worker] = []
        self._bound: list[threading.Event] = []
        self._publisher = Publisher(store, None, self._snapshot, interval=publish_interval, name=f"{self.role}-pub")
        self._started = False

    @property
    def uid(self) -> str:
        return self._uid

    @property
    def endpoints(self) -> dict[str, str]:
        return dict(self._endpoints)

    def advertise(self, name: str, endpoint: str) -> None:
        """Add ``name: endpoint`` (e.g. ``metrics``) to this component's registry record."""
        self._endpoints[name] = endpoint
        if self._registration is not None:
            self._registration.update(endpoints={name: endpoint})

    # ---- for subclasses

    def _add_worker(self, name: str, target: Callable[[threading.Event], None]) -> Worker:
        bound = threading.Event()
        worker = Worker(name, lambda: target(bound))
        self._workers.append(worker)
        self._bound.append(bound)
        return worker

    def _bind_pull(self, name: str, max_msg_size: int) -> zmq.Socket:
        """A PULL socket bound to a port of ``STEMSTREAM_PORT_RANGE`` on ``host``, advertised in the registry as
        ``name``."""
        sock = make_socket(self._ctx, zmq.PULL, settings=self.settings, role="server")
        try:
            self._endpoints[name] = bind_in_range(sock, self.host, settings=self.settings, max_msg_size=max_msg_size)
        except BaseException:
            sock.close()
            raise
        return sock

    def _registry_fields(self) -> dict[str, Any]:
        return {}

    def _on_started(self) -> None:
        """After registering (e.g. watch the store)."""

    def _before_join(self) -> None:
        """After the stop event is set, before the threads are joined (e.g. unblock their sends)."""

    def counts(self) -> dict[str, int]:
        raise NotImplementedError

    def _snapshot(self) -> dict[str, Any]:
        return {"counts": self.counts()}

    # ---- life cycle

    def start(self, timeout: float = 10.0) -> Any:
        """Bind every socket, then register ``/<role>s/<uid>`` with the endpoints, status "ready"."""
        if self._registry is None:
            from stemstream.store import Registry

            self._registry = Registry(self.store, ttl=self.settings.store_ttl_s)
        for w in self._workers:
            w.start()
        deadline = time.monotonic() + timeout
        for event in self._bound:
            while not event.wait(0.1):
                self.maybe_raise()
                if time.monotonic() > deadline:
                    raise WaitTimeout(f"{self.role} {self._uid}: sockets not bound within {timeout:.0f} s")
        self._started = True
        self._registration = self._registry.register(
            self.role,
            self._uid,
            status="ready",
            endpoints=self.endpoints,
            server_key=self._server_key,
            sectors=self.n_sectors,
            **self._registry_fields(),
        )
        self._publisher._registration = self._registration
        self._publisher.start()
        self._on_started()
        logger.info("%s %s ready: %s", self.role, self._uid, self._endpoints)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Say "stopping", stop the threads, write what is queued, deregister, close the sockets."""
        if self._registration is not None:
            self._registration.update(status="stopping")
        self._stop.set()
        self._before_join()
        for w in self._workers:
            if w.is_alive():
                w.join(timeout)
        if self._started:
            self._publisher.flush(timeout)
            self._publisher.stop(timeout)
        if self._registration is not None:
            self._registration.close()
            self._registration = None
        term_context(self._ctx)

    def maybe_raise(self) -> None:
        """Re-raise, on the calling thread, the exception that ended a worker thread."""
        for w in self._workers:
            w.maybe_raise()
        self._publisher.maybe_raise()

    def __enter__(self) -> Any:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

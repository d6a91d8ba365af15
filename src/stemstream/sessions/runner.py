"""``SessionRunner``: a streaming session as a library, from the checks to the release of the nodes.

Its steps, in order: :meth:`~SessionRunner.check` (the store answers, the machine is known and up),
:meth:`~SessionRunner.open` (catalogue row, aggregator, NodeGroups' job submitted),
:meth:`~SessionRunner.wait_ready` (the NodeGroups are live in the store), :meth:`~SessionRunner.serve` (the
loop) and :meth:`~SessionRunner.close` (release, wait for the scans in hand, records: always, also after a
failure). The Prefect flow ``streaming_session`` wraps each step but the loop in a task.

The loop supervises the aggregator and the NodeGroups' job, watches the session's scans in the store, shows
the streaming ones live and ends on time, when :attr:`~SessionRunner.stopping` is set (SIGTERM: see
:func:`stop_on_sigterm`) or on ``/control/session/<uid>/stop``.
What each scan needs afterwards (count it from disk, summarise, draw, archive, catalogue) is the caller's
:class:`ScanHandlers`, run in a bounded pool of worker threads (``SessionParams.scan_workers``), so a slow archive
(a Globus transfer takes minutes) never holds up the loop: previews, restarts and supervision go on. Each job
runs in a copy of the loop thread's context (``contextvars``), so a Prefect subflow it calls is a child of the
session's run. The store is the settings' (with its Binary Star backup).
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from stemstream.allocation import Allocation, Allocator
from stemstream.catalog import Catalog
from stemstream.config import Settings, get_settings
from stemstream.errors import AllocationError, StemstreamError
from stemstream.scans import keys
from stemstream.scans.records import SessionRecord
from stemstream.sessions.metrics import session_metrics
from stemstream.sessions.params import SessionParams, check_store, make_allocator
from stemstream.sessions.supervise import JobWatch, Supervisor, aggregator_spec, event_lines
from stemstream.sessions.watcher import SESSION_SUBTREES, ScanView, ScanWatcher, live_view_url

POLL_S = 0.5
_log = logging.getLogger(__name__)


class ScanHandlers(Protocol):
    """What a session does with its scans; the Prefect flow's runs subflows and makes artifacts."""

    def counted(self, view: ScanView) -> Any:
        """A streamed scan was counted: summarise, archive, catalogue it (in a worker thread)."""
        ...

    def on_disk(self, view: ScanView) -> Any:
        """A scan landed on disk: count it from its raw files, then as :meth:`counted` (in a worker thread)."""
        ...

    def preview(self, view: ScanView) -> None:
        """A scan is still streaming: show ``view.preview`` (in the loop, every poll)."""
        ...

    def preview_done(self, scan_number: int) -> None:
        """The scan's live preview is over (in the loop)."""
        ...


@dataclass
class SessionResult:
    uid: str
    status: str
    scans: list[int] = field(default_factory=list)  # processed, by number
    failed: list[int] = field(default_factory=list)  # whose processing raised
    restarts: int = 0  # of the NodeGroups' job

    def as_dict(self) -> dict[str, Any]:
        return {
            "uid": self.uid,
            "status": self.status,
            "scans": self.scans,
            "failed": self.failed,
            "restarts": self.restarts,
        }


class SessionRunner:
    """One streaming session: see the module's docstring. ``logger`` is where the run's log lines go."""

    def __init__(
        self,
        params: SessionParams,
        handlers: ScanHandlers,
        *,
        settings: Settings | None = None,
        logger: logging.Logger | logging.LoggerAdapter[Any] | None = None,
        poll_s: float = POLL_S,
    ) -> None:
        self.params = params
        self.handlers = handlers
        self.settings = settings or get_settings()
        self.log = logger or _log
        self.poll_s = poll_s
        self.status = "failed"  # until serve() ends otherwise
        self.stopping = threading.Event()
        self.allocator: Allocator | None = None
        self.job: JobWatch | None = None
        self.supervisor: Supervisor | None = None
        self.members: list[str] = []
        self.live_view: str | None = None  # the live view's address (rank 0 of the NodeGroups, docs/analyses.md)
        self._client: Any = None
        self._metrics: Any = None  # the session's /metrics (sessions.metrics), while it serves
        self._catalog_open = False
        self._pool = ThreadPoolExecutor(params.scan_workers, thread_name_prefix=f"scan-{params.uid}")
        self._work: dict[Future[Any], int] = {}
        self._done: list[int] = []
        self._failed: list[int] = []

    # -- steps ---------------------------------------------------------------------------------------------

    def check(self) -> None:
        """The machine is known and up, the store (or its backup) answers: one-line errors otherwise."""
        self.allocator = make_allocator(self.params)
        check_store(self.settings)

    def open(self) -> Allocation:
        """The session's catalogue row and store client, its aggregator (``aggregator="local"``), the NodeGroups'
        job submitted."""
        from stemstream.store import StoreClient

        if self.allocator is None:
            self.check()
        assert self.allocator is not None  # for mypy: check() made it
        self._client = StoreClient.from_settings(self.settings, subtrees=SESSION_SUBTREES, timeout=10).start()
        with self._catalog() as catalog:
            catalog.start_session(self.params.uid, self.params.machine, self.params.n_nodes, self.params.counting)
        self._catalog_open = True
        if self.params.aggregator == "local":
            self.supervisor = Supervisor(backoff_s=1.0, max_backoff_s=10.0)
            self.supervisor.add(aggregator_spec(self.settings, Path(self.params.output_dir) / "logs"))
        request = self.params.request(self.settings)
        allocation = self.allocator.submit(request)
        self.job = JobWatch(self.allocator, request, allocation)
        return allocation

    def wait_ready(self) -> list[str]:
        """Wait until the NodeGroups are ready in the store (the membership is announced); fails early, with the
        job's state, when the job ends before they appear."""
        from stemstream.store import Registry

        job, client = self._opened()
        n, timeout_s = self.params.n_nodegroups, self.params.ready_timeout_s
        registry = Registry(client)
        deadline = time.monotonic() + timeout_s
        allocation = job.allocation
        while True:
            ready = sorted(r.uid for r in registry.members("nodegroup", status="ready"))
            if len(ready) >= n:
                break
            state = job.allocator.state(allocation)
            if state.finished:
                raise AllocationError(
                    f"NodeGroup job {allocation.job_id} on {allocation.request.machine} ended ({state.value}) before "
                    f"its NodeGroups came up; see the job's log in {allocation.request.output_dir}"
                )
            if time.monotonic() > deadline:
                raise AllocationError(
                    f"{len(ready)} of {n} NodeGroups ready after {timeout_s:.0f} s (job {allocation.job_id} is "
                    f"{state.value}); is the queue busy, or does the job fail? see its log"
                )
            if self.stopping.wait(0.5):
                break
        self.members = ready
        self.live_view = live_view_url(client)
        if self.live_view:
            self.log.info("session %s: live view at %s", self.params.uid, self.live_view)
        return ready

    def serve(self) -> str:
        """The loop, until the session's time is up or a stop is asked for; returns "ended" or "cancelled"."""
        job, client = self._opened()
        ends_at = time.time() + self.params.minutes * 60
        scans = ScanWatcher(client)  # before the record: a scan seen "running" is watched
        self._metrics = session_metrics(client, self.params.uid, self.params.n_nodegroups, since=scans.since)
        record = SessionRecord("running", members=tuple(self.members), ends_at=ends_at, metrics=self._metrics.url)
        client.set(keys.session(self.params.uid), record.to_record())
        self.log.info(
            "session %s: %d NodeGroup(s) live on %s (%s), until %s",
            self.params.uid, len(self.members), self.params.machine, job.allocation.job_id,
            time.strftime("%H:%M:%S", time.localtime(ends_at)),
        )  # fmt: skip
        stop_key = keys.session_stop(self.params.uid)
        while time.time() < ends_at and not self.stopping.is_set() and not client.get(stop_key):
            self.step(scans)
            self.stopping.wait(self.poll_s)
        self.status = "cancelled" if self.stopping.is_set() else "ended"
        self.log.info("session %s %s after %d scan(s)", self.params.uid, self.status, len(self._done))
        return self.status

    def step(self, scans: ScanWatcher) -> None:
        """One turn of the loop: supervision, the job, the scans; never waits for a scan's processing."""
        job, _client = self._opened()
        if self.supervisor is not None:
            for line in event_lines(self.supervisor.check()):
                self.log.warning("%s", line)
        for line in job.check():
            self.log.warning("%s", line)
        counted, on_disk, live = scans.poll()
        for view in live:
            self.handlers.preview(view)
        for view in counted:
            self.handlers.preview_done(view.number)
            self._submit(self.handlers.counted, view)
        for view in on_disk:
            self.log.warning("scan %d went to disk (%s); counting it from its files", view.number, view.record.reason)
            self._submit(self.handlers.on_disk, view)
        self._collect(wait=False)

    def close(self) -> SessionResult:
        """Release the nodes, stop the aggregator, wait for the scans in hand, write the session's records."""
        job, status = self.job, self.status
        try:
            if job is not None:
                with contextlib.suppress(StemstreamError):
                    job.allocator.cancel(job.allocation)
            if self.supervisor is not None:
                self.supervisor.stop()
            if self._metrics is not None:
                self._metrics.close()
            self._collect(wait=True)
        finally:
            self._pool.shutdown(wait=True)
            if self._client is not None:
                summary = SessionRecord(status, scans=tuple(sorted(self._done)), ended_at=time.time())
                with contextlib.suppress(StemstreamError):
                    self._client.set(keys.session(self.params.uid), summary.to_record())
                self._client.close()
                self._client = None
            if self._catalog_open:
                with self._catalog() as catalog:
                    catalog.end_session(self.params.uid, status)
        return SessionResult(
            self.params.uid, status, sorted(self._done), sorted(self._failed), job.restarts if job else 0
        )

    def _opened(self) -> tuple[JobWatch, Any]:
        if self.job is None or self._client is None:
            raise StemstreamError(f"session {self.params.uid} is not open: call SessionRunner.open() first")
        return self.job, self._client

    # -- scans ---------------------------------------------------------------------------------------------

    def _submit(self, handler: Any, view: ScanView) -> None:
        context = contextvars.copy_context()  # the loop's Prefect run context: subflows become its children
        self._work[self._pool.submit(context.run, handler, view)] = view.number

    def _collect(self, *, wait: bool) -> None:
        """Note the scans whose processing ended (all of them with ``wait``); a scan's StemstreamError is logged
        (the catalogue says what went wrong), anything else is a bug and ends the session."""
        for future in list(self._work):
            if not (wait or future.done()):
                continue
            number = self._work.pop(future)
            try:
                future.result()
            except StemstreamError as exc:
                self._failed.append(number)
                self.log.error("scan %d: %s", number, exc)
            else:
                self._done.append(number)

    @contextlib.contextmanager
    def _catalog(self) -> Iterator[Catalog]:
        catalog = Catalog(self.settings.catalog_url)
        try:
            yield catalog
        finally:
            catalog.close()


@contextlib.contextmanager
def stop_on_sigterm(stop: threading.Event) -> Iterator[None]:
    """Set ``stop`` on SIGTERM for the block (Prefect cancels a served run with SIGTERM): the session ends cleanly
    and releases its nodes instead of dying. Only the main thread can have signal handlers; elsewhere a no-op."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)

"""Tasks of a streaming session: checks, nodes, the aggregator, membership, release."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from stemstream.allocation import Allocation, Allocator, JobState
from stemstream.catalog import Catalog
from stemstream.errors import AllocationError
from stemstream.sessions import SessionParams, check_store, make_allocator
from stemstream.sessions.supervise import ProcessSpec, Supervisor, SupervisorEvent


@task(cache_policy=NO_CACHE)
def check_store_task(address: str) -> None:
    """The store answers (one-line error saying how to start it if not)."""
    check_store(address)


@task(cache_policy=NO_CACHE)
def check_machine(params: SessionParams, options: dict[str, Any] | None = None) -> Allocator:
    """The backend's allocator, once it has confirmed the machine is known and up."""
    return make_allocator(params, **(options or {}))


@task(cache_policy=NO_CACHE)
def allocate(allocator: Allocator, params: SessionParams, store_address: str) -> Allocation:
    """Submit the NodeGroups' job (mpiexec here, sbatch, or the Superfacility API)."""
    return allocator.submit(params.request(store_address))


@task(cache_policy=NO_CACHE)
def release(allocator: Allocator, allocation: Allocation) -> None:
    """Cancel the NodeGroups' job (producers fall back to disk by themselves)."""
    allocator.cancel(allocation)


@task(cache_policy=NO_CACHE)
def start_aggregator(store_address: str, log_dir: str) -> Supervisor:
    """An aggregator on this host, supervised (restarted with backoff when it dies)."""
    supervisor = Supervisor(backoff_s=1.0, max_backoff_s=10.0)
    supervisor.add(
        ProcessSpec(
            name="aggregator",
            argv=[sys.executable, "-m", "stemstream.cli", "aggregator", "--store", store_address],
            env={"STEMSTREAM_LOG_LEVEL": "INFO"},
            log_path=Path(log_dir) / "aggregator.log",
        )
    )
    return supervisor


@task(cache_policy=NO_CACHE)
def wait_for_nodegroups(
    client: Any, allocator: Allocator, allocation: Allocation, n: int, timeout_s: float, exclude: list[str]
) -> list[str]:
    """Wait until ``n`` NodeGroups (not in ``exclude``) are ready in the store: the membership is announced.

    Fails early, with the job's state, if the job ends before they appear.
    """
    from stemstream.store import Registry

    registry = Registry(client)
    deadline = time.monotonic() + timeout_s
    while True:
        ready = [r.uid for r in registry.members("nodegroup", status="ready") if r.uid not in exclude]
        if len(ready) >= n:
            return sorted(ready)
        state = allocator.state(allocation)
        if state.finished:
            raise AllocationError(
                f"NodeGroup job {allocation.job_id} on {allocation.request.machine} ended ({state.value}) before its "
                f"NodeGroups came up; see the job's log in {allocation.request.output_dir}"
            )
        if time.monotonic() > deadline:
            raise AllocationError(
                f"{len(ready)} of {n} NodeGroups ready after {timeout_s:.0f} s (job {allocation.job_id} is "
                f"{state.value}); is the queue busy, or does the job fail? see its log"
            )
        time.sleep(0.5)


@task(cache_policy=NO_CACHE)
def open_session(catalog_url: str, params: SessionParams) -> None:
    catalog = Catalog(catalog_url)
    try:
        catalog.start_session(params.uid, params.machine, params.n_nodes, params.background_n_sigma)
    finally:
        catalog.close()


@task(cache_policy=NO_CACHE)
def close_session(catalog_url: str, uid: str, status: str) -> None:
    catalog = Catalog(catalog_url)
    try:
        catalog.end_session(uid, status)
    finally:
        catalog.close()


@dataclass
class JobWatch:
    """Follows the NodeGroups' job during a session and resubmits it, with backoff, when it ends early."""

    allocator: Allocator
    params: SessionParams
    store_address: str
    allocation: Allocation
    backoff_s: float = 2.0
    max_backoff_s: float = 60.0
    max_restarts: int = 20
    restarts: int = 0
    _retry_at: float | None = None
    history: list[str] = field(default_factory=list)

    def check(self) -> list[str]:
        """What happened since the last call (lines for the run's log)."""
        events: list[str] = []
        if self._retry_at is None:
            state = self.allocator.state(self.allocation)
            if not state.finished:
                return events
            if self.restarts >= self.max_restarts:
                raise AllocationError(
                    f"NodeGroup job {self.allocation.job_id} ended ({state.value}) after {self.restarts} restarts; "
                    "giving up: see its log"
                )
            delay = min(self.backoff_s * 2**self.restarts, self.max_backoff_s)
            self._retry_at = time.monotonic() + delay
            events.append(
                f"NodeGroup job {self.allocation.job_id} ended early ({state.value}); resubmitting in {delay:.0f} s"
            )
        elif time.monotonic() >= self._retry_at:
            self._retry_at = None
            self.restarts += 1
            old = self.allocation.job_id
            self.allocation = self.allocator.submit(self.params.request(self.store_address))
            events.append(f"NodeGroup job resubmitted as {self.allocation.job_id} (was {old}; restart {self.restarts})")
        self.history.extend(events)
        return events

    @property
    def running(self) -> bool:
        return self._retry_at is None and self.allocator.state(self.allocation) in (JobState.RUNNING,)


def supervisor_lines(events: list[SupervisorEvent]) -> list[str]:
    return [e.message or f"{e.name}: {e.kind} (pid {e.pid})" for e in events]

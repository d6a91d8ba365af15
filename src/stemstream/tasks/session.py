"""Tasks of a streaming session: each one step of :class:`~stemstream.sessions.runner.SessionRunner`."""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from stemstream.sessions import SessionRunner, check_store


@task(cache_policy=NO_CACHE)
def check_store_task() -> None:
    """The store (or its backup) answers; a one-line error saying how to start one if not."""
    check_store()


@task(cache_policy=NO_CACHE)
def check_session(runner: SessionRunner) -> None:
    """The machine is known and up, the store answers."""
    runner.check()


@task(cache_policy=NO_CACHE)
def open_session(runner: SessionRunner) -> str:
    """Catalogue row, aggregator, the NodeGroups' job submitted (mpiexec here, sbatch, or the Superfacility API);
    the job's id."""
    return runner.open().job_id


@task(cache_policy=NO_CACHE)
def wait_for_nodegroups(runner: SessionRunner) -> list[str]:
    """Wait until the NodeGroups are ready in the store: the membership is announced."""
    return runner.wait_ready()


@task(cache_policy=NO_CACHE)
def close_session(runner: SessionRunner) -> dict[str, Any]:
    """Release the nodes (producers fall back to disk by themselves), finish the scans in hand, record the end."""
    return runner.close().as_dict()

"""Tasks of a multi-scan experiment: each one call of :class:`~stemstream.sessions.experiment.Experiment`."""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from stemstream.sessions.experiment import Background, Experiment


@task(cache_policy=NO_CACHE)
def wait_for_session(experiment: Experiment, uid: str, session: Background) -> None:
    """Until the session started for the experiment serves."""
    experiment.wait_for_session(uid, session)


@task(cache_policy=NO_CACHE)
def acquire_scans(
    experiment: Experiment,
    first: int | None,
    n_scans: int,
    interval_s: float,
    scan_shape: tuple[int, int],
    seed: int,
    loss_rate: float,
) -> list[int]:
    """Request the scans at their interval (from the next free number unless ``first``); their numbers."""
    start = first if first is not None else experiment.next_scan_number()
    log = get_run_logger()
    return experiment.acquire(start, n_scans, interval_s, scan_shape, seed=seed, loss_rate=loss_rate, log=log)


@task(cache_policy=NO_CACHE)
def wait_for_scans(experiment: Experiment, numbers: list[int], timeout_s: float) -> dict[int, dict[str, Any]]:
    """The catalogue rows of the scans dealt with (archived, or failed) within ``timeout_s``."""
    return experiment.wait_rows(numbers, timeout_s)

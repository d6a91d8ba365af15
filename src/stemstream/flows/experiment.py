"""``multi_scan_experiment``: N scans at a fixed interval (the paper's hour-long stability series)."""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact

from stemstream.errors import ConfigError
from stemstream.sessions import SessionParams
from stemstream.sessions.experiment import Background, Experiment, check_done, check_plan, session_for, turnaround_table
from stemstream.tasks.experiment import acquire_scans, wait_for_scans, wait_for_session
from stemstream.tasks.session import check_store_task


@flow(name="multi-scan-experiment", log_prints=True)
def multi_scan_experiment(
    n_scans: int = 5,
    interval_s: float = 10.0,
    scan_shape: tuple[int, int] = (32, 32),
    session: SessionParams | None = None,
    start_session: bool = True,
    end_session: bool = True,
    first_scan: int | None = None,
    seed: int = 0,
    loss_rate: float = 0.001,
    timeout_s: float = 600.0,
) -> list[dict[str, Any]]:
    """Make sure a streaming session is up (start one with ``session`` parameters if not, and ``start_session``),
    acquire ``n_scans`` scans ``interval_s`` apart, wait until each is counted, archived and catalogued, and report
    per-scan turnaround (an artifact ``experiment-turnaround``).

    Args:
        n_scans: how many scans to take (at least 1)
        interval_s: seconds from one scan's start to the next's
        scan_shape: probe positions of each scan, rows and columns
        session: the streaming session to start when none is up (the session form)
        start_session: start a session when no NodeGroups are live (else fail)
        end_session: end the session this experiment started, when done
        first_scan: the first scan's number (empty: the next free number in the store)
        seed: the simulated detector's seed (a real DAQ ignores it)
        loss_rate: the simulated detector's share of sectors lost upstream (a real DAQ ignores it)
        timeout_s: seconds to wait for the scans to be counted, archived and catalogued
    """
    from stemstream.flows.session import streaming_session

    logger = get_run_logger()
    check_plan(n_scans, interval_s, scan_shape, timeout_s)
    check_store_task()
    shape = (int(scan_shape[0]), int(scan_shape[1]))
    params = session or SessionParams()
    background: Background | None = None
    with Experiment() as experiment:
        try:
            if not experiment.nodegroups_live():
                if not start_session:
                    raise ConfigError(
                        "no NodeGroups are live and start_session is false; start a streaming session first"
                    )
                params = session_for(params, n_scans, interval_s, timeout_s)
                logger.info("no NodeGroups live: starting session %s (%s, %d node(s))", params.uid, params.machine,
                            params.n_nodes)  # fmt: skip
                background = Background(lambda: streaming_session(params)).start()
                wait_for_session(experiment, params.uid, background)
            numbers = acquire_scans(experiment, first_scan, n_scans, interval_s, shape, seed, loss_rate)
            rows = wait_for_scans(experiment, numbers, timeout_s)
            table = turnaround_table(numbers, rows)
            create_table_artifact(table=table, key="experiment-turnaround", description="per-scan turnaround")
            done = [r for r in table if r["status"] == "archived"]
            logger.info("experiment: %d of %d scans counted, archived and catalogued", len(done), len(table))
            check_done(numbers, rows, timeout_s)
            return table
        finally:
            if background is not None:
                if end_session:
                    experiment.stop_session(params.uid)
                background.join(120 if end_session else 0)
                if background.error is not None:
                    logger.error("the streaming session failed: %s", background.error)

"""``multi_scan_experiment``: N scans at a fixed interval (the paper's hour-long stability series)."""

from __future__ import annotations

import threading
import time
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact

from stemstream.catalog import Catalog
from stemstream.config import get_settings
from stemstream.errors import ConfigError, StemstreamError
from stemstream.scans import keys
from stemstream.sessions import session_params
from stemstream.tasks.session import check_store_task

_FINAL = ("archived", "archive_failed", "count_failed")


def _next_scan_number(client: Any, catalog: Catalog) -> int:
    known = [n for key in client.items(keys.SCANS) if (n := keys.scan_number_of(key)) is not None]
    known += [row.scan_number for row in catalog.list_scans()]
    return max(known, default=0) + 1


def _wait_rows(catalog: Catalog, numbers: list[int], timeout_s: float) -> dict[int, dict[str, Any]]:
    deadline = time.monotonic() + timeout_s
    rows: dict[int, dict[str, Any]] = {}
    while True:
        for n in numbers:
            if n not in rows:
                try:
                    row = catalog.get_scan(n).as_dict()
                except StemstreamError:
                    continue
                if row["status"] in _FINAL:
                    rows[n] = row
        if len(rows) == len(numbers) or time.monotonic() > deadline:
            return rows
        time.sleep(0.5)


@flow(name="multi-scan-experiment", log_prints=True)
def multi_scan_experiment(
    n_scans: int = 5,
    interval_s: float = 10.0,
    scan_shape: tuple[int, int] = (32, 32),
    store: str | None = None,
    catalog_url: str | None = None,
    session: dict[str, Any] | None = None,
    start_session: bool = True,
    end_session: bool = True,
    first_scan: int | None = None,
    seed: int = 0,
    loss_rate: float = 0.001,
    timeout_s: float = 600.0,
) -> list[dict[str, Any]]:
    """Make sure a streaming session is up (start one with ``session`` parameters if not, and
    ``start_session``), acquire ``n_scans`` scans ``interval_s`` apart, wait until each is counted, archived
    and catalogued, and report per-scan turnaround (an artifact ``experiment-turnaround``)."""
    from stemstream.flows.session import streaming_session
    from stemstream.plane.requests import request_scan
    from stemstream.store import Registry, StoreClient

    logger = get_run_logger()
    if n_scans < 1 or interval_s < 0 or timeout_s <= 0:
        raise ConfigError(
            f"n_scans={n_scans}, interval_s={interval_s}, timeout_s={timeout_s}: need n_scans >= 1, interval_s >= 0 "
            "and timeout_s > 0"
        )
    rows_cols = (int(scan_shape[0]), int(scan_shape[1]))
    if min(rows_cols) < 1:
        raise ConfigError(f"scan_shape {scan_shape}: both sides must be at least 1 probe position")
    s = get_settings()
    store = store or s.store_address
    catalog_url = catalog_url or s.catalog_url
    check_store_task(store)
    params = session_params(**(session or {}))
    catalog = Catalog(catalog_url)
    client = StoreClient(store, timeout=10).start()
    background: threading.Thread | None = None
    failure: list[BaseException] = []
    try:
        registry = Registry(client)
        if not registry.members("nodegroup", status="ready"):
            if not start_session:
                raise ConfigError("no NodeGroups are live and start_session is false; start a streaming session first")
            minutes = (
                params.minutes
                if session and "minutes" in session
                else max(5.0, (timeout_s + n_scans * interval_s) / 60)
            )
            kwargs = {**params.model_dump(), "minutes": minutes, "store": store, "catalog_url": catalog_url}
            logger.info(
                "no NodeGroups live: starting session %s (%s, %d node(s))", params.uid, params.machine, params.n_nodes
            )

            def run() -> None:
                try:
                    streaming_session(**kwargs)
                except BaseException as exc:  # reported below
                    failure.append(exc)

            background = threading.Thread(target=run, name="streaming-session", daemon=True)
            background.start()
            deadline = time.monotonic() + 300
            while len(registry.members("nodegroup", status="ready")) < params.n_nodegroups:
                if failure:
                    raise failure[0]
                if time.monotonic() > deadline:
                    raise StemstreamError("the streaming session's NodeGroups did not come up within 300 s")
                time.sleep(0.5)
            # The session flow watches scans decided after it started watching: give it a moment.
            time.sleep(1.0)
        first = first_scan if first_scan is not None else _next_scan_number(client, catalog)
        numbers = list(range(first, first + n_scans))
        t0 = time.monotonic()
        for i, n in enumerate(numbers):
            wait = t0 + i * interval_s - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            request_scan(client, n, rows_cols, seed=seed + i, loss_rate=loss_rate)
            logger.info("scan %d requested (%dx%d)", n, *rows_cols)
        rows = _wait_rows(catalog, numbers, timeout_s)
        table = []
        for n in numbers:
            row = rows.get(n)
            table.append(
                {
                    "scan": n,
                    "route": row["route"] if row else None,
                    "status": row["status"] if row else "not done in time",
                    "frames": row["frames"] if row else None,
                    "incomplete frames": row["frames_incomplete"] if row else None,
                    "events": row["events"] if row else None,
                    "seconds from last frame to counted file": round(row["turnaround_s"], 2)
                    if row and row["turnaround_s"] is not None
                    else None,
                    "location": row["archive_location"] or row["counted_path"] if row else None,
                }
            )
        create_table_artifact(table=table, key="experiment-turnaround", description="per-scan turnaround")
        done = [r for r in table if r["status"] == "archived"]
        logger.info("experiment: %d of %d scans counted, archived and catalogued", len(done), len(table))
        if len(rows) < len(numbers):
            missing = sorted(set(numbers) - set(rows))
            raise StemstreamError(
                f"scans {missing} were not processed within {timeout_s:.0f} s; see the session's logs"
            )
        return table
    finally:
        if background is not None:
            if end_session:
                client.set(keys.session_stop(params.uid), True)
            background.join(120 if end_session else 0)
            if failure:
                logger.error("the streaming session failed: %s", failure[0])
        client.close()
        catalog.close()

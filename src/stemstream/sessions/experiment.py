"""A multi-scan experiment as a library: N scans at a fixed interval on a live session, each waited for until it
is counted, archived and catalogued, and the turnaround of each. The flow ``multi_scan_experiment`` sequences
these calls; the store and the catalogue are the settings'."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from stemstream.catalog import Catalog
from stemstream.config import Settings, get_settings
from stemstream.errors import ConfigError, StemstreamError, WaitTimeout
from stemstream.scans import keys
from stemstream.scans.records import SessionRecord
from stemstream.sessions.params import SessionParams

logger = logging.getLogger(__name__)

FINAL = ("archived", "archive_failed", "count_failed")  # a scan's catalogue statuses once it is dealt with


def check_plan(n_scans: int, interval_s: float, scan_shape: tuple[int, int] | list[int], timeout_s: float) -> None:
    """One-line ConfigError for an experiment that cannot run."""
    if n_scans < 1 or interval_s < 0 or timeout_s <= 0:
        raise ConfigError(
            f"n_scans={n_scans}, interval_s={interval_s}, timeout_s={timeout_s}: need n_scans >= 1, interval_s >= 0 "
            "and timeout_s > 0"
        )
    if len(scan_shape) != 2 or min(int(x) for x in scan_shape) < 1:
        raise ConfigError(f"scan_shape {scan_shape}: both sides must be at least 1 probe position")


def session_for(params: SessionParams, n_scans: int, interval_s: float, timeout_s: float) -> SessionParams:
    """The session to start for an experiment: as long as the experiment may take, unless its length was chosen."""
    if "minutes" in params.model_fields_set:
        return params
    return params.model_copy(update={"minutes": max(5.0, (timeout_s + n_scans * interval_s) / 60)})


class Background:
    """A session run in a thread while the experiment goes on; what it raised is kept in :attr:`error`."""

    def __init__(self, target: Callable[[], Any], name: str = "streaming-session") -> None:
        self.error: BaseException | None = None
        self._target = target
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def _run(self) -> None:
        try:
            self._target()
        except BaseException as exc:  # reported by the experiment
            self.error = exc

    def start(self) -> Background:
        self._thread.start()
        return self

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)


class Experiment:
    """The store and catalogue an experiment works with; use as a context manager."""

    def __init__(self, settings: Settings | None = None) -> None:
        from stemstream.sessions.watcher import SESSION_SUBTREES
        from stemstream.store import Registry, StoreClient

        self.settings = settings or get_settings()
        self.catalog = Catalog(self.settings.catalog_url)
        try:
            self.client = StoreClient.from_settings(self.settings, subtrees=SESSION_SUBTREES, timeout=10).start()
        except BaseException:
            self.catalog.close()
            raise
        self.registry = Registry(self.client)

    def close(self) -> None:
        self.client.close()
        self.catalog.close()

    def __enter__(self) -> Experiment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def nodegroups_live(self) -> int:
        return len(self.registry.members("nodegroup", status="ready"))

    def wait_for_session(self, uid: str, session: Background, timeout_s: float = 300.0) -> None:
        """Wait until session ``uid`` serves (its NodeGroups are live and it watches scans); re-raise what the
        session raised if it failed first."""
        key = keys.session(uid)
        deadline = time.monotonic() + timeout_s
        while getattr(SessionRecord.parse(self.client.get(key)), "status", None) != "running":
            if session.error is not None:
                raise session.error
            if time.monotonic() > deadline:
                raise WaitTimeout(f"the streaming session {uid} did not come up within {timeout_s:.0f} s; see its logs")
            time.sleep(0.2)

    def next_scan_number(self) -> int:
        """One past the highest scan number the store or the catalogue knows."""
        known = [n for key in self.client.items(keys.SCANS) if (n := keys.scan_number_of(key)) is not None]
        known += [row.scan_number for row in self.catalog.list_scans()]
        return max(known, default=0) + 1

    def acquire(
        self,
        first: int,
        n_scans: int,
        interval_s: float,
        scan_shape: tuple[int, int],
        *,
        seed: int = 0,
        loss_rate: float = 0.001,
        log: logging.Logger | logging.LoggerAdapter[Any] = logger,
    ) -> list[int]:
        """Request scans ``first`` .. ``first + n_scans - 1``, ``interval_s`` apart (start to start)."""
        from stemstream.plane.requests import request_scan

        numbers = list(range(first, first + n_scans))
        t0 = time.monotonic()
        for i, n in enumerate(numbers):
            wait = t0 + i * interval_s - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            request_scan(self.client, n, scan_shape, seed=seed + i, loss_rate=loss_rate)
            log.info("scan %d requested (%dx%d)", n, *scan_shape)
        return numbers

    def wait_rows(self, numbers: list[int], timeout_s: float) -> dict[int, dict[str, Any]]:
        """The catalogue rows of ``numbers`` that reached a final status within ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        rows: dict[int, dict[str, Any]] = {}
        while True:
            for n in numbers:
                if n not in rows:
                    try:
                        row = self.catalog.get_scan(n).as_dict()
                    except StemstreamError:
                        continue
                    if row["status"] in FINAL:
                        rows[n] = row
            if len(rows) == len(numbers) or time.monotonic() > deadline:
                return rows
            time.sleep(0.5)

    def stop_session(self, uid: str) -> None:
        """Ask session ``uid`` to end (``/control/session/<uid>/stop``)."""
        self.client.set(keys.session_stop(uid), True)


def turnaround_table(numbers: list[int], rows: dict[int, dict[str, Any]]) -> list[dict[str, Any]]:
    """One line per scan: where it went, its status, frames, events and seconds from last frame to counted file."""
    table = []
    for n in numbers:
        row = rows.get(n)
        turnaround = row["turnaround_s"] if row else None
        table.append(
            {
                "scan": n,
                "route": row["route"] if row else None,
                "status": row["status"] if row else "not done in time",
                "frames": row["frames"] if row else None,
                "incomplete frames": row["frames_incomplete"] if row else None,
                "events": row["events"] if row else None,
                "seconds from last frame to counted file": round(turnaround, 2) if turnaround is not None else None,
                "location": row["archive_location"] or row["counted_path"] if row else None,
            }
        )
    return table


def check_done(numbers: list[int], rows: dict[int, dict[str, Any]], timeout_s: float) -> None:
    """A one-line WaitTimeout naming the scans not dealt with in time."""
    missing = sorted(set(numbers) - set(rows))
    if missing:
        raise WaitTimeout(f"scans {missing} were not processed within {timeout_s:.0f} s; see the session's logs")

"""Tasks for one scan: its records, count its raw files, read and draw it, archive it, catalogue it, show it in
the Prefect UI (and the live preview while it streams)."""

from __future__ import annotations

import base64
import re
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from prefect import task
from prefect.artifacts import (
    create_link_artifact,
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import NO_CACHE

from stemstream.catalog import Catalog
from stemstream.config import get_settings
from stemstream.counting import CountingParams
from stemstream.sessions import ScanView, SessionParams, make_archiver
from stemstream.sessions.scanwork import (
    CountedScan,
    add_daq_metadata,
    count_raw,
    read_counted_record,
    read_counted_scan,
    read_scan_record,
)


@task(cache_policy=NO_CACHE)
def read_counted_record_task(scan_number: int) -> dict[str, Any]:
    """The scan's ``/scans/<n>/counted`` record, from the store (for a scan processed on demand)."""
    return read_counted_record(scan_number)


@task(cache_policy=NO_CACHE)
def read_scan_record_task(scan_number: int) -> dict[str, Any]:
    """The scan's ``/scans/<n>`` record, from the store (for a scan counted from disk on demand)."""
    return read_scan_record(scan_number)


@task(cache_policy=NO_CACHE)
def count_raw_scan(
    raw_paths: list[str], output: str, scan_number: int, counting: CountingParams, daq: dict[str, Any] | None = None
) -> str:
    """Count a scan's raw files (stempy's reader) into ``output``, with the DAQ's metadata ``daq``; its path."""
    path = count_raw(raw_paths, output, scan_number, counting)
    if daq:
        add_daq_metadata(path, daq)
    return path


@task(cache_policy=NO_CACHE)
def add_daq_metadata_task(path: str, daq: dict[str, Any]) -> None:
    """The DAQ's metadata (beam energy, step size...) into the counted file, ``/stemstream/daq``."""
    add_daq_metadata(path, daq)


@task(cache_policy=NO_CACHE)
def describe_scan(path: str, scan_number: int) -> CountedScan:
    """What the counted file says (frames, incomplete frames, events, thresholds, timings) and its picture (a
    virtual bright-field PNG beside it), from one read of the file."""
    return read_counted_scan(path, scan_number)


@task(retries=2, retry_delay_seconds=2, cache_policy=NO_CACHE)
def archive_scan(path: str, scan_number: int, params: SessionParams) -> dict[str, Any]:
    """Copy the counted file to long-term storage (local copy or Globus); never deletes it."""
    archiver = make_archiver(params)
    return asdict(archiver.archive(Path(path), scan_number=scan_number))


@task(cache_policy=NO_CACHE)
def catalog_scan(scan_number: int, session_uid: str | None, **fields: Any) -> dict[str, Any]:
    """Insert or update the scan's row in the catalogue (STEMSTREAM_CATALOG_URL), tied to its session; the row."""
    catalog = Catalog(get_settings().catalog_url)
    try:
        if session_uid:
            fields["session_id"] = catalog.session_id(session_uid)
        return catalog.upsert_scan(scan_number, **fields).as_dict()
    finally:
        catalog.close()


def _png_markdown(png: str, title: str) -> str:
    data = base64.b64encode(Path(png).read_bytes()).decode()
    return f"### {title}\n\n![{title}](data:image/png;base64,{data})\n"


def session_artifact_key(session_uid: str) -> str:
    """The key of a session's scan list artifact (Prefect keys: lower-case letters, digits and dashes)."""
    slug = re.sub(r"[^a-z0-9-]+", "-", session_uid.lower()).strip("-")[:80]
    return f"scans-{slug or 'session'}"


def _scan_list_row(row: dict[str, Any]) -> dict[str, Any]:
    daq = row.get("metadata") or {}
    return {
        "scan": row.get("scan_number"),
        "shape": f"{row.get('scan_rows')}x{row.get('scan_cols')}",
        "route": row.get("route"),
        "status": row.get("status"),
        "events": row.get("events"),
        "incomplete frames": row.get("frames_incomplete"),
        "seconds to file": round(row["turnaround_s"], 2) if row.get("turnaround_s") is not None else None,
        "metadata": ", ".join(f"{k}={v}" for k, v in daq.items()),
        "notes": row.get("notes") or "",
        "thumbnail": row.get("thumbnail_path"),
        "location": row.get("archive_location") or row.get("counted_path"),
    }


@task(cache_policy=NO_CACHE)
def publish_session_scans(session_uid: str) -> list[dict[str, Any]]:
    """The session's scan list (from the catalog) as its table artifact, a new version each time a scan
    finishes (key ``scans-<session uid>``); the table."""
    catalog = Catalog(get_settings().catalog_url)
    try:
        table = [_scan_list_row(r.as_dict()) for r in catalog.list_scans(session_uid)]
    finally:
        catalog.close()
    create_table_artifact(
        table=table, key=session_artifact_key(session_uid), description=f"session {session_uid}: its scans so far"
    )
    return table


@task(cache_policy=NO_CACHE)
def publish_scan(scan_number: int, row: dict[str, Any], png: str | None) -> None:
    """The scan's table and picture as Prefect artifacts (keys ``scan-<n>`` and ``scan-<n>-picture``)."""
    turnaround = row.get("turnaround_s")
    table = [
        {
            "scan": scan_number,
            "route": row.get("route"),
            "frames": row.get("frames"),
            "incomplete frames": row.get("frames_incomplete"),
            "events": row.get("events"),
            "background threshold": (row.get("thresholds") or {}).get("background"),
            "x-ray threshold": (row.get("thresholds") or {}).get("xray"),
            "seconds from last frame to counted file": round(turnaround, 2) if turnaround is not None else None,
            "status": row.get("status"),
            "location": row.get("archive_location") or row.get("counted_path"),
        }
    ]
    create_table_artifact(table=table, key=f"scan-{scan_number}", description=f"scan {scan_number}")
    if png:
        create_markdown_artifact(
            markdown=_png_markdown(png, f"scan {scan_number}: virtual bright field"),
            key=f"scan-{scan_number}-picture",
            description=f"scan {scan_number}: virtual bright-field image",
        )


class LivePreview:
    """What the session's Prefect run shows while scans stream: one link artifact to the live view (key
    ``live-view``: the session's page, served by the NodeGroups, docs/analyses.md) and one progress artifact per
    scan (key ``scan-<n>-progress``, frames counted of the scan's), updated in place at most every
    ``interval_s``. The pictures are on the page, not in the run. Plain helper for the session loop, not a
    task: it runs every second for an hour."""

    def __init__(self, interval_s: float = 1.0) -> None:
        self.interval_s = interval_s
        self.linked: str | None = None
        self._progress: dict[int, Any] = {}
        self._last: dict[int, tuple[float, int]] = {}

    def link(self, url: str | None, session_uid: str = "") -> None:
        """The link artifact to the live view, once per session."""
        if not url or self.linked == url:
            return
        create_link_artifact(
            link=url,
            link_text="live view: the scans as they are counted",
            key="live-view",
            description=f"session {session_uid}: progress, diffraction pattern, virtual images, detector settings",
        )
        self.linked = url

    def show(self, view: ScanView) -> None:
        """The scan's progress so far, from the session's watcher."""
        _image, counted, _share = view.preview
        self.update(view.number, counted, view.n_frames)

    def update(self, scan_number: int, counted: int, n_frames: int) -> None:
        now = time.monotonic()
        last_t, last_counted = self._last.get(scan_number, (0.0, -1))
        if counted == last_counted or now - last_t < self.interval_s or n_frames <= 0:
            return
        self._last[scan_number] = (now, counted)
        percent = min(100.0, 100.0 * counted / n_frames)
        if scan_number not in self._progress:
            self._progress[scan_number] = create_progress_artifact(
                progress=percent, key=f"scan-{scan_number}-progress", description=f"scan {scan_number}: counted"
            )
        else:
            update_progress_artifact(self._progress[scan_number], percent)

    def finish(self, scan_number: int) -> None:
        if scan_number in self._progress:
            update_progress_artifact(self._progress.pop(scan_number), 100.0)
        self._last.pop(scan_number, None)

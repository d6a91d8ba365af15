"""``process_scan`` (a counted, streamed scan) and ``count_fallback_scan`` (a scan that landed on disk)."""

from __future__ import annotations

import time
from typing import Any

from prefect import flow, get_run_logger

from stemstream.errors import ArchiveError, CountingError
from stemstream.sessions import SessionParams
from stemstream.sessions.scanwork import (
    counted_file,
    counted_outcome,
    daq_metadata_of,
    raw_paths_of,
    turnaround_from_disk,
)
from stemstream.tasks.scans import (
    add_daq_metadata_task,
    archive_scan,
    catalog_scan,
    count_raw_scan,
    describe_scan,
    publish_scan,
    publish_session_scans,
    read_counted_record_task,
    read_scan_record_task,
)


def _finish(scan_number: int, path: str, route: str, params: SessionParams, extra: dict[str, Any]) -> dict[str, Any]:
    """The steps every counted scan goes through: summary and picture, archive, catalogue, artifacts."""
    logger = get_run_logger()
    scan = describe_scan(path, scan_number)
    fields = scan.catalog_fields(route, **extra)
    if params.notes:
        fields["notes"] = params.notes
    catalog_scan(scan_number, params.uid, status="archiving", **fields)
    try:
        archived = archive_scan(path, scan_number, params)
    except ArchiveError as exc:
        # The counted file stays where it is; the catalog says what went wrong.
        row = catalog_scan(scan_number, params.uid, status="archive_failed", error=str(exc))
        publish_scan(scan_number, row, scan.png)
        publish_session_scans(params.uid)
        logger.error("scan %d: archiving failed: %s", scan_number, exc)
        raise
    row = catalog_scan(scan_number, params.uid, status="archived", archive_location=archived["destination"], error=None)
    publish_scan(scan_number, row, scan.png)
    publish_session_scans(params.uid)
    turnaround = fields.get("turnaround_s")
    logger.info(
        "scan %d: %d frames (%d incomplete), %d events, %s; archived to %s",
        scan_number, scan.frames, scan.frames_incomplete, scan.events,
        f"{turnaround:.2f} s from last frame to counted file" if turnaround else "", archived["destination"],
    )  # fmt: skip
    return row


@flow(name="process-scan", log_prints=True)
def process_scan(
    scan_number: int,
    session: SessionParams | None = None,
    counted: dict[str, Any] | None = None,
    record: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A scan the store reports counted: the DAQ's metadata into its file, archive it, catalogue it, show its
    table and picture.

    Args:
        scan_number: the scan's number
        session: the session it belongs to (the session form; empty: defaults)
        counted: its ``/scans/<n>/counted`` record when the caller has it (a session does); else from the store
        record: its ``/scans/<n>`` record when the caller has it (a session does); else from the store
    """
    params = session or SessionParams()
    outcome = counted_outcome(
        counted if counted is not None else read_counted_record_task(scan_number), params.output_dir
    )
    if outcome.path is None:
        catalog_scan(scan_number, params.uid, status="count_failed", error=outcome.error)
        raise CountingError(f"scan {scan_number} was not counted: {outcome.error}")
    daq = daq_metadata_of(record if record is not None else read_scan_record_task(scan_number))
    if daq:
        add_daq_metadata_task(outcome.path, daq)
    extra = {"turnaround_s": outcome.turnaround_s, "error": None}
    return _finish(scan_number, outcome.path, "stream", params, extra)


@flow(name="count-fallback-scan", log_prints=True)
def count_fallback_scan(
    scan_number: int,
    session: SessionParams | None = None,
    record: dict[str, Any] | None = None,
    raw_paths: list[str] | None = None,
) -> dict[str, Any]:
    """A scan that landed on disk: count its raw files with stempy's reader, then archive and catalogue it.

    Args:
        scan_number: the scan's number
        session: the session it belongs to, with the counting parameters (the session form; empty: defaults)
        record: its ``/scans/<n>`` record when the caller has it (a session does); else from the store
        raw_paths: its raw files (empty: those the producers reported in its ``/scans/<n>`` record)
    """
    params = session or SessionParams()
    if record is None:
        record = read_scan_record_task(scan_number) if raw_paths is None else {}
    paths = raw_paths_of(scan_number, record, raw_paths)
    catalog_scan(scan_number, params.uid, route="disk", status="counting", raw_paths=paths)
    started = time.time()
    output = str(counted_file(params.output_dir, scan_number))
    path = count_raw_scan(paths, output, scan_number, params.counting, daq_metadata_of(record))
    extra = {"raw_paths": paths, "turnaround_s": turnaround_from_disk(record, started), "error": None}
    return _finish(scan_number, path, "disk", params, extra)

"""``process_scan`` (a counted, streamed scan) and ``count_fallback_scan`` (a scan that landed on disk)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from stemstream.config import get_settings
from stemstream.counting.output import counted_path
from stemstream.errors import ArchiveError, CatalogError, StemstreamError
from stemstream.scans import keys
from stemstream.sessions import SessionParams, session_params
from stemstream.tasks.scans import (
    archive_scan,
    catalog_scan,
    count_raw_scan,
    draw_scan,
    publish_scan,
    summarize_counted,
)


def _store_items(store: str, scan_number: int) -> dict[str, Any]:
    from stemstream.store import StoreClient

    with StoreClient(store, timeout=10) as client:
        return client.items(keys.scan(scan_number))


def _finish(
    scan_number: int,
    path: str,
    route: str,
    params: SessionParams,
    catalog_url: str,
    session_uid: str | None,
    extra: dict[str, Any],
    archive_options: dict[str, Any] | None,
) -> dict[str, Any]:
    """The steps every counted scan goes through: summary, picture, archive, catalog, artifacts."""
    logger = get_run_logger()
    summary = summarize_counted(path)
    png = draw_scan(path, scan_number)
    rows, cols = summary["scan_shape"]
    fields: dict[str, Any] = {
        "scan_rows": rows,
        "scan_cols": cols,
        "route": route,
        "counted_path": path,
        "preview_path": png,
        "frames": summary["frames"],
        "frames_incomplete": summary["frames_incomplete"],
        "events": summary["events"],
        "thresholds": summary["thresholds"],
        "first_frame": summary["first_frame"],
        "last_frame": summary["last_frame"],
        "counted_at": summary["file_written"],
        "progress": 1.0,
        **extra,
    }
    if fields.get("turnaround_s") is None and summary["last_frame"] and summary["file_written"]:
        fields["turnaround_s"] = summary["file_written"] - summary["last_frame"]
    catalog_scan(catalog_url, scan_number, session_uid, status="archiving", **fields)
    try:
        archived = archive_scan(path, scan_number, params, archive_options)
    except ArchiveError as exc:
        # The counted file stays where it is; the catalog says what went wrong.
        row = catalog_scan(catalog_url, scan_number, session_uid, status="archive_failed", error=str(exc))
        publish_scan(scan_number, row, png)
        logger.error("scan %d: archiving failed: %s", scan_number, exc)
        raise
    row = catalog_scan(
        catalog_url, scan_number, session_uid, status="archived", archive_location=archived["destination"], error=None
    )
    publish_scan(scan_number, row, png)
    logger.info(
        "scan %d: %d frames (%d incomplete), %d events, %s; archived to %s",
        scan_number,
        summary["frames"],
        summary["frames_incomplete"],
        summary["events"],
        f"{fields['turnaround_s']:.2f} s from last frame to counted file" if fields.get("turnaround_s") else "",
        archived["destination"],
    )
    return row


@flow(name="process-scan", log_prints=True)
def process_scan(
    scan_number: int,
    store: str | None = None,
    session: dict[str, Any] | None = None,
    catalog_url: str | None = None,
    archive_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A scan the store reports counted: archive it, catalogue it, show its table and picture."""
    s = get_settings()
    params = session_params(**(session or {}))
    items = _store_items(store or s.store_address, scan_number)
    record = items.get(keys.counted(scan_number))
    if not isinstance(record, dict):
        raise CatalogError(
            f"scan {scan_number} has no counted record in the store; is it still streaming, or did it go to disk? "
            "(`stemstream store get /scans/{scan_number}`)"
        )
    if record.get("status") == "failed" or not record.get("path"):
        catalog_scan(
            catalog_url or s.catalog_url, scan_number, params.uid, status="count_failed", error=record.get("error")
        )
        raise StemstreamError(f"scan {scan_number} was not counted: {record.get('error')}")
    extra = {"turnaround_s": record.get("seconds_after_last_frame"), "error": None}
    return _finish(
        scan_number, record["path"], "stream", params, catalog_url or s.catalog_url, params.uid, extra, archive_options
    )


@flow(name="count-fallback-scan", log_prints=True)
def count_fallback_scan(
    scan_number: int,
    store: str | None = None,
    session: dict[str, Any] | None = None,
    catalog_url: str | None = None,
    raw_paths: list[str] | None = None,
    archive_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A scan that landed on disk: count its raw files with stempy's reader, then archive and catalogue it.

    ``raw_paths`` default to the files the producers reported in the store (``/scans/<n>``).
    """
    s = get_settings()
    params = session_params(**(session or {}))
    url = catalog_url or s.catalog_url
    record: dict[str, Any] = {}
    if raw_paths is None:
        record = _store_items(store or s.store_address, scan_number).get(keys.scan(scan_number)) or {}
        raw_paths = list(record.get("fallback_paths") or [])
        if not raw_paths:
            raise CatalogError(
                f"scan {scan_number}: the store knows no raw files for it; pass raw_paths, or check the scan number"
            )
    missing = [p for p in raw_paths if not Path(p).exists()]
    if missing:
        raise CatalogError(f"scan {scan_number}: raw file {missing[0]} is gone; pass raw_paths where they are now")
    catalog_scan(url, scan_number, params.uid, route="disk", status="counting", raw_paths=raw_paths)
    started = time.time()
    output = counted_path(Path(params.output_dir), scan_number)
    path = count_raw_scan(raw_paths, str(output), scan_number, params.engine, params.background_n_sigma)
    # Turnaround: from the scan's last sector on disk (the producers' closing time) to the counted file.
    landed = float(record.get("closed_at") or started)
    extra = {"raw_paths": raw_paths, "turnaround_s": time.time() - landed, "error": None}
    return _finish(scan_number, path, "disk", params, url, params.uid, extra, archive_options)

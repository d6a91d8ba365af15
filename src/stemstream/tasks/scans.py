"""Tasks for one scan: count raw files, draw it, archive it, catalogue it, show it in the Prefect UI."""

from __future__ import annotations

import base64
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from prefect import task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import NO_CACHE

from stemstream.catalog import Catalog
from stemstream.counting import count_raw_files, read_counted, save_png, virtual_bright_field
from stemstream.sessions import SessionParams, make_archiver


@task(cache_policy=NO_CACHE)
def count_raw_scan(raw_paths: list[str], output: str, scan_number: int, engine: str, background_n_sigma: float) -> str:
    """Count a scan's raw files (stempy's reader) into ``output``; its path."""
    path = count_raw_files(
        [Path(p) for p in raw_paths],
        output,
        scan_number=scan_number,
        engine=engine,
        background_n_sigma=background_n_sigma,
    )
    return str(path)


@task(cache_policy=NO_CACHE)
def summarize_counted(path: str) -> dict[str, Any]:
    """What the counted file says: frames, incomplete frames, events, thresholds, timings."""
    sparse, meta = read_counted(path)
    lengths = [len(e) for e in sparse.data.ravel()]
    thresholds = meta.get("thresholds")
    timings = meta.get("timings") or {}
    return {
        "frames": len(lengths),
        "frames_incomplete": int(meta.get("frames_incomplete", 0)),
        "events": int(sum(lengths)),
        "background_threshold": round(float(thresholds.background), 3) if thresholds else None,
        "xray_threshold": round(float(thresholds.xray), 3) if thresholds else None,
        "thresholds": thresholds.to_dict() if thresholds else {},
        "engine": meta.get("engine", ""),
        "first_frame": timings.get("first_frame"),
        "last_frame": timings.get("last_frame"),
        "file_written": timings.get("file_written"),
        "scan_shape": [int(x) for x in sparse.scan_shape],
    }


@task(cache_policy=NO_CACHE)
def draw_scan(path: str, scan_number: int) -> str:
    """A virtual bright-field image of the counted scan, as a PNG beside the file; its path."""
    sparse, _meta = read_counted(path)
    image = virtual_bright_field(sparse)
    png = Path(path).with_name(f"scan_{scan_number}_vbf.png")
    save_png(image, png, title=f"scan {scan_number}: virtual bright field (electrons)")
    return str(png)


@task(retries=2, retry_delay_seconds=2, cache_policy=NO_CACHE)
def archive_scan(path: str, scan_number: int, params: SessionParams, options: dict[str, Any] | None = None) -> dict:
    """Copy the counted file to long-term storage (local copy or Globus); never deletes it."""
    archiver = make_archiver(params, **(options or {}))
    return asdict(archiver.archive(Path(path), scan_number=scan_number))


@task(cache_policy=NO_CACHE)
def catalog_scan(catalog_url: str, scan_number: int, session_uid: str | None, **fields: Any) -> dict[str, Any]:
    """Insert or update the scan's row (and tie it to its session); the row."""
    catalog = Catalog(catalog_url)
    try:
        if session_uid:
            fields["session_id"] = catalog.session_id(session_uid)
        return catalog.upsert_scan(scan_number, **fields).as_dict()
    finally:
        catalog.close()


def _png_markdown(png: str, title: str) -> str:
    data = base64.b64encode(Path(png).read_bytes()).decode()
    return f"### {title}\n\n![{title}](data:image/png;base64,{data})\n"


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
    """While a scan streams: a progress artifact (frames counted of the scan's) and the growing
    virtual bright-field image (a markdown artifact, key ``scan-<n>-live``), updated at most every
    ``interval_s``. Plain helper for the session flow, not a task: it runs every second for an hour."""

    def __init__(self, directory: Path, interval_s: float = 1.0) -> None:
        self.directory = directory
        self.interval_s = interval_s
        self._progress: dict[int, Any] = {}
        self._last: dict[int, tuple[float, int]] = {}

    def update(self, scan_number: int, image: Any, counted: int, n_frames: int) -> None:
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
        if image is not None:
            png = save_png(
                image,
                self.directory / f"scan_{scan_number}_live.png",
                title=f"scan {scan_number}: {counted} of {n_frames} frames counted",
            )
            create_markdown_artifact(
                markdown=_png_markdown(str(png), f"scan {scan_number} (live): {counted} of {n_frames} frames"),
                key=f"scan-{scan_number}-live",
                description=f"scan {scan_number}: live virtual bright field",
            )

    def finish(self, scan_number: int) -> None:
        if scan_number in self._progress:
            update_progress_artifact(self._progress.pop(scan_number), 100.0)
        self._last.pop(scan_number, None)

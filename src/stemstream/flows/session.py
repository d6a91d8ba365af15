"""``streaming_session``: nodes allocated, NodeGroups up, every scan counted, archived, catalogued."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from stemstream.flows.scans import count_fallback_scan, process_scan
from stemstream.sessions import ScanView, SessionParams, SessionRunner, stop_on_sigterm
from stemstream.tasks.scans import LivePreview
from stemstream.tasks.session import check_session, close_session, open_session, wait_for_nodegroups


class _Scans:
    """What the session does with its scans: a subflow per scan (in the runner's worker threads, children of the
    session's run), the live preview as artifacts (in the loop)."""

    def __init__(self, params: SessionParams) -> None:
        self.params = params
        self.live = LivePreview(Path(params.output_dir))

    def counted(self, view: ScanView) -> dict[str, Any]:
        counted = view.counted.to_record() if view.counted is not None else None
        return process_scan(view.number, session=self.params, counted=counted)

    def on_disk(self, view: ScanView) -> dict[str, Any]:
        return count_fallback_scan(view.number, session=self.params, record=view.record.to_record())

    def preview(self, view: ScanView) -> None:
        self.live.show(view)

    def preview_done(self, scan_number: int) -> None:
        self.live.finish(scan_number)


@flow(name="streaming-session", log_prints=True)
def streaming_session(session: SessionParams) -> dict[str, Any]:
    """Allocate, start the NodeGroups, wait until they are live in the store, then until the session time ends
    (or the run is cancelled, or ``/control/session/<uid>/stop`` is set): restart what dies, show each streaming
    scan's progress and picture live, process every scan alongside. Then release the nodes."""
    runner = SessionRunner(session, _Scans(session), logger=get_run_logger())
    try:
        check_session(runner)
        open_session(runner)
        wait_for_nodegroups(runner)
        with stop_on_sigterm(runner.stopping):
            runner.serve()
    finally:
        result = close_session(runner)
    return result

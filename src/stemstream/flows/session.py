"""``streaming_session``: nodes allocated, NodeGroups up, every scan counted, archived, catalogued."""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger

from stemstream.flows.scans import count_fallback_scan, process_scan
from stemstream.sessions import ScanView, SessionParams, SessionRunner, stop_on_sigterm
from stemstream.tasks.scans import LivePreview
from stemstream.tasks.session import check_session, close_session, open_session, wait_for_nodegroups


class _Scans:
    """What the session does with its scans: a subflow per scan (in the runner's worker threads, children of the
    session's run), a progress artifact per streaming scan and the link to the live view (in the loop)."""

    def __init__(self, params: SessionParams) -> None:
        self.params = params
        self.live = LivePreview()

    def counted(self, view: ScanView) -> dict[str, Any]:
        counted = view.counted.to_record() if view.counted is not None else None
        return process_scan(view.number, session=self.params, counted=counted, record=view.record.to_record())

    def on_disk(self, view: ScanView) -> dict[str, Any]:
        return count_fallback_scan(view.number, session=self.params, record=view.record.to_record())

    def preview(self, view: ScanView) -> None:
        self.live.show(view)

    def preview_done(self, scan_number: int) -> None:
        self.live.finish(scan_number)


@flow(name="streaming-session", log_prints=True)
def streaming_session(session: SessionParams) -> dict[str, Any]:
    """Allocate, start the NodeGroups, wait until they are live in the store, then until the session time ends
    (or the run is cancelled, or ``/control/session/<uid>/stop`` is set): restart what dies, link the live view
    and show each streaming scan's progress, process every scan alongside. Then release the nodes."""
    scans = _Scans(session)
    runner = SessionRunner(session, scans, logger=get_run_logger())
    try:
        check_session(runner)
        open_session(runner)
        wait_for_nodegroups(runner)
        scans.live.link(runner.live_view, session.uid)
        with stop_on_sigterm(runner.stopping):
            runner.serve()
    finally:
        result = close_session(runner)
    return result

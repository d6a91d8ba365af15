"""``streaming_session``: nodes allocated, NodeGroups up, every scan counted, archived, catalogued."""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from stemstream.config import get_settings
from stemstream.errors import StemstreamError
from stemstream.flows.scans import count_fallback_scan, process_scan
from stemstream.scans import keys
from stemstream.sessions import ScanWatcher, session_params
from stemstream.tasks.scans import LivePreview
from stemstream.tasks.session import (
    JobWatch,
    allocate,
    check_machine,
    check_store_task,
    close_session,
    open_session,
    release,
    start_aggregator,
    supervisor_lines,
    wait_for_nodegroups,
)

POLL_S = 0.5


@contextlib.contextmanager
def _stop_on_sigterm(stop: threading.Event):
    """Prefect cancels a served run with SIGTERM: end the session cleanly (release the nodes) instead of dying."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@flow(name="streaming-session", log_prints=True)
def streaming_session(
    machine: str = "local",
    n_nodes: int = 1,
    nodegroups_per_node: int = 2,
    background_n_sigma: float = 4.0,
    minutes: float = 60.0,
    engine: str = "stempy",
    backend: str = "local",
    aggregator: str = "local",
    archive: str = "local",
    archive_dir: str = "./data/archive",
    output_dir: str = "",
    store: str | None = None,
    catalog_url: str | None = None,
    uid: str = "",
    account: str | None = None,
    qos: str = "realtime",
    constraint: str = "cpu",
    allocator_options: dict[str, Any] | None = None,
    archive_options: dict[str, Any] | None = None,
    ready_timeout_s: float = 300.0,
) -> dict[str, Any]:
    """Allocate, start the NodeGroups, wait until they are live in the store, then until the session time
    ends (or the run is cancelled, or ``/control/session/<uid>/stop`` is set): restart what dies, show each
    streaming scan's progress and picture live, process every counted scan. Then release the nodes."""
    logger = get_run_logger()
    s = get_settings()
    params = session_params(
        machine=machine, n_nodes=n_nodes, nodegroups_per_node=nodegroups_per_node,
        background_n_sigma=background_n_sigma, minutes=minutes, engine=engine, backend=backend,
        aggregator=aggregator, archive=archive, archive_dir=archive_dir, output_dir=output_dir, uid=uid,
        account=account, qos=qos, constraint=constraint,
    )  # fmt: skip
    store = store or s.store_address
    catalog_url = catalog_url or s.catalog_url
    allocator = check_machine(params, allocator_options)
    check_store_task(store)

    from stemstream.store import StoreClient

    stop = threading.Event()
    client = StoreClient(store, timeout=10).start()
    open_session(catalog_url, params)
    supervisor = None
    watch: JobWatch | None = None
    status = "failed"
    processed: list[int] = []
    log_dir = Path(params.output_dir) / "logs"
    try:
        if params.aggregator == "local":
            supervisor = start_aggregator(store, str(log_dir))
        allocation = allocate(allocator, params, store)
        watch = JobWatch(allocator, params, store, allocation)
        members = wait_for_nodegroups(client, allocator, allocation, params.n_nodegroups, ready_timeout_s, [])
        ends_at = time.time() + params.minutes * 60
        until = time.strftime("%H:%M:%S", time.localtime(ends_at))
        logger.info(
            "session %s: %d NodeGroup(s) live on %s (%s), until %s",
            params.uid, len(members), params.machine, allocation.job_id, until,
        )  # fmt: skip
        client.set(keys.session(params.uid), {"status": "running", "members": members, "ends_at": ends_at})
        scans = ScanWatcher(client)
        preview = LivePreview(Path(params.output_dir))
        stop_key = keys.session_stop(params.uid)
        session = params.model_dump()
        with _stop_on_sigterm(stop):
            while time.time() < ends_at and not stop.is_set() and not client.get(stop_key):
                if supervisor is not None:
                    for line in supervisor_lines(supervisor.check()):
                        logger.warning("%s", line)
                for line in watch.check():
                    logger.warning("%s", line)
                counted, on_disk, live = scans.poll()
                for view in live:
                    image, n_counted, _share = view.preview
                    preview.update(view.number, image, n_counted, view.n_frames)
                for view in counted:
                    preview.finish(view.number)
                    try:
                        process_scan(view.number, store=store, session=session, catalog_url=catalog_url,
                                     archive_options=archive_options)  # fmt: skip
                        processed.append(view.number)
                    except StemstreamError as exc:
                        logger.error("scan %d: %s", view.number, exc)
                for view in on_disk:
                    logger.warning("scan %d went to disk (%s); counting it from its files", view.number,
                                   view.record.reason)  # fmt: skip
                    try:
                        count_fallback_scan(view.number, store=store, session=session, catalog_url=catalog_url,
                                            archive_options=archive_options)  # fmt: skip
                        processed.append(view.number)
                    except StemstreamError as exc:
                        logger.error("scan %d: %s", view.number, exc)
                time.sleep(POLL_S)
        status = "cancelled" if stop.is_set() else "ended"
        logger.info("session %s %s after %d scan(s)", params.uid, status, len(processed))
    finally:
        if watch is not None:
            with contextlib.suppress(StemstreamError):
                release(watch.allocator, watch.allocation)
        if supervisor is not None:
            supervisor.stop()
        with contextlib.suppress(StemstreamError):
            client.set(keys.session(params.uid), {"status": status, "scans": processed, "ended_at": time.time()})
        client.close()
        close_session(catalog_url, params.uid, status)
    return {"uid": params.uid, "status": status, "scans": processed, "restarts": watch.restarts if watch else 0}

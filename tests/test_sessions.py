"""Streaming sessions under faults and site settings, on Prefect's test harness against real store, producer,
aggregator and NodeGroup processes (Globus mocked at its HTTP contract only):

* the site's counting settings reach the NodeGroups through their command line (not their environment) and
  the fallback counter: each counted file records what it was counted with;
* a session carries on when the store's primary dies (Binary Star): a scan after the kill is processed;
* a scan that archives slowly holds up nothing: meanwhile another scan streams with its live preview and is
  processed, and a killed aggregator is restarted.
"""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import globus_sdk
import pytest
import responses
from globus_sdk.testing import load_response

from globus_mock import DST_EP, SRC_EP
from plane_helpers import ProcessTree, free_port_block, start_store, wait_until
from session_fixtures import catalog_url
from stemstream.catalog import Catalog
from stemstream.config import environment, store_overrides
from stemstream.scans import keys
from stemstream.sessions import SessionParams, session_params
from test_counting_params import SITE, assert_counted_with_site_settings

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_server")]
SHAPE = (12, 12)


def _start_producers(tree: ProcessTree, tmp_path: Path, *store: str) -> None:
    from stemstream.store import Registry, StoreClient

    for m in range(4):
        tree.start(f"producer-{m}", "producer", *store, "--sector", m, "--threads", 2,
                   "--fallback-dir", tmp_path / "fallback")  # fmt: skip
    with StoreClient.from_settings(timeout=10) as client:
        Registry(client).wait_for_members("producer", 4, status="ready", timeout=60)


@pytest.fixture
def plane(tmp_path: Path) -> Iterator[ProcessTree]:
    """A store and four simulated producers; the settings (store, catalogue) point at them."""
    with ProcessTree(tmp_path / "logs") as tree:
        address = start_store(tree)
        settings = {"catalog_url": catalog_url(tmp_path), "fallback_dir": tmp_path / "fallback"}  # the producers'
        with environment(**store_overrides(address), **settings):
            _start_producers(tree, tmp_path, "--store", address)
            yield tree


def _session(tmp_path: Path, **kw: Any) -> SessionParams:
    values = {"nodegroups_per_node": 1, "output_dir": str(tmp_path / "counted"), "archive_dir": str(tmp_path / "a")}
    return session_params(**{**values, **kw})


class Session:
    """A streaming session flow run in a thread: ``with Session(params) as s:`` ... ``s.result``."""

    def __init__(self, params: SessionParams) -> None:
        self.params = params
        self.result: dict[str, Any] = {}
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        from stemstream.flows import streaming_session

        try:
            self.result.update(streaming_session(self.params))
        except BaseException as exc:
            self.result["error"] = exc

    def __enter__(self) -> Session:
        from stemstream.store import Registry, StoreClient

        self.thread.start()
        with StoreClient.from_settings(timeout=10) as client:
            wait_until(lambda: "error" in self.result or client.get(keys.session(self.params.uid)), 180, "the session")
            Registry(client).wait_for_members("nodegroup", self.params.n_nodegroups, status="ready", timeout=30)
        return self

    def __exit__(self, *exc: object) -> None:
        from stemstream.store import StoreClient

        with StoreClient.from_settings(timeout=10) as client:
            client.set(keys.session_stop(self.params.uid), True)
        self.thread.join(120)
        assert not self.thread.is_alive()


def _request(n: int, shape: tuple[int, int] = SHAPE) -> None:
    from stemstream.plane.requests import request_scan
    from stemstream.store import StoreClient

    with StoreClient.from_settings(timeout=10) as client:
        request_scan(client, n, shape, seed=n)


def _row(catalog: Catalog, n: int) -> Any:
    try:
        return catalog.get_scan(n)
    except Exception:
        return None


def _wait_archived(catalog: Catalog, n: int, timeout: float = 180) -> Any:
    wait_until(lambda: getattr(_row(catalog, n), "status", None) == "archived", timeout, f"scan {n} archived")
    return catalog.get_scan(n)


# -- the site's counting settings on every path


def test_the_site_counting_settings_reach_the_nodegroups_on_their_command_line(tmp_path, plane):
    # clean_env: the NodeGroups get nothing of this environment (as on a batch node); only their command line.
    with environment(**SITE):
        params = _session(tmp_path, minutes=5, allocator_options={"clean_env": True})
    catalog = Catalog(catalog_url(tmp_path))
    with Session(params) as session:
        _request(3)
        row = _wait_archived(catalog, 3)
    catalog.close()
    assert row.route == "stream" and session.result["scans"] == [3]
    assert_counted_with_site_settings(Path(row.counted_path))


def test_the_site_counting_settings_reach_the_fallback_counter(tmp_path, plane):
    from stemstream.flows import count_fallback_scan
    from stemstream.store import StoreClient

    _request(4)  # no NodeGroups: to disk
    with StoreClient.from_settings(timeout=10) as client:
        key = keys.scan(4)
        client.wait_for(lambda items: (items.get(key) or {}).get("status") == "on_disk", prefix=key, timeout=60)
    with environment(**SITE):
        row = count_fallback_scan(4, session=_session(tmp_path))
    assert row["route"] == "disk" and row["status"] == "archived"
    assert_counted_with_site_settings(Path(row["counted_path"]))


# -- the store's primary dies


def _binary_star(tree: ProcessTree) -> tuple[str, str]:
    """A primary and a backup store server (Binary Star), both answering; their addresses."""
    from stemstream.store import StoreClient

    primary_port = free_port_block(4)
    backup_port = free_port_block(4)
    while abs(backup_port - primary_port) < 4:
        backup_port = free_port_block(4)
    primary, backup = f"tcp://127.0.0.1:{primary_port}", f"tcp://127.0.0.1:{backup_port}"
    common = ["--heartbeat", "0.3", "--stats-interval", "0.3"]
    tree.start("store-primary", "store", "serve", "--port", primary_port, "--primary-with-backup", backup, *common)
    tree.start("store-backup", "store", "serve", "--port", backup_port, "--backup-of", primary, *common)
    deadline = time.monotonic() + 30
    while True:  # the backup follows the primary once its stats come through the primary
        tree.check_alive("store-primary", "store-backup")
        try:
            with StoreClient(primary, backup=backup, timeout=2.0) as client:
                client.wait_for(lambda items: "/store/backup/stats" in items, prefix="/store/", timeout=5)
            return primary, backup
        except Exception:
            if time.monotonic() > deadline:
                raise


def test_a_session_carries_on_when_the_store_primary_is_killed(tmp_path):
    with ProcessTree(tmp_path / "logs") as tree:
        primary, backup = _binary_star(tree)
        with environment(**store_overrides(primary, backup), catalog_url=catalog_url(tmp_path)):
            _start_producers(tree, tmp_path, "--store", primary, "--store-backup", backup)
            catalog = Catalog(catalog_url(tmp_path))
            with Session(_session(tmp_path, minutes=5)) as session:
                _request(1)
                _wait_archived(catalog, 1)
                os.killpg(tree.procs["store-primary"].pid, signal.SIGKILL)
                tree.procs["store-primary"].wait(10)
                _request(2)  # through the backup
                row = _wait_archived(catalog, 2)
            catalog.close()
    assert "error" not in session.result, session.result.get("error")
    assert session.result["scans"] == [1, 2] and session.result["status"] == "ended"
    assert row.route == "stream" and row.frames == SHAPE[0] * SHAPE[1]


# -- a slow archive holds nothing up


class SlowGlobus:
    """Globus at its HTTP contract, where the transfer of one scan stays ACTIVE until :meth:`release`.

    Each submitted transfer gets its own task id (from the scan number in its label); every other transfer
    succeeds at its first poll."""

    TRANSFER = "https://transfer.api.globus.org/v0.10/transfer"
    TASK = re.compile(r"https://transfer\.api\.globus\.org/v0\.10/task/([0-9a-f-]+)$")

    def __init__(self, slow_scan: int) -> None:
        self.slow_scan = slow_scan
        self.first_poll: dict[int, float] = {}
        self.released = threading.Event()
        load_response(globus_sdk.ConfidentialAppAuthClient.oauth2_client_credentials_tokens)
        load_response(globus_sdk.TransferClient.get_submission_id)
        responses.add_callback(responses.POST, self.TRANSFER, callback=self._submit, content_type="application/json")
        responses.add_callback(responses.GET, self.TASK, callback=self._task, content_type="application/json")

    def release(self) -> None:
        self.released.set()

    def _submit(self, request: Any) -> tuple[int, dict[str, str], str]:
        scan = int(re.search(r"scan (\d+)", json.loads(request.body)["label"]).group(1))
        task_id = f"00000000-0000-4000-8000-{scan:012d}"
        return 202, {}, json.dumps({"DATA_TYPE": "transfer_result", "code": "Accepted", "task_id": task_id})

    def _task(self, request: Any) -> tuple[int, dict[str, str], str]:
        scan = int(self.TASK.match(request.url).group(1)[-12:])
        self.first_poll.setdefault(scan, time.time())
        done = scan != self.slow_scan or self.released.is_set()
        doc = {"DATA_TYPE": "task", "status": "SUCCEEDED" if done else "ACTIVE", "nice_status": None,
               "fatal_error": None, "bytes_transferred": 1000 if done else 0}  # fmt: skip
        return 200, {}, json.dumps(doc)


def _live_progress(scan: int) -> list[float]:
    """When the scan's progress artifact was made and last updated, in place (unix seconds)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        key = ArtifactFilterKey(any_=[f"scan-{scan}-progress"])
        found = client.read_artifacts(artifact_filter=ArtifactFilter(key=key))
    return sorted(t.timestamp() for a in found for t in (a.created, a.updated) if t is not None)


def test_a_slow_archive_holds_up_neither_the_preview_nor_supervision(tmp_path, plane, mocked_responses):
    from stemstream.store import Registry, StoreClient

    globus = SlowGlobus(slow_scan=1)
    options = {"source_endpoint": SRC_EP, "destination_endpoint": DST_EP, "destination_path": "/ncem", "poll_s": 0.05}
    credentials = {"globus_client_id": "11111111-2222-4333-8444-555555555555", "globus_client_secret": "s3cr3t"}
    params = _session(tmp_path, minutes=5, archive="globus", archive_options=options)
    catalog = Catalog(catalog_url(tmp_path))
    try:
        with (
            environment(**credentials),  # the site's: read where the scans are archived
            Session(params) as session,
            StoreClient.from_settings(timeout=10) as client,
        ):
            _request(1)
            wait_until(lambda: 1 in globus.first_poll, 120, "scan 1's transfer submitted")
            blocked = globus.first_poll[1]
            # While scan 1 archives: scan 2 streams (its progress is shown), is counted, archived, catalogued.
            _request(2, (32, 32))
            _wait_archived(catalog, 2, timeout=120)
            # ... and the aggregator the session supervises is restarted when it dies.
            registry = Registry(client)
            (aggregator,) = registry.members("aggregator", status="ready")
            os.kill(aggregator.pid, signal.SIGKILL)
            wait_until(
                lambda: any(r.pid != aggregator.pid for r in registry.members("aggregator", status="ready")),
                60, "the aggregator restarted",
            )  # fmt: skip
            restarted = time.time()
            assert _row(catalog, 1).status == "archiving"  # scan 1's transfer is still going
            released = time.time()
            globus.release()
            _wait_archived(catalog, 1, timeout=60)
    finally:
        globus.release()
        catalog.close()
    assert "error" not in session.result, session.result.get("error")
    shown = [t for t in _live_progress(2) if blocked < t < released]
    assert shown, f"no progress of scan 2 shown while scan 1 archived ({blocked:.1f} .. {released:.1f})"
    assert blocked < restarted < released
    assert session.result["scans"] == [1, 2]

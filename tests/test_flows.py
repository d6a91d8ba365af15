"""The Prefect flows, run for real on Prefect's test harness (a local server on SQLite), against real
store, producer, aggregator and NodeGroup processes. Only what cannot be reached from here is mocked, at
its HTTP contract: the Superfacility API (respx) and Globus (globus_sdk.testing)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import globus_sdk
import numpy as np
import pytest
import responses
from globus_sdk.testing import load_response

from globus_mock import DST_EP, SRC_EP
from plane_helpers import ProcessTree, free_port_block, start_store, store_client, wait_until
from session_fixtures import catalog_url, start_in_thread
from sfapi_mock import CLIENT_ID
from stemstream.catalog import Catalog
from stemstream.config import environment, store_overrides
from stemstream.errors import AllocationError, ArchiveError, ConfigError, StoreUnavailable
from stemstream.scans import keys
from stemstream.sessions import SessionParams, session_params

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_server")]
SHAPE = (12, 12)


@pytest.fixture
def plane(tmp_path: Path):
    """A store and four simulated sector producers (the microscope side); yields (store address, tree).
    The flows find the store (and the catalogue) in the settings."""
    with ProcessTree(tmp_path / "logs") as tree:
        address = start_store(tree)
        for m in range(4):
            tree.start(f"producer-{m}", "producer", "--store", address, "--sector", m, "--threads", 2,
                       "--fallback-dir", tmp_path / "fallback")  # fmt: skip
        with store_client(address) as client:
            from stemstream.store import Registry

            Registry(client).wait_for_members("producer", 4, status="ready", timeout=60)
        # The fallback directory the producers write to: the flows count raw files only under it (wire.paths).
        fallback = tmp_path / "fallback"
        with environment(**store_overrides(address), catalog_url=catalog_url(tmp_path), fallback_dir=fallback):
            yield address, tree


def _session(tmp_path: Path, **kw: Any) -> SessionParams:
    values = {
        "nodegroups_per_node": 1,
        "output_dir": str(tmp_path / "counted"),
        "archive_dir": str(tmp_path / "archive"),
    }
    return session_params(**{**values, **kw})


def test_session_streams_scans_counted_archived_and_catalogued(tmp_path, plane):
    from stemstream.flows import multi_scan_experiment

    _store, _tree = plane
    table = multi_scan_experiment(
        n_scans=2,
        interval_s=0.5,
        scan_shape=SHAPE,
        session=_session(tmp_path, nodegroups_per_node=2),
        timeout_s=240,
    )
    assert [r["status"] for r in table] == ["archived", "archived"]
    catalog = Catalog(catalog_url(tmp_path))
    rows = catalog.list_scans()
    assert [r.scan_number for r in rows] == [1, 2]
    for row in rows:
        assert row.route == "stream" and row.frames == SHAPE[0] * SHAPE[1] and row.events > 0
        archived = Path(row.archive_location)
        assert archived.exists() and archived.read_bytes() == Path(row.counted_path).read_bytes()
        assert Path(row.preview_path).stat().st_size > 1000  # the picture
        assert row.turnaround_s is not None and 0 <= row.turnaround_s < 120
        assert row.session_id is not None
    sessions = catalog.list_sessions()
    assert len(sessions) == 1 and sessions[0].status == "ended"
    catalog.close()

    # (in a subprocess: Prefect's console log handler keeps the stream it first saw, so no capsys here)
    cli = [sys.executable, "-m", "stemstream.cli", "catalog", "--url", catalog_url(tmp_path), "list"]
    out = subprocess.run(cli, capture_output=True, text=True, check=True, timeout=60).stdout
    for row in rows:
        assert str(row.archive_location) in out or Path(row.archive_location).name in out


def test_a_killed_nodegroup_is_restarted_and_the_next_scan_is_counted(tmp_path, plane):
    from stemstream.flows import streaming_session
    from stemstream.plane.requests import request_scan
    from stemstream.store import Registry

    store, _tree = plane
    uid = "session-restart-test"

    thread, result = start_in_thread(lambda: streaming_session(_session(tmp_path, minutes=5, uid=uid)))
    with store_client(store) as client:
        registry = Registry(client)
        first = registry.wait_for_members("nodegroup", 1, status="ready", timeout=120)[0]
        os.kill(first.pid, signal.SIGKILL)

        def replaced() -> bool:
            return any(r.uid != first.uid for r in registry.members("nodegroup", status="ready"))

        wait_until(replaced, 120, "a new NodeGroup after the kill")
        wait_until(lambda: all(r.uid != first.uid for r in registry.members("nodegroup")), 30, "the dead record gone")
        request_scan(client, 5, SHAPE, seed=3)
        catalog = Catalog(catalog_url(tmp_path))
        wait_until(lambda: _status(catalog, 5) == "archived", 180, "scan 5 archived")
        catalog.close()
        client.set(keys.session_stop(uid), True)
    thread.join(120)
    assert result["restarts"] >= 1 and result["scans"] == [5]


def _status(catalog: Catalog, n: int) -> str | None:
    try:
        return catalog.get_scan(n).status
    except Exception:
        return None


def test_fallback_scan_is_counted_from_disk(tmp_path, plane):
    from stemstream.flows import count_fallback_scan
    from stemstream.plane.requests import request_scan

    store, _tree = plane
    with store_client(store) as client:  # no NodeGroups: the scan goes to disk
        request_scan(client, 9, SHAPE, seed=4)
        key = "/scans/9"
        client.wait_for(lambda items: (items.get(key) or {}).get("status") == "on_disk", prefix=key, timeout=60)
    row = count_fallback_scan(9, session=_session(tmp_path))
    assert row["route"] == "disk" and row["status"] == "archived" and row["frames"] == SHAPE[0] * SHAPE[1]
    assert len(row["raw_paths"]) == 4 and all(Path(p).exists() for p in row["raw_paths"])
    assert Path(row["archive_location"]).exists()


# -- the Superfacility API, at its HTTP contract


def test_sfapi_session_submit_running_completed(tmp_path, sfapi, rsa_key):
    from stemstream.flows import streaming_session

    fake, router = sfapi
    fake.squeue = [{"jobid": "4242", "state": "PENDING", "reason": "Priority"}]
    options = {"make_output_dir": False}
    with ProcessTree(tmp_path / "logs") as tree, _sfapi_site(tmp_path, start_store(tree), rsa_key) as store:
        params = _session(
            tmp_path, machine="perlmutter", backend="sfapi", aggregator="external", minutes=0.1,
            allocator_options=options,
        )  # fmt: skip

        thread, result = start_in_thread(lambda: streaming_session(params))
        wait_until(lambda: router["submit"].called, 60, "the job submitted through the API")
        script = parse_qs(router["submit"].calls.last.request.content.decode())["job"][0]
        assert "stemstream nodegroup" in script and f"--store {store}" in script
        time.sleep(1.0)  # still pending: the session waits
        assert thread.is_alive()
        # The job starts "at NERSC": its NodeGroup registers in the store, as the real one would.
        fake.squeue = [{"jobid": "4242", "state": "RUNNING", "reason": "None"}]
        tree.start("nodegroup", "nodegroup", "--store", store, "--consumer", "null")
        thread.join(120)
        assert not thread.is_alive() and result["status"] == "ended"
    assert router["cancel"].called  # released at the end of the session
    catalog = Catalog(catalog_url(tmp_path))
    assert catalog.list_sessions()[0].machine == "perlmutter"
    catalog.close()


def test_sfapi_session_with_a_failed_job_says_so(tmp_path, sfapi, rsa_key):
    from stemstream.flows import streaming_session

    fake, _router = sfapi
    fake.squeue = [{"jobid": "4242", "state": "FAILED", "reason": "NonZeroExitCode"}]
    options = {"make_output_dir": False}
    kw = {"machine": "perlmutter", "backend": "sfapi", "aggregator": "external", "minutes": 1}
    with (
        ProcessTree(tmp_path / "logs") as tree,
        _sfapi_site(tmp_path, start_store(tree), rsa_key),
        pytest.raises(AllocationError) as info,
    ):
        streaming_session(_session(tmp_path, allocator_options=options, **kw))
    message = str(info.value)
    assert "\n" not in message, repr(message)
    assert "4242" in message and "FAILED" in message and "log" in message
    catalog = Catalog(catalog_url(tmp_path))
    assert catalog.list_sessions()[0].status == "failed"
    catalog.close()


@contextlib.contextmanager
def _sfapi_site(tmp_path: Path, store: str, rsa_key: Any) -> Iterator[str]:
    """The settings of a site with the Superfacility API: its store, catalogue and client credentials."""
    site = {"catalog_url": catalog_url(tmp_path), "sfapi_client_id": CLIENT_ID, "sfapi_secret": rsa_key[0]}
    with environment(**store_overrides(store), **site):
        yield store


# -- Globus, at its HTTP contract


@pytest.fixture
def counted_scan(tmp_path: Path):
    """A store holding a counted scan 77 (its file written by our writer) for process_scan."""
    from stemstream.counting import Thresholds, write_counted

    rng = np.random.default_rng(0)
    events = [np.sort(rng.choice(576 * 576, 20, replace=False)).astype(np.uint32) for _ in range(16)]
    path = write_counted(
        tmp_path / "counted" / "scan_77_counted.h5",
        events,
        scan_shape=(4, 4),
        metadata={"thresholds": Thresholds(20.0, 60.0, 0.0, 4.0, 4.0, 10.0, 40), "timings": {"last_frame": 1.0}},
    )
    with ProcessTree(tmp_path / "logs") as tree:
        store = start_store(tree)
        with store_client(store) as client:
            client.set(keys.counted(77), {"status": "counted", "path": str(path), "seconds_after_last_frame": 0.8})
            client.wait_for(lambda items: keys.counted(77) in items, prefix=keys.counted(77), timeout=10)
        with environment(**store_overrides(store), catalog_url=catalog_url(tmp_path), **GLOBUS_CREDENTIALS):
            yield store, path


# The confidential app's credentials: settings, never session parameters.
GLOBUS_CREDENTIALS = {"globus_client_id": "11111111-2222-4333-8444-555555555555", "globus_client_secret": "s3cr3t"}


def _globus_options() -> dict[str, Any]:
    return {
        "source_endpoint": SRC_EP,
        "destination_endpoint": DST_EP,
        "destination_path": "/archive/ncem/",
        "poll_s": 0.01,
    }


def _load_globus(case: str) -> None:
    load_response(globus_sdk.ConfidentialAppAuthClient.oauth2_client_credentials_tokens)
    load_response(globus_sdk.TransferClient.get_submission_id)
    load_response(globus_sdk.TransferClient.submit_transfer)
    load_response("stemstream.get_task", case=case)


def test_process_scan_archives_through_globus(tmp_path, counted_scan, mocked_responses):
    from stemstream.flows import process_scan

    _store, path = counted_scan
    _load_globus("succeeds")
    row = process_scan(77, session=_session(tmp_path, archive="globus", archive_options=_globus_options()))
    assert row["status"] == "archived"
    assert row["archive_location"] == f"globus://{DST_EP}/archive/ncem/{path.name}"
    assert any(c.request.url.endswith("/v0.10/transfer") for c in responses.calls)
    assert row["turnaround_s"] == pytest.approx(0.8)


def test_process_scan_with_a_failed_transfer_marks_the_scan_and_keeps_the_file(
    tmp_path, counted_scan, mocked_responses
):
    from stemstream.flows import process_scan

    _store, path = counted_scan
    before = path.read_bytes()
    _load_globus("fails")
    with pytest.raises(ArchiveError) as info:
        process_scan(77, session=_session(tmp_path, archive="globus", archive_options=_globus_options()))
    assert "\n" not in str(info.value) and "FAILED" in str(info.value) and str(path) in str(info.value)
    assert path.read_bytes() == before
    catalog = Catalog(catalog_url(tmp_path))
    row = catalog.get_scan(77)
    assert row.status == "archive_failed" and "FAILED" in row.error and row.counted_path == str(path)
    catalog.close()


# -- bad input: one-line errors that say what to do


@pytest.mark.parametrize(
    ("kw", "error", "words"),
    [
        ({"minutes": 0}, ConfigError, ["minutes", "session length"]),
        ({"background_n_sigma": 50}, ConfigError, ["background_n_sigma", "4 or 4.5"]),
        ({"machine": "nowhere"}, ConfigError, ["nowhere", "machine", "STEMSTREAM_SITES"]),
        ({"store": "tcp://127.0.0.1:9"}, StoreUnavailable, ["stemstream store serve", "STEMSTREAM_STORE_HOST"]),
    ],
)
def test_bad_session_input_is_one_line(tmp_path, kw, error, words):
    from stemstream.flows import streaming_session

    kw = dict(kw)
    if "background_n_sigma" in kw:  # a counting parameter
        kw["counting"] = {"background_n_sigma": kw.pop("background_n_sigma")}
    # A store that does not answer: a free port (the settings refuse port 9).
    store = f"tcp://127.0.0.1:{free_port_block(3)}" if kw.pop("store", None) else None
    with environment(**store_overrides(store), catalog_url=catalog_url(tmp_path)), pytest.raises(error) as info:
        streaming_session(_session(tmp_path, **kw))
    message = str(info.value)
    assert "\n" not in message
    for word in words:
        assert word in message


def test_deployments_register_with_parameters_and_a_schedule():
    import sys as _sys

    from prefect.client.orchestration import get_client

    _sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "deployments"))
    import serve

    ids = [d.apply() for d in serve.deployments()]
    with get_client(sync_client=True) as client:
        found = {f"{client.read_flow(d.flow_id).name}/{d.name}": d for d in map(client.read_deployment, ids)}
    assert set(found) == {
        "streaming-session/local",
        "streaming-session/perlmutter",
        "process-scan/on-demand",
        "count-fallback-scan/on-demand",
        "multi-scan-experiment/stability-series",
    }
    perlmutter = found["streaming-session/perlmutter"]
    assert perlmutter.parameters["session"]["machine"] == "perlmutter"
    # The form the UI renders: the microscopist's fields only (the infrastructure is the site's).
    form = perlmutter.parameter_openapi_schema["definitions"]["SessionParams"]["properties"]
    assert set(form) == {"machine", "minutes", "n_nodes", "nodegroups_per_node", "counting", "notes", "uid"}
    assert all(f.get("title") and f.get("description") for f in form.values())
    series = found["multi-scan-experiment/stability-series"]
    assert series.parameters["n_scans"] == 60 and series.schedules and series.schedules[0].schedule.cron

"""Analyses live, with real processes: store, aggregator, 4 producers and a counting job of 2 MPI ranks
(NodeGroups) that runs the built-ins and a plug-in from a package of its own (tests/data/plugin, on the
ranks' PYTHONPATH: its dist-info declares the entry point) on every counted batch, merges the ranks'
partials on rank 0 and writes them into the counted file. The file's results must equal stempy's sparse
functions on that same file and what ``stemstream analyse`` computes offline from it; a detector change
posted to the live view in the middle of a scan must apply to that scan (recomputed from kept events) and
be recorded with it.
"""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.request
from pathlib import Path

import h5py
import numpy as np
import pytest

from plane_helpers import ProcessTree, free_port_block, start_store, store_client
from stemstream.scans import keys

PLUGIN = Path(__file__).parent / "data" / "plugin"
ANALYSES = "sum,virtual,com,radial,occupancy"
PARAMS = {"radial": {"per_position": True}, "occupancy": {"busy": 25}}
SEED = 5
LOSS = 0.004

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not os.path.exists(Path(sys.executable).parent / "mpiexec"), reason="no mpiexec in the venv"),
]


def get_json(url: str, body: dict | None = None) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


class Site:
    """The running processes, the store client and the live view's address."""

    def __init__(self, tree: ProcessTree, client, out: Path, view: str) -> None:
        self.tree, self.client, self.out, self.view = tree, client, out, view

    def scan(self, number: int, shape: tuple[int, int], **extra) -> None:
        from stemstream.plane.requests import request_scan

        request_scan(self.client, number, shape, seed=SEED, **extra)

    def counted(self, number: int, timeout: float = 240) -> dict:
        key = keys.counted(number)
        record = self.client.wait_for(lambda items: key in items, prefix=key, timeout=timeout)[key]
        self.tree.check_alive()
        assert record["status"] == "counted", record
        return record


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    from stemstream.store import Registry

    tmp = tmp_path_factory.mktemp("live")
    out = tmp / "counted"
    port = free_port_block(40)  # the view's, and every process's metrics port
    env = {
        "STEMSTREAM_ANALYSES": ANALYSES,
        "STEMSTREAM_ANALYSIS_PARAMS": json.dumps(PARAMS),
        "STEMSTREAM_PORT_RANGE": f"{port}-{port + 39}",
        "PYTHONPATH": str(PLUGIN),
    }
    with ProcessTree(tmp / "logs", env=env) as tree:
        address = start_store(tree)
        tree.start("aggregator", "aggregator", "--store", address)
        args = ["nodegroup", "--store", address, "--consumer", "count", "--count", 1, "--uid", "ng"]
        args += ["--output-dir", out, "--engine", "cpu"]
        mpiexec = Path(sys.executable).parent / "mpiexec"
        tree.start_argv(
            "nodegroups", [str(mpiexec), "-n", "2", sys.executable, "-m", "stemstream.cli", *map(str, args)]
        )
        with store_client(address) as client:
            registry = Registry(client)
            registry.wait_for_members("aggregator", 1, status="ready", timeout=60)
            groups = registry.wait_for_members("nodegroup", 2, status="ready", timeout=120)
            views = [g.extra["view"] for g in groups if g.extra.get("view")]
            assert len(views) == 1 and groups[0].extra["view"] == views[0], [g.extra for g in groups]  # rank 0's
            for m in range(4):
                tree.start(f"producer-{m}", "producer", "--store", address, "--sector", m, "--threads", 2)
            registry.wait_for_members("producer", 4, status="ready", timeout=60)
            yield Site(tree, client, out, views[0])


def _offline(path: str) -> dict:
    """``stemstream analyse`` in this process, the plug-in's package on sys.path as on the ranks'."""
    from stemstream.analyses import analyse_events, specs_for
    from stemstream.analyses.files import load_events

    sys.path.insert(0, str(PLUGIN))
    try:
        events, scan = load_events(path)
        return analyse_events(specs_for(ANALYSES.split(","), PARAMS), events, scan)
    finally:
        sys.path.remove(str(PLUGIN))
        sys.modules.pop("stemstream_testplugin", None)


def test_live_results_equal_stempy_and_the_offline_run_on_the_same_file(site):
    import stempy.image as si
    import stempy.io as sio

    from stemstream.analyses.files import png_dir, read_results
    from stemstream.scans.records import AnalysesRecord

    shape = (24, 24)
    site.scan(3, shape, loss_rate=LOSS, electrons_per_frame=4)  # ~2 % of the frames without events
    record = site.counted(3)
    path = record["path"]
    stored, history = read_results(path)
    assert set(stored) == {"sum", "virtual", "com", "radial", "occupancy"}
    assert history == []
    assert {n: o.error for n, o in stored.items()} == dict.fromkeys(stored)
    # Partials of both ranks were merged (the centre may have been refined once more on the whole pattern).
    assert {n: stored[n].how for n in ("sum", "com", "occupancy")} == dict.fromkeys(
        ("sum", "com", "occupancy"), "merged"
    )
    assert stored["virtual"].how in ("merged", "recomputed")

    # Equal to stempy on the same file.
    sparse = sio.load_electron_counts(path)
    assert np.array_equal(stored["sum"].results["pattern"], si.calculate_sum_sparse(sparse.data, sparse.frame_shape))
    row, col = stored["virtual"].params["center"]
    assert np.array_equal(stored["virtual"].results["bf"], si.virtual_darkfield(sparse, col, row, 60.0))
    assert np.array_equal(stored["com"].results["com"], si.com_sparse(sparse), equal_nan=True)
    assert np.array_equal(stored["radial"].results["per_position"], si.radial_sum_sparse(sparse, [row, col]))
    # Some frames had no events: stempy's NaN handling was exercised.
    assert any(len(e) == 0 for e in np.asarray(sparse.data).ravel())

    # Equal to the offline run, every analysis (the plug-in too), parameters included.
    offline = _offline(path)
    for name, outcome in offline.items():
        assert stored[name].params == outcome.params, name
        for key, value in outcome.results.items():
            assert np.array_equal(stored[name].results[key], value, equal_nan=True), (name, key)
    counts = np.array([len(e) for e in np.asarray(sparse.data).ravel()]).reshape(shape)
    assert np.array_equal(stored["occupancy"].results["events"], counts)

    # The scan's analyses record (published once the PNGs beside the file are written, just after the counted
    # record), the PNGs, the view's strip.
    key = keys.analyses(3)
    rec = site.client.wait_for(lambda it: it.get(key, {}).get("status") == "counted", prefix=key, timeout=10)
    analyses = AnalysesRecord.from_record(rec[key])
    assert analyses.params["virtual"] == stored["virtual"].params
    assert analyses.pngs == str(png_dir(path)) and (png_dir(path) / "virtual.bf.png").stat().st_size > 0
    state = get_json(site.view + "api/state?scan=3")
    assert [s["status"] for s in state["strip"] if s["scan"] == 3] == ["counted"]
    assert state["view"]["totals"]["virtual.bf"] == stored["virtual"].results["bf"].sum()


def test_a_detector_change_on_the_view_applies_to_the_scan_streaming_and_is_recorded(site):
    import stempy.image as si
    import stempy.io as sio

    from stemstream.analyses.files import read_results

    shape = (64, 64)
    site.scan(4, shape, loss_rate=0.0)
    deadline = time.monotonic() + 120
    while True:  # wait until the scan is well under way, then change the detectors on the page
        state = get_json(site.view + "api/state")
        progress = state.get("progress") or {}
        if progress.get("scan") == 4 and progress.get("counted", 0) >= 0.15 * progress["frames"]:
            break
        assert time.monotonic() < deadline, state
        time.sleep(0.2)
    assert state["view"]["detectors"] == {"bf": [0.0, 60.0], "adf": [70.0, 250.0]}
    new = {"center": None, "detectors": {"bf": [0, 30], "adf": [70, 250], "ring": [100, 140]}, "scan": 4}
    answer = get_json(site.view + "api/settings", new)
    assert answer["ok"] and answer["settings"]["detectors"]["bf"] == [0.0, 30.0]
    # The view shows the new detectors while the scan still streams (recomputed from kept events).
    while True:
        state = get_json(site.view + "api/state?scan=4")
        if state["view"]["detectors"].get("ring") == [100.0, 140.0]:
            break
        assert time.monotonic() < deadline, state["view"]["detectors"]
        time.sleep(0.1)
    streaming_then = state["view"]["status"] == "streaming"
    record = site.counted(4)
    assert streaming_then, "the scan was written before the change showed: make it longer"
    stored, history = read_results(record["path"])
    assert [h["settings"]["detectors"] for h in history] == [
        {"bf": [0.0, 30.0], "adf": [70.0, 250.0], "ring": [100.0, 140.0]}
    ]
    virtual = stored["virtual"]
    assert virtual.params["detectors"]["bf"] == [0.0, 30.0] and virtual.params["center_auto"] is True
    sparse = sio.load_electron_counts(record["path"])
    row, col = virtual.params["center"]
    assert np.array_equal(virtual.results["bf"], si.virtual_darkfield(sparse, col, row, 30.0))
    ring = si.virtual_darkfield(sparse, col, row, 140.0).astype(np.int64) - si.virtual_darkfield(sparse, col, row, 100)
    assert np.array_equal(virtual.results["ring"], ring)
    with h5py.File(record["path"]) as f:
        assert json.loads(f["analyses"].attrs["settings_history"])[0]["source"] == "page"


def test_the_counting_job_logged_no_error(site):
    log = site.tree.log("nodegroups")
    problems = [line for line in log.splitlines() if "Traceback" in line or " ERROR " in line]
    assert not problems, "\n".join(problems[:20])
    assert "detector settings {'center': None, 'detectors': {'bf': [0.0, 30.0]" in log  # the page's change

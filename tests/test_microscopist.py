"""The microscopist's session on Prefect's test harness, against real store, producer, aggregator and NodeGroup
processes: a session with a dark reference and notes; the DAQ's metadata on the scan request. The counted file
must be stempy's count with that dark, frame by frame, and carry the metadata; the catalog row must have the
notes, the metadata and a thumbnail; the session's scan list artifact must list the scan. A scan that lands
on disk gets the same metadata and notes through the fallback counter."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest

from plane_helpers import ProcessTree, start_store, store_client, wait_until
from session_fixtures import catalog_url, start_in_thread
from stemstream.catalog import Catalog
from stemstream.config import environment, store_overrides
from stemstream.scans import keys
from stemstream.sessions import SessionParams, session_params

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_server")]
SHAPE = (12, 12)
METADATA = {"beam_energy_kev": 300.0, "step_size_nm": 0.25, "camera_length_mm": 115, "sample": "SrTiO3 [001]"}
NOTES = "SrTiO3 [001], 300 kV, 4 px probe"


@pytest.fixture
def plane(tmp_path: Path) -> Iterator[tuple[str, ProcessTree]]:
    """A store and four simulated producers; the settings (store, catalog) point at them."""
    from stemstream.store import Registry

    with ProcessTree(tmp_path / "logs") as tree:
        address = start_store(tree)
        for m in range(4):
            tree.start(f"producer-{m}", "producer", "--store", address, "--sector", m, "--threads", 2,
                       "--fallback-dir", tmp_path / "fallback")  # fmt: skip
        with store_client(address) as client:
            Registry(client).wait_for_members("producer", 4, status="ready", timeout=60)
        # dark references must lie under STEMSTREAM_DARK_DIR (the NodeGroups inherit this environment)
        # (and the flows count raw files only under the producers' fallback directory)
        site = {"catalog_url": catalog_url(tmp_path), "dark_dir": tmp_path, "fallback_dir": tmp_path / "fallback"}
        with environment(**store_overrides(address), **site):
            yield address, tree


def _session(tmp_path: Path, **kw: Any) -> SessionParams:
    values = {"nodegroups_per_node": 1, "output_dir": str(tmp_path / "counted"), "archive_dir": str(tmp_path / "a")}
    return session_params(**{**values, **kw})


def _sim(scan: int):
    from stemstream.sim import FourDCameraSim

    return FourDCameraSim(SHAPE, scan_number=scan, seed=scan, loss_rate=0.0)


def _dark_file(tmp_path: Path, scan: int) -> Path:
    # Below the simulator's dark level, so that stempy's uint16 subtraction never wraps (docs/counting.md).
    path = tmp_path / "dark.npy"
    np.save(path, _sim(scan).dark_reference() - 11.0)
    return path


def _stempy_events(scan: int, thresholds: Any, dark: np.ndarray) -> list[np.ndarray]:
    import stempy.image as simage

    sim = _sim(scan)
    events = []
    for f in range(SHAPE[0] * SHAPE[1]):
        counted = simage.electron_count_frame(
            sim.frame(f), darkreference=dark, background_threshold=thresholds.background, xray_threshold=thresholds.xray
        )
        events.append(np.asarray(counted.data[0, 0], dtype=np.uint32))
    return events


def _daq_attrs(path: str) -> dict[str, Any]:
    with h5py.File(path, "r") as f:
        group = f.get("stemstream/daq")
        return {k: (v.item() if hasattr(v, "item") else v) for k, v in group.attrs.items()} if group else {}


def _table_artifact(key: str) -> list[dict[str, Any]]:
    import json

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        found = client.read_latest_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))
    assert found, f"no artifact {key}"
    data = found[0].data
    return json.loads(data) if isinstance(data, str) else data


def test_a_session_with_a_dark_reference_and_notes_counts_as_stempy_and_lists_the_scan(tmp_path, plane):
    from stemstream.counting import read_counted
    from stemstream.flows import streaming_session
    from stemstream.plane.requests import request_scan
    from stemstream.tasks.scans import session_artifact_key

    store, _tree = plane
    scan, uid = 6, "session-microscopist"
    dark_path = _dark_file(tmp_path, scan)
    # the site's default engine (auto: the cpu engine here), the microscopist's dark reference
    params = _session(tmp_path, minutes=5, uid=uid, notes=NOTES, counting={"dark": dark_path.name})

    thread, result = start_in_thread(lambda: streaming_session(params))
    catalog = Catalog(catalog_url(tmp_path))
    with store_client(store) as client:
        from stemstream.store import Registry

        Registry(client).wait_for_members("nodegroup", 1, status="ready", timeout=180)
        # the session watches scans from when it serves (its record says so)
        wait_until(lambda: "error" in result or client.get(keys.session(uid)), 180, "the session serving")
        request_scan(client, scan, SHAPE, seed=scan, loss_rate=0.0, metadata=METADATA)

        def archived() -> bool:
            try:
                return catalog.get_scan(scan).status == "archived"
            except Exception:
                return "error" in result

        wait_until(archived, 180, f"scan {scan} archived")
        client.set(keys.session_stop(uid), True)
    thread.join(120)
    assert "error" not in result, result.get("error")
    row = catalog.get_scan(scan)
    catalog.close()

    # The file: stempy's count with that dark, frame by frame; the DAQ's metadata.
    sparse, meta = read_counted(row.counted_path)
    assert meta["counting_options"]["dark_reference"] and meta["dark"] == str(dark_path.resolve())
    assert meta["row_dark"] == "none" and meta["engine"] in ("cpu", "gpu")
    ours = [np.asarray(e, dtype=np.uint32) for e in np.asarray(sparse.data).ravel()]
    theirs = _stempy_events(scan, meta["thresholds"], np.load(dark_path))
    differ = [f for f, (a, b) in enumerate(zip(ours, theirs, strict=True)) if not np.array_equal(a, b)]
    assert not differ, f"frames {differ[:10]} differ from stempy's with the dark reference"
    assert sum(e.size for e in ours) > 0
    assert _daq_attrs(row.counted_path) == METADATA

    # The catalog row and the session's scan list.
    assert row.route == "stream" and row.notes == NOTES and row.metadata_ == METADATA
    thumbnail = Path(row.thumbnail_path).read_bytes()
    assert thumbnail.startswith(b"\x89PNG") and len(thumbnail) < 20_000
    table = _table_artifact(session_artifact_key(uid))
    assert [r["scan"] for r in table] == [scan]
    assert table[0]["notes"] == NOTES and "beam_energy_kev=300.0" in table[0]["metadata"]


def test_a_scan_on_disk_gets_the_metadata_and_the_notes(tmp_path, plane):
    from stemstream.flows import count_fallback_scan
    from stemstream.plane.requests import request_scan

    store, _tree = plane
    with store_client(store) as client:  # no NodeGroups: the scan goes to disk
        request_scan(client, 9, SHAPE, seed=4, metadata=METADATA)
        key = keys.scan(9)
        client.wait_for(lambda items: (items.get(key) or {}).get("status") == "on_disk", prefix=key, timeout=60)
    row = count_fallback_scan(9, session=_session(tmp_path, notes=NOTES))
    assert row["route"] == "disk" and row["status"] == "archived"
    assert row["notes"] == NOTES and row["metadata"] == METADATA
    assert _daq_attrs(row["counted_path"]) == METADATA
    assert Path(row["thumbnail_path"]).exists()

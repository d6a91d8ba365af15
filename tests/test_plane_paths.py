"""Paths from the store are never trusted (issue 17): a scan request's or plan's fallback directory outside the
producers' configured root is refused (counted, one line) and the raw files go to the producer's own directory;
a session archives no counted file outside its output directory and no raw file outside the fallback roots."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from plane_helpers import ProcessTree, start_store, store_client, wait_scan_status, wait_until
from stemstream.errors import CatalogError
from stemstream.wire.paths import UnsafePath, under_roots

SHAPE = (4, 4)


def test_under_roots_resolves_and_refuses(tmp_path: Path):
    root = tmp_path / "root"
    (root / "a").mkdir(parents=True)
    assert under_roots("a/b", [root], "x") == (root / "a" / "b").resolve()
    assert under_roots(root, [root], "x") == root.resolve()
    assert under_roots(str(root / "a" / ".." / "c"), [root], "x") == (root / "c").resolve()
    (root / "link").symlink_to(tmp_path)  # a symbolic link out of the root is followed, then refused
    for bad in ("../x", "a/../../x", str(tmp_path / "rootx"), "/etc", "link/evil", "a\x00b"):
        with pytest.raises(UnsafePath):
            under_roots(bad, [root], "x")
    with pytest.raises(UnsafePath, match="no root"):
        under_roots("a", [None], "x")


_SEGMENT = st.sampled_from(["..", ".", "a", "b", "link", "", "~", "root", "rootx", "é", "a..", "..a"])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(_SEGMENT, max_size=8), st.booleans())
def test_no_path_outside_the_root_is_ever_accepted(tmp_path: Path, segments: list[str], absolute: bool):
    root = tmp_path / "root"
    (root / "a").mkdir(parents=True, exist_ok=True)
    if not (root / "link").is_symlink():
        (root / "link").symlink_to(tmp_path)
    text = "/".join(segments)
    path = str(root) + "/" + text if absolute else text
    try:
        got = under_roots(path, [root], "x")
    except UnsafePath as exc:
        assert "\n" not in str(exc)
        return
    real_root = root.resolve()
    assert got == real_root or got.is_relative_to(real_root)
    assert Path(os.path.realpath(got)).is_relative_to(real_root)


@pytest.mark.slow
def test_attacker_chosen_fallback_dir_creates_nothing_outside_the_root(tmp_path: Path):
    from stemstream.plane.requests import request_scan
    from stemstream.store import Registry

    site = tmp_path / "site"
    fallback = site / "fallback"
    outside = tmp_path / "attacker_chosen"
    with ProcessTree(tmp_path / "logs") as tree:
        address = start_store(tree)
        tree.start("aggregator", "aggregator", "--store", address)
        for m in range(4):
            tree.start(
                f"producer-{m}", "producer", "--store", address, "--sector", m, "--threads", 1,
                "--fallback-dir", fallback,
            )  # fmt: skip
        with store_client(address) as client:
            registry = Registry(client)
            registry.wait_for_members("producer", 4, status="ready", timeout=60)
            # No NodeGroup: every scan lands on disk, where the request says if it may.
            request_scan(client, 1, SHAPE, fallback_dir=str(fallback / ".." / ".." / "attacker_chosen" / "deep"))
            r1 = wait_scan_status(client, 1, ("on_disk", "incomplete"), timeout=90)
            request_scan(client, 2, SHAPE, fallback_dir="../../attacker_chosen/deep/new/dir")
            r2 = wait_scan_status(client, 2, ("on_disk", "incomplete"), timeout=90)
            request_scan(client, 3, SHAPE, fallback_dir="beamtime-7")  # under the root: honoured
            r3 = wait_scan_status(client, 3, ("on_disk", "incomplete"), timeout=90)
            wait_until(
                lambda: sum(r.counts.get("refused_paths", 0) for r in registry.members("producer")) >= 2,
                30,
                "the leader counts the refused requests",
                tree,
            )
            tree.check_alive()

    assert not outside.exists()
    assert not (site / "attacker_chosen").exists()
    for record in (r1, r2):
        assert record["status"] == "on_disk" and record.get("fallback_dir") is None
        assert all(Path(p).parent == fallback.resolve() for p in record["fallback_paths"])
        assert len(record["fallback_paths"]) == 4
    assert r3["fallback_dir"] == str((fallback / "beamtime-7").resolve())
    assert all(Path(p).parent == (fallback / "beamtime-7").resolve() for p in r3["fallback_paths"])
    assert "refused" in (tmp_path / "logs" / "producer-0.log").read_text()


def test_a_forged_plan_directory_is_refused_by_every_producer(tmp_path: Path):
    from stemstream.plane.producer import Producer
    from stemstream.scans.records import ScanPlan

    own = tmp_path / "own"
    producer = Producer(None, 1, threads=1, uid="p1", fallback_dir=own)
    forged = ScanPlan(7, (2, 2), "disk", fallback_dir=str(tmp_path / "elsewhere"), raw_dir="x")
    assert producer.raw_directory(forged) == own / "x"  # its own directory (the acquisition's part kept)
    escape = ScanPlan(7, (2, 2), "disk", fallback_dir=str(own / "sub"), raw_dir="../../../out")
    assert producer.raw_directory(escape) == (own / "sub").resolve()
    fine = ScanPlan(7, (2, 2), "disk", fallback_dir=str(own / "sub"), raw_dir="acq-1")
    assert producer.raw_directory(fine) == (own / "sub").resolve() / "acq-1"
    assert producer.counts()["refused_paths"] == 2
    assert not (tmp_path / "elsewhere").exists()


def test_a_session_archives_no_path_outside_its_roots(tmp_path: Path):
    from stemstream.config import environment
    from stemstream.sessions.scanwork import counted_outcome, raw_paths_of

    out = tmp_path / "counted"
    record: dict[str, Any] = {"scan": 3, "status": "counted", "path": str(out / "scan_3.h5")}
    assert counted_outcome(record, out).path == str((out / "scan_3.h5").resolve())
    for bad in ("/etc/passwd", str(out / ".." / "secret.h5")):
        outcome = counted_outcome({**record, "path": bad}, out)
        assert outcome.path is None and "outside" in (outcome.error or "")
    with environment(fallback_dir=tmp_path / "fb", fallback_root=None) as settings:
        raw = str(tmp_path / "fb" / "data_scan1_module0.data")
        scan = {"scan": 1, "scan_shape": [2, 2], "route": "disk", "status": "on_disk", "fallback_paths": [raw]}
        with pytest.raises(CatalogError, match="gone"):  # under the root: accepted, then looked for
            raw_paths_of(1, scan, settings=settings)
        with pytest.raises(CatalogError, match="outside"):
            raw_paths_of(1, {**scan, "fallback_paths": ["/etc/shadow"]}, settings=settings)

"""``stemstream demo`` end to end, at a reduced size: a Prefect server, the store, producers, a session with
two NodeGroups under mpiexec, streamed scans and a disk-fallback scan, the summary table, exit code 0."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import h5py
import pytest

from stemstream.catalog import Catalog

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_runs_a_whole_session_and_prints_the_summary(tmp_path: Path):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    env.pop("PREFECT_API_URL", None)
    argv = [sys.executable, "-m", "stemstream.cli", "demo", "--dir", str(tmp_path / "demo"), "--scans", "2",
            "--scan-shape", "10", "10", "--interval", "0.5"]  # fmt: skip
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=420, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    table = [line.split() for line in out.splitlines() if line.split()[:1] in (["1"], ["2"], ["3"])]
    assert [row[:3] for row in table] == [["1", "stream", "archived"], ["2", "stream", "archived"],
                                          ["3", "disk", "archived"]]  # fmt: skip
    assert "Prefect UI" in out and "Where to look" in out
    # the default engine (no --engine given), and the median last-frame-to-file time of the streamed scans
    from stemstream.config import Settings

    assert f"counting engine: {Settings().engine}" in out
    median = next(line.split() for line in out.splitlines() if "median of the streamed scans" in line)
    assert median[-1].endswith("s") and float(median[-1][:-1]) >= 0
    catalog = Catalog(f"sqlite:///{tmp_path / 'demo' / 'catalog.sqlite'}")
    rows = catalog.list_scans()
    catalog.close()
    for row in rows:
        assert row.frames == 100 and Path(row.archive_location).exists() and Path(row.preview_path).exists()
        with h5py.File(row.counted_path) as f:
            assert f["electron_events/frames"].shape == (100,)
    assert {r.route for r in rows} == {"stream", "disk"}

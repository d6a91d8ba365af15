"""What a session's Prefect run shows while a scan streams, checked the way a person would: headless-Chromium
screenshots of the Prefect UI and of the live view it links to (``scripts/screenshot_preview.py``). The run
has one link artifact to the live view and one progress artifact per scan (updated in place), not a picture
card every second.

Needs Debian's ``chromium`` (``.ci/run`` installs it; skipped where it is missing)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("chromium") is None, reason="no chromium here (apt-get install chromium)")
def test_the_prefect_run_links_the_live_view_and_shows_progress(tmp_path: Path):
    import matplotlib.image

    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    env.pop("PREFECT_API_URL", None)
    argv = [sys.executable, str(ROOT / "scripts" / "screenshot_preview.py"), "--out", str(tmp_path)]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=480, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    out = done.stdout
    assert "live-preview-run.png: scan 1 with" in out and "(still streaming)" in out
    assert "progress artifact of scan 1 at the end: 100.0 %" in out
    assert "the run's page shows the link: True" in out
    assert "the view through the link shows scan 1: True" in out
    assert "('markdown', 'scan-1-live')" not in out  # no picture card per second any more
    # The live view, reached through the run's link: a page with the pattern and images, not a blank one.
    page = matplotlib.image.imread(tmp_path / "live-view-from-run.png")[..., :3]
    assert page.shape[0] > 500 and page.std() > 0.05
    bright = (page.max(axis=2) > 0.5).mean()
    assert 0.01 < bright < 0.6, f"{bright:.1%} bright: no pictures on the page?"
    run = matplotlib.image.imread(tmp_path / "live-preview-run.png")[..., :3]
    assert run.std() > 0.02
    assert np.isfinite(run).all()

"""The live preview, checked the way a person would: a headless Chromium screenshot of the Prefect UI
while a scan streams shows the growing virtual bright-field picture (``scripts/screenshot_preview.py``).

Needs Debian's ``chromium`` (skipped where it is missing, as on CI machines without it)."""

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
def test_screenshot_of_the_prefect_ui_shows_the_live_picture(tmp_path: Path):
    import matplotlib.image

    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    env.pop("PREFECT_API_URL", None)
    argv = [sys.executable, str(ROOT / "scripts" / "screenshot_preview.py"), "--out", str(tmp_path)]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=480, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "frames counted (still streaming)" in done.stdout
    card = matplotlib.image.imread(tmp_path / "live-preview-artifact.png")[..., :3]
    # The Prefect UI is dark; the picture (matplotlib's white figure) is the only large bright area.
    white = (card > 0.97).all(axis=2)
    assert white.mean() > 0.05, f"no picture on the artifact page ({white.mean():.1%} white)"
    rows = np.flatnonzero(white.any(axis=1))
    picture = card[rows.min() : rows.max() + 1]
    assert picture.std() > 0.1  # an image with contrast inside the white card, not a blank box

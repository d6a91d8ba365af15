"""CountingParams: one name, one default (the site's setting) and one range check per parameter, and the
settings reach what counts: the fallback counter and ``stemstream count`` write them into the counted file.
(The session path, through the NodeGroups' command line, is in test_flows.py.)"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from stemstream.cli import build_parser
from stemstream.commands.options import counting_from
from stemstream.config import Settings, environment, load_settings
from stemstream.counting import CountingParams, count_raw_files, counting_params, read_counted
from stemstream.errors import ConfigError, CountingError

ROOT = Path(__file__).resolve().parents[1]
# Not the defaults (4, 10, 40, stempy), so that a path that ignores a setting shows in the counted file.
SITE = {"background_n_sigma": 3.5, "xray_n_sigma": 12.0, "threshold_samples": 16, "engine": "cpu"}
SITE_ENV = {f"STEMSTREAM_{k.upper()}": str(v) for k, v in SITE.items()}


@pytest.fixture(scope="module")
def raw_scan(tmp_path_factory) -> Path:
    """The raw files of a 6x6 simulated scan (scan 3), written by ``stemstream sim write``."""
    out = tmp_path_factory.mktemp("raw")
    argv = [sys.executable, "-m", "stemstream.cli", "sim", "write", "--out", str(out), "--scan-shape", "6", "6",
            "--scan-number", "3", "--seed", "5"]  # fmt: skip
    subprocess.run(
        argv, check=True, capture_output=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT / "src")}
    )
    return out


def assert_counted_with_site_settings(path: Path) -> None:
    _sparse, meta = read_counted(path)
    thresholds = meta["thresholds"]
    assert meta["engine"] == SITE["engine"]
    assert thresholds.n_sigma_background == SITE["background_n_sigma"]
    assert thresholds.n_sigma_xray == SITE["xray_n_sigma"]
    assert thresholds.n_samples == SITE["threshold_samples"]


@pytest.mark.parametrize("name", ["background_n_sigma", "xray_n_sigma", "threshold_samples"])
def test_settings_and_params_check_each_range_alike(name):
    model = CountingParams.model_json_schema()["properties"][name]
    site = Settings.model_json_schema()["properties"][name]
    assert (model["minimum"], model["maximum"]) == (site["minimum"], site["maximum"])
    too_big = model["maximum"] * 2
    with pytest.raises(ConfigError, match=name) as info:
        counting_params(**{name: too_big})
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match=f"STEMSTREAM_{name.upper()}"):
        load_settings(**{name: too_big})


def test_each_default_is_the_site_setting():
    with environment(**SITE):
        params = CountingParams()
    assert params.model_dump(include=set(SITE)) == SITE
    assert CountingParams().model_dump(include=set(SITE)) != SITE  # read when made, not at import


def test_the_nodegroup_command_line_gives_back_the_same_params(tmp_path):
    np.save(tmp_path / "dark.npy", np.zeros((576, 576)))
    with environment(dark_dir=tmp_path):
        params = CountingParams(**SITE, dark=tmp_path / "dark.npy", gain=None)
        args = build_parser().parse_args(["nodegroup", "--consumer", "count", *params.argv()])
        assert counting_from(args) == params
    for flag in ("--background-n-sigma", "--xray-n-sigma", "--threshold-samples", "--engine", "--dark"):
        assert flag in params.argv()


def test_an_unreadable_reference_is_one_line(tmp_path):
    (tmp_path / "dark.npy").write_text("not numpy")
    with environment(dark_dir=tmp_path), pytest.raises(CountingError, match="cannot read the dark reference") as info:
        CountingParams(dark=tmp_path / "dark.npy").load_dark()
    assert "\n" not in str(info.value)


def test_the_fallback_counter_counts_with_the_site_settings(raw_scan, tmp_path):
    with environment(**SITE):
        path = count_raw_files(raw_scan, tmp_path / "c.h5", scan_number=3)
    assert_counted_with_site_settings(path)


def test_stemstream_count_counts_with_the_site_settings(raw_scan, tmp_path):
    out = tmp_path / "cli.h5"
    argv = [sys.executable, "-m", "stemstream.cli", "count", str(raw_scan), "--scan", "3", "--output", str(out),
            "--no-progress"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), **SITE_ENV}
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert_counted_with_site_settings(out)

    # A flag wins over its setting.
    flagged = tmp_path / "flagged.h5"
    argv[argv.index(str(out))] = str(flagged)
    done = subprocess.run([*argv, "--background-n-sigma", "5"], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert read_counted(flagged)[1]["thresholds"].n_sigma_background == 5.0

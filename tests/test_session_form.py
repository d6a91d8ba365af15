"""The session form as Prefect renders it (the flow's parameter schema), the DAQ's metadata checks, and the
scan list of ``stemstream count`` / ``catalog note`` (real processes, real files)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from plane_helpers import ROOT
from stemstream.config import environment
from stemstream.errors import ConfigError, ProtocolError
from stemstream.scans.records import ScanRequest, scan_metadata
from stemstream.sessions import session_params

# What a microscopist chooses; nothing else may be on the form.
FORM = {"machine", "minutes", "n_nodes", "nodegroups_per_node", "counting", "notes", "uid"}
INFRASTRUCTURE = ("store", "catalog_url", "qos", "constraint", "allocator_options", "archive_options", "backend")


def _form() -> dict[str, Any]:
    from prefect.utilities.callables import parameter_schema

    from stemstream.flows import streaming_session

    return parameter_schema(streaming_session.fn).model_dump()


def _walk(schema: Any) -> list[str]:
    """Every property name anywhere in ``schema``."""
    if isinstance(schema, dict):
        names = list(schema.get("properties", {})) if isinstance(schema.get("properties"), dict) else []
        return names + [n for v in schema.values() for n in _walk(v)]
    if isinstance(schema, list):
        return [n for v in schema for n in _walk(v)]
    return []


def test_the_form_holds_the_microscopists_fields_described_with_choices_and_bounds():
    with environment(background_n_sigma=4.5, sites='{"local": {}, "krios": {"backend": "slurm"}}'):
        schema = _form()
    session = schema["definitions"]["SessionParams"]
    fields = session["properties"]
    assert set(fields) == FORM
    for name, field in fields.items():
        assert field.get("title") and field.get("description"), name
    assert not set(_walk(schema)) & set(INFRASTRUCTURE), "infrastructure on the form"
    assert fields["machine"]["enum"] == ["krios", "local"]  # the site's machines, when the form is made
    assert fields["minutes"]["maximum"] == 720 and fields["minutes"]["exclusiveMinimum"] == 0
    assert fields["notes"]["maxLength"] == 2000
    assert fields["counting"]["default"]["background_n_sigma"] == 4.5  # the deployment's setting
    counting = schema["definitions"]["CountingParams"]["properties"]
    assert set(counting["engine"]["enum"]) >= {"stempy", "cpu", "auto"}
    assert counting["background_n_sigma"]["title"] and counting["background_n_sigma"]["maximum"] == 20


def test_the_infrastructure_comes_from_the_site_and_the_form_is_checked():
    with environment(sites='{"local": {}, "perlmutter": {"backend": "sfapi", "qos": "debug"}}'):
        params = session_params(machine="perlmutter", notes="x")
        assert (params.site.backend, params.site.qos, params.machine) == ("sfapi", "debug", "perlmutter")
        with pytest.raises(ConfigError, match=r"machine='nowhere'.*choose one of local, perlmutter") as info:
            session_params(machine="nowhere")
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match=r"minutes=1000.*720"):
        session_params(minutes=1000)
    with pytest.raises(ConfigError, match=r"notes="):
        session_params(notes="x" * 2001)


@pytest.mark.parametrize(
    ("metadata", "why"),
    [
        ({f"k{i}": i for i in range(33)}, "33 entries"),
        ({"1st": 1}, "is not 1-64"),
        ({"a" * 65: 1}, "is not 1-64"),
        ({"sample": "x" * 257}, "string of at most 256"),
        ({"energy": float("nan")}, "finite float"),
        ({"energy": 2**63}, "int64"),
        ({"nested": {"a": 1}}, "dict"),
        ({"none": None}, "NoneType"),
        (["a"], "expected a map"),
    ],
)
def test_scan_metadata_is_bounded(metadata, why):
    with pytest.raises(ProtocolError, match=why):
        scan_metadata(metadata)
    record = ScanRequest(1, (2, 2), requested_at=1.0).to_record() | {"metadata": metadata}
    with pytest.raises(ProtocolError):
        ScanRequest.from_record(record)  # the producers ignore the request (and log why)


def test_scan_metadata_round_trips():
    good = {"beam_energy_kev": 300.0, "camera_length_mm": 115, "sample": "SrTiO3", "tilted": False}
    assert scan_metadata(good) == good
    request = ScanRequest.from_record(ScanRequest(1, (2, 2), metadata=good, requested_at=1.0).to_record())
    assert request.metadata == good and "metadata" not in request.extra


def _cli(*args: Any, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    argv = [sys.executable, "-m", "stemstream.cli", *(str(a) for a in args)]
    return subprocess.run(argv, capture_output=True, text=True, env=env, cwd=cwd, timeout=120)


def test_stemstream_count_lands_in_the_catalog_with_notes_and_a_thumbnail(tmp_path):
    from stemstream.catalog import Catalog

    assert _cli("sim", "write", "--scan-shape", 6, 6, "--scan-number", 4, "--out", "raw", cwd=tmp_path).returncode == 0
    done = _cli("count", "raw", "--scan", 4, "--engine", "cpu", "--no-progress", "--notes", "first look", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    noted = _cli("catalog", "note", 4, "drift in the last rows", cwd=tmp_path)
    assert noted.returncode == 0, noted.stderr
    listed = _cli("catalog", "list", cwd=tmp_path)
    assert "first look" in listed.stdout and " cli " in listed.stdout
    catalog = Catalog(f"sqlite:///{tmp_path / 'data' / 'catalog.sqlite'}", create=False)
    row = catalog.get_scan(4)
    catalog.close()
    assert row.notes == "first look\ndrift in the last rows" and row.route == "cli" and row.frames == 36
    assert Path(tmp_path / row.counted_path).exists()
    thumbnail = (tmp_path / row.thumbnail_path).read_bytes()
    assert thumbnail.startswith(b"\x89PNG") and len(thumbnail) < 20_000
    unknown = _cli("catalog", "note", 5, "x", cwd=tmp_path)
    assert unknown.returncode == 1 and unknown.stderr.strip().splitlines()[-1].endswith("shows the known scans")

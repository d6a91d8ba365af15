"""The operator's files in infra/: the alert rules (``promtool check rules`` and their own unit tests), the
Prometheus configuration, the Grafana dashboard (the schema fields it uses, valid PromQL, only metrics the
exporter has) and the systemd units (``systemd-analyze verify``). promtool comes from Debian's ``prometheus``
package (``.ci/run`` installs it); a test skips, saying why, where a tool is missing."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from stemstream.metrics.catalog import BY_ROLE, SPECS

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
ALERTS = INFRA / "prometheus" / "alerts.yml"
DASHBOARD = INFRA / "grafana" / "stemstream.json"
UNITS = INFRA / "systemd"

# Metrics not of the catalogue that the files may use: Prometheus' own and prometheus_client's process metrics.
OTHER_METRICS = {"up", "process_cpu_seconds_total", "process_resident_memory_bytes", "process_open_fds"}
EXPORTED = {name for names in BY_ROLE.values() for name in names}


def _tool(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (Debian: apt-get install {package}; .ci/run does it as root)")
    return path


def _run(*argv: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=120, cwd=cwd)


_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless", "offset"}


def _metric_names(expr: str) -> set[str]:
    """The metric names an expression reads: identifiers left once strings, label matchers, grouping label
    lists and ranges are taken out, that are neither functions (followed by "(") nor keywords."""
    expr = re.sub(r'"[^"]*"', '""', expr)
    expr = re.sub(r"\{[^}]*\}", "", expr)
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    expr = re.sub(r"\[[^\]]*\]", "", expr)
    words = re.findall(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\b(?!\s*\()", expr)
    return {w for w in words if w not in _KEYWORDS and not re.fullmatch(r"\d+[smhdwy]?", w)}


def _alert_rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(ALERTS.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def _dashboard_targets() -> list[tuple[dict[str, Any], dict[str, Any]]]:
    dash = json.loads(DASHBOARD.read_text())
    return [(p, t) for p in dash["panels"] if p["type"] != "row" for t in p["targets"]]


# ------------------------------------------------------------------------------------------- alerts


def test_alert_rules_pass_promtool_and_their_unit_tests():
    promtool = _tool("promtool", "prometheus")
    checked = _run(promtool, "check", "rules", ALERTS)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = _run(promtool, "test", "rules", "alerts_test.yml", cwd=ALERTS.parent)
    assert tested.returncode == 0, tested.stdout + tested.stderr
    config = _run(promtool, "check", "config", "prometheus.yml", cwd=ALERTS.parent)
    assert config.returncode == 0, config.stdout + config.stderr


def test_alerts_cover_the_issue_and_use_only_exported_metrics():
    rules = {r["alert"]: r for r in _alert_rules()}
    for name in (
        "StemstreamScanStalled",
        "StemstreamNodeGroupGone",
        "StemstreamLossHigh",
        "StemstreamStoreWithoutBackup",
    ):
        assert name in rules, f"{name} missing"
    tested = set(re.findall(r"alertname: (\w+)", (ALERTS.parent / "alerts_test.yml").read_text()))
    assert tested == set(rules), f"alerts without a unit test: {set(rules) - tested}"
    for name, rule in rules.items():
        assert rule["labels"]["severity"] in ("page", "warning"), name
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], name
        used = _metric_names(rule["expr"])
        assert used, name
        unknown = {m for m in used if m not in EXPORTED and m not in OTHER_METRICS}
        assert not unknown, f"{name} queries {unknown}, which no stemstream process exports"


# ---------------------------------------------------------------------------------------- dashboard


def test_dashboard_json_has_the_grafana_fields_it_uses():
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] == "stemstream" and dash["title"] and isinstance(dash["schemaVersion"], int)
    assert dash["schemaVersion"] >= 36  # panels as a flat list with rows, datasource objects (Grafana 9+)
    assert dash["time"]["from"].startswith("now-")
    (variable,) = [v for v in dash["templating"]["list"] if v["type"] == "datasource"]
    assert variable["name"] == "datasource" and variable["query"] == "prometheus"
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)) and all(isinstance(i, int) for i in ids)
    cells: set[tuple[int, int]] = set()
    for p in dash["panels"]:
        assert p["type"] in ("row", "timeseries", "stat", "bargauge"), p["type"]
        assert p["title"], p
        g = p["gridPos"]
        assert all(isinstance(g[k], int) for k in "hwxy") and g["x"] >= 0 and g["x"] + g["w"] <= 24
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not mine & cells, f"panel {p['title']!r} overlaps another"
        cells |= mine
        if p["type"] == "row":
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert p["description"], p["title"]
        assert "unit" in p["fieldConfig"]["defaults"] and "overrides" in p["fieldConfig"]
        refs = [t["refId"] for t in p["targets"]]
        assert refs and len(refs) == len(set(refs)), p["title"]
        for t in p["targets"]:
            assert t["expr"].strip() and t["datasource"] == p["datasource"], p["title"]
    rows = [p["title"].lower() for p in dash["panels"] if p["type"] == "row"]
    for topic in ("throughput per stage", "back-pressure", "loss", "counting lag", "scan outcomes"):
        assert topic in rows, f"no row for {topic}"


def test_dashboard_queries_only_exported_metrics_in_valid_promql(tmp_path: Path):
    used: set[str] = set()
    for panel, target in _dashboard_targets():
        names = _metric_names(target["expr"])
        assert names, (panel["title"], target["expr"])
        unknown = {m for m in names if m not in EXPORTED and m not in OTHER_METRICS}
        assert not unknown, f"panel {panel['title']!r} queries {unknown}, which no stemstream process exports"
        used |= names
    assert {"stemstream_bytes_sent_total", "stemstream_send_blocked_seconds_total", "stemstream_counting_lag_seconds",
            "stemstream_scans", "stemstream_sectors_lost_upstream_total"} <= used  # fmt: skip
    assert used <= set(SPECS) | OTHER_METRICS
    # Syntax: every query as a recording rule, Grafana's $__rate_interval as 1m.
    promtool = _tool("promtool", "prometheus")
    rules = [{"record": f"dashboard:panel{p['id']}_{t['refId']}", "expr": t["expr"].replace("$__rate_interval", "1m")}
             for p, t in _dashboard_targets()]  # fmt: skip
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    checked = _run(promtool, "check", "rules", path)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_metric_names_are_read_from_expressions():
    expr = 'sum by (uid) (rate(stemstream_bytes_sent_total{role="p"}[5m])) / max(up) > 0 and stemstream_scans == 1'
    assert _metric_names(expr) == {"stemstream_bytes_sent_total", "up", "stemstream_scans"}


# ------------------------------------------------------------------------------------------ systemd


def test_systemd_units_verify(tmp_path: Path):
    analyze = _tool("systemd-analyze", "systemd")
    venv = Path(sys.prefix)
    if not (venv / "bin" / "stemstream").exists():
        pytest.skip(f"no stemstream console script in {venv}/bin to stand in for /opt/stemstream/venv")
    units = sorted(p for p in UNITS.iterdir() if p.suffix in (".service", ".timer", ".target"))
    assert {p.name for p in units} >= {
        "stemstream-store@.service", "stemstream-aggregator.service", "stemstream-producer@.service",
        "stemstream-prefect-server.service", "stemstream-deployments.service", "stemstream.target",
    }  # fmt: skip
    # The units name /opt/stemstream/venv (the venv) and /opt/stemstream/src (the checkout): here, this venv and
    # this checkout (systemd-analyze checks that each ExecStart exists).
    for unit in units:
        text = unit.read_text()
        if unit.suffix == ".service":
            assert re.search(r"^ExecStart=/opt/stemstream/venv/bin/", text, re.M), unit.name
            assert re.search(r"^User=stemstream$", text, re.M), unit.name
            if "Type=oneshot" not in text:
                assert re.search(r"^Restart=(always|on-failure)$", text, re.M), unit.name
        local = text.replace("/opt/stemstream/venv", str(venv)).replace("/opt/stemstream/src", str(ROOT))
        (tmp_path / unit.name).write_text(local)
    names = [f"./{u.name.replace('@.', '@primary.' if 'store' in u.name else '@0.')}" for u in units]
    verified = _run(analyze, "verify", *names, cwd=tmp_path)
    assert verified.returncode == 0 and not (verified.stdout + verified.stderr).strip(), (
        verified.stdout + verified.stderr
    )


def test_operations_doc_names_every_infra_file():
    doc = (ROOT / "docs" / "operations.md").read_text()
    for path in [*UNITS.iterdir(), ALERTS, DASHBOARD, ALERTS.parent / "prometheus.yml"]:
        name = path.name.split("@")[0] + "@" if "@" in path.name else path.name  # a template by its instances
        assert name in doc, f"docs/operations.md does not mention {path.name}"

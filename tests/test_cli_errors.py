"""A user's mistake is one line that says what to do, never a traceback; a service keeps running on bad input;
``stemstream session list`` and ``session stop`` against a real store. Every command runs as a real process."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from plane_helpers import ROOT, ProcessTree, free_port_block, start_store, store_client, wait_until
from stemstream.scans import keys
from stemstream.scans.records import SessionRecord


def _cli(*args: Any, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    environ = {**os.environ, "PYTHONPATH": str(ROOT / "src"), **(env or {})}
    argv = [sys.executable, "-m", "stemstream.cli", *(str(a) for a in args)]
    return subprocess.run(argv, capture_output=True, text=True, env=environ, cwd=cwd, timeout=120)


def _one_line(done: subprocess.CompletedProcess[str], rc: int, *words: str) -> str:
    """The command failed with ``rc`` and its error is one line (the last), with ``words``; no traceback."""
    err = done.stderr.strip()
    assert done.returncode == rc, (done.returncode, err)
    assert "Traceback" not in err, err
    line = err.splitlines()[-1]
    for word in words:
        assert word in line, line
    return line


def test_a_bad_log_level_is_one_line(tmp_path):
    done = _cli("catalog", "list", env={"STEMSTREAM_LOG_LEVEL": "LOUD"}, cwd=tmp_path)
    assert _one_line(done, 1, "STEMSTREAM_LOG_LEVEL", "LOUD") == done.stderr.strip()


def test_an_output_dir_that_cannot_be_made_is_one_line(tmp_path):
    raw = tmp_path / "raw"
    made = _cli("sim", "write", "--scan-shape", 4, 4, "--scan-number", 3, "--out", raw)
    assert made.returncode == 0, made.stderr
    env = {"STEMSTREAM_OUTPUT_DIR": "/proc/nope"}
    done = _cli("--log-level", "WARNING", "count", raw, "--scan", 3, "--no-progress", env=env, cwd=tmp_path)
    assert _one_line(done, 1, "/proc/nope", "check the path") == done.stderr.strip()


def test_a_sector_out_of_range_is_one_line(tmp_path):
    done = _cli("producer", "--sector", 7, "--store", "tcp://127.0.0.1:9", cwd=tmp_path)
    assert _one_line(done, 2, "--sector", "7", "0, 1, 2, 3", "--help") == done.stderr.strip()  # no usage block


def test_session_start_without_a_prefect_api_is_one_line(tmp_path):
    api = f"http://127.0.0.1:{free_port_block(1)}/api"
    started = time.monotonic()
    done = _cli("session", "start", "--minutes", 0.1, env={"PREFECT_API_URL": api}, cwd=tmp_path)
    assert _one_line(done, 1, "PREFECT_API_URL", api, "prefect server start") == done.stderr.strip()
    assert time.monotonic() - started < 60


def test_session_start_without_a_store_is_one_line(tmp_path):
    store = f"tcp://127.0.0.1:{free_port_block(3)}"
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    argv = [sys.executable, "-m", "stemstream.cli", "session", "start", "--minutes", "0.1", "--store", store]
    done = subprocess.run(argv, capture_output=True, text=True, env={**env, "PYTHONPATH": str(ROOT / "src")},
                          cwd=tmp_path, timeout=120)  # fmt: skip
    assert _one_line(done, 1, store, "stemstream store serve") == done.stderr.strip()
    assert done.stdout == ""


def test_session_list_and_stop_with_a_real_store(tmp_path):
    with ProcessTree(tmp_path / "logs") as tree:
        address = start_store(tree)
        listed = _cli("session", "list", "--store", address)
        assert listed.returncode == 0 and "(no sessions)" in listed.stdout, listed.stderr
        # a running session's record, as the session writes it
        with store_client(address) as client:
            ends = time.time() + 600
            client.set(keys.session("s-1"), SessionRecord("running", members=("ng-0",), ends_at=ends).to_record())
            client.wait_for(lambda items: keys.session("s-1") in items, prefix=keys.SESSIONS, timeout=10)
        listed = _cli("session", "list", "--store", address)
        assert listed.returncode == 0, listed.stderr
        row = next(line for line in listed.stdout.splitlines() if line.startswith("s-1"))
        assert row.split()[1] == "running"

        stopped = _cli("session", "stop", "s-1", "--store", address)
        assert stopped.returncode == 0 and "asked session s-1 to end" in stopped.stdout, stopped.stderr
        with store_client(address) as client:
            client.wait_for(lambda items: items.get(keys.session_stop("s-1")) is True, prefix="/control/", timeout=10)

        unknown = _cli("session", "stop", "nobody", "--store", address)
        _one_line(unknown, 1, "'nobody'", "stemstream session list")


def test_a_bad_scan_request_is_refused_logged_and_the_producer_serves_on(tmp_path):
    from stemstream.plane.requests import request_scan

    with ProcessTree(tmp_path / "logs") as tree:
        address = start_store(tree)
        tree.start("producer-0", "producer", "--store", address, "--sector", 0, "--fallback-dir", tmp_path / "fb")
        with store_client(address) as client:
            from stemstream.store import Registry

            Registry(client).wait_for_members("producer", 1, status="ready", timeout=60)
            request_scan(client, 5, (2, 2), loss_rate="abc")
            failed = keys.producer(5, "")
            client.wait_for(
                lambda items: any(k.startswith(failed) and v.get("status") == "failed" for k, v in items.items()),
                prefix=failed,
                timeout=30,
            )
            record = next(v for k, v in client.items(failed).items())
        assert "loss_rate" in record["error"] and "'abc'" in record["error"]
        wait_until(lambda: "loss_rate='abc'" in tree.log("producer-0"), 10, "the refusal in the log")
        # metadata that is not a bounded flat map: the request is ignored, said in the log
        with store_client(address) as client:
            bad = {"scan": 6, "scan_shape": [2, 2], "requested_at": time.time(), "metadata": {"lens": {"c": 1}}}
            client.set(keys.CONTROL_SCAN, bad)
        wait_until(lambda: "metadata lens" in tree.log("producer-0"), 10, "the ignored request in the log")
        time.sleep(1.0)
        tree.check_alive("producer-0")
        assert "Traceback" not in tree.log("producer-0")


@pytest.mark.parametrize("where", ["nowhere/at/all", "catalog.sqlite"])
def test_catalog_list_never_makes_a_catalog(tmp_path, where):
    done = _cli("catalog", "--url", f"sqlite:///{tmp_path / where}", "list", cwd=tmp_path)
    _one_line(done, 1, "no scan catalog", str(tmp_path / where))
    default = _cli("catalog", "list", cwd=tmp_path)
    _one_line(default, 1, "no scan catalog", "STEMSTREAM_CATALOG_URL")
    assert not (tmp_path / "data").exists() and not (tmp_path / where).exists()


def _parser_raising(error: BaseException) -> Any:
    import argparse

    def fail(args: Any) -> int:
        raise error

    def build() -> argparse.ArgumentParser:
        parser = argparse.ArgumentParser()
        parser.set_defaults(func=fail, log_level="WARNING")
        return parser

    return build


def test_main_turns_os_and_validation_errors_into_one_line(capsys, monkeypatch):
    from pydantic import BaseModel, Field, ValidationError

    from stemstream import cli

    class Form(BaseModel):
        minutes: float = Field(gt=0)

    monkeypatch.setattr(cli, "build_parser", _parser_raising(PermissionError(13, "Permission denied", "/srv/x")))
    assert cli.main([]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "/srv/x: Permission denied; check the path" in err, err

    with pytest.raises(ValidationError) as info:
        Form(minutes=-1)
    monkeypatch.setattr(cli, "build_parser", _parser_raising(info.value))
    assert cli.main([]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Form minutes=-1" in err and "greater than 0" in err, err

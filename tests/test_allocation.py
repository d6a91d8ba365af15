"""Allocation backends: request validation, batch script, local mpiexec, Slurm CLI (faked), Superfacility API.

The Superfacility API is mocked at its HTTP contract with respx (token endpoint, status, submit task,
job state through squeue then sacct, cancel), with a throwaway RSA key for the client's JWT assertion.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import httpx
import jwt
import psutil
import pytest

from sfapi_mock import ACCESS_TOKEN, API, CLIENT_ID, JWT_BEARER, TOKEN_URL
from stemstream.allocation import (
    AllocationRequest,
    JobState,
    get_allocator,
    nodegroup_args,
    render_batch_script,
    slurm_state,
)
from stemstream.allocation.local import LocalAllocator
from stemstream.allocation.sfapi import SfapiAllocator
from stemstream.allocation.slurm import SlurmAllocator
from stemstream.counting.params import CountingParams
from stemstream.errors import AllocationError

REPO = Path(__file__).resolve().parents[1]


def _wait_for(predicate: Callable[[], Any], timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        time.sleep(0.02)
    raise AssertionError("condition not met in time")


def _request(tmp_path: Path, **kw: Any) -> AllocationRequest:
    return AllocationRequest(store_address="tcp://127.0.0.1:5560", output_dir=str(tmp_path / "out"), **kw)


# -- request, script, state mapping, registry ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"n_nodes": 0}, "n_nodes must be at least 1"),
        ({"qos": "realtime\n#SBATCH --x"}, "qos"),
        ({"account": "m1 2"}, "account"),
        ({"extra_env": {"BAD NAME": "x"}}, "extra_env name"),
    ],
)
def test_request_rejects_bad_values_in_one_line(tmp_path, kw, match):
    with pytest.raises(AllocationError, match=match) as info:
        _request(tmp_path, **kw)
    assert "\n" not in str(info.value)


def test_batch_script_has_directives_quoted_args_and_valid_syntax(tmp_path):
    req = AllocationRequest(
        machine="perlmutter",
        n_nodes=3,
        nodegroups_per_node=2,
        minutes=45,
        store_address="tcp://10.1.2.3:5560",
        output_dir="/pscratch/sd/u/user/counted",
        counting=CountingParams(
            background_n_sigma=3.5, xray_n_sigma=10, threshold_samples=40, threshold_window=40, engine="cpu", dark=None
        ),
        account="m4242",
        extra_env={"STEMSTREAM_LOG_LEVEL": "DEBUG", "ODD": "it's $HOME"},
    )
    script = render_batch_script(req, executable="/venv/bin/stemstream", prologue=["module load python"])
    assert script.startswith("#!/bin/bash\n")
    lines = script.splitlines()
    for directive in [
        "#SBATCH --nodes=3",
        "#SBATCH --ntasks-per-node=2",
        "#SBATCH --time=45",
        "#SBATCH --qos=realtime",
        "#SBATCH --constraint=cpu",
        "#SBATCH --account=m4242",
        "#SBATCH --job-name=stemstream-nodegroups",
        "#SBATCH --output=/pscratch/sd/u/user/counted/stemstream-nodegroups-%j.log",
    ]:
        assert directive in lines
    # Slurm stops reading directives at the first command: all of them come before it.
    first_command = next(i for i, line in enumerate(lines) if line and not line.startswith("#"))
    assert max(i for i, line in enumerate(lines) if line.startswith("#SBATCH")) < first_command
    assert "export ODD='it'\"'\"'s $HOME'" in lines
    assert "srun --ntasks=6 --ntasks-per-node=2" in script
    assert (
        "/venv/bin/stemstream nodegroup --store tcp://10.1.2.3:5560 --consumer count "
        "--output-dir /pscratch/sd/u/user/counted --background-n-sigma 3.5 --xray-n-sigma 10.0 "
        "--threshold-samples 40 --threshold-window 40 --engine cpu --row-dark none"
    ) in script
    checked = subprocess.run(["bash", "-n"], input=script, text=True, capture_output=True)
    assert checked.returncode == 0, checked.stderr


def test_no_account_directive_without_account(tmp_path):
    assert "--account" not in render_batch_script(_request(tmp_path))


def test_operator_copy_of_template_matches_package_data():
    packaged = REPO / "src/stemstream/allocation/templates/nodegroups.sbatch.j2"
    assert (REPO / "infra/nodegroups.sbatch.j2").read_text() == packaged.read_text()


def test_custom_and_missing_templates(tmp_path):
    custom = tmp_path / "t.j2"
    custom.write_text("#!/bin/sh\necho {{ request.n_tasks }} {{ nodegroup_args | join(',') }}\n")
    out = render_batch_script(_request(tmp_path, n_nodes=2), template=custom)
    assert out == f"#!/bin/sh\necho 4 {','.join(nodegroup_args(_request(tmp_path)))}\n"
    with pytest.raises(AllocationError, match="cannot read batch-script template"):
        render_batch_script(_request(tmp_path), template=tmp_path / "missing.j2")
    custom.write_text("{{ nonexistent.attr }}")
    with pytest.raises(AllocationError, match="template is broken"):
        render_batch_script(_request(tmp_path), template=custom)


@pytest.mark.parametrize(
    ("raw", "state"),
    [
        ("PENDING", JobState.PENDING),
        ("CONFIGURING", JobState.PENDING),
        ("RUNNING", JobState.RUNNING),
        ("COMPLETING", JobState.RUNNING),
        ("COMPLETED", JobState.COMPLETED),
        ("TIMEOUT", JobState.COMPLETED),
        ("CANCELLED by 12345", JobState.CANCELLED),
        ("FAILED", JobState.FAILED),
        ("OUT_OF_MEMORY", JobState.FAILED),
        ("NODE_FAIL", JobState.FAILED),
    ],
)
def test_slurm_states(raw, state):
    assert slurm_state(raw) is state


def test_get_allocator():
    assert get_allocator("local").name == "local"
    assert get_allocator("slurm", sbatch="/x/sbatch").name == "slurm"
    with pytest.raises(AllocationError, match="unknown; choose one of local, slurm, sfapi"):
        get_allocator("pbs")


# -- local ---------------------------------------------------------------------------------------------------

ECHO_AND_SLEEP = [
    sys.executable,
    "-c",
    "import sys, time; print('ARGV', sys.argv[1:], flush=True); time.sleep(60)",
]


def test_local_runs_ranks_under_mpiexec_and_cancel_stops_them_all(tmp_path):
    alloc = LocalAllocator(command=ECHO_AND_SLEEP, grace_s=3.0)
    alloc.check_machine("local")
    with pytest.raises(AllocationError, match="machine 'perlmutter' unknown"):
        alloc.check_machine("perlmutter")
    req = _request(tmp_path, n_nodes=1, nodegroups_per_node=2)
    allocation = alloc.submit(req)
    try:
        assert allocation.backend == "local" and allocation.job_id.startswith("local-")
        assert alloc.state(allocation) is JobState.RUNNING
        log = alloc.log_path(allocation)
        assert log.parent == tmp_path / "out"
        # Both ranks started and got the nodegroup arguments.
        _wait_for(lambda: log.read_text().count("ARGV") == 2)
        assert str(nodegroup_args(req)) in log.read_text()
        mpiexec = psutil.Process(int(allocation.job_id.removeprefix("local-")))
        ranks = [p for p in mpiexec.children(recursive=True) if "time.sleep(60)" in " ".join(p.cmdline())]
        assert len(ranks) == 2
    finally:
        alloc.cancel(allocation)
    assert alloc.state(allocation) is JobState.CANCELLED
    _gone, alive = psutil.wait_procs(ranks, timeout=5)
    assert not alive
    alloc.cancel(allocation)  # a second cancel is a no-op


@pytest.mark.parametrize(("code", "state"), [(0, JobState.COMPLETED), (3, JobState.FAILED)])
def test_local_exit_codes(tmp_path, code, state, caplog):
    alloc = LocalAllocator(command=[sys.executable, "-c", f"raise SystemExit({code})"], use_mpi=False)
    allocation = alloc.submit(_request(tmp_path))
    _wait_for(lambda: alloc.state(allocation).finished)
    assert alloc.state(allocation) is state
    assert alloc.exit_code(allocation) == code
    if code:
        assert f"exited with code {code}" in caplog.text


def test_local_kills_what_ignores_sigterm(tmp_path):
    stubborn = (
        "import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "print('ready', flush=True); time.sleep(60)"
    )
    alloc = LocalAllocator(command=[sys.executable, "-c", stubborn], use_mpi=False, grace_s=0.3)
    allocation = alloc.submit(_request(tmp_path))
    _wait_for(lambda: "ready" in alloc.log_path(allocation).read_text())
    alloc.cancel(allocation)
    assert alloc.exit_code(allocation) == -signal.SIGKILL
    assert alloc.state(allocation) is JobState.CANCELLED


def test_local_unknown_job_and_bad_command(tmp_path):
    alloc = LocalAllocator(command=[str(tmp_path / "missing")], use_mpi=False)
    with pytest.raises(AllocationError, match="cannot start"):
        alloc.submit(_request(tmp_path))
    other = LocalAllocator(command=ECHO_AND_SLEEP, use_mpi=False)
    from stemstream.allocation import Allocation

    stray = Allocation(backend="local", job_id="local-1", request=_request(tmp_path), submitted=0.0)
    with pytest.raises(AllocationError, match="not one this allocator started"):
        other.state(stray)


# -- Slurm (fake CLI) ----------------------------------------------------------------------------------------


@pytest.fixture
def fake_slurm(tmp_path: Path) -> dict[str, Path]:
    """sbatch/squeue/sacct/scancel scripts that record their calls; squeue/sacct print what the test sets."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    state = {name: tmp_path / f"{name}.out" for name in ("squeue", "sacct")}
    calls = tmp_path / "calls.log"
    scripts = {
        "sbatch": f'echo "sbatch $*" >> {calls}\ncat > {tmp_path}/submitted.sh\n'
        f"if [ -f {tmp_path}/sbatch.err ]; then cat {tmp_path}/sbatch.err >&2; exit 1; fi\n"
        'echo "4242;perlmutter"',
        "squeue": f'echo "squeue $*" >> {calls}\ncat {state["squeue"]} 2>/dev/null; true',
        "sacct": f'echo "sacct $*" >> {calls}\ncat {state["sacct"]} 2>/dev/null; true',
        "scancel": f'echo "scancel $*" >> {calls}',
    }
    paths: dict[str, Path] = {"calls": calls, "submitted": tmp_path / "submitted.sh", **state}
    for name, body in scripts.items():
        path = bin_dir / name
        path.write_text(f"#!/bin/bash\n{body}\n")
        path.chmod(0o755)
        paths[f"{name}_bin"] = path
    return paths


def _slurm(fake: dict[str, Path]) -> SlurmAllocator:
    names = ("sbatch", "squeue", "sacct", "scancel")
    return SlurmAllocator(**{name: str(fake[f"{name}_bin"]) for name in names})


def test_slurm_submit_poll_cancel(tmp_path, fake_slurm):
    alloc = _slurm(fake_slurm)
    req = _request(tmp_path, machine="perlmutter", n_nodes=2, account="m1")
    allocation = alloc.submit(req)
    assert allocation.job_id == "4242" and allocation.backend == "slurm"
    assert fake_slurm["submitted"].read_text() == render_batch_script(req)
    assert (tmp_path / "out").is_dir()  # Slurm needs the --output directory before the job starts

    fake_slurm["squeue"].write_text("PENDING\n")
    assert alloc.state(allocation) is JobState.PENDING
    fake_slurm["squeue"].write_text("RUNNING\n")
    assert alloc.state(allocation) is JobState.RUNNING
    fake_slurm["squeue"].write_text("")  # left the queue: sacct has the final word
    fake_slurm["sacct"].write_text("CANCELLED by 501\n")
    assert alloc.state(allocation) is JobState.CANCELLED
    alloc.cancel(allocation)

    calls = fake_slurm["calls"].read_text().splitlines()
    assert calls == [
        "sbatch --parsable",
        "squeue -h -j 4242 -o %T",
        "squeue -h -j 4242 -o %T",
        "squeue -h -j 4242 -o %T",
        "sacct -n -X -P -j 4242 -o State",
        "scancel 4242",
    ]


def test_slurm_errors_are_one_line(tmp_path, fake_slurm):
    alloc = _slurm(fake_slurm)
    with pytest.raises(AllocationError, match="machine 'cori' unknown; choose one of perlmutter"):
        alloc.submit(_request(tmp_path, machine="cori"))
    (tmp_path / "sbatch.err").write_text("sbatch: error: Invalid qos specification\nmore detail\n")
    with pytest.raises(AllocationError) as info:
        alloc.submit(_request(tmp_path, machine="perlmutter"))
    assert str(info.value) == (
        "sbatch refused the job (sbatch: error: Invalid qos specification; more detail); "
        "check account, qos and constraint"
    )
    from stemstream.allocation import Allocation

    gone = Allocation("slurm", "999", _request(tmp_path, machine="perlmutter"), 0.0)
    with pytest.raises(AllocationError, match="unknown to squeue and sacct"):
        alloc.state(gone)
    missing = SlurmAllocator(sbatch=str(tmp_path / "nope"))
    with pytest.raises(AllocationError, match="not found; run on a Slurm login node or pass a path"):
        missing.submit(_request(tmp_path, machine="perlmutter"))


# -- Superfacility API (respx at the HTTP contract) ----------------------------------------------------------


def _form(request: httpx.Request) -> dict[str, list[str]]:
    return parse_qs(request.content.decode())


def test_sfapi_submit_pending_running_completed(tmp_path, sfapi, rsa_key, caplog):
    caplog.set_level(logging.DEBUG)
    fake, router = sfapi
    pem, public_key = rsa_key
    req = _request(tmp_path, machine="perlmutter", n_nodes=2, account="m4242")
    with SfapiAllocator(CLIENT_ID, pem, executable="/global/common/venv/bin/stemstream") as alloc:
        allocation = alloc.submit(req)
        assert allocation.job_id == "4242" and allocation.backend == "sfapi"

        # The token request: client credentials with a private_key_jwt assertion signed by our key.
        token_form = _form(router["token"].calls.last.request)
        assert token_form["grant_type"] == ["client_credentials"]
        assert token_form["client_assertion_type"] == [JWT_BEARER]
        assertion = token_form["client_assertion"][0]
        claims = jwt.decode(assertion, public_key, algorithms=["RS256"], audience=TOKEN_URL)
        assert claims["iss"] == claims["sub"] == CLIENT_ID
        assert router["token"].call_count == 1

        # Status checked, output directory made, the rendered script submitted as text, not a path.
        assert router["status"].called
        assert _form(router["command"].calls.last.request) == {"executable": [f"mkdir -p {tmp_path / 'out'}"]}
        submitted = _form(router["submit"].calls.last.request)
        assert submitted["isPath"] == ["false"]
        assert submitted["job"] == [alloc.batch_script(req)]
        assert "/global/common/venv/bin/stemstream nodegroup" in submitted["job"][0]
        assert router["submit"].calls.last.request.headers["Authorization"] == f"Bearer {ACCESS_TOKEN}"

        fake.squeue = [{"jobid": "4242", "state": "PENDING", "reason": "Priority"}]
        assert alloc.state(allocation) is JobState.PENDING
        fake.squeue = [{"jobid": "4242", "state": "RUNNING", "reason": "None"}]
        assert alloc.state(allocation) is JobState.RUNNING
        fake.squeue = []  # left the queue: sfapi_client asks sacct
        fake.sacct = [{"jobid": "4242", "state": "COMPLETED", "exitcode": "0:0"}]
        assert alloc.state(allocation) is JobState.COMPLETED

    squeue_query = {"sacct": ["false"], "cached": ["false"], "kwargs": ["jobid=4242"]}
    sacct_query = {"sacct": ["true"], "cached": ["false"], "kwargs": ["jobid=4242"]}
    assert fake.job_queries == [squeue_query, squeue_query, squeue_query, sacct_query]
    assert pem.splitlines()[1] not in caplog.text and ACCESS_TOKEN not in caplog.text
    assert pem.splitlines()[1] not in repr(alloc)


def test_sfapi_failed_job_and_cancel(tmp_path, sfapi, rsa_key, caplog):
    fake, router = sfapi
    with SfapiAllocator(CLIENT_ID, rsa_key[0], make_output_dir=False) as alloc:
        allocation = alloc.submit(_request(tmp_path, machine="perlmutter"))
        assert not router["command"].called
        fake.squeue = [{"jobid": "4242", "state": "FAILED", "reason": "NonZeroExitCode"}]
        assert alloc.state(allocation) is JobState.FAILED
        assert "job 4242 on perlmutter ended FAILED (reason: NonZeroExitCode)" in caplog.text

        # Another process follows the same job by id, and cancels it.
        from stemstream.allocation import Allocation

        fake.squeue = [{"jobid": "4242", "state": "RUNNING"}]
        with SfapiAllocator(CLIENT_ID, rsa_key[0]) as other:
            same = Allocation("sfapi", "4242", allocation.request, allocation.submitted)
            assert other.state(same) is JobState.RUNNING
            other.cancel(same)
        assert router["cancel"].call_count == 1


def test_sfapi_rejected_submission_is_one_line(tmp_path, sfapi, rsa_key):
    fake, _router = sfapi
    fake.submit_result = {"status": "error", "error": "sbatch: error: Invalid qos specification\n"}
    with SfapiAllocator(CLIENT_ID, rsa_key[0]) as alloc, pytest.raises(AllocationError) as info:
        alloc.submit(_request(tmp_path, machine="perlmutter"))
    assert str(info.value) == (
        "the Superfacility API reported an error while submitting the NodeGroups job to perlmutter: "
        "sbatch: error: Invalid qos specification; fix that"
    )


def test_sfapi_machine_down_is_one_line(tmp_path, sfapi, rsa_key):
    fake, router = sfapi
    fake.status = {
        "name": "perlmutter",
        "status": "unavailable",
        "description": "System Degraded",
        "notes": ["Scheduled maintenance", "Login nodes\navailable"],
    }
    fake.outages = [
        {"name": "perlmutter", "status": "Active", "start_at": "2024-05-01T07:00:00+00:00",
         "end_at": "2024-05-01T19:00:00+00:00", "description": "maintenance"},
    ]  # fmt: skip
    with SfapiAllocator(CLIENT_ID, rsa_key[0]) as alloc:
        with pytest.raises(AllocationError) as info:
            alloc.submit(_request(tmp_path, machine="perlmutter"))
        assert str(info.value) == (
            "perlmutter is unavailable (System Degraded; Scheduled maintenance; Login nodes; available) "
            "until 2024-05-01 19:00 UTC; try again later"
        )
        assert not router["submit"].called
        with pytest.raises(AllocationError, match="machine 'cori' unknown; choose one of perlmutter"):
            alloc.check_machine("cori")


def test_sfapi_bad_credentials(tmp_path, sfapi, rsa_key, monkeypatch):
    fake, router = sfapi
    fake.token_status = 401
    with SfapiAllocator(CLIENT_ID, rsa_key[0]) as alloc, pytest.raises(AllocationError) as info:
        alloc.check_machine("perlmutter")
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("NERSC refused the Superfacility API client while reading the status of")
    assert "STEMSTREAM_SFAPI_CLIENT_ID and STEMSTREAM_SFAPI_SECRET" in message
    assert router["token"].called and not router["status"].called

    # A 401 from the API itself (e.g. this host's IP is not in the client's ranges) says the same.
    fake.token_status = 200
    router.routes["status"].mock(return_value=httpx.Response(401, json={"detail": "Unauthorized"}))
    with (
        SfapiAllocator(CLIENT_ID, rsa_key[0]) as alloc,
        pytest.raises(AllocationError, match=r"HTTP 401.*IP"),
    ):
        alloc.check_machine("perlmutter")

    with pytest.raises(AllocationError, match="no Superfacility API credentials; set STEMSTREAM_SFAPI_"):
        SfapiAllocator().check_machine("perlmutter")
    monkeypatch.setenv("STEMSTREAM_SFAPI_CLIENT_ID", CLIENT_ID)
    bad_pem = "-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----"
    monkeypatch.setenv("STEMSTREAM_SFAPI_SECRET", bad_pem)
    with pytest.raises(AllocationError, match="STEMSTREAM_SFAPI_SECRET is not a usable private key"):
        SfapiAllocator().check_machine("perlmutter")


def test_sfapi_gave_up_retrying_and_network_errors_are_one_line():
    """sfapi_client retries 429/5xx/timeouts with tenacity, then raises RetryError: unwrap it."""
    import tenacity

    alloc = SfapiAllocator(CLIENT_ID, "unused")
    request = httpx.Request("GET", f"{API}/status/perlmutter")

    def gave_up() -> None:
        @tenacity.retry(stop=tenacity.stop_after_attempt(2), wait=tenacity.wait_none())
        def call() -> None:
            busy = httpx.Response(503, request=request)
            raise httpx.HTTPStatusError("busy", request=request, response=busy)

        call()

    with pytest.raises(AllocationError) as info, alloc._api("reading the status of perlmutter"):
        gave_up()
    assert str(info.value) == (
        "the Superfacility API answered HTTP 503 while reading the status of perlmutter; try again later"
    )
    unreachable = r"cannot reach the Superfacility API .* \(ConnectError\)"
    with pytest.raises(AllocationError, match=unreachable), alloc._api("submitting"):
        raise httpx.ConnectError("no route to host", request=request)


def test_env_credentials_are_used(sfapi, rsa_key, monkeypatch):
    _fake, router = sfapi
    monkeypatch.setenv("STEMSTREAM_SFAPI_CLIENT_ID", CLIENT_ID)
    monkeypatch.setenv("STEMSTREAM_SFAPI_SECRET", rsa_key[0])
    with SfapiAllocator() as alloc:
        alloc.check_machine("perlmutter")
    claims = jwt.decode(
        _form(router["token"].calls.last.request)["client_assertion"][0],
        rsa_key[1],
        algorithms=["RS256"],
        audience=TOKEN_URL,
    )
    assert claims["sub"] == CLIENT_ID


def test_no_prefect_imported():
    code = (
        "import sys, stemstream.allocation.sfapi, stemstream.allocation.local, stemstream.archive.globus, "
        "stemstream.archive.local; assert 'prefect' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})

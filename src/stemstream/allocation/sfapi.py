"""Allocate NERSC nodes through the Superfacility API (``sfapi_client``, synchronous client).

What goes over the wire (sfapi_client 0.6, checked against its source):

- token: ``POST https://oidc.nersc.gov/c2id/token``, OAuth2 client credentials authenticated with a
  ``private_key_jwt`` assertion signed (RS256) by the client's private key;
- status: ``GET /status/{machine}`` -> ``{"name", "status": "active"|"unavailable"|"degraded"|"other",
  "notes": [...], "description"}``, outages: ``GET /status/outages/{machine}``;
- submit: ``POST /compute/jobs/{machine}`` (form ``job=<script>&isPath=false``) -> ``{"task_id", "status"}``,
  then ``GET /tasks/{task_id}`` until ``status`` is ``completed``; its ``result`` is a JSON string holding
  ``jobid`` (or ``"status": "error"`` and ``error``);
- state: ``GET /compute/jobs/{machine}?sacct=false&cached=false&kwargs=jobid=<id>`` (squeue); an empty
  ``output`` means the job left the queue and the same call with ``sacct=true`` gives its final state;
- cancel: ``DELETE /compute/jobs/{machine}/{jobid}``.
"""

from __future__ import annotations

import json
import logging
import shlex
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pydantic
import tenacity
from authlib.integrations.base_client import OAuthError
from authlib.oauth2.rfc7523 import PrivateKeyJWT
from pydantic import SecretStr
from sfapi_client import Client, OutageStatusValue, SfApiError, StatusValue
from sfapi_client.compute import Compute, Machine
from sfapi_client.jobs import JobSqueue

from stemstream.allocation.base import (
    Allocation,
    AllocationRequest,
    JobState,
    one_line,
    render_batch_script,
    slurm_state,
)
from stemstream.config import Settings, load_settings
from stemstream.errors import AllocationError

try:  # sfapi_client keeps these two in a private module; fall back to the values it documents.
    from sfapi_client._sync.client import SFAPI_BASE_URL, SFAPI_TOKEN_URL
except ImportError:  # pragma: no cover
    SFAPI_BASE_URL = "https://api.nersc.gov/api/v1.2"
    SFAPI_TOKEN_URL = "https://oidc.nersc.gov/c2id/token"

logger = logging.getLogger(__name__)

ENV_CLIENT_ID = "STEMSTREAM_SFAPI_CLIENT_ID"
ENV_SECRET = "STEMSTREAM_SFAPI_SECRET"
_CREDENTIALS_HINT = (
    f"check {ENV_CLIENT_ID} and {ENV_SECRET} (the client's private key from iris.nersc.gov), "
    "that the client has not expired and that this host's IP is in its allowed ranges"
)
# Machines that run batch jobs (Machine also lists data-transfer nodes).
BATCH_MACHINES = (Machine.perlmutter.value,)


def _secret_key(secret: str) -> str | dict[str, Any]:
    """The private key as sfapi_client wants it: PEM text, or a JWK given as JSON."""
    text = secret.strip()
    if not text.startswith("{"):
        return text + "\n"
    try:
        key = json.loads(text)
    except ValueError:
        raise AllocationError(
            f"{ENV_SECRET} looks like JSON but does not parse; paste the key as Iris gave it"
        ) from None
    # sfapi_client's key files hold {"client_id": ..., "secret": <JWK>}; accept that or a bare JWK.
    return key.get("secret", key) if isinstance(key, dict) else key


class SfapiAllocator:
    """Submit the NodeGroups' batch script through the Superfacility API and follow the job.

    Credentials: ``client_id``/``secret`` or the settings (``STEMSTREAM_SFAPI_CLIENT_ID`` and
    ``STEMSTREAM_SFAPI_SECRET``, or ``STEMSTREAM_SFAPI_SECRET_FILE``: the PEM private key of a Superfacility
    client made in Iris), read when the allocator is made. They are never logged. ``executable``/``prologue``
    go to :func:`render_batch_script`; ``make_output_dir`` creates the output directory (where Slurm writes
    the job log) with a command on a login node first.
    """

    name = "sfapi"

    def __init__(
        self,
        client_id: str | None = None,
        secret: str | None = None,
        *,
        machines: Sequence[str] = BATCH_MACHINES,
        executable: str = "stemstream",
        prologue: Sequence[str] = (),
        template: Path | None = None,
        allow_degraded: bool = False,
        make_output_dir: bool = True,
        api_base_url: str = SFAPI_BASE_URL,
        token_url: str = SFAPI_TOKEN_URL,
        settings: Settings | None = None,
    ) -> None:
        if client_id is None or secret is None:
            settings = settings or load_settings()  # read now: credentials may have changed since start-up
            client_id = client_id or settings.sfapi_client_id
            secret = secret or settings.secret("sfapi_secret")
        self.client_id = client_id or None
        self._secret = SecretStr(secret) if secret else None
        self.machines = tuple(machines)
        self.executable = executable
        self.prologue = tuple(prologue)
        self.template = template
        self.allow_degraded = allow_degraded
        self.make_output_dir = make_output_dir
        self.api_base_url = api_base_url
        self.token_url = token_url
        self._client: Client | None = None
        self._computes: dict[str, Compute] = {}
        self._jobs: dict[str, JobSqueue] = {}
        self._reported: set[str] = set()

    def __repr__(self) -> str:  # never show the secret
        return f"SfapiAllocator(client_id={self.client_id!r}, machines={self.machines!r})"

    def __enter__(self) -> SfapiAllocator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the HTTP session."""
        if self._client is not None:
            self._client.close()
            self._client = None
            self._computes.clear()
            self._jobs.clear()

    # -- plumbing -----------------------------------------------------------------------------------------

    def _get_client(self) -> Client:
        if self._client is not None:
            return self._client
        if not self.client_id or not self._secret:
            raise AllocationError(
                f"no Superfacility API credentials; set {ENV_CLIENT_ID} and {ENV_SECRET} (or {ENV_SECRET}_FILE): "
                "a client made at iris.nersc.gov and its private key"
            )
        key = _secret_key(self._secret.get_secret_value())
        try:  # sign a throwaway assertion exactly as the token request will, to catch a bad key early
            PrivateKeyJWT(self.token_url).sign(
                SimpleNamespace(client_id=self.client_id, client_secret=key), self.token_url
            )
        except (ValueError, TypeError) as exc:
            raise AllocationError(
                f"{ENV_SECRET} is not a usable private key ({one_line(exc)[:80]}); paste the key from Iris"
            ) from None
        self._client = Client(self.client_id, key, api_base_url=self.api_base_url, token_url=self.token_url)
        return self._client

    @contextmanager
    def _api(self, doing: str) -> Iterator[None]:
        """Turn whatever sfapi_client, authlib and httpx raise into one-line AllocationErrors."""
        try:
            yield
        except tenacity.RetryError as exc:  # sfapi_client retried 429/5xx/timeouts and gave up
            cause = exc.last_attempt.exception()
            raise _to_allocation_error(doing, cause if isinstance(cause, Exception) else exc) from None
        except (OAuthError, httpx.HTTPError, SfApiError, pydantic.ValidationError) as exc:
            raise _to_allocation_error(doing, exc) from None

    def _compute(self, machine: str, *, refresh: bool = False) -> Compute:
        compute = self._computes.get(machine)
        if compute is None or refresh:
            client = self._get_client()
            with self._api(f"reading the status of {machine}"):
                compute = client.compute(machine)
            self._computes[machine] = compute
        return compute

    # -- Allocator ----------------------------------------------------------------------------------------

    def check_machine(self, machine: str) -> None:
        if machine not in self.machines:
            raise AllocationError(f"machine {machine!r} unknown; choose one of {', '.join(self.machines)}")
        compute = self._compute(machine, refresh=True)
        status = StatusValue(compute.status)
        if status is StatusValue.active or (status is StatusValue.degraded and self.allow_degraded):
            return
        details = "; ".join(filter(None, [compute.description, *(compute.notes or [])]))
        until = self._outage_end(compute)
        raise AllocationError(
            f"{machine} is {status.value}"
            + (f" ({one_line(details)})" if details else "")
            + (f" until {until}" if until else "")
            + "; try again later"
        )

    def _outage_end(self, compute: Compute) -> str | None:
        """When the current outage of ``compute`` is due to end, if NERSC says so."""
        try:
            with self._api(f"reading the outages of {compute.name}"):
                outages = compute.outages()
        except AllocationError as exc:
            logger.debug("no outage information: %s", exc)
            return None
        current = (OutageStatusValue.Active, OutageStatusValue.Extended)
        ends = [o.end_at for o in outages if o.end_at is not None and o.status in current]
        return max(ends).strftime("%Y-%m-%d %H:%M %Z").strip() if ends else None

    def batch_script(self, request: AllocationRequest) -> str:
        return render_batch_script(request, self.template, executable=self.executable, prologue=self.prologue)

    def submit(self, request: AllocationRequest) -> Allocation:
        self.check_machine(request.machine)
        script = self.batch_script(request)
        compute = self._compute(request.machine)
        if self.make_output_dir:
            # Slurm opens the job's --output file before the script runs; a missing directory fails the job.
            with self._api(f"creating {request.output_dir} on {request.machine}"):
                compute.run(f"mkdir -p {shlex.quote(request.output_dir)}")
        with self._api(f"submitting the NodeGroups job to {request.machine}"):
            job = compute.submit_job(script)
        job_id = str(job.jobid)
        self._jobs[job_id] = job
        return Allocation.submitted_now(self.name, job_id, request, "job (Superfacility API)")

    def _job(self, allocation: Allocation) -> JobSqueue:
        job = self._jobs.get(allocation.job_id)
        if job is None:  # submitted by another process: follow it by id
            job = JobSqueue(jobid=allocation.job_id, compute=self._compute(allocation.request.machine))
            self._jobs[allocation.job_id] = job
        return job

    def state(self, allocation: Allocation) -> JobState:
        job = self._job(allocation)
        with self._api(f"reading the state of job {allocation.job_id}"):
            job.update()
        if job.state is None:
            raise AllocationError(f"the Superfacility API gave no state for job {allocation.job_id}; retry")
        raw = str(job.state.value)
        state = slurm_state(raw)
        if state is JobState.FAILED and allocation.job_id not in self._reported:
            self._reported.add(allocation.job_id)
            reason = getattr(job, "reason", None) or "none given"
            logger.warning(
                "job %s on %s ended %s (reason: %s); see the job log in %s",
                allocation.job_id, allocation.request.machine, raw, reason, allocation.request.output_dir,
            )  # fmt: skip
        return state

    def cancel(self, allocation: Allocation) -> None:
        job = self._job(allocation)
        try:
            with self._api(f"cancelling job {allocation.job_id}"):
                job.cancel()
        except AllocationError:
            if self.state(allocation).finished:
                logger.info("job %s had already ended", allocation.job_id)
                return
            raise
        logger.info("cancelled job %s on %s", allocation.job_id, allocation.request.machine)


def _to_allocation_error(doing: str, exc: Exception) -> AllocationError:
    if isinstance(exc, OAuthError):
        return AllocationError(
            f"NERSC refused the Superfacility API client while {doing} ({exc.error}); {_CREDENTIALS_HINT}"
        )
    if isinstance(exc, httpx.HTTPStatusError):
        code, hint = exc.response.status_code, _CREDENTIALS_HINT
        if code in (401, 403):
            return AllocationError(f"the Superfacility API answered HTTP {code} while {doing}; {hint}")
        return AllocationError(f"the Superfacility API answered HTTP {code} while {doing}; try again later")
    if isinstance(exc, httpx.HTTPError):
        return AllocationError(
            f"cannot reach the Superfacility API while {doing} ({type(exc).__name__}); check the network"
        )
    if isinstance(exc, SfApiError):
        what = one_line(getattr(exc, "message", exc))
        return AllocationError(f"the Superfacility API reported an error while {doing}: {what}; fix that")
    return AllocationError(
        f"unexpected answer from the Superfacility API while {doing} ({one_line(exc)[:200]}); try again"
    )

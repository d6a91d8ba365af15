"""The NERSC Superfacility API mocked at its HTTP contract (respx): token, status, outages, command,
submit task, job state through squeue then sacct, cancel. Shared by the allocation and flow tests."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qs

import httpx
import pytest
import respx
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

API = "https://api.nersc.gov/api/v1.2"
TOKEN_URL = "https://oidc.nersc.gov/c2id/token"
CLIENT_ID = "abcdefghijklm"
ACCESS_TOKEN = "test-access-token-0123456789"
JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"


@pytest.fixture(scope="module")
def rsa_key() -> tuple[str, Any]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    return pem, key.public_key()


class FakeSfApi:
    """Holds what the mocked API answers; the test changes it between calls."""

    def __init__(self) -> None:
        self.status: dict[str, Any] = {
            "name": "perlmutter",
            "status": "active",
            "notes": [],
            "description": "",
        }
        self.outages: list[dict[str, Any]] = []
        self.squeue: list[dict[str, Any]] = []
        self.sacct: list[dict[str, Any]] = []
        self.submit_result: dict[str, Any] = {"status": "ok", "jobid": "4242"}
        self.token_status = 200
        self.job_queries: list[dict[str, list[str]]] = []

    def jobs(self, request: httpx.Request) -> httpx.Response:
        params = parse_qs(request.url.query.decode())
        self.job_queries.append(params)
        output = self.sacct if params["sacct"] == ["true"] else self.squeue
        return httpx.Response(200, json={"status": "OK", "output": output, "error": None})

    def token(self, request: httpx.Request) -> httpx.Response:
        if self.token_status != 200:
            return httpx.Response(
                self.token_status,
                json={"error": "invalid_client", "error_description": "Client authentication failed"},
            )
        token = {"access_token": ACCESS_TOKEN, "token_type": "Bearer", "expires_in": 600}
        return httpx.Response(200, json=token)


@pytest.fixture
def sfapi(monkeypatch) -> Iterator[tuple[FakeSfApi, respx.MockRouter]]:
    monkeypatch.delenv("STEMSTREAM_SFAPI_CLIENT_ID", raising=False)
    monkeypatch.delenv("STEMSTREAM_SFAPI_SECRET", raising=False)
    fake = FakeSfApi()
    with respx.mock(assert_all_mocked=True, assert_all_called=False) as router:
        router.route(host="127.0.0.1").pass_through()  # a local Prefect API server, when a flow test runs one
        router.post(TOKEN_URL, name="token").mock(side_effect=fake.token)
        router.get(f"{API}/status/perlmutter", name="status").mock(
            side_effect=lambda r: httpx.Response(200, json=fake.status)
        )
        router.get(f"{API}/status/outages/perlmutter", name="outages").mock(
            side_effect=lambda r: httpx.Response(200, json=fake.outages)
        )
        router.post(f"{API}/utilities/command/perlmutter", name="command").mock(
            return_value=httpx.Response(200, json={"task_id": "cmd-1", "status": "OK", "error": None})
        )
        router.get(f"{API}/tasks/cmd-1", name="command_task").mock(
            return_value=httpx.Response(
                200,
                json={
                    "id": "cmd-1",
                    "status": "completed",
                    "result": json.dumps({"status": "ok", "output": ""}),
                },
            )
        )
        router.post(f"{API}/compute/jobs/perlmutter", name="submit").mock(
            return_value=httpx.Response(200, json={"task_id": "sub-1", "status": "OK", "error": None})
        )
        router.get(f"{API}/tasks/sub-1", name="submit_task").mock(
            side_effect=lambda r: httpx.Response(
                200, json={"id": "sub-1", "status": "completed", "result": json.dumps(fake.submit_result)}
            )
        )
        router.get(f"{API}/compute/jobs/perlmutter", name="jobs").mock(side_effect=fake.jobs)
        router.delete(f"{API}/compute/jobs/perlmutter/4242", name="cancel").mock(
            return_value=httpx.Response(200, json={"status": "OK", "output": "", "error": None})
        )
        yield fake, router

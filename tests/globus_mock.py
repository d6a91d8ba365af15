"""Globus mocked at its HTTP contract with ``globus_sdk.testing`` (``responses`` under the hood): the SDK's
own fixtures for ``get_submission_id``, ``submit_transfer`` and the client-credentials token, plus Transfer
task documents registered here for ``get_task`` (ACTIVE, then SUCCEEDED / FAILED / stuck / inactive).
Shared by the archive and flow tests."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import globus_sdk
import pytest
import responses
from globus_sdk.testing import RegisteredResponse, ResponseList, ResponseSet, get_response_set, register_response_set

SRC_EP = "aaaaaaaa-0000-4000-8000-000000000001"
DST_EP = "bbbbbbbb-0000-4000-8000-000000000002"
TASK_ID = get_response_set(globus_sdk.TransferClient.submit_transfer).metadata["task_id"]
SUBMISSION_ID = get_response_set(globus_sdk.TransferClient.submit_transfer).metadata["submission_id"]


def _task(status: str, **fields: Any) -> RegisteredResponse:
    """A Transfer task document (GET /v0.10/task/<id>) as the Transfer API documents it."""
    doc = {
        "DATA_TYPE": "task",
        "task_id": TASK_ID,
        "type": "TRANSFER",
        "status": status,
        "label": "stemstream scan 42",
        "source_endpoint_id": SRC_EP,
        "destination_endpoint_id": DST_EP,
        "sync_level": 3,
        "verify_checksum": True,
        "files": 1,
        "files_transferred": 1 if status == "SUCCEEDED" else 0,
        "bytes_transferred": 300_000 if status == "SUCCEEDED" else 0,
        "faults": 0,
        "fatal_error": None,
        "nice_status": None,
        "nice_status_short_description": None,
        "is_ok": None,
        **fields,
    }
    return RegisteredResponse(service="transfer", path=f"/v0.10/task/{TASK_ID}", json=doc)


register_response_set(
    "stemstream.get_task",
    ResponseSet(
        metadata={"task_id": TASK_ID},
        succeeds=ResponseList(_task("ACTIVE", nice_status="Queued", is_ok=True), _task("SUCCEEDED")),
        fails=ResponseList(
            _task("ACTIVE", nice_status="PERMISSION_DENIED", is_ok=False, faults=3),
            _task("FAILED", fatal_error={"code": "PERMISSION_DENIED", "description": "permission denied"}),
        ),
        stuck=_task("ACTIVE", nice_status="CONNECTION_FAILED", is_ok=False),
        inactive=_task("INACTIVE", nice_status="CREDENTIAL_EXPIRED"),
        cancel=RegisteredResponse(
            service="transfer",
            method="POST",
            path=f"/v0.10/task/{TASK_ID}/cancel",
            json={
                "DATA_TYPE": "result",
                "code": "Canceled",
                "message": "The task has been cancelled successfully.",
            },
        ),
    ),
)


@pytest.fixture
def mocked_responses() -> Iterator[None]:
    """Activate ``responses`` for the test (what globus_sdk.testing registers into)."""
    responses.start()
    try:
        yield
    finally:
        responses.stop()
        responses.reset()

"""Archive backends: local copy with SHA-256 verification, and Globus at its HTTP contract.

Globus is mocked with ``globus_sdk.testing`` (``responses`` under the hood): the SDK's own fixtures for
``get_submission_id``, ``submit_transfer`` and the client-credentials token, plus Transfer task documents
registered here for ``get_task`` (ACTIVE, then SUCCEEDED / FAILED / stuck).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import globus_sdk
import pytest
import responses
from globus_sdk.testing import (
    get_last_request,
    load_response,
)

from globus_mock import DST_EP, SRC_EP, SUBMISSION_ID, TASK_ID
from stemstream.archive import ArchiveResult, get_archiver, sha256_file
from stemstream.archive.globus import GlobusArchiver
from stemstream.archive.local import LocalArchiver
from stemstream.errors import ArchiveError

# -- local ---------------------------------------------------------------------------------------------------


@pytest.fixture
def counted(tmp_path: Path) -> Path:
    path = tmp_path / "src" / "FOURD_240501_0000_00042_counted.h5"
    path.parent.mkdir()
    path.write_bytes(os.urandom(300_000))
    return path


def test_local_copies_verifies_and_keeps_source(tmp_path, counted):
    before = counted.read_bytes()
    archiver = LocalArchiver(tmp_path / "archive" / "2024", chunk_size=64 * 1024)
    result = archiver.archive(counted, scan_number=42)
    dest = tmp_path / "archive" / "2024" / counted.name
    assert result == ArchiveResult("local", str(dest), None, len(before), result.seconds)
    assert dest.read_bytes() == before and counted.read_bytes() == before
    assert sha256_file(dest) == hashlib.sha256(before).hexdigest()
    assert os.stat(dest).st_mtime == os.stat(counted).st_mtime
    assert sorted(p.name for p in dest.parent.iterdir()) == [counted.name]  # no temporary left behind

    again = archiver.archive(counted, scan_number=42)  # a retry is a no-op
    assert again.destination == str(dest) and again.bytes == len(before)


def test_local_never_overwrites_different_content(tmp_path, counted):
    dest_dir = tmp_path / "archive"
    dest_dir.mkdir()
    (dest_dir / counted.name).write_bytes(b"older scan")
    with pytest.raises(ArchiveError, match="already exists with different content") as info:
        LocalArchiver(dest_dir).archive(counted, scan_number=42)
    assert "\n" not in str(info.value) and f"kept at {counted}" in str(info.value)
    assert (dest_dir / counted.name).read_bytes() == b"older scan"


def test_local_checksum_mismatch_leaves_nothing(tmp_path, counted, monkeypatch):
    monkeypatch.setattr("stemstream.archive.local.sha256_file", lambda path, chunk=0: "0" * 64)
    dest_dir = tmp_path / "archive"
    with pytest.raises(ArchiveError, match="checksum mismatch copying scan 7") as info:
        LocalArchiver(dest_dir).archive(counted, scan_number=7)
    assert f"the counted file is kept at {counted}" in str(info.value)
    assert list(dest_dir.iterdir()) == [] and counted.exists()


def test_local_bad_source_and_destination(tmp_path, counted):
    with pytest.raises(ArchiveError, match="does not exist; pass the path of one counted file"):
        LocalArchiver(tmp_path / "a").archive(tmp_path / "missing.h5", scan_number=1)
    with pytest.raises(ArchiveError, match="is not a regular file"):
        LocalArchiver(tmp_path / "a").archive(tmp_path, scan_number=1)
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    with pytest.raises(ArchiveError, match=f"cannot archive scan 1 to {blocker}/.*kept at {counted}"):
        LocalArchiver(blocker).archive(counted, scan_number=1)


def test_get_archiver(tmp_path):
    assert get_archiver("local", destination_dir=tmp_path).name == "local"
    with pytest.raises(ArchiveError, match="unknown; choose one of local, globus"):
        get_archiver("tape")


# -- Globus --------------------------------------------------------------------------------------------------


def _archiver(**kw: Any) -> GlobusArchiver:
    tc = globus_sdk.TransferClient(authorizer=globus_sdk.AccessTokenAuthorizer("transfer-token"))
    return GlobusArchiver(SRC_EP, DST_EP, "/archive/ncem/2024/", transfer_client=tc, poll_s=0.01, **kw)


def _calls() -> list[tuple[str, str]]:
    return [(c.request.method, c.request.url.split("?")[0]) for c in responses.calls]


def test_globus_success_submits_one_checksummed_item(mocked_responses, counted):
    load_response(globus_sdk.TransferClient.get_submission_id)
    load_response(globus_sdk.TransferClient.submit_transfer)
    load_response("stemstream.get_task", case="succeeds")

    result = _archiver().archive(counted, scan_number=42)

    assert result.backend == "globus" and result.task_id == TASK_ID
    assert result.destination == f"globus://{DST_EP}/archive/ncem/2024/{counted.name}"
    assert result.bytes == counted.stat().st_size and counted.exists()
    base = "https://transfer.api.globus.org/v0.10"
    assert _calls() == [
        ("GET", f"{base}/submission_id"),
        ("POST", f"{base}/transfer"),
        ("GET", f"{base}/task/{TASK_ID}"),
        ("GET", f"{base}/task/{TASK_ID}"),
    ]
    submitted = responses.calls[1].request
    assert submitted.headers["Authorization"] == "Bearer transfer-token"
    body = json.loads(submitted.body)
    assert body["DATA_TYPE"] == "transfer" and body["submission_id"] == SUBMISSION_ID
    assert (body["source_endpoint"], body["destination_endpoint"]) == (SRC_EP, DST_EP)
    assert body["label"] == "stemstream scan 42"
    assert body["sync_level"] == 3  # the SDK sends sync_level="checksum" as the API's integer 3
    assert body["verify_checksum"] is True and body["notify_on_succeeded"] is False
    assert body["DATA"] == [
        {
            "DATA_TYPE": "transfer_item",
            "source_path": counted.absolute().as_posix(),
            "destination_path": f"/archive/ncem/2024/{counted.name}",
        }
    ]


def test_globus_label_and_source_path_mapping(mocked_responses, counted):
    load_response(globus_sdk.TransferClient.get_submission_id)
    load_response(globus_sdk.TransferClient.submit_transfer)
    load_response("stemstream.get_task", case="succeeds")
    archiver = _archiver(source_path=lambda p: f"/global/cfs/ncem/{p.name}")
    archiver.archive(counted, scan_number=42, label="session 3: scan #42 (Ti/O)")
    body = json.loads(responses.calls[1].request.body)
    assert body["label"] == "session 3_ scan _42 _Ti_O_"
    assert body["DATA"][0]["source_path"] == f"/global/cfs/ncem/{counted.name}"


def test_globus_failed_task_raises_and_keeps_source(mocked_responses, counted):
    load_response(globus_sdk.TransferClient.get_submission_id)
    load_response(globus_sdk.TransferClient.submit_transfer)
    load_response("stemstream.get_task", case="fails")
    before = counted.read_bytes()

    with pytest.raises(ArchiveError) as info:
        _archiver().archive(counted, scan_number=42)

    message = str(info.value)
    assert message == (
        f"Globus task {TASK_ID} for scan 42 FAILED "
        "(PERMISSION_DENIED: permission denied; PERMISSION_DENIED); "
        f"the counted file is kept at {counted}; retry the archive step once the cause is fixed, "
        f"see https://app.globus.org/activity/{TASK_ID}"
    )
    assert counted.read_bytes() == before
    assert get_last_request().method == "GET"  # a FAILED task is over: nothing cancelled


def test_globus_stuck_task_is_cancelled_at_timeout(mocked_responses, counted):
    load_response(globus_sdk.TransferClient.get_submission_id)
    load_response(globus_sdk.TransferClient.submit_transfer)
    load_response("stemstream.get_task", case="stuck")
    load_response("stemstream.get_task", case="cancel")

    with pytest.raises(ArchiveError, match=r"not done after 0\.05 s and was cancelled \(CONNECTION_FAILED\)"):
        _archiver(timeout_s=0.05).archive(counted, scan_number=42)

    last = get_last_request()
    assert (last.method, last.url) == ("POST", f"https://transfer.api.globus.org/v0.10/task/{TASK_ID}/cancel")
    assert counted.exists()


def test_globus_inactive_task_is_cancelled(mocked_responses, counted):
    load_response(globus_sdk.TransferClient.get_submission_id)
    load_response(globus_sdk.TransferClient.submit_transfer)
    load_response("stemstream.get_task", case="inactive")
    load_response("stemstream.get_task", case="cancel")
    with pytest.raises(ArchiveError, match=r"went INACTIVE and was cancelled \(CREDENTIAL_EXPIRED\)"):
        _archiver().archive(counted, scan_number=42)
    assert get_last_request().url.endswith(f"/task/{TASK_ID}/cancel") and counted.exists()


def test_globus_refused_submission(mocked_responses, counted):
    load_response(globus_sdk.TransferClient.get_submission_id)
    load_response(globus_sdk.TransferClient.submit_transfer, case="failure")
    with pytest.raises(ArchiveError) as info:
        _archiver().archive(counted, scan_number=42)
    assert str(info.value).startswith(
        "Globus refused the transfer of scan 42 (HTTP 400 ClientError.BadRequest.NoTransferItems: "
        "A transfer requires at least one item); the counted file is kept at"
    )


def test_globus_confidential_app_credentials(mocked_responses, counted, monkeypatch):
    monkeypatch.setenv("STEMSTREAM_GLOBUS_CLIENT_ID", "11111111-2222-4333-8444-555555555555")
    monkeypatch.setenv("STEMSTREAM_GLOBUS_CLIENT_SECRET", "s3cr3t")
    token = load_response(globus_sdk.ConfidentialAppAuthClient.oauth2_client_credentials_tokens)
    load_response(globus_sdk.TransferClient.get_submission_id)
    load_response(globus_sdk.TransferClient.submit_transfer)
    load_response("stemstream.get_task", case="succeeds")

    archiver = GlobusArchiver(SRC_EP, DST_EP, "/archive", poll_s=0.01)
    assert "s3cr3t" not in repr(archiver)
    archiver.archive(counted, scan_number=42)

    token_request = responses.calls[0].request
    assert token_request.url == "https://auth.globus.org/v2/oauth2/token"
    form = parse_qs(token_request.body)
    assert form["grant_type"] == ["client_credentials"]
    assert "urn:globus:auth:scope:transfer.api.globus.org:all" in form["scope"][0]
    basic = base64.b64encode(b"11111111-2222-4333-8444-555555555555:s3cr3t").decode()
    assert token_request.headers["Authorization"] == f"Basic {basic}"
    transfer_requests = [c.request for c in responses.calls if "transfer.api" in c.request.url]
    assert transfer_requests
    bearer = f"Bearer {token.metadata['access_token']}"
    assert {r.headers["Authorization"] for r in transfer_requests} == {bearer}


def test_globus_without_credentials(monkeypatch):
    monkeypatch.delenv("STEMSTREAM_GLOBUS_CLIENT_ID", raising=False)
    monkeypatch.delenv("STEMSTREAM_GLOBUS_CLIENT_SECRET", raising=False)
    with pytest.raises(ArchiveError, match="no Globus credentials; set STEMSTREAM_GLOBUS_CLIENT_ID"):
        get_archiver("globus", source_endpoint=SRC_EP, destination_endpoint=DST_EP, destination_path="/a")

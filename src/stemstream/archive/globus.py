"""Archive through a Globus transfer (checksum-verified), waiting for the task to end.

One task per scan: ``TransferData(label=..., sync_level="checksum", verify_checksum=True)`` with one item,
``submit_transfer``, then ``get_task`` every ``poll_s`` until ``SUCCEEDED`` or ``FAILED``. The source is
never deleted; a task that fails, goes ``INACTIVE`` or outlives ``timeout_s`` is cancelled and reported.
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import globus_sdk

from stemstream.archive.base import ArchiveResult, default_label, one_line, source_file
from stemstream.config import Settings, load_settings
from stemstream.errors import ArchiveError

logger = logging.getLogger(__name__)

ENV_CLIENT_ID = "STEMSTREAM_GLOBUS_CLIENT_ID"
ENV_CLIENT_SECRET = "STEMSTREAM_GLOBUS_CLIENT_SECRET"
ACTIVITY_URL = "https://app.globus.org/activity/{task_id}"
_LABEL_BAD = re.compile(r"[^A-Za-z0-9 _,.\-]")  # Globus allows letters, digits, spaces and -_,. in labels


def _label(text: str) -> str:
    return _LABEL_BAD.sub("_", text)[:128]


class GlobusArchiver:
    """Transfer counted files from ``source_endpoint`` to ``destination_path`` on ``destination_endpoint``.

    Authentication: pass a ready ``transfer_client``, or a confidential app's ``client_id``/``client_secret``
    (default: the settings ``STEMSTREAM_GLOBUS_CLIENT_ID`` and ``STEMSTREAM_GLOBUS_CLIENT_SECRET``, or
    ``STEMSTREAM_GLOBUS_CLIENT_SECRET_FILE``); tokens stay in memory, nothing is logged.
    ``data_access_collections`` lists GCS v5 mapped collections that need a data_access consent.
    ``source_path`` maps a local path to its path on the source endpoint (default: the absolute path).
    """

    name = "globus"

    def __init__(
        self,
        source_endpoint: str,
        destination_endpoint: str,
        destination_path: str,
        *,
        transfer_client: globus_sdk.TransferClient | None = None,
        client_id: str | None = None,
        client_secret: str | None = None,
        data_access_collections: Sequence[str] = (),
        source_path: Callable[[Path], str] | None = None,
        timeout_s: float = 3600.0,
        poll_s: float = 5.0,
        settings: Settings | None = None,
    ) -> None:
        self.source_endpoint = source_endpoint
        self.destination_endpoint = destination_endpoint
        self.destination_path = destination_path.rstrip("/") or "/"
        self.source_path = source_path or (lambda p: p.absolute().as_posix())
        self.timeout_s = timeout_s
        self.poll_s = poll_s
        if transfer_client is None and (client_id is None or client_secret is None):
            settings = settings or load_settings()  # read now: credentials may have changed since start-up
            client_id = client_id or settings.globus_client_id
            client_secret = client_secret or settings.secret("globus_client_secret")
        self.tc = transfer_client or self._client(client_id, client_secret, data_access_collections)

    def __repr__(self) -> str:  # never show the secret
        return f"GlobusArchiver({self.source_endpoint}->{self.destination_endpoint}:{self.destination_path})"

    @staticmethod
    def _client(
        client_id: str | None, client_secret: str | None, collections: Sequence[str]
    ) -> globus_sdk.TransferClient:
        if not client_id or not client_secret:
            raise ArchiveError(
                f"no Globus credentials; set {ENV_CLIENT_ID} and {ENV_CLIENT_SECRET} (or {ENV_CLIENT_SECRET}_FILE): "
                "a confidential app registered at app.globus.org/settings/developers"
            )
        app = globus_sdk.ClientApp(
            "stemstream",
            client_id=client_id,
            client_secret=client_secret,
            config=globus_sdk.GlobusAppConfig(token_storage="memory"),
        )
        tc = globus_sdk.TransferClient(app=app)
        if collections:
            tc.add_app_data_access_scope(list(collections))
        return tc

    def archive(self, path: Path, *, scan_number: int, label: str | None = None) -> ArchiveResult:
        t0 = time.monotonic()
        path = source_file(path)
        size = path.stat().st_size
        destination = f"{self.destination_path}/{path.name}"
        kept = f"the counted file is kept at {path}"
        tdata = globus_sdk.TransferData(
            self.source_endpoint,
            self.destination_endpoint,
            label=_label(label or default_label(scan_number)),
            sync_level="checksum",
            verify_checksum=True,
            preserve_timestamp=True,
            fail_on_quota_errors=True,
            notify_on_succeeded=False,
        )
        tdata.add_item(self.source_path(path), destination)
        try:
            task_id = str(self.tc.submit_transfer(tdata)["task_id"])
        except globus_sdk.GlobusAPIError as exc:
            raise ArchiveError(
                f"Globus refused the transfer of scan {scan_number} (HTTP {exc.http_status} {exc.code}: "
                f"{one_line(exc.message)}); {kept}; check endpoint ids, paths and permissions, then retry"
            ) from None
        except globus_sdk.GlobusError as exc:
            raise ArchiveError(
                f"cannot submit the Globus transfer of scan {scan_number} ({one_line(exc)}); {kept}; retry"
            ) from None
        logger.info("scan %d: Globus task %s copies %s to %s", scan_number, task_id, path, destination)
        task = self._wait(task_id, scan_number, kept)
        seconds = time.monotonic() - t0
        logger.info(
            "scan %d archived by Globus task %s: %s bytes transferred in %.1f s",
            scan_number, task_id, task.get("bytes_transferred"), seconds,
        )  # fmt: skip
        where = f"globus://{self.destination_endpoint}{destination}"
        return ArchiveResult(self.name, where, task_id, size, seconds)

    def _wait(self, task_id: str, scan_number: int, kept: str) -> dict[str, Any]:
        """Poll the task until it ends; a task that did not succeed raises ArchiveError."""
        deadline = time.monotonic() + self.timeout_s
        see = f"see {ACTIVITY_URL.format(task_id=task_id)}"
        task: dict[str, Any] = {}
        last_nice = ""  # Globus' nice_status while ACTIVE (e.g. PERMISSION_DENIED); FAILED tasks have none
        while True:
            try:
                task = dict(self.tc.get_task(task_id).data)
            except (globus_sdk.NetworkError, globus_sdk.GlobusAPIError) as exc:
                if isinstance(exc, globus_sdk.GlobusAPIError) and exc.http_status < 500:
                    raise ArchiveError(
                        f"cannot follow Globus task {task_id} for scan {scan_number} (HTTP {exc.http_status} "
                        f"{exc.code}); {kept}; {see}"
                    ) from None
                logger.warning("Globus task %s: status unknown for now (%s)", task_id, one_line(exc))
            status = task.get("status")
            if status == "SUCCEEDED":
                return task
            if task.get("nice_status"):
                last_nice = str(task["nice_status"])
            fatal = task.get("fatal_error") or {}
            fatal_text = ": ".join(str(v) for v in (fatal.get("code"), fatal.get("description")) if v)
            why = one_line("; ".join(filter(None, [fatal_text, last_nice])))
            if status in ("FAILED", "INACTIVE") or time.monotonic() >= deadline:
                if status == "FAILED":
                    what = "FAILED"
                else:  # stuck: cancel it so that a retry does not race a second copy
                    self._cancel(task_id)
                    late = f"was not done after {self.timeout_s:g} s"
                    stuck = "went INACTIVE" if status == "INACTIVE" else late
                    what = f"{stuck} and was cancelled"
                raise ArchiveError(
                    f"Globus task {task_id} for scan {scan_number} {what}"
                    + (f" ({why})" if why else "")
                    + f"; {kept}; retry the archive step once the cause is fixed, {see}"
                )
            if task.get("nice_status"):
                logger.info("Globus task %s is %s: %s", task_id, status, last_nice)
            time.sleep(self.poll_s)

    def _cancel(self, task_id: str) -> None:
        with contextlib.suppress(globus_sdk.GlobusError):
            self.tc.cancel_task(task_id)
            logger.warning("cancelled Globus task %s", task_id)

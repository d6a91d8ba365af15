"""What the Prefect session tests share: Prefect's own test server for a module (``prefect_server``), the
catalog URL of a test, and a session flow run in a thread as a deployment would run it."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest


@pytest.fixture(scope="module")
def prefect_server() -> Iterator[None]:
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


def catalog_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'catalog.sqlite'}"


def start_in_thread(flow: Callable[[], dict[str, Any]]) -> tuple[threading.Thread, dict[str, Any]]:
    """Run ``flow`` in a daemon thread; the dict gets its result, or ``error``: the exception it raised."""
    result: dict[str, Any] = {}

    def run() -> None:
        try:
            result.update(flow())
        except BaseException as exc:
            result["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, result

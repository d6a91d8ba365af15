"""Fixtures of the in-process plane tests: a Clone store server with one client, and a ZeroMQ context."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import zmq

from stemstream.store import StoreClient, StoreServer


@pytest.fixture
def client() -> Iterator[StoreClient]:
    server = StoreServer(host="127.0.0.1", port=None).start()
    try:
        with StoreClient(server.address, timeout=5.0) as c:
            yield c
    finally:
        server.stop()


@pytest.fixture
def ctx() -> Iterator[zmq.Context]:
    context = zmq.Context()
    yield context
    context.destroy(linger=0)

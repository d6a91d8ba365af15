"""Following a Clone store server: its address, the sockets to it, and the snapshot exchange.

A client and a passive server follow a server the same way (docs/store.md, Snapshot exchange): a SUB on its
update port P+1 and a DEALER on its snapshot port P (:class:`Link`). Updates that arrive before the snapshot
is complete are held back; the snapshot is asked for once the subscription is live (or after a while
anyway), collected up to ``KTHXBAI``, and given up if it does not come in time (:class:`SnapshotSync`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import zmq

from stemstream.config import Settings
from stemstream.errors import StoreError
from stemstream.store.kvmsg import ICANHAZ, KTHXBAI, KVMsg, snapshot_tag
from stemstream.transport.sockets import Role, make_socket

# A subscriber's receive queue, and the server's send queue to its Binary Star peer (P+4): generous, since a
# dropped update costs a resync. The peer must never be starved by a bound meant for clients.
PUB_HWM = 100_000
# The server's send queue to each client on P+1: ZeroMQ drops beyond it, so a subscriber that does not read
# costs the server at most this many messages (it notices the gap and resyncs, docs/store.md).
UPDATES_HWM = 1000
# Port offsets from a server's base port P.
SNAPSHOT_PORT, UPDATES_PORT, COLLECTOR_PORT, STATE_PORT, PEER_UPDATES_PORT = range(5)


def split_address(address: str) -> tuple[str, int]:
    """``tcp://host:port`` -> (host, port); raises StoreError for anything else."""
    prefix = "tcp://"
    host, _, port = address[len(prefix) :].rpartition(":") if address.startswith(prefix) else ("", "", "")
    if not host or not port.isdigit() or not 0 < int(port) < 65533:
        raise StoreError(f"store address {address!r} is not tcp://HOST:PORT")
    return host, int(port)


def endpoint(host: str, port: int) -> str:
    return f"tcp://{host}:{port}"


def control_pipe(ctx: zmq.Context, name: str) -> tuple[zmq.Socket, zmq.Socket]:
    """An inproc PAIR, as (bound end, connected end): how an API object talks to the thread it started."""
    url = f"inproc://{name}"
    bound = ctx.socket(zmq.PAIR)
    bound.linger = 0
    bound.bind(url)
    connected = ctx.socket(zmq.PAIR)
    connected.linger = 0
    connected.connect(url)
    return bound, connected


def waiting(sock: zmq.Socket, limit: int, copy: bool = True) -> Iterator[list[Any]]:
    """Up to ``limit`` messages already waiting on ``sock``, without blocking (``copy=False``: as
    ``zmq.Frame`` s, which carry the connection's properties such as ``User-Id``)."""
    for _ in range(limit):
        try:
            frames = sock.recv_multipart(zmq.NOBLOCK, copy=copy)
        except zmq.Again:
            return
        yield frames


class Link:
    """The sockets to one server: its updates under ``topics`` (SUB, port P+1, or P+4 for its Binary Star
    peer) and snapshots (DEALER, P)."""

    def __init__(
        self,
        ctx: zmq.Context,
        settings: Settings,
        address: str,
        topics: Sequence[bytes],
        role: Role,
        updates_port: int = UPDATES_PORT,
    ):
        host, port = split_address(address)
        self.address = address
        # The SUB's send queue carries its subscriptions: with a small STEMSTREAM_SNDHWM ZeroMQ would drop
        # all but the first few topics when it connects.
        self.sub = make_socket(ctx, zmq.SUB, settings=settings, sndhwm=1000, rcvhwm=PUB_HWM, role=role)
        for topic in topics:
            self.sub.setsockopt(zmq.SUBSCRIBE, topic)
        self.sub.connect(endpoint(host, port + updates_port))
        self.dealer = make_socket(ctx, zmq.DEALER, settings=settings, role=role)
        self.dealer.connect(endpoint(host, port))

    def close(self) -> None:
        self.sub.close(linger=0)
        self.dealer.close(linger=0)


@dataclass(eq=False)
class SnapshotSync:
    """One attempt at the snapshot of ``subtrees`` (one request, one consistent snapshot) over ``link``: hold
    back the stream, ask, collect, or give up.

    The request goes out once something has come on the SUB (the subscription is live, so no update can fall
    between the snapshot and the stream) or at ``ask_by`` anyway. The attempt fails at ``give_up_at``; every
    snapshot part moves that to at least ``patience`` seconds ahead, and so does the request itself when
    ``renew_on_request``.
    """

    link: Link
    subtrees: tuple[str, ...]
    ask_by: float
    give_up_at: float
    patience: float
    renew_on_request: bool = False
    ready: bool = field(default=False, init=False)  # something came on the SUB: safe to ask
    requested: bool = field(default=False, init=False)
    backlog: list[KVMsg] = field(default_factory=list, init=False)  # the stream until the snapshot is complete
    snapshot: dict[str, KVMsg] = field(default_factory=dict, init=False)

    def hold(self, msg: KVMsg) -> None:
        """A message from the update stream before the snapshot is complete: kept for after it."""
        self.backlog.append(msg)
        self.ready = True

    def add_part(self, msg: KVMsg, now: float) -> bool:
        """A message from the snapshot port; True when it is the ``KTHXBAI`` that completes the snapshot."""
        self.give_up_at = max(self.give_up_at, now + self.patience)
        if msg.key == KTHXBAI:
            return msg.body == snapshot_tag(self.subtrees)
        if msg.body:  # a snapshot never holds deletions; be lenient with servers that send them
            self.snapshot[msg.key] = msg
        return False

    def tick(self, now: float) -> bool:
        """Ask for the snapshot when it is time; False once the attempt has failed (start another)."""
        if now >= self.give_up_at:
            return False
        if not self.requested and (self.ready or now >= self.ask_by):
            try:
                self.link.dealer.send_multipart([ICANHAZ, *(t.encode() for t in self.subtrees)], zmq.NOBLOCK)
            except zmq.Again:
                return True  # not connected yet: the next tick tries again
            self.requested = True
            if self.renew_on_request:
                self.give_up_at = max(self.give_up_at, now + self.patience)
        return True

    def deadline(self) -> float:
        """When :meth:`tick` has something to do next."""
        return self.give_up_at if self.requested else min(self.ask_by, self.give_up_at)

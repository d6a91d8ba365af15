"""The sockets of a store server, bound from one base port P.

Ports, from a base port P (the address ``tcp://host:P``):

* P   ROUTER: snapshots. ``[ICANHAZ?, subtree]`` -> every kvmsg under ``subtree``, then ``KTHXBAI``.
* P+1 XPUB: sequenced updates (topic = key) and ``HUGZ`` heartbeats. An XPUB rather than a PUB so a new
  subscriber gets a ``HUGZ`` at once: it then knows its subscription is live before asking for a snapshot.
* P+2 PULL: updates from clients; the active server applies each, numbers it and republishes it.
* P+3 PUB: Binary Star state, to the peer (only with a peer).
* P+4 XPUB: the update stream again, for the peer only (only with a peer): its own queue, so a bound on
  what slow clients may cost never starves the peer.

A passive server also connects a SUB to its peer's P+3 (Binary Star state).
"""

from __future__ import annotations

import random

import zmq

from stemstream.config import Settings
from stemstream.errors import StoreError
from stemstream.store.kvmsg import MAX_KEY_BYTES
from stemstream.store.link import PUB_HWM, UPDATES_HWM, endpoint
from stemstream.store.snapshots import SNAPSHOT_HWM
from stemstream.transport.sockets import CURVE_HANDSHAKE_BYTES, make_socket

WILDCARD_HOSTS = ("*", "0.0.0.0", "::", "")
_NAMES = ("router", "publisher", "collector", "statepub", "peerpub")


def bind_server_sockets(
    ctx: zmq.Context,
    settings: Settings,
    host: str,
    port: int | None,
    peer: tuple[str, int] | None,
    max_body: int,
) -> tuple[int, dict[str, zmq.Socket]]:
    """(base port, sockets by name): at ``port``, or at the first free run of consecutive ports."""
    n_ports = 5 if peer else 3
    if port:
        return port, _bind_at(ctx, settings, host, port, peer, max_body)
    # Free consecutive ports: try random bases and keep the first that binds (no check-then-bind race).
    for _ in range(100):
        base = random.randrange(20000, 60000 - n_ports)
        try:
            return base, _bind_at(ctx, settings, host, base, peer, max_body)
        except StoreError:
            continue
    raise StoreError(f"found no {n_ports} free consecutive ports on {host}")


def _bind_at(
    ctx: zmq.Context, s: Settings, host: str, base: int, peer: tuple[str, int] | None, max_body: int
) -> dict[str, zmq.Socket]:
    inbound_cap = 4 * max_body + 65536  # larger than this: peer disconnected, not even counted
    # The snapshot port queues at most SNAPSHOT_HWM parts per client (snapshots.Snapshots sends the rest as
    # the client reads), bodies zero-copy; the update port at most UPDATES_HWM messages per subscriber.
    router = make_socket(ctx, zmq.ROUTER, settings=s, sndhwm=SNAPSHOT_HWM, role="server")
    router.setsockopt(zmq.ROUTER_MANDATORY, 1)
    router.setsockopt(zmq.MAXMSGSIZE, 65536)
    publisher = make_socket(ctx, zmq.XPUB, settings=s, sndhwm=UPDATES_HWM, role="server")
    publisher.setsockopt(zmq.XPUB_VERBOSE, 1)
    publisher.setsockopt(zmq.MAXMSGSIZE, MAX_KEY_BYTES + 64)
    collector = make_socket(ctx, zmq.PULL, settings=s, role="server")
    collector.setsockopt(zmq.MAXMSGSIZE, inbound_cap)
    sockets = {"router": router, "publisher": publisher, "collector": collector}
    if peer:
        # Binary Star ports admit only the store's own keys (peer_only).
        sockets["statepub"] = make_socket(ctx, zmq.PUB, settings=s, role="server", peer_only=True)
        # It only takes the peer's subscription, but MAXMSGSIZE also caps CURVE's handshake.
        sockets["statepub"].setsockopt(zmq.MAXMSGSIZE, CURVE_HANDSHAKE_BYTES)
        peerpub = make_socket(ctx, zmq.XPUB, settings=s, sndhwm=PUB_HWM, role="server", peer_only=True)
        peerpub.setsockopt(zmq.XPUB_VERBOSE, 1)
        peerpub.setsockopt(zmq.MAXMSGSIZE, MAX_KEY_BYTES + 64)
        sockets["peerpub"] = peerpub
    bind_host = "*" if host in WILDCARD_HOSTS else host
    try:
        for offset, name in enumerate(_NAMES):
            if name in sockets:
                sockets[name].bind(endpoint(bind_host, base + offset))
    except zmq.ZMQError as exc:
        for sock in sockets.values():
            sock.close(linger=0)
        raise StoreError(f"cannot bind ports {base}..{base + len(sockets) - 1} on {host}: {exc}") from None
    if peer:
        statesub = make_socket(ctx, zmq.SUB, settings=s, role="peer")
        statesub.setsockopt(zmq.SUBSCRIBE, b"")
        statesub.setsockopt(zmq.MAXMSGSIZE, CURVE_HANDSHAKE_BYTES)  # state messages are 1 byte
        statesub.connect(endpoint(peer[0], peer[1] + 3))
        sockets["statesub"] = statesub
    return sockets

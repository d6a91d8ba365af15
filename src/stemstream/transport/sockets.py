"""The one place ZeroMQ sockets are made: every option the project relies on is set here.

* HWM bounds memory; PUSH blocks at the HWM instead of dropping (the data must never be lost).
* LINGER is finite, so a process with unsent messages still exits.
* IMMEDIATE on PUSH: messages queue only on completed connections, never on a peer that is not there.
* CURVE (docs/security.md): ``role="server"`` for a socket that binds, ``"client"`` for one that connects,
  ``"peer"`` for a store server's link to its Binary Star peer. Whether CURVE is on comes from the settings
  (:func:`stemstream.config.curve_enabled`); when it is off the role changes nothing. A client connecting to
  a service that published its own server key (``server_key`` in its registry record) passes that key; a
  server socket with ``peer_only`` admits only the store's own keys (Binary Star ports). A context that has
  had a server socket with CURVE on has a ZAP authenticator thread: end it with :func:`term_context`.
* ``ZMQ_MAXMSGSIZE`` also caps CURVE's handshake commands (HELLO 200 bytes, INITIATE 257 plus metadata): a
  socket that sets it must allow at least :data:`CURVE_HANDSHAKE_BYTES`, or with CURVE on it never connects.
"""

from __future__ import annotations

import zmq

from stemstream.config import Settings, get_settings
from stemstream.errors import ConfigError
from stemstream.transport.keys import CurveKeys
from stemstream.transport.security import Role, curve_security, stop_authenticator

__all__ = ["CURVE_HANDSHAKE_BYTES", "CurveKeys", "Role", "bind_in_range", "bind_random", "make_socket", "term_context"]

# The smallest ZMQ_MAXMSGSIZE with which a CURVE handshake still completes (with room for metadata).
CURVE_HANDSHAKE_BYTES = 512


def make_socket(
    ctx: zmq.Context,
    kind: int,
    *,
    settings: Settings | None = None,
    sndhwm: int | None = None,
    rcvhwm: int | None = None,
    role: Role | None = None,
    curve: CurveKeys | None = None,
    curve_server: bool = False,
    server_key: str | bytes | None = None,
    peer_only: bool = False,
) -> zmq.Socket:
    """Create a socket of ``kind`` with the project's standard options applied.

    ``role`` (``"server"``, ``"client"``, ``"peer"``) gives the socket this process's CURVE keys when the
    settings turn CURVE on; every socket that talks to another process should have one (None: plaintext,
    for tests and bare benchmarks). ``curve``/``curve_server`` set explicit keys instead (no authenticator).
    ``server_key`` (z85; clients) is the key the service published; None: the store's. ``peer_only``
    (servers) admits only the store's own keys.
    """
    s = settings or get_settings()
    security = curve_security(s) if role is not None else None
    sock = ctx.socket(kind)
    try:
        sock.setsockopt(zmq.LINGER, s.linger_ms)
        sock.setsockopt(zmq.SNDHWM, sndhwm if sndhwm is not None else s.sndhwm)
        sock.setsockopt(zmq.RCVHWM, rcvhwm if rcvhwm is not None else s.rcvhwm)
        if kind in (zmq.PUSH, zmq.DEALER, zmq.REQ):
            sock.setsockopt(zmq.IMMEDIATE, 1)
        if security is not None:
            assert role is not None
            security.apply(sock, role, ctx, server_key=server_key, peer_only=peer_only)
        elif curve is not None:
            sock.curve_secretkey = curve.secret
            sock.curve_publickey = curve.public
            if curve_server:
                sock.curve_server = True
            elif curve.server_public is not None:
                sock.curve_serverkey = curve.server_public
    except BaseException:
        sock.close(linger=0)
        raise
    return sock


def term_context(ctx: zmq.Context) -> None:
    """Stop ``ctx``'s ZAP authenticator (if CURVE gave it one), then terminate it."""
    stop_authenticator(ctx)
    ctx.term()


def bind_random(sock: zmq.Socket, host: str = "127.0.0.1", *, max_msg_size: int | None = None) -> str:
    """Bind to a free port on ``host`` and return the full endpoint others should connect to.

    ``max_msg_size`` (bytes) sets ``ZMQ_MAXMSGSIZE`` first (a listener takes the options the socket has when
    it binds): a peer that sends a larger part is disconnected and the part is never read into memory.
    """
    if max_msg_size is not None:
        sock.setsockopt(zmq.MAXMSGSIZE, max_msg_size)
    port = sock.bind_to_random_port(f"tcp://{host}")
    return f"tcp://{host}:{port}"


def bind_in_range(
    sock: zmq.Socket,
    host: str = "127.0.0.1",
    *,
    settings: Settings | None = None,
    max_msg_size: int | None = None,
) -> str:
    """Bind to the first free port of ``STEMSTREAM_PORT_RANGE`` on ``host`` and return the endpoint others should
    connect to: every socket a service binds for others to find is in that one range (firewall rules,
    docs/operations.md). ``max_msg_size`` as in :func:`bind_random`. Raises ConfigError (one line) when every
    port of the range is taken."""
    s = settings or get_settings()
    if max_msg_size is not None:
        sock.setsockopt(zmq.MAXMSGSIZE, max_msg_size)
    for port in s.ports:
        try:
            sock.bind(f"tcp://{host}:{port}")
        except zmq.ZMQError as exc:
            if exc.errno == zmq.EADDRINUSE:
                continue  # taken (another service, or another socket of this one): the next
            raise ConfigError(f"cannot bind tcp://{host}:{port}: {exc}") from None
        return f"tcp://{host}:{port}"
    raise ConfigError(f"no free port in STEMSTREAM_PORT_RANGE={s.port_range} on {host}; widen the range")

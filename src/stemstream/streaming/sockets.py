"""The one place ZeroMQ sockets are made: every option the project relies on is set here.

* HWM bounds memory; PUSH blocks at the HWM instead of dropping (the data must never be lost).
* LINGER is finite, so a process with unsent messages still exits.
* IMMEDIATE on PUSH: messages queue only on completed connections, never on a peer that is not there.
"""

from __future__ import annotations

from dataclasses import dataclass

import zmq

from stemstream.config import Settings, get_settings


@dataclass(frozen=True)
class CurveKeys:
    """CURVE keys: a server needs its own pair; a client its own pair and the server's public key."""

    public: bytes
    secret: bytes
    server_public: bytes | None = None


def make_socket(
    ctx: zmq.Context,
    kind: int,
    *,
    settings: Settings | None = None,
    sndhwm: int | None = None,
    rcvhwm: int | None = None,
    curve: CurveKeys | None = None,
    curve_server: bool = False,
) -> zmq.Socket:
    """Create a socket of ``kind`` with the project's standard options applied."""
    s = settings or get_settings()
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, s.linger_ms)
    sock.setsockopt(zmq.SNDHWM, sndhwm if sndhwm is not None else s.sndhwm)
    sock.setsockopt(zmq.RCVHWM, rcvhwm if rcvhwm is not None else s.rcvhwm)
    if kind in (zmq.PUSH, zmq.DEALER, zmq.REQ):
        sock.setsockopt(zmq.IMMEDIATE, 1)
    if curve is not None:
        sock.curve_secretkey = curve.secret
        sock.curve_publickey = curve.public
        if curve_server:
            sock.curve_server = True
        elif curve.server_public is not None:
            sock.curve_serverkey = curve.server_public
    return sock


def bind_random(sock: zmq.Socket, host: str = "127.0.0.1") -> str:
    """Bind to a free port on ``host`` and return the full endpoint others should connect to."""
    port = sock.bind_to_random_port(f"tcp://{host}")
    return f"tcp://{host}:{port}"

"""ZeroMQ CURVE for stemstream: which keys a socket gets, and the ZAP authenticator that admits clients.
The key files themselves are ``transport.keys`` (docs/security.md).

Socket roles: a socket that binds is a CURVE *server* (the host's own server keypair when
STEMSTREAM_SERVER_KEY_NAME names one, else the store's); one that connects is a *client* (its own keypair
plus the server's public key: the store's, or the one a service published in its registry record); a store
server connecting to its Binary Star peer is a *peer* (a client with its own client keypair, which must have
the ``store`` role). Every context with a server socket gets one ZAP authenticator thread that admits only
the public keys in ``authorized/``, never a server key, and names each connection by its key name (the ZAP
``User-Id``, which the store reads to know who writes); it re-reads that directory when it changes, so
``keys add``/``keys revoke`` take effect for new connections without a restart. Binary Star ports admit only
``store`` (and ``admin``) keys (:data:`PEER_ZAP_DOMAIN`).

Secret keys are never logged, never part of a repr, and never held in Settings (only the directory is).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import zmq
import zmq.auth
import zmq.utils.z85
from zmq.auth.thread import ThreadAuthenticator

from stemstream.config import Settings, curve_enabled
from stemstream.errors import SecurityError
from stemstream.log import RateLimitedLog
from stemstream.transport.keys import (
    DEFAULT_CLIENT,
    CurveKeys,
    KeyDirectory,
    check_name,
    read_public,
    read_role,
    valid_key,
)

logger = logging.getLogger(__name__)
_rlog = RateLimitedLog(logger)

Role = Literal["server", "client", "peer"]
ROLES: tuple[str, ...] = ("server", "client", "peer")
ZAP_DOMAIN = b"stemstream"
PEER_ZAP_DOMAIN = b"stemstream-peer"  # Binary Star ports: only the store's own keys
PEER_ROLES = frozenset({"store", "admin"})


class CurveSecurity:
    """The CURVE keys of one process (read from the key directory once, on first use) and how to apply them.

    ``apply(sock, role, ctx)`` sets a socket's keys; for a server socket it also makes sure the context has
    its ZAP authenticator. Get one with :func:`curve_security`, which returns None when CURVE is off.
    ``server_key_name`` names this host's own server keypair (``servers/NAME``); None: the store's.
    """

    def __init__(
        self, keys_dir: Path | str, key_name: str = DEFAULT_CLIENT, server_key_name: str | None = None
    ) -> None:
        self.directory = KeyDirectory(keys_dir)
        self.key_name = check_name(key_name)
        self.server_key_name = check_name(server_key_name) if server_key_name is not None else None
        self._lock = threading.Lock()
        self._keys: dict[str, CurveKeys] = {}

    def __repr__(self) -> str:
        host = f", server_key_name={self.server_key_name!r}" if self.server_key_name else ""
        return f"CurveSecurity({str(self.directory.path)!r}, key_name={self.key_name!r}{host})"

    def keys(self, role: Role) -> CurveKeys:
        """The keys a socket of ``role`` uses; a one-line SecurityError if a file is missing or bad."""
        if role not in ROLES:
            raise ValueError(f"socket role {role!r}: expected one of {', '.join(ROLES)}")
        which = "server" if role == "server" else "client"  # a peer link is a client with its own key
        if not self.directory.path.is_dir():
            raise SecurityError(
                f"the key directory {self.directory.path} does not exist: fix STEMSTREAM_KEYS_DIR, or make it with "
                "`stemstream keys init DIR` (docs/security.md)"
            )
        with self._lock:
            keys = self._keys.get(which)
            if keys is None:
                d = self.directory
                keys = d.client_keys(self.key_name) if which == "client" else d.server_keys(self.server_key_name)
                self._keys[which] = keys
            return keys

    @property
    def server_public(self) -> str:
        """The public key (z85 text) of the server keypair this process binds with: what it publishes in its
        registry record (``server_key``) so that clients connect to it with that key."""
        return self.keys("server").public.decode()

    def check(self, *roles: Role) -> None:
        """Read the keys ``roles`` need now (on the caller's thread), so a missing file fails early."""
        for role in roles:
            self.keys(role)
            if role == "server" and not self.directory.authorized_dir.is_dir():
                raise SecurityError(
                    f"no {self.directory.authorized_dir}: a process that binds needs the authorised public keys "
                    "(docs/security.md)"
                )

    def apply(
        self,
        sock: zmq.Socket,
        role: Role,
        ctx: zmq.Context,
        *,
        server_key: str | bytes | None = None,
        peer_only: bool = False,
    ) -> None:
        """Set ``sock``'s keys for ``role``. A client connects to the store's server key unless given the
        ``server_key`` (z85) a service published; a server with ``peer_only`` admits only ``store`` keys."""
        keys = self.keys(role)
        if role == "server":
            ensure_authenticator(ctx, self.directory)
            sock.zap_domain = PEER_ZAP_DOMAIN if peer_only else ZAP_DOMAIN
            sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)  # no ZAP handler: refuse, never admit anyone
            sock.curve_secretkey = keys.secret
            sock.curve_publickey = keys.public
            sock.curve_server = True
        else:
            sock.curve_secretkey = keys.secret
            sock.curve_publickey = keys.public
            if server_key is not None:
                key = server_key.encode() if isinstance(server_key, str) else server_key
                if not valid_key(key):
                    raise SecurityError("a published server key is not 40 characters of z85; refusing to connect")
                sock.curve_serverkey = key
            else:
                assert keys.server_public is not None
                sock.curve_serverkey = keys.server_public

    def identities(self, min_interval_s: float = 1.0) -> AuthorizedKeys:
        """A fresh view of ``authorized/`` (names and roles by key, re-read at most every ``min_interval_s``)
        for a service's own thread: the store server asks it the role of each writer."""
        return AuthorizedKeys(self.directory, min_interval_s=min_interval_s)


_cache: dict[tuple[Path, str, str | None], CurveSecurity] = {}
_cache_lock = threading.Lock()


def curve_security(settings: Settings, hosts: tuple[str | None, ...] = ()) -> CurveSecurity | None:
    """This process's CurveSecurity for ``settings`` (one per key directory, key name and server key name),
    or None when CURVE is off; see :func:`stemstream.config.curve_enabled` for the decision and its
    ConfigError."""
    if not curve_enabled(settings, hosts):
        return None
    assert settings.keys_dir is not None
    key = (Path(settings.keys_dir).expanduser().resolve(), settings.key_name, settings.server_key_name)
    with _cache_lock:
        security = _cache.get(key)
        if security is None:
            security = _cache[key] = CurveSecurity(key[0], settings.key_name, settings.server_key_name)
        return security


# ------------------------------------------------------------------------------------ authenticator


@dataclass(frozen=True)
class Identity:
    """Who an authorised public key is: its name (the file's stem) and its store role (None: read only)."""

    name: str
    role: str | None


class AuthorizedKeys:
    """ZAP credentials provider: admits the public keys in ``authorized/`` (``*.key`` certificate files) of
    ``keys``, never a server key of that directory (the store's or a host's), and with ``roles`` only keys of
    those store roles. It also tells a key's :class:`Identity` (``identity``) and a name's role (``role``).

    The directory is re-read whenever its listing changes (names, sizes, modification times), but at most
    every ``min_interval_s``, so keys added or revoked there count for the next connection (and the next
    store write) without a restart. Refusals are logged (the client's *public* key, rate-limited).
    """

    def __init__(self, keys: KeyDirectory, *, roles: frozenset[str] | None = None, min_interval_s: float = 0.0) -> None:
        self.keys = keys
        self.directory = keys.authorized_dir
        self.roles = roles
        self.min_interval_s = min_interval_s
        self._signature: tuple[tuple[str, int, int], ...] | None = None
        self._checked = float("-inf")
        self._by_key: dict[bytes, Identity] = {}
        self._roles: dict[str, str | None] = {}
        self._lock = threading.Lock()

    def _listing(self) -> tuple[tuple[str, int, int], ...]:
        found = []
        for directory, prefix in ((self.directory, ""), (self.keys.servers_dir, "servers/"), (self.keys.path, "/")):
            try:
                with os.scandir(directory) as it:
                    for entry in it:
                        if entry.name.endswith(".key") and entry.is_file():
                            st = entry.stat()
                            found.append((prefix + entry.name, st.st_mtime_ns, st.st_size))
            except OSError:
                continue
        return tuple(sorted(found))

    def refresh(self) -> None:
        now = time.monotonic()
        with self._lock:
            if now - self._checked < self.min_interval_s:
                return
            self._checked = now
            listing = self._listing()
            if listing == self._signature:
                return
            servers = self.keys.server_public_keys()
            by_key: dict[bytes, Identity] = {}
            roles: dict[str, str | None] = {}
            for name, _, _ in listing:
                if "/" in name:
                    continue  # a server key file, listed only to notice changes
                path = self.directory / name
                try:
                    public, role = read_public(path), read_role(path)
                except SecurityError as exc:
                    _rlog.warning("bad_authorized", "CURVE: skipping %s", exc)
                    continue
                if public in servers:
                    _rlog.warning("server_authorized", "CURVE: %s holds a server key; a server key is never "
                                  "admitted as a client key (remove it)", path)  # fmt: skip
                    continue
                identity = Identity(path.stem, role)
                by_key[public] = identity
                roles[identity.name] = role
            if not by_key:
                _rlog.warning("no_authorized", "CURVE: no authorised public keys in %s: every client is refused",
                              self.directory)  # fmt: skip
            self._signature, self._by_key, self._roles = listing, by_key, roles
        logger.debug("CURVE: %d authorised public keys in %s", len(by_key), self.directory)

    def identity(self, key: bytes) -> Identity | None:
        """The identity of an authorised public key (z85), or None."""
        self.refresh()
        return self._by_key.get(key)

    def role(self, name: str) -> str | None:
        """The store role of the authorised key ``name`` now (None: no role, or no longer authorised)."""
        self.refresh()
        return self._roles.get(name)

    def callback(self, domain: str, key: bytes) -> bool:
        who = self.identity(key)
        if who is not None and (self.roles is None or who.role in self.roles):
            return True
        why = f"not in {self.directory}" if who is None else f"role {who.role!r} may not use this port"
        _rlog.warning("denied", "CURVE: refused a connection from public key %s (%s)",
                      key.decode("ascii", "replace"), why)  # fmt: skip
        return False


class _Authenticator(ThreadAuthenticator):
    """pyzmq's thread authenticator, naming each admitted connection by its key name (the ZAP User-Id that
    ``zmq.Frame.get("User-Id")`` returns on the service's side) instead of the key's z85 text."""

    def __init__(self, ctx: zmq.Context, names: AuthorizedKeys) -> None:
        super().__init__(ctx, log=logging.getLogger(f"{__name__}.zap"))
        self._names = names

    def curve_user_id(self, client_public_key: bytes) -> str:
        z85_key = zmq.utils.z85.encode(client_public_key)
        who = self._names.identity(z85_key)
        return who.name if who is not None else z85_key.decode("ascii")


_auth_lock = threading.Lock()
_authenticators: dict[int, tuple[zmq.Context, ThreadAuthenticator]] = {}


def ensure_authenticator(ctx: zmq.Context, keys: KeyDirectory) -> None:
    """Start ``ctx``'s ZAP authenticator (once per context) admitting the keys in ``keys``'s ``authorized/``:
    any role on the service ports (:data:`ZAP_DOMAIN`), only :data:`PEER_ROLES` on the Binary Star ports.

    It runs a thread with a socket in ``ctx``: end such a context with :func:`stop_authenticator` first
    (``sockets.term_context`` does both), or ``ctx.term()`` would wait for that socket forever.
    """
    with _auth_lock:
        if id(ctx) in _authenticators:
            return
        clients = AuthorizedKeys(keys)
        auth = _Authenticator(ctx, clients)
        auth.configure_curve_callback(ZAP_DOMAIN.decode(), credentials_provider=clients)
        peers = AuthorizedKeys(keys, roles=PEER_ROLES)
        auth.configure_curve_callback(PEER_ZAP_DOMAIN.decode(), credentials_provider=peers)
        auth.start()  # binds inproc://zeromq.zap.01 in ctx before its server socket binds
        _authenticators[id(ctx)] = (ctx, auth)
    logger.info("CURVE: ZAP authenticator started; authorised keys from %s", keys.authorized_dir)


def stop_authenticator(ctx: zmq.Context) -> None:
    """Stop ``ctx``'s ZAP authenticator, if it has one; safe to call twice."""
    with _auth_lock:
        entry = _authenticators.pop(id(ctx), None)
    if entry is not None:
        entry[1].stop()


def has_authenticator(ctx: zmq.Context) -> bool:
    with _auth_lock:
        return id(ctx) in _authenticators

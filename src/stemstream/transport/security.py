"""ZeroMQ CURVE for stemstream: the key directory, which keys a socket gets, and the ZAP authenticator.

A key directory (made by ``stemstream keys init DIR``; pyzmq certificate files, docs/security.md)::

    DIR/server.key                 the store's server public key: every host needs it
    DIR/server.key_secret          the store's server keypair (0600): the store servers only
    DIR/servers/HOST.key           a host's own server public key (``keys add HOST --server``)
    DIR/servers/HOST.key_secret    its keypair (0600): that host only (STEMSTREAM_SERVER_KEY_NAME)
    DIR/clients/NAME.key           a client's public key
    DIR/clients/NAME.key_secret    a client's keypair (0600): the hosts that use NAME (STEMSTREAM_KEY_NAME)
    DIR/authorized/NAME.key        public keys allowed to connect, each with its store role (metadata
                                   ``role = "nodegroup"``; none: it may read the store but write nothing)

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
import re
import stat
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import zmq
import zmq.auth
import zmq.utils.z85
from zmq.auth.thread import ThreadAuthenticator

from stemstream.config import Settings, curve_enabled
from stemstream.errors import SecurityError
from stemstream.log import RateLimitedLog

logger = logging.getLogger(__name__)
_rlog = RateLimitedLog(logger)

Role = Literal["server", "client", "peer"]
ROLES: tuple[str, ...] = ("server", "client", "peer")
SERVER = "server"
SERVERS = "servers"
CLIENTS = "clients"
AUTHORIZED = "authorized"
DEFAULT_CLIENT = "stemstream"
# The default client made by `keys init` may write anything: for the demo, tests and the operator's CLI.
DEFAULT_CLIENT_ROLE = "admin"
ZAP_DOMAIN = b"stemstream"
PEER_ZAP_DOMAIN = b"stemstream-peer"  # Binary Star ports: only the store's own keys
PEER_ROLES = frozenset({"store", "admin"})
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@+-]{0,63}$")
ROLE_RE = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
_ROLE_LINE = re.compile(r'^[ \t]+role[ \t]*=[ \t]*"?([^"\s]*)"?[ \t]*$', re.MULTILINE)
_Z85_KEY_LEN = 40


@dataclass(frozen=True)
class CurveKeys:
    """CURVE keys (z85 text): a server needs its own pair; a client its own pair and the server's public key.

    The secret is left out of the repr, so a CurveKeys in a log line or a traceback shows no secret.
    """

    public: bytes
    secret: bytes = field(repr=False)
    server_public: bytes | None = None


def check_name(name: str) -> str:
    """A key name is a letter or digit, then up to 63 letters, digits or ``_.@+-`` (it becomes a file name);
    ``server`` is reserved."""
    if not NAME_RE.match(name):
        raise SecurityError(f"key name {name!r}: start with a letter or digit, then up to 63 letters, digits or _.@+-")
    if name == SERVER:
        raise SecurityError("key name 'server' is reserved for the facility server keypair; choose another")
    return name


def check_role(role: str) -> str:
    """A store role is a lower-case word (``nodegroup``, ``producer``, ...); which roles exist, and what each
    may write, is the store's write policy (docs/security.md), not this module's business."""
    if not ROLE_RE.match(role):
        raise SecurityError(f"role {role!r}: a lower-case word of letters, digits, _ and -")
    return role


# ----------------------------------------------------------------------------------------- key files


class KeyDirectory:
    """A key directory on disk (see the module docstring): made, read and changed only through this class."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path).expanduser()

    def __repr__(self) -> str:
        return f"KeyDirectory({str(self.path)!r})"

    @property
    def server_public_file(self) -> Path:
        return self.path / f"{SERVER}.key"

    @property
    def server_secret_file(self) -> Path:
        return self.path / f"{SERVER}.key_secret"

    @property
    def servers_dir(self) -> Path:
        return self.path / SERVERS

    @property
    def clients_dir(self) -> Path:
        return self.path / CLIENTS

    @property
    def authorized_dir(self) -> Path:
        return self.path / AUTHORIZED

    def client_public_file(self, name: str) -> Path:
        return self.clients_dir / f"{name}.key"

    def client_secret_file(self, name: str) -> Path:
        return self.clients_dir / f"{name}.key_secret"

    def host_public_file(self, name: str) -> Path:
        return self.servers_dir / f"{name}.key"

    def host_secret_file(self, name: str) -> Path:
        return self.servers_dir / f"{name}.key_secret"

    # ---- making keys

    def init(self, client: str = DEFAULT_CLIENT, role: str = DEFAULT_CLIENT_ROLE) -> None:
        """Make the store's server keypair and the ``client`` keypair, and authorise the client with ``role``.

        The server's own key is never authorised: a server key is not a client key."""
        check_name(client)
        if self.server_public_file.exists() or self.server_secret_file.exists():
            raise SecurityError(
                f"{self.path} already holds a server keypair; use `stemstream keys add NAME --dir {self.path}` "
                "for another client, or init a new directory to rotate the server key"
            )
        self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
        for sub in (self.clients_dir, self.authorized_dir, self.servers_dir):
            sub.mkdir(mode=0o755, exist_ok=True)
        self._create(self.path, SERVER)
        self.add(client, role=role)

    def add(self, name: str, *, authorize: bool = True, role: str | None = None, server: bool = False) -> bytes:
        """Make client keypair ``name`` (and authorise it, with ``role``), or with ``server`` a host's own
        server keypair (never authorised as a client); its public key (z85)."""
        check_name(name)
        self._require_initialised()
        if server:
            if role is not None:
                raise SecurityError("a server key has no store role: give the host a client key for that")
            if self.host_secret_file(name).exists() or self.host_public_file(name).exists():
                raise SecurityError(f"server key {name!r} exists in {self.servers_dir}; add one with a new name")
            self.servers_dir.mkdir(mode=0o755, exist_ok=True)
            self._create(self.servers_dir, name)
            return read_public(self.host_public_file(name))
        if self.client_secret_file(name).exists() or self.client_public_file(name).exists():
            raise SecurityError(
                f"client key {name!r} exists in {self.clients_dir}; revoke it and add one with a new name to rotate it"
            )
        self.clients_dir.mkdir(mode=0o755, exist_ok=True)
        self._create(self.clients_dir, name)
        if authorize:
            self.authorize(name, role=role)
        return read_public(self.client_public_file(name))

    def authorize(self, name_or_file: str | Path, role: str | None = None) -> str:
        """Allow a public key to connect, with store ``role`` (None: it may read, not write): a client of
        this directory by name, or a public key file (``NAME.key``, e.g. made at another site). Authorising
        an authorised key again sets its role. The name it is authorised under."""
        if role is not None:
            check_role(role)
        source = Path(name_or_file)
        if source.suffix == ".key" and source.is_file():
            name = check_name(source.stem)
        else:
            name = check_name(str(name_or_file))
            source = self.client_public_file(name)
            if not source.is_file():
                raise SecurityError(f"no client key {name!r} in {self.clients_dir}; make it with `keys add`")
        public = read_public(source)
        if public in self.server_public_keys():
            raise SecurityError(f"{source} holds a server key; a server key is never authorised as a client key")
        self.authorized_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
        target = self.authorized_dir / f"{name}.key"
        if target.exists() and read_public(target) != public:
            raise SecurityError(f"{target} holds a different key; revoke {name!r} first")
        # Only the public key goes to authorized/, even if a secret file was given.
        _write_atomic(target, _public_text(public, role), 0o644)
        return name

    def revoke(self, name: str) -> Path:
        """Remove ``name``'s public key from authorized/ (its keypair files stay); the file removed."""
        if name != SERVER:
            check_name(name)
        target = self.authorized_dir / f"{name}.key"
        if not target.exists():
            raise SecurityError(f"{name!r} is not authorised in {self.authorized_dir} (see `stemstream keys list`)")
        target.unlink()
        return target

    def entries(self) -> list[dict[str, object]]:
        """Every key by name: kind, public key (z85 text), whether this directory holds its secret,
        whether it is authorised, and its store role."""
        authorized = self._authorized()
        out: list[dict[str, object]] = []
        if self.server_public_file.exists():
            out.append(self._entry(SERVER, "server", self.server_public_file, self.server_secret_file, {}))
        hosts = sorted(p.stem for p in self.servers_dir.glob("*.key")) if self.servers_dir.is_dir() else []
        for name in hosts:
            out.append(self._entry(name, "host", self.host_public_file(name), self.host_secret_file(name), {}))
        names = sorted(p.stem for p in self.clients_dir.glob("*.key")) if self.clients_dir.is_dir() else []
        for name in names:
            pub, sec = self.client_public_file(name), self.client_secret_file(name)
            out.append(self._entry(name, "client", pub, sec, authorized))
        for name in sorted(set(authorized) - set(names)):  # authorised from elsewhere (or a stale server.key)
            public, role = authorized[name]
            out.append(
                {"name": name, "kind": "external", "public": public, "secret": False, "authorized": True, "role": role}
            )
        return out

    def _entry(
        self, name: str, kind: str, pub: Path, sec: Path, authorized: dict[str, tuple[str, str | None]]
    ) -> dict[str, object]:
        public = read_public(pub).decode()
        held = authorized.get(name)
        ok = held is not None and held[0] == public
        return {
            "name": name,
            "kind": kind,
            "public": public,
            "secret": sec.exists(),
            "authorized": ok,
            "role": held[1] if ok and held is not None else None,
        }

    def _authorized(self) -> dict[str, tuple[str, str | None]]:
        """Authorised keys by name: (public key, role)."""
        if not self.authorized_dir.is_dir():
            return {}
        out = {}
        for p in sorted(self.authorized_dir.glob("*.key")):
            try:
                out[p.stem] = (read_public(p).decode(), read_role(p))
            except SecurityError as exc:
                logger.warning("%s", exc)
        return out

    def _require_initialised(self) -> None:
        if not self.server_public_file.exists():
            raise SecurityError(f"{self.path} is not a key directory; run `stemstream keys init {self.path}` first")

    @staticmethod
    def _create(directory: Path, name: str) -> None:
        """``name.key`` (0644) and ``name.key_secret`` (0600) in ``directory``, never world-readable in between:
        made in a private temporary directory, then moved into place."""
        with tempfile.TemporaryDirectory(dir=directory, prefix=".keys-") as tmp:  # mode 0700
            public_file, secret_file = zmq.auth.create_certificates(tmp, name)
            os.chmod(secret_file, 0o600)
            os.chmod(public_file, 0o644)
            os.replace(secret_file, directory / f"{name}.key_secret")
            os.replace(public_file, directory / f"{name}.key")

    # ---- reading keys (processes)

    def server_public(self) -> bytes:
        if not self.server_public_file.exists():
            raise SecurityError(
                f"no server public key {self.server_public_file}: run `stemstream keys init {self.path}` "
                "on the key host and copy server.key here (or fix STEMSTREAM_KEYS_DIR)"
            )
        return read_public(self.server_public_file)

    def server_public_keys(self) -> frozenset[bytes]:
        """Every server public key of this directory (the store's and each host's): never a client key."""
        files = [self.server_public_file]
        if self.servers_dir.is_dir():
            files += sorted(self.servers_dir.glob("*.key"))
        out = set()
        for path in files:
            if path.is_file():
                try:
                    out.add(read_public(path))
                except SecurityError as exc:
                    logger.warning("%s", exc)
        return frozenset(out)

    def server_keys(self, host: str | None = None) -> CurveKeys:
        """The keypair a process that binds uses: host ``host``'s own (``servers/HOST.key_secret``), or with
        None the store's (``server.key_secret``)."""
        if host is not None:
            path = self.host_secret_file(check_name(host))
            if not path.exists():
                raise SecurityError(
                    f"no server keypair {path}: make it with `stemstream keys add {host} --server --dir DIR` on "
                    "the key host and copy it here (mode 0600), or unset STEMSTREAM_SERVER_KEY_NAME"
                )
            public, secret = read_keypair(path)
            return CurveKeys(public, secret, public)
        if not self.server_secret_file.exists():
            raise SecurityError(
                f"this process binds sockets and needs a server keypair: {self.server_secret_file} (the store's), "
                "or its host's own (`stemstream keys add HOST --server`, STEMSTREAM_SERVER_KEY_NAME=HOST); "
                "copy it from the key host (mode 0600), see docs/security.md"
            )
        public, secret = read_keypair(self.server_secret_file)
        return CurveKeys(public, secret, public)

    def client_keys(self, name: str) -> CurveKeys:
        """Client keypair ``name`` plus the store server's public key, for sockets that connect."""
        check_name(name)
        path = self.client_secret_file(name)
        if not path.exists():
            raise SecurityError(
                f"no client keypair {path}: make one with `stemstream keys add {name} --dir DIR` on the key "
                "host and copy it here, or set STEMSTREAM_KEY_NAME to one that exists"
            )
        public, secret = read_keypair(path)
        return CurveKeys(public, secret, self.server_public())


def _public_text(public: bytes, role: str | None = None) -> str:
    meta = f'    role = "{role}"\n' if role else ""
    return (
        "#   ZeroMQ CURVE Public Certificate (stemstream keys)\n"
        "metadata\n"
        f"{meta}"
        "curve\n"
        f'    public-key = "{public.decode()}"\n'
    )


def read_role(path: Path) -> str | None:
    """The store role in an authorised key's metadata (``role = "nodegroup"``), or None."""
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        raise SecurityError(f"cannot read {path}: {exc.strerror}") from None
    found = _ROLE_LINE.search(text.split("\ncurve", 1)[0])
    role = found.group(1) if found else None
    return role if role and ROLE_RE.match(role) else None


def _write_atomic(path: Path, text: str, mode: int) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def _valid_key(key: bytes | None) -> bool:
    if key is None or len(key) != _Z85_KEY_LEN:
        return False
    try:
        zmq.utils.z85.decode(key)
    except (ValueError, KeyError):
        return False
    return True


def read_public(path: Path) -> bytes:
    """The public key (z85) in a certificate file; SecurityError if it has none or a malformed one."""
    try:
        public, _ = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise SecurityError(f"cannot read the public key in {path}: {exc}") from None
    if not _valid_key(public):
        raise SecurityError(f"{path}: the public key is not 40 characters of z85")
    return public


def read_keypair(path: Path) -> tuple[bytes, bytes]:
    """Public and secret key (z85) of a ``.key_secret`` file, which must be readable by its owner only."""
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except OSError as exc:
        raise SecurityError(f"cannot read {path}: {exc.strerror}") from None
    if mode & 0o077:
        raise SecurityError(f"{path} has mode {mode:04o}; a secret key must be private: chmod 600 {path}")
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise SecurityError(f"cannot read the keypair in {path}: {exc}") from None
    if not _valid_key(public) or not _valid_key(secret):
        raise SecurityError(f"{path} does not hold a valid CURVE keypair (40-character z85 keys)")
    assert secret is not None
    return public, secret


# ---------------------------------------------------------------------------------------- processes


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
                if not _valid_key(key):
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

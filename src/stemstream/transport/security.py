"""ZeroMQ CURVE for stemstream: the key directory, which keys a socket gets, and the ZAP authenticator.

A key directory (made by ``stemstream keys init DIR``; pyzmq certificate files, docs/security.md)::

    DIR/server.key                 the facility server's public key: every host needs it
    DIR/server.key_secret          the server keypair (0600): hosts that bind (store, aggregator, NodeGroups)
    DIR/clients/NAME.key           a client's public key
    DIR/clients/NAME.key_secret    a client's keypair (0600): the hosts that use NAME (STEMSTREAM_KEY_NAME)
    DIR/authorized/NAME.key        public keys allowed to connect (init adds the default client and the
                                   server itself, since Binary Star peers connect to each other)

Roles: a socket that binds is a CURVE *server* (the server keypair, ``curve_server``); one that connects is
a *client* (its own keypair plus the server's public key); a store server connecting to its Binary Star
peer is a *peer* (a client that uses the server keypair). Every context with a server socket gets one ZAP
authenticator thread that admits only the public keys in ``authorized/``; it re-reads that directory when
it changes, so ``keys add``/``keys revoke`` take effect for new connections without a restart.

Secret keys are never logged, never part of a repr, and never held in Settings (only the directory is).
"""

from __future__ import annotations

import logging
import os
import re
import stat
import tempfile
import threading
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
CLIENTS = "clients"
AUTHORIZED = "authorized"
DEFAULT_CLIENT = "stemstream"
ZAP_DOMAIN = b"stemstream"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@+-]{0,63}$")
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
    def clients_dir(self) -> Path:
        return self.path / CLIENTS

    @property
    def authorized_dir(self) -> Path:
        return self.path / AUTHORIZED

    def client_public_file(self, name: str) -> Path:
        return self.clients_dir / f"{name}.key"

    def client_secret_file(self, name: str) -> Path:
        return self.clients_dir / f"{name}.key_secret"

    # ---- making keys

    def init(self, client: str = DEFAULT_CLIENT) -> None:
        """Make the server keypair and the ``client`` keypair, and authorise both public keys."""
        check_name(client)
        if self.server_public_file.exists() or self.server_secret_file.exists():
            raise SecurityError(
                f"{self.path} already holds a server keypair; use `stemstream keys add NAME --dir {self.path}` "
                "for another client, or init a new directory to rotate the server key"
            )
        self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
        for sub in (self.clients_dir, self.authorized_dir):
            sub.mkdir(mode=0o755, exist_ok=True)
        self._create(self.path, SERVER)
        _write_atomic(self.authorized_dir / f"{SERVER}.key", _public_text(self.server_public()), 0o644)
        self.add(client)

    def add(self, name: str, *, authorize: bool = True) -> bytes:
        """Make client keypair ``name`` (and authorise it); its public key (z85)."""
        check_name(name)
        self._require_initialised()
        if self.client_secret_file(name).exists() or self.client_public_file(name).exists():
            raise SecurityError(
                f"client key {name!r} exists in {self.clients_dir}; revoke it and add one with a new name to rotate it"
            )
        self.clients_dir.mkdir(mode=0o755, exist_ok=True)
        self._create(self.clients_dir, name)
        if authorize:
            self.authorize(name)
        return read_public(self.client_public_file(name))

    def authorize(self, name_or_file: str | Path) -> str:
        """Allow a public key to connect: a client of this directory by name, or a public key file
        (``NAME.key``, e.g. made at another site). The name it is authorised under."""
        source = Path(name_or_file)
        if source.suffix == ".key" and source.is_file():
            name = check_name(source.stem)
        else:
            name = check_name(str(name_or_file))
            source = self.client_public_file(name)
            if not source.is_file():
                raise SecurityError(f"no client key {name!r} in {self.clients_dir}; make it with `keys add`")
        public = read_public(source)
        self.authorized_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
        target = self.authorized_dir / f"{name}.key"
        if target.exists() and read_public(target) != public:
            raise SecurityError(f"{target} holds a different key; revoke {name!r} first")
        # Only the public key goes to authorized/, even if a secret file was given.
        _write_atomic(target, _public_text(public), 0o644)
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
        """Every key by name: public key (z85 text), whether this directory holds its secret, authorised."""
        authorized = self._authorized_names()
        out: list[dict[str, object]] = []
        if self.server_public_file.exists():
            out.append(self._entry(SERVER, "server", self.server_public_file, self.server_secret_file, authorized))
        names = sorted(p.stem for p in self.clients_dir.glob("*.key")) if self.clients_dir.is_dir() else []
        for name in names:
            pub, sec = self.client_public_file(name), self.client_secret_file(name)
            out.append(self._entry(name, "client", pub, sec, authorized))
        for name in sorted(set(authorized) - {SERVER, *names}):  # authorised from elsewhere
            out.append(
                {"name": name, "kind": "external", "public": authorized[name], "secret": False, "authorized": True}
            )
        return out

    def _entry(self, name: str, kind: str, pub: Path, sec: Path, authorized: dict[str, str]) -> dict[str, object]:
        public = read_public(pub).decode()
        return {
            "name": name,
            "kind": kind,
            "public": public,
            "secret": sec.exists(),
            "authorized": authorized.get(name) == public,
        }

    def _authorized_names(self) -> dict[str, str]:
        if not self.authorized_dir.is_dir():
            return {}
        out = {}
        for p in sorted(self.authorized_dir.glob("*.key")):
            try:
                out[p.stem] = read_public(p).decode()
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

    def server_keys(self) -> CurveKeys:
        """The server keypair, for sockets that bind (and for a store server's Binary Star peer links)."""
        if not self.server_secret_file.exists():
            raise SecurityError(
                f"this process binds sockets and needs the server keypair {self.server_secret_file}; copy it "
                "from the key host (mode 0600), see docs/security.md"
            )
        public, secret = read_keypair(self.server_secret_file)
        return CurveKeys(public, secret, public)

    def client_keys(self, name: str) -> CurveKeys:
        """Client keypair ``name`` plus the server's public key, for sockets that connect."""
        check_name(name)
        path = self.client_secret_file(name)
        if not path.exists():
            raise SecurityError(
                f"no client keypair {path}: make one with `stemstream keys add {name} --dir DIR` on the key "
                "host and copy it here, or set STEMSTREAM_KEY_NAME to one that exists"
            )
        public, secret = read_keypair(path)
        return CurveKeys(public, secret, self.server_public())


def _public_text(public: bytes) -> str:
    return (
        "#   ZeroMQ CURVE Public Certificate (stemstream keys)\n"
        "metadata\n"
        "curve\n"
        f'    public-key = "{public.decode()}"\n'
    )


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
    """

    def __init__(self, keys_dir: Path | str, key_name: str = DEFAULT_CLIENT) -> None:
        self.directory = KeyDirectory(keys_dir)
        self.key_name = check_name(key_name)
        self._lock = threading.Lock()
        self._keys: dict[str, CurveKeys] = {}

    def __repr__(self) -> str:
        return f"CurveSecurity({str(self.directory.path)!r}, key_name={self.key_name!r})"

    def keys(self, role: Role) -> CurveKeys:
        """The keys a socket of ``role`` uses; a one-line SecurityError if a file is missing or bad."""
        if role not in ROLES:
            raise ValueError(f"socket role {role!r}: expected one of {', '.join(ROLES)}")
        which = "client" if role == "client" else "server"
        if not self.directory.path.is_dir():
            raise SecurityError(
                f"the key directory {self.directory.path} does not exist: fix STEMSTREAM_KEYS_DIR, or make it with "
                "`stemstream keys init DIR` (docs/security.md)"
            )
        with self._lock:
            keys = self._keys.get(which)
            if keys is None:
                d = self.directory
                keys = d.client_keys(self.key_name) if which == "client" else d.server_keys()
                self._keys[which] = keys
            return keys

    def check(self, *roles: Role) -> None:
        """Read the keys ``roles`` need now (on the caller's thread), so a missing file fails early."""
        for role in roles:
            self.keys(role)
            if role == "server" and not self.directory.authorized_dir.is_dir():
                raise SecurityError(
                    f"no {self.directory.authorized_dir}: a process that binds needs the authorised public keys "
                    "(docs/security.md)"
                )

    def apply(self, sock: zmq.Socket, role: Role, ctx: zmq.Context) -> None:
        keys = self.keys(role)
        if role == "server":
            ensure_authenticator(ctx, self.directory.authorized_dir)
            sock.zap_domain = ZAP_DOMAIN
            sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)  # no ZAP handler: refuse, never admit anyone
            sock.curve_secretkey = keys.secret
            sock.curve_publickey = keys.public
            sock.curve_server = True
        else:
            sock.curve_secretkey = keys.secret
            sock.curve_publickey = keys.public
            assert keys.server_public is not None
            sock.curve_serverkey = keys.server_public


_cache: dict[tuple[Path, str], CurveSecurity] = {}
_cache_lock = threading.Lock()


def curve_security(settings: Settings, hosts: tuple[str | None, ...] = ()) -> CurveSecurity | None:
    """This process's CurveSecurity for ``settings`` (one per key directory and key name), or None when
    CURVE is off; see :func:`stemstream.config.curve_enabled` for the decision and its ConfigError."""
    if not curve_enabled(settings, hosts):
        return None
    assert settings.keys_dir is not None
    key = (Path(settings.keys_dir).expanduser().resolve(), settings.key_name)
    with _cache_lock:
        security = _cache.get(key)
        if security is None:
            security = _cache[key] = CurveSecurity(key[0], settings.key_name)
        return security


# ------------------------------------------------------------------------------------ authenticator


class AuthorizedKeys:
    """ZAP credentials provider: admits the public keys in ``directory`` (``*.key`` certificate files).

    The directory is re-read whenever its listing changes (names, sizes, modification times), so keys
    added or revoked there count for the next connection without a restart. Called on the authenticator's
    thread only. Refusals are logged (the client's *public* key, rate-limited).
    """

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self._signature: tuple[tuple[str, int, int], ...] | None = None
        self._keys: frozenset[bytes] = frozenset()

    def _listing(self) -> tuple[tuple[str, int, int], ...]:
        try:
            with os.scandir(self.directory) as it:
                found = []
                for entry in it:
                    if entry.name.endswith(".key") and entry.is_file():
                        st = entry.stat()
                        found.append((entry.name, st.st_mtime_ns, st.st_size))
                return tuple(sorted(found))
        except OSError:
            return ()

    def refresh(self) -> None:
        listing = self._listing()
        if listing == self._signature:
            return
        keys = set()
        for name, _, _ in listing:
            try:
                keys.add(read_public(self.directory / name))
            except SecurityError as exc:
                _rlog.warning("bad_authorized", "CURVE: skipping %s", exc)
        if not keys:
            _rlog.warning("no_authorized", "CURVE: no authorised public keys in %s: every client is refused",
                          self.directory)  # fmt: skip
        self._signature, self._keys = listing, frozenset(keys)
        logger.debug("CURVE: %d authorised public keys in %s", len(keys), self.directory)

    def callback(self, domain: str, key: bytes) -> bool:
        self.refresh()
        if key in self._keys:
            return True
        _rlog.warning(
            "denied",
            "CURVE: refused a connection from public key %s (not in %s)",
            key.decode("ascii", "replace"),
            self.directory,
        )
        return False


_auth_lock = threading.Lock()
_authenticators: dict[int, tuple[zmq.Context, ThreadAuthenticator]] = {}


def ensure_authenticator(ctx: zmq.Context, authorized_dir: Path) -> None:
    """Start ``ctx``'s ZAP authenticator (once per context) admitting the keys in ``authorized_dir``.

    It runs a thread with a socket in ``ctx``: end such a context with :func:`stop_authenticator` first
    (``sockets.term_context`` does both), or ``ctx.term()`` would wait for that socket forever.
    """
    with _auth_lock:
        if id(ctx) in _authenticators:
            return
        auth = ThreadAuthenticator(ctx, log=logging.getLogger(f"{__name__}.zap"))
        auth.configure_curve_callback(ZAP_DOMAIN.decode(), credentials_provider=AuthorizedKeys(authorized_dir))
        auth.start()  # binds inproc://zeromq.zap.01 in ctx before its server socket binds
        _authenticators[id(ctx)] = (ctx, auth)
    logger.info("CURVE: ZAP authenticator started; authorised keys from %s", authorized_dir)


def stop_authenticator(ctx: zmq.Context) -> None:
    """Stop ``ctx``'s ZAP authenticator, if it has one; safe to call twice."""
    with _auth_lock:
        entry = _authenticators.pop(id(ctx), None)
    if entry is not None:
        entry[1].stop()


def has_authenticator(ctx: zmq.Context) -> bool:
    with _auth_lock:
        return id(ctx) in _authenticators

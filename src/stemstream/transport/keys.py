"""CURVE key material on disk: the key directory (made by ``stemstream keys init DIR``; pyzmq certificate
files, docs/security.md) and reading and writing its files. Which keys a socket uses, and who may connect,
is ``transport.security``.

::

    DIR/server.key                 the store's server public key: every host needs it
    DIR/server.key_secret          the store's server keypair (0600): the store servers only
    DIR/servers/HOST.key           a host's own server public key (``keys add HOST --server``)
    DIR/servers/HOST.key_secret    its keypair (0600): that host only (STEMSTREAM_SERVER_KEY_NAME)
    DIR/clients/NAME.key           a client's public key
    DIR/clients/NAME.key_secret    a client's keypair (0600): the hosts that use NAME (STEMSTREAM_KEY_NAME)
    DIR/authorized/NAME.key        public keys allowed to connect, each with its store role (metadata
                                   ``role = "nodegroup"``; none: it may read the store but write nothing)

Secret keys are never logged and never part of a repr.
"""

from __future__ import annotations

import logging
import os
import re
import stat
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import zmq
import zmq.auth
import zmq.utils.z85

from stemstream.errors import SecurityError

logger = logging.getLogger(__name__)

SERVER = "server"
SERVERS = "servers"
CLIENTS = "clients"
AUTHORIZED = "authorized"
DEFAULT_CLIENT = "stemstream"
# The default client made by `keys init` may write anything: for the demo, tests and the operator's CLI.
DEFAULT_CLIENT_ROLE = "admin"
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


def valid_key(key: bytes | None) -> bool:
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
    if not valid_key(public):
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
    if not valid_key(public) or not valid_key(secret):
        raise SecurityError(f"{path} does not hold a valid CURVE keypair (40-character z85 keys)")
    assert secret is not None
    return public, secret


# ---------------------------------------------------------------------------------------- processes

"""Service registry on the Clone store: each process keeps an ephemeral record of itself alive.

Records live at ``/<role>s/<uid>`` (``/nodegroups/...``, ``/producers/...``, ``/aggregators/...``,
``/sessions/...``, ``/flows/...``) as msgpack maps (:meth:`Record.to_dict`). A :class:`Registration`
re-sets its record with a TTL every ``ttl/3`` seconds from a timer thread, so a process that dies
disappears within ``ttl`` (the server expires the key and publishes the deletion).
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import socket
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from stemstream.errors import ProtocolError, StoreError, WaitTimeout
from stemstream.log import RateLimitedLog
from stemstream.store.client import StoreClient

logger = logging.getLogger(__name__)

ROLES = ("nodegroup", "producer", "aggregator", "session", "flow")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:@+-]{0,199}$")
_rlog = RateLimitedLog(logger)


def role_prefix(role: str) -> str:
    """The key prefix of ``role``'s records: ``/<role>s/``."""
    if not _NAME.match(role):
        raise StoreError(f"role {role!r}: use letters, digits and _.:@+- (known roles: {', '.join(ROLES)})")
    return f"/{role}s/"


def record_key(role: str, uid: str) -> str:
    if not _NAME.match(uid):
        raise StoreError(f"uid {uid!r}: use letters, digits and _.:@+-, at most 200 characters, no '/'")
    return role_prefix(role) + uid


def _hostname() -> str:
    return socket.gethostname().split(".")[0]


@dataclass
class Record:
    """What a process says about itself. ``to_dict()`` is the msgpack map stored in the store."""

    uid: str
    role: str
    status: str = "starting"
    scan_number: int | None = None
    counts: dict[str, int] = field(default_factory=dict)
    endpoints: dict[str, str] = field(default_factory=dict)
    host: str = field(default_factory=_hostname)
    pid: int = field(default_factory=os.getpid)
    heartbeat: float = field(default_factory=time.time)
    started: float = field(default_factory=time.time)
    extra: dict[str, Any] = field(default_factory=dict)
    # With CURVE: the public key (z85) of the server keypair the process binds its endpoints with; clients
    # connect to those endpoints with it (docs/security.md). None: the store's server key (or no CURVE).
    server_key: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> Record:
        """Validate a decoded record; raises ProtocolError. Unknown keys are ignored (newer writers)."""
        if not isinstance(data, dict):
            raise ProtocolError(f"registry record: expected a map, got {type(data).__name__}")

        def want(name: str, types: type | tuple[type, ...], default: Any = None, required: bool = False):
            if name not in data:
                if required:
                    raise ProtocolError(f"registry record: missing field {name!r}")
                return default() if callable(default) else default
            value = data[name]
            if not isinstance(value, types) or (isinstance(value, bool) and bool not in _as_tuple(types)):
                raise ProtocolError(f"registry record: field {name!r} has type {type(value).__name__}")
            return value

        counts = want("counts", dict, dict)
        endpoints = want("endpoints", dict, dict)
        if not all(isinstance(k, str) and type(v) is int for k, v in counts.items()):
            raise ProtocolError("registry record: counts must map strings to integers")
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in endpoints.items()):
            raise ProtocolError("registry record: endpoints must map strings to strings")
        return cls(
            uid=want("uid", str, required=True),
            role=want("role", str, required=True),
            status=want("status", str, "starting"),
            scan_number=want("scan_number", (int, type(None))),
            counts=counts,
            endpoints=endpoints,
            host=want("host", str, ""),
            pid=want("pid", int, 0),
            heartbeat=float(want("heartbeat", (int, float), 0.0)),
            started=float(want("started", (int, float), 0.0)),
            extra=want("extra", dict, dict),
            server_key=want("server_key", (str, type(None))),
        )


def _as_tuple(types: type | tuple[type, ...]) -> tuple[type, ...]:
    return types if isinstance(types, tuple) else (types,)


class Registration:
    """A live record: refreshed every ``ttl/3`` s until :meth:`close` (which deletes it)."""

    def __init__(self, client: StoreClient, record: Record, ttl: float) -> None:
        self.uid = record.uid
        self.record = record
        self.key = record_key(record.role, record.uid)
        self._client = client
        self._ttl = ttl
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._publish()
        self._thread = threading.Thread(target=self._refresh, name=f"registry-{self.uid}", daemon=True)
        self._thread.start()

    def update(
        self,
        *,
        status: str | None = None,
        scan_number: int | None = None,
        counts: dict[str, int] | None = None,
        endpoints: dict[str, str] | None = None,
        **extra: Any,
    ) -> None:
        """Change fields (``counts``, ``endpoints`` and ``extra`` are merged) and publish at once."""
        with self._lock:
            r = self.record
            if status is not None:
                r.status = status
            if scan_number is not None:
                r.scan_number = scan_number
            if counts:
                r.counts.update(counts)
            if endpoints:
                r.endpoints.update(endpoints)
            r.extra.update(extra)
        self._publish()

    def close(self) -> None:
        """Stop refreshing and delete the record; safe to call twice."""
        if self._stop.is_set():
            return
        self._stop.set()
        self._thread.join(5.0)
        try:
            self._client.delete(self.key)
        except StoreError as exc:
            logger.debug("registry: could not delete %s: %s", self.key, exc)  # it expires anyway

    def __enter__(self) -> Registration:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Registration({self.key}, {self.record.status})"

    def _publish(self) -> None:
        with self._lock:
            self.record.heartbeat = time.time()
            data = self.record.to_dict()
            # Under the lock: two publishes never reach the client in the opposite order of their content.
            self._client.set(self.key, data, ttl=self._ttl)

    def _refresh(self) -> None:
        while not self._stop.wait(self._ttl / 3):
            try:
                self._publish()
            except StoreError as exc:
                _rlog.warning("refresh", "registry: could not refresh %s: %s", self.key, exc)


class Registry:
    """Typed records of the processes of a deployment, on top of a :class:`StoreClient`."""

    def __init__(self, client: StoreClient, ttl: float = 5.0) -> None:
        self.client = client
        self.ttl = ttl

    def register(
        self,
        role: str,
        uid: str | None = None,
        *,
        status: str = "starting",
        endpoints: dict[str, str] | None = None,
        server_key: str | None = None,
        **extra: Any,
    ) -> Registration:
        """Publish a record for this process and keep it alive; ``uid`` defaults to role-host-pid-random.
        ``server_key``: the public key clients must use for ``endpoints`` (with CURVE)."""
        uid = uid or f"{role}-{_hostname()}-{os.getpid()}-{secrets.token_hex(2)}"
        record = Record(
            uid=uid,
            role=role,
            status=status,
            endpoints=dict(endpoints or {}),
            extra=dict(extra),
            server_key=server_key,
        )
        record_key(role, uid)  # validate before anything is published
        return Registration(self.client, record, self.ttl)

    def members(self, role: str, status: str | None = None) -> list[Record]:
        """Live records of ``role`` (optionally only those with ``status``), sorted by uid."""
        return _records(self.client.items(role_prefix(role)), role, status)

    def wait_for_members(
        self,
        role: str,
        n: int,
        timeout: float = 30.0,
        status: str | None = None,
    ) -> list[Record]:
        """Block until at least ``n`` records of ``role`` (with ``status``) are live; raises TimeoutError."""
        prefix = role_prefix(role)
        try:
            items = self.client.wait_for(lambda it: len(_records(it, role, status)) >= n, prefix, timeout)
        except TimeoutError:
            have = [r.uid for r in self.members(role, status)]
            what = f"{role} records" + (f" with status {status!r}" if status else "")
            raise WaitTimeout(
                f"waited {timeout:g} s for {n} {what}; have {len(have)}: {', '.join(have) or 'none'}"
            ) from None
        return _records(items, role, status)


def _records(items: dict[str, Any], role: str, status: str | None) -> list[Record]:
    records = []
    for key, value in items.items():
        try:
            record = Record.from_dict(value)
        except ProtocolError as exc:
            _rlog.warning("bad-record", "registry: ignoring %s: %s", key, exc)
            continue
        if record.role == role and (status is None or record.status == status):
            records.append(record)
    return sorted(records, key=lambda r: r.uid)

"""StoreClient: a local replica of (subtrees of) the Clone store, kept current by a background agent.

The agent thread (:mod:`stemstream.store.agent`, the zguide's clone agent) owns every socket: a SUB and a
DEALER to the server in use, and a PUSH to each server's collector. The API talks to it through a command
queue and an inproc PAIR that only wakes it, and reads the replica (:mod:`stemstream.store.replica`) under
its lock, so any thread may call any method.

Consistency, in short (docs/store.md has the details):

* ``set``/``delete`` apply to the local replica at once (read-your-writes), then go to the server(s). Until
  the server echoes our update back, later updates of that key from others are ignored: they were
  numbered before ours. The echo "acknowledges" the update; unacknowledged updates are resent after a
  resync or failover, and servers drop the duplicates by uuid.
* Keys outside ``subtrees`` can be written but are not mirrored (we would never see their echo); recent
  ones are resent after a failover too. A client mirrors only the subtrees it uses (``subtrees=("/scans/",
  "/nodegroups/")``): what others write elsewhere costs it nothing.
* The client resyncs (new snapshot, watchers told of the differences) on a gap in sequence numbers (the
  server drops updates for a subscriber that does not keep up; with the whole tree the global sequence
  shows the gap, with subtrees of whole top-level segments, ``/scans/``, each update's ``prev`` and the
  ``last`` of ``HUGZ``), a server restart (new epoch in ``HUGZ``), or a server silent for three heartbeats;
  with a ``backup`` it then tries the other server.
* Without CURVE, ``role``/``name`` are declared on every update (properties ``role``, ``writer``), so the
  server's write policy refuses what a buggy client of that role should not write. With CURVE the server
  goes by the client's key instead.
* After a server restart that lost the state, the client re-publishes the keys whose latest value it wrote.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, TypedDict, Unpack

import zmq

from stemstream.config import Settings, get_settings
from stemstream.errors import StoreError, StoreUnavailable, WaitTimeout
from stemstream.store.agent import Agent, Commands
from stemstream.store.kvmsg import MAX_SUBTREES, KVMsg, KVMsgError, check_path, decode_value, encode_value, format_ttl
from stemstream.store.link import control_pipe, endpoint, split_address
from stemstream.store.policy import ROLE, WRITER
from stemstream.store.replica import Replica, Watcher
from stemstream.transport.security import curve_security

logger = logging.getLogger(__name__)


def store_addresses(settings: Settings) -> tuple[str, str | None]:
    """The store's address and its backup's (None without STEMSTREAM_STORE_BACKUP_HOST) from settings."""
    host, port = settings.store_backup_host, settings.store_backup_port
    return settings.store_address, (endpoint(host, port) if host else None)


class ClientOptions(TypedDict, total=False):
    """What :meth:`StoreClient.from_settings` passes on to the client (see its constructor)."""

    subtree: str
    subtrees: Sequence[str] | None
    timeout: float
    role: str | None
    name: str | None


class StoreClient:
    """A replica of the Clone store at ``address`` (and ``backup``), restricted to ``subtrees`` (or the one
    ``subtree``; ``"/"`` is everything).

    ``start()`` waits up to ``timeout`` seconds for the first snapshot. Values are anything msgpack can
    encode (tuples come back as lists); values written by non-msgpack clients come back as bytes. ``role``
    and ``name`` are declared on the updates for a site without CURVE (module docstring).
    """

    def __init__(
        self,
        address: str,
        *,
        backup: str | None = None,
        subtree: str = "/",
        subtrees: Sequence[str] | None = None,
        timeout: float = 5.0,
        settings: Settings | None = None,
        role: str | None = None,
        name: str | None = None,
    ) -> None:
        hosts = [split_address(address)[0]]  # fail early on a malformed address
        if backup is not None:
            hosts.append(split_address(backup)[0])
        self._servers = [address] if backup is None else [address, backup]
        self._subtrees = tuple(subtrees) if subtrees is not None else (subtree,)
        if not 1 <= len(self._subtrees) <= MAX_SUBTREES:
            raise StoreError(f"a store client follows 1 to {MAX_SUBTREES} subtrees, not {len(self._subtrees)}")
        if any(t in ("", "/") for t in self._subtrees):
            self._subtrees = ("/",)
        self._declared: dict[str, str] = {}
        if role:
            self._declared[ROLE] = role
        if name:
            self._declared[WRITER] = name
        self._timeout = timeout
        self._settings: Settings = settings or get_settings()
        # CURVE: decided (and the client keys read) here, so a missing key is a one-line error now.
        self._security = curve_security(self._settings, hosts=tuple(hosts))
        if self._security is not None:
            self._security.check("client")
        self._replica = Replica(address)
        self._commands: Commands | None = None
        self._ctx: zmq.Context | None = None
        self._thread: threading.Thread | None = None
        self._closed = False

    @classmethod
    def from_settings(cls, settings: Settings | None = None, **options: Unpack[ClientOptions]) -> StoreClient:
        """A client of the store named by STEMSTREAM_STORE_HOST/PORT (and STORE_BACKUP_HOST/PORT, if set)."""
        settings = settings or get_settings()
        address, backup = store_addresses(settings)
        return cls(address, backup=backup, settings=settings, **options)

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> StoreClient:
        """Connect and wait for the first snapshot; raises StoreUnavailable if none comes within timeout."""
        if self._thread is not None:
            raise StoreError("the store client is already started")
        self._ctx = zmq.Context()
        pipe, agent_pipe = control_pipe(self._ctx, f"store-client-{id(self):x}")
        self._commands = Commands(pipe)
        agent = Agent(
            self._replica,
            self._commands,
            self._ctx,
            agent_pipe,
            settings=self._settings,
            servers=self._servers,
            subtrees=self._subtrees,
            timeout=self._timeout,
            declared=self._declared,
        )
        self._thread = threading.Thread(target=agent.run, name="store-client", daemon=True)
        self._thread.start()
        if not self._replica.synced.wait(self._timeout) or self._replica.error is not None:
            error = self._replica.error
            self.close()
            if error is not None:
                raise StoreError(f"store client failed: {error}") from error
            where = " or ".join(self._servers)
            if self._security is None:
                hint = "; if it uses CURVE, set STEMSTREAM_KEYS_DIR"
            else:
                hint = f"; with CURVE on, client key {self._security.key_name!r} must be authorised there"
            raise StoreUnavailable(
                f"no Clone store answered at {where}; start one with `stemstream store serve` "
                f"or set STEMSTREAM_STORE_HOST/PORT{hint}"
            )
        return self

    def close(self) -> None:
        """Stop the agent (after it has handed queued updates to ZeroMQ) and release the sockets."""
        if self._closed:
            return
        self._closed = True
        if self._thread is not None and self._commands is not None:
            self._commands.put(("stop",))
            self._commands.wake(force=True)
            self._thread.join(self._settings.linger_ms / 1000 + 5.0)
            if self._thread.is_alive():
                logger.error("store client agent did not stop; leaving its sockets open")
                return
        if self._commands is not None:
            self._commands.close()
        if self._ctx is not None:
            self._ctx.term()

    def __enter__(self) -> StoreClient:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "connected" if self.connected else "not connected"
        return f"StoreClient({self.server}, subtrees={self._subtrees!r}, {state}, {len(self._replica)} keys)"

    @property
    def connected(self) -> bool:
        """True while synced with a live server."""
        return self._replica.connected

    @property
    def server(self) -> str:
        """Address of the server in use (or being tried)."""
        return self._replica.server

    @property
    def subtrees(self) -> tuple[str, ...]:
        """The prefixes this client mirrors (``("/",)``: everything)."""
        return self._subtrees

    # ------------------------------------------------------------------ writes

    def set(self, key: str, value: Any, ttl: float | None = None) -> None:
        """Set ``key`` to ``value``; with ``ttl`` (seconds) it is ephemeral: re-set it before it expires."""
        body = encode_value(value, key=key)
        props: dict[str, str] = {}
        if ttl is not None:
            try:
                props["ttl"] = format_ttl(ttl)
            except KVMsgError as exc:
                raise StoreError(f"ttl for {key!r}: {exc}") from None
        self._submit(KVMsg(key, 0, body, props))

    def delete(self, key: str) -> None:
        self._submit(KVMsg(key))

    def _submit(self, msg: KVMsg) -> None:
        commands = self._check_usable()
        try:
            check_path(msg.key)
        except KVMsgError as exc:
            raise StoreError(str(exc)) from None
        tracked = msg.key.startswith(self._subtrees)
        with self._replica.lock:  # the agent sends in the order the replica changed
            changed = tracked and self._replica.write(msg, time.monotonic())
            if not tracked:
                self._replica.write_outside(msg)
            commands.put(("send", msg, tracked, changed))
        commands.wake()

    # ------------------------------------------------------------------ reads

    def get(self, key: str, default: Any = None) -> Any:
        """The value of ``key`` in the local replica (no round trip), or ``default``."""
        body = self._replica.get(key)
        return default if body is None else decode_value(body)

    def keys(self, prefix: str = "/") -> list[str]:
        """The keys of the local replica under ``prefix`` (nothing decoded)."""
        return [k for k, _ in self._replica.bodies(prefix)]

    def items(self, prefix: str = "/") -> dict[str, Any]:
        """A copy of the replica under ``prefix``, decoded (changing it changes nothing in the store)."""
        return {k: decode_value(body) for k, body in self._replica.bodies(prefix)}

    def watch(self, callback: Watcher, prefix: str = "/") -> Callable[[], None]:
        """Call ``callback(key, value)`` from the agent thread on every change under ``prefix``.

        ``value`` is None when the key was deleted or expired. Keep callbacks short: they delay the agent.
        Returns a function that unsubscribes.
        """
        return self._replica.watch(prefix, callback)

    def wait_for(
        self, predicate: Callable[[dict[str, Any]], bool], prefix: str = "/", timeout: float = 10.0
    ) -> dict[str, Any]:
        """Block until ``predicate(items(prefix))`` is true and return those items; raises TimeoutError.

        The predicate is re-evaluated on every change of the replica and whenever the connection is lost
        or (re)established, so it may also look at :attr:`connected` and :attr:`server`.
        """
        replica = self._replica
        deadline = time.monotonic() + timeout
        while True:
            with replica.lock:
                version = replica.version
            snapshot = self.items(prefix)
            if predicate(snapshot):
                return snapshot
            with replica.lock:
                while replica.version == version:
                    if replica.error is not None:
                        raise StoreError(f"store client agent died: {replica.error}")
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise WaitTimeout(f"store: condition on {prefix!r} not met within {timeout:g} s")
                    replica.changed.wait(remaining)

    # ------------------------------------------------------------------ internals

    def _check_usable(self) -> Commands:
        """The agent's command queue; raises StoreError if the client is not running."""
        if self._replica.error is not None:
            raise StoreError(f"store client agent died: {self._replica.error}")
        if self._closed:
            raise StoreError("the store client is closed")
        if self._commands is None:
            raise StoreError("the store client is not started; call start() or use it in a with block")
        return self._commands

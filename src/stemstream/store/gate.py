"""Who may write what: the writer of each update (its CURVE key's name and role, or what it declared on a
site without CURVE), the write policy's verdict and the writer's quota. The server applies a client's update
only when :meth:`Gate.admit` has nothing against it."""

from __future__ import annotations

from typing import Any

import zmq

from stemstream.store.kvmsg import KVMsg, check_path
from stemstream.store.policy import ROLE, WRITER, Denial, WritePolicy, Writer, owner_of
from stemstream.store.table import Table, entry_bytes
from stemstream.transport.security import AuthorizedKeys

# Per writer (a key name; "" for clients that declared none on a site without CURVE): keys and bytes held.
QUOTA_KEYS = 100_000
QUOTA_BYTES = 256 << 20


class Gate:
    """The server's admission of client updates (used on the server thread only)."""

    def __init__(
        self,
        identities: AuthorizedKeys | None,
        policy: WritePolicy,
        quota_keys: int = QUOTA_KEYS,
        quota_bytes: int = QUOTA_BYTES,
        max_body: int | None = None,
    ) -> None:
        self.identities = identities  # None: no CURVE, writers are what they declare
        self.policy = policy
        self.quota_keys = quota_keys
        self.quota_bytes = quota_bytes
        self.max_body = max_body

    def decode(self, frames: list[Any]) -> tuple[KVMsg, Writer]:
        """An update from a client, checked as the collector requires, and who sent it; raises KVMsgError."""
        user_id: str | None = None
        if self.identities is not None:  # CURVE: zmq.Frames; the connection's key name is on each
            try:
                user_id = frames[0].get("User-Id")
            except (zmq.ZMQError, IndexError):
                user_id = None
            frames = [f.bytes for f in frames]
        msg = KVMsg.from_frames(frames, max_body=self.max_body)
        check_path(msg.key)
        _ = msg.ttl  # validates
        return msg, self.writer(user_id, msg)

    def writer(self, user_id: str | None, msg: KVMsg) -> Writer:
        """With CURVE, the key (its name and current role); without, what the update declares. The
        declaration is removed from the update; the server stamps the writer's name on what it stores."""
        declared_name = msg.properties.pop(WRITER, "")
        declared_role = msg.properties.pop(ROLE, "") or None
        if self.identities is None:
            return Writer(declared_name, declared_role, authenticated=False)
        name = user_id or ""
        return Writer(name, self.identities.role(name) if name else None, authenticated=True)

    def admit(self, msg: KVMsg, writer: Writer, table: Table) -> Denial | None:
        """Why ``writer`` may not make the update ``msg`` (policy, then quota); None when it may."""
        if writer.authenticated and writer.role is None:
            return Denial("no_role", f"{writer} has no role: it may read the store, not write it")
        if not writer.unchecked:
            denial = self.policy.check(writer, msg, table)
            if denial is not None:
                return denial
        if msg.is_delete:
            return None
        keys, nbytes = table.usage(writer.name)
        old = table.get(msg.key)
        if old is not None and (owner_of(old) or "") == writer.name:
            keys, nbytes = keys - 1, nbytes - entry_bytes(old)  # replaced, not added
        if keys + 1 > self.quota_keys or nbytes + entry_bytes(msg) > self.quota_bytes:
            return Denial(
                "quota",
                f"{writer} holds {keys} keys, {nbytes} bytes; {msg.key[:80]!r} would pass the quota of "
                f"{self.quota_keys} keys, {self.quota_bytes} bytes",
            )
        return None

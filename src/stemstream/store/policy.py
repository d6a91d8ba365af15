"""Who may write what in the store: the write policy the server asks about every set and delete.

The server knows each writer (:class:`Writer`): with CURVE, by the key it connected with (the ZAP ``User-Id``
is the key's name, its role is in ``authorized/``, docs/security.md); without CURVE, by what the client
declared in the update's ``writer`` and ``role`` properties, which guards against bugs, not attackers. It
stamps the writer's name on what it stores (property ``writer``): that is a key's *owner*.

Rules are data: a :class:`Rule` gives the roles that may write keys matching a pattern (``{name}`` matches
one path segment, ``{n}`` a scan number), with checks that read the store's current state (:class:`Lookup`),
such as "the writer owns this record" (:func:`owner`). :class:`RulePolicy` applies them: a writer whose role
has no rule for the key is refused. The store's own rules are :data:`STORE_RULES` (the passive server's
stats); the scan-aware rules live above the store (``stemstream.scans.policy``) and are handed to the server
by ``stemstream store serve``, since the store does not know what a scan is. Quotas and value sizes are the
server's (docs/store.md, Limits).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from stemstream.store.kvmsg import KVMsg

# Properties of an update that say who wrote it: set by the server on what it stores (``writer``); a client
# without CURVE may declare both, and the server removes ``role`` before storing.
WRITER = "writer"
ROLE = "role"
# The role that may write anything (the default client of `stemstream keys init`: demo, tests, operator CLI).
ADMIN = "admin"
# The Binary Star peer's role: it publishes the passive server's stats through the active one.
STORE = "store"


@dataclass(frozen=True, slots=True)
class Writer:
    """Who sent an update: ``name`` (a key name with CURVE; declared without; "" for nobody in particular),
    ``role`` (None: none), ``authenticated`` (the name comes from CURVE, not from the client's word)."""

    name: str = ""
    role: str | None = None
    authenticated: bool = False

    @property
    def unchecked(self) -> bool:
        """A client on a site without CURVE that declared no role: nothing to check it against."""
        return not self.authenticated and self.role is None

    def __str__(self) -> str:
        how = "key" if self.authenticated else "declared"
        return f"{how} {self.name or '?'!r} (role {self.role or 'none'})"


@dataclass(frozen=True, slots=True)
class Denial:
    """Why a write is refused: ``kind`` names its counter (``denied_<kind>``), ``why`` is one log line."""

    kind: str
    why: str


class Lookup(Protocol):
    """What a policy may read of the server's state: the stored update of a key (with its ``writer``)."""

    def get(self, key: str) -> KVMsg | None: ...


class WritePolicy(Protocol):
    """Decides whether ``writer`` may apply ``msg`` (a set, or a delete when its body is empty)."""

    def check(self, writer: Writer, msg: KVMsg, current: Lookup) -> Denial | None:
        """None to apply it; otherwise why not (the server counts it and never applies it)."""
        ...


class AllowAll:
    """No write permissions (a bare server in tests); quotas and sizes still apply."""

    def check(self, writer: Writer, msg: KVMsg, current: Lookup) -> Denial | None:
        return None


def owner_of(msg: KVMsg | None) -> str | None:
    """The name stamped on a stored update (its writer), or None for a key nobody owns."""
    return None if msg is None else msg.properties.get(WRITER) or None


# ------------------------------------------------------------------------------------ rules as data


@dataclass(frozen=True, slots=True)
class Write:
    """One write as a check sees it: who, the key's fields (from the rule's pattern), the value written
    (for a delete: the value it deletes), and the store's current state."""

    writer: Writer
    key: str
    fields: Mapping[str, str]
    body: bytes
    current: Lookup

    def owns(self, key: str) -> bool:
        """The writer's name is stamped on ``key``'s current value (it exists, and they wrote it last)."""
        return owner_of(self.current.get(key)) == self.writer.name


# A check answers None (fine) or why the write is refused; its __name__ is the denial's kind.
Check = Callable[[Write], str | None]

_FIELD = re.compile(r"\{([a-z_]+)\}")


@dataclass(frozen=True)
class Rule:
    """``roles`` may write (and delete) keys matching ``pattern`` if every check passes, with values of at
    most ``max_bytes``. In a pattern ``{n}`` (and any field ending in ``_n``) matches a decimal number, any
    other ``{field}`` one path segment."""

    roles: frozenset[str]
    pattern: str
    checks: tuple[Check, ...] = ()
    max_bytes: int = 64 << 10
    regex: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        parts, pos = [], 0
        for m in _FIELD.finditer(self.pattern):
            parts.append(re.escape(self.pattern[pos : m.start()]))
            name = m.group(1)
            parts.append(f"(?P<{name}>(?:0|[1-9][0-9]{{0,17}}))" if name == "n" or name.endswith("_n") else
                         f"(?P<{name}>[^/]+)")  # fmt: skip
            pos = m.end()
        parts.append(re.escape(self.pattern[pos:]))
        object.__setattr__(self, "regex", re.compile("".join(parts)))

    def match(self, key: str) -> dict[str, str] | None:
        m = self.regex.fullmatch(key)
        return None if m is None else m.groupdict()


def rule(roles: str | Iterable[str], pattern: str, *checks: Check, max_bytes: int = 64 << 10) -> Rule:
    return Rule(frozenset([roles] if isinstance(roles, str) else roles), pattern, checks, max_bytes)


def owner(w: Write) -> str | None:
    """The key is new, or its writer is the one who wrote it: a record is its owner's until it is deleted
    (or expires)."""
    who = owner_of(w.current.get(w.key))
    if who is None or who == w.writer.name:
        return None
    return f"{w.key} belongs to {who!r}"


STORE_RULES: tuple[Rule, ...] = (rule(STORE, "/store/{server}/stats", max_bytes=16 << 10),)


class RulePolicy:
    """A :class:`WritePolicy` from :class:`Rule` s: ``admin`` may write anything; any other role only keys a
    rule gives it, with every check of that rule passing and the value within the rule's size."""

    def __init__(self, rules: Iterable[Rule] = STORE_RULES, admin_roles: Iterable[str] = (ADMIN,)) -> None:
        self.rules = tuple(rules)
        self.admin_roles = frozenset(admin_roles)
        self.roles = frozenset(r for rl in self.rules for r in rl.roles) | self.admin_roles

    def rules_for(self, role: str) -> tuple[Rule, ...]:
        return tuple(r for r in self.rules if role in r.roles)

    def check(self, writer: Writer, msg: KVMsg, current: Lookup) -> Denial | None:
        role = writer.role
        if role in self.admin_roles:
            return None
        if role is None:
            return Denial("no_role", f"{writer} has no role and may not write {msg.key[:80]!r}")
        body = msg.body
        if not body:  # a delete: the checks look at what it deletes
            held = current.get(msg.key)
            body = held.body if held is not None else b""
        for r in self.rules_for(role):
            fields = r.match(msg.key)
            if fields is None:
                continue
            if len(msg.body) > r.max_bytes:
                return Denial("size", f"{writer}: {len(msg.body)} bytes for {msg.key[:80]!r}, over {r.max_bytes}")
            write = Write(writer, msg.key, fields, body, current)
            for check in r.checks:
                why = check(write)
                if why is not None:
                    return Denial(check.__name__, f"{writer}: {why}")
            return None
        return Denial("role", f"{writer} may not write {msg.key[:80]!r} (not the role's)")

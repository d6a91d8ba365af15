"""``stemstream health ROLE [UID]``: is a process registered and making progress? For probes and operators.

A producer, aggregator or NodeGroup is healthy when, within the check's window,

* its registry record is there and not ``stopping``,
* its heartbeat moved (the record was refreshed: the process and its link to the store are alive),
* and, when it has work in hand (a producer streaming or writing a scan, an aggregator or NodeGroup with a
  scan open), its progress counters moved: messages sent, routed, received, sectors written (read from its
  metrics endpoint, which is live, or else from the counts in its record).

A store server (``store [primary|backup]``) is healthy when its ``/store/<role>/stats`` record is there (it
expires three stats intervals after the server stops publishing) and the store answers at all.

Without a UID every registered process of the role is checked. The verdict is one line.
"""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from stemstream.store.registry import Record, Registry

PLANE_ROLES = ("producer", "aggregator", "nodegroup")
ROLES = (*PLANE_ROLES, "store")

# What counts as progress, per role: metrics (as scraped) or, without an endpoint, record counts.
_PROGRESS_METRICS = {
    "producer": ("stemstream_messages_sent_total", "stemstream_sectors_on_disk_total"),
    "aggregator": ("stemstream_messages_received_total", "stemstream_messages_sent_total"),
    "nodegroup": ("stemstream_messages_received_total", "stemstream_frames_assembled_total"),
}
_PROGRESS_COUNTS = {
    "producer": ("data_messages", "sent", "written", "sectors_on_disk"),
    "aggregator": ("received", "routed", "rejected"),
    "nodegroup": ("received", "frames_complete", "frames_incomplete", "rejected"),
}


@dataclass(frozen=True)
class Health:
    ok: bool
    line: str


def busy(record: Record) -> str | None:
    """What the process has in hand (None: idle, so counts need not move)."""
    if record.role == "producer":
        if record.status in ("streaming", "writing"):
            return f"{record.status} scan {record.scan_number}"
        return None
    open_scans = record.counts.get("scans_open", 0)
    return f"{open_scans} scan(s) open" if open_scans else None


def scrape_progress(url: str, role: str, uid: str, timeout: float = 2.0) -> float | None:
    """The sum of ``role``'s progress counters of ``uid`` at ``url``; None when the endpoint does not answer."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            text = response.read().decode()
    except (OSError, ValueError):
        return None
    wanted = {name.removesuffix("_total") for name in _PROGRESS_METRICS[role]}
    total = 0.0
    for family in text_string_to_metric_families(text):
        if family.name in wanted:
            total += sum(s.value for s in family.samples if s.labels.get("uid") == uid and s.name.endswith("_total"))
    return total


class _Progress:
    """Progress readings of one process: from its metrics endpoint when it has one, else its record."""

    def __init__(self, record: Record, scrape: Callable[[str, str, str], float | None]) -> None:
        self.url = record.endpoints.get("metrics")
        self.role = record.role
        self.uid = record.uid
        self._scrape = scrape
        self.unanswered = False

    def read(self, record: Record) -> float:
        if self.url:
            value = self._scrape(self.url, self.role, self.uid)
            if value is not None:
                return value
            self.unanswered = True
        return float(sum(record.counts.get(k, 0) for k in _PROGRESS_COUNTS[self.role]))


def check(
    client: Any,
    role: str,
    uid: str | None = None,
    *,
    window: float = 5.0,
    poll: float = 0.25,
    scrape: Callable[[str, str, str], float | None] = scrape_progress,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> Health:
    """The health of ``role`` (``uid``, or every registered one) as one line; see the module's docstring."""
    if role not in ROLES:
        return Health(False, f"health: unknown role {role!r}; one of {', '.join(ROLES)}")
    if role == "store":
        return _check_store(client, uid)
    registry = Registry(client)

    def records() -> dict[str, Record]:
        return {r.uid: r for r in registry.members(role) if uid is None or r.uid == uid}

    first = records()
    what = f"{role} {uid}" if uid else f"{role}s"
    if not first:
        return Health(False, f"{what}: not registered in the store at {client.server}")
    progress = {u: _Progress(r, scrape) for u, r in first.items()}
    start = {u: p.read(first[u]) for u, p in progress.items()}
    deadline = clock() + window
    while True:
        sleep(poll)
        now = records()
        problems = _problems(first, now, progress, start, window)
        if not problems["waiting"] or clock() >= deadline:
            break
    bad = problems["bad"] + problems["waiting"]
    if bad:
        return Health(False, f"{what}: " + "; ".join(bad))
    summary = ", ".join(f"{u} {now[u].status}" + (f" ({b})" if (b := busy(now[u])) else "") for u in sorted(now))
    return Health(True, f"{what}: ok, heartbeat moving: {summary}")


def _problems(
    first: dict[str, Record],
    now: dict[str, Record],
    progress: dict[str, _Progress],
    start: dict[str, float],
    window: float,
) -> dict[str, list[str]]:
    """``bad``: final verdicts; ``waiting``: what may still come right before the window ends."""
    bad: list[str] = []
    waiting: list[str] = []
    for u, before in sorted(first.items()):
        rec = now.get(u)
        if rec is None:
            bad.append(f"{u} left the registry (stopped, or its record expired)")
            continue
        if rec.status in ("stopping", "failed"):
            bad.append(f"{u} is {rec.status}")
            continue
        if rec.heartbeat <= before.heartbeat:
            age = max(0.0, time.time() - rec.heartbeat)
            waiting.append(f"{u}: heartbeat did not move in {window:g} s (last {age:.1f} s ago)")
            continue
        doing = busy(rec)
        if doing is not None and progress[u].read(rec) <= start[u]:
            where = "its metrics endpoint does not answer" if progress[u].unanswered else "nothing moved"
            waiting.append(f"{u}: stalled, {doing} and no progress in {window:g} s ({where})")
    return {"bad": bad, "waiting": waiting}


def _check_store(client: Any, name: str | None) -> Health:
    from stemstream.store.server import ROLES as SERVER_ROLES

    names = [name] if name else list(SERVER_ROLES)
    found = {}
    for server in names:
        if server not in SERVER_ROLES:
            return Health(False, f"store {server}: a store server is 'primary' or 'backup'")
        stats = client.get(f"/store/{server}/stats")
        if isinstance(stats, dict):
            found[server] = stats
    if not found or (name and name not in found):
        return Health(False, f"store {name or ''}".rstrip() + f": no stats from it in the store at {client.server}")
    parts = [f"{s} {st.get('state', '?')} at sequence {st.get('sequence', '?')}" for s, st in sorted(found.items())]
    return Health(True, "store: ok, " + ", ".join(parts))

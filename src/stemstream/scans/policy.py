"""Who may write which store key of a scan's life: the store's write policy for stemstream (docs/security.md).

The store does not know what a scan is, so these rules live here and ``stemstream store serve`` hands them to
the server (:class:`~stemstream.store.policy.RulePolicy`). Each role writes only what it owns:

* a NodeGroup its registry record, and its sub-records of scans it is a member of (the scan's plan names
  it and the writer owns its registry record); rank 0 of a counting job the counted record, previews and the
  analyses record of scans one of the writer's NodeGroups is a member of;
* a producer its registry record, its share records and the replay records of its own sector; the leader
  producer (role ``leader``) also the scan record (plan, totals, replayed) of scans it planned, and the
  records of earlier acquisitions of a reused scan number it keeps (``/scans/<n>/acquisitions/<start>``);
* an aggregator its registry record and the per-sector records of scans whose plan names it;
* a session its session record and its flow's registry record;
* an operator the control requests (``/control/...``);
* ``admin`` anything; ``store`` (a Binary Star peer) its stats.

A record is its owner's until deleted or expired (:func:`~stemstream.store.policy.owner`): nobody else may
overwrite or delete it. The patterns are the layout of :mod:`stemstream.scans.keys` and of the registry
(tests check that every key those modules build is covered by exactly the intended rule).
"""

from __future__ import annotations

from typing import Any

from stemstream.errors import StemstreamError
from stemstream.scans import keys
from stemstream.scans.records import ReplayRecord, ScanPlan
from stemstream.store.kvmsg import decode_value
from stemstream.store.policy import ADMIN, STORE, STORE_RULES, Rule, RulePolicy, Write, owner, rule
from stemstream.store.registry import Record, record_key, role_prefix

NODEGROUP = "nodegroup"
PRODUCER = "producer"
LEADER = "leader"  # the producer that plans scans (sector 0's by default)
AGGREGATOR = "aggregator"
SESSION = "session"
OPERATOR = "operator"
ROLES = (NODEGROUP, PRODUCER, LEADER, AGGREGATOR, SESSION, OPERATOR, STORE, ADMIN)

RECORD_BYTES = 64 << 10  # registry records, sub-records, requests
SCAN_BYTES = 256 << 10  # the scan record (members, endpoints, fallback paths of 256 sectors)
PREVIEW_BYTES = 512 << 10  # a preview: up to 256 x 256 uint32 and its fields


def _plan(w: Write) -> ScanPlan | None:
    held = w.current.get(keys.scan(int(w.fields["n"])))
    return None if held is None else ScanPlan.parse(decode_value(held.body))


def _registry(w: Write, role: str, uid: str) -> Record | None:
    """The registry record ``/<role>s/<uid>`` if the writer owns it, else None."""
    try:
        key = record_key(role, uid)
    except StemstreamError:
        return None
    held = w.current.get(key)
    if held is None or not w.owns(key):
        return None
    try:
        return Record.from_dict(decode_value(held.body))
    except StemstreamError:
        return None


def member(w: Write) -> str | None:
    """NodeGroup ``uid`` is a member of scan ``n`` and its registry record is the writer's."""
    uid, plan = w.fields["uid"], _plan(w)
    if plan is None or uid not in plan.members:
        return f"{uid!r} is not a member of scan {w.fields['n']}"
    if _registry(w, NODEGROUP, uid) is None:
        return f"the NodeGroup record of {uid!r} is not the writer's"
    return None


def member_of_job(w: Write) -> str | None:
    """One of the writer's NodeGroups is a member of scan ``n`` (rank 0 of a job writes for its scans)."""
    plan = _plan(w)
    if plan is None:
        return f"scan {w.fields['n']} has no plan"
    if not any(_registry(w, NODEGROUP, uid) is not None for uid in plan.members):
        return f"none of scan {w.fields['n']}'s members is the writer's NodeGroup"
    return None


def producer_record(w: Write) -> str | None:
    """The producer record ``uid`` is the writer's."""
    if _registry(w, PRODUCER, w.fields["uid"]) is None:
        return f"the producer record of {w.fields['uid']!r} is not the writer's"
    return None


def own_sector(w: Write) -> str | None:
    """A replay record of sector ``sector`` names a producer record of that sector that is the writer's."""
    replay = ReplayRecord.parse(decode_value(w.body))
    if replay is None or str(replay.sector) != w.fields["sector_n"]:
        return f"{w.key} does not hold a replay record of sector {w.fields['sector_n']}"
    record = _registry(w, PRODUCER, replay.producer)
    if record is None or record.extra.get("sector") != replay.sector:
        return f"the writer has no producer record of sector {replay.sector}"
    return None


def plans_aggregator(w: Write) -> str | None:
    """The plan of scan ``n`` names, for sector ``sector_n``, an aggregator whose registry record is the writer's."""
    plan = _plan(w)
    uid = plan.aggregator_of(int(w.fields["sector_n"])) if plan is not None else None
    if uid is None or _registry(w, AGGREGATOR, uid) is None:
        return f"scan {w.fields['n']}'s aggregator of sector {w.fields['sector_n']} is not the writer's"
    return None


_PRODUCERS = (PRODUCER, LEADER)
_SCAN = keys.SCANS + "{n}"

RULES: tuple[Rule, ...] = (
    *STORE_RULES,
    rule(NODEGROUP, role_prefix(NODEGROUP) + "{uid}", owner, max_bytes=RECORD_BYTES),
    rule(NODEGROUP, _SCAN + "/nodegroups/{uid}", member, max_bytes=RECORD_BYTES),
    rule(NODEGROUP, _SCAN + "/counted", member_of_job, max_bytes=RECORD_BYTES),
    rule(NODEGROUP, _SCAN + "/preview/{rank_n}", member_of_job, max_bytes=PREVIEW_BYTES),
    rule(NODEGROUP, _SCAN + "/analyses", member_of_job, max_bytes=RECORD_BYTES),
    rule(_PRODUCERS, role_prefix(PRODUCER) + "{uid}", owner, max_bytes=RECORD_BYTES),
    rule(_PRODUCERS, _SCAN + "/producers/{uid}", producer_record, max_bytes=SCAN_BYTES),
    rule(_PRODUCERS, _SCAN + "/replay/{sector_n}", own_sector, max_bytes=SCAN_BYTES),
    rule(LEADER, _SCAN, owner, max_bytes=SCAN_BYTES),
    rule(LEADER, _SCAN + "/acquisitions/{start}", owner, max_bytes=SCAN_BYTES),
    rule(AGGREGATOR, role_prefix(AGGREGATOR) + "{uid}", owner, max_bytes=RECORD_BYTES),
    rule(AGGREGATOR, _SCAN + "/aggregator/{sector_n}", plans_aggregator, max_bytes=RECORD_BYTES),
    rule(SESSION, keys.SESSIONS + "{uid}", owner, max_bytes=RECORD_BYTES),
    rule(SESSION, role_prefix("flow") + "{uid}", owner, max_bytes=RECORD_BYTES),
    rule(OPERATOR, keys.CONTROL_SCAN, max_bytes=RECORD_BYTES),
    rule(OPERATOR, "/control/session/{uid}/stop", max_bytes=RECORD_BYTES),
)


def scan_policy(**kwargs: Any) -> RulePolicy:
    """The store's write policy for stemstream: :data:`RULES`, ``admin`` writes anything."""
    return RulePolicy(RULES, **kwargs)

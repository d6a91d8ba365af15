"""The acknowledgement verdict: may the producers let a streamed scan go, keep waiting, or must they replay it
to disk? A pure function of the scan's records, so the four producers of a scan decide alike
(docs/reliability.md)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from stemstream.scans import keys
from stemstream.scans.plan import sub_records
from stemstream.scans.records import ACK_COUNTED, CountedRecord, ScanPlan

WAIT, ACK, REPLAY = "wait", "ack", "replay"


def ack_verdict(
    plan: ScanPlan, items: Mapping[str, Any], live_nodegroups: Mapping[str, float] | set[str]
) -> tuple[str, str]:
    """(WAIT | ACK | REPLAY, why) for a streamed scan, from the store's records under ``/scans/<n>``.

    ``live_nodegroups``: the registered NodeGroups (UID -> when they registered).
    """
    n = plan.scan_number
    # Only this acquisition's records: an earlier acquisition of a reused scan number left its own under
    # the same keys, and they must never acknowledge this one.
    producers, _sectors, groups = sub_records(n, items, plan.start)
    for p in producers.values():
        if p.status == "failed" or p.degraded:
            return REPLAY, f"producer {p.producer} could not stream its sector ({p.error})"
    sent = sum(p.sent_total for p in producers.values())
    all_sent = len(producers) >= plan.n_sectors
    if plan.ack == ACK_COUNTED:
        value = items.get(keys.counted(n))
        counted = CountedRecord.parse(value) if value is not None else None
        if value is not None and counted is None:
            return REPLAY, "the counted record is not readable"
        if counted is not None and counted.start == plan.start:
            if counted.status != "counted":
                why = counted.error or f"rank(s) {list(counted.ranks_missing)} missing"
                return REPLAY, f"the counted file is {counted.status} ({why})"
            if not all_sent:
                return WAIT, "counted; waiting for the other producers' records"
            received = int(counted.messages.get("received", -1))
            if received != sent:
                return REPLAY, f"{received} of {sent} sent sectors reached the NodeGroups"
            return ACK, f"counted in {counted.path}"
    else:
        records = [groups.get(uid) for uid in plan.members]
        if all(r is not None for r in records):
            statuses = {r.status for r in records if r is not None}
            if statuses != {"received"}:
                return REPLAY, f"NodeGroup scan status {sorted(statuses)}"
            if not all_sent:
                return WAIT, "received; waiting for the other producers' records"
            received = sum(r.received for r in records if r is not None)
            if received != sent:
                return REPLAY, f"{received} of {sent} sent sectors reached the NodeGroups"
            return ACK, "received by every NodeGroup"
    gone = [uid for uid in plan.members if not _same_member(plan, uid, live_nodegroups)]
    if gone:
        return REPLAY, f"NodeGroup(s) {', '.join(gone)} left before the scan was acknowledged"
    return WAIT, "not acknowledged yet"


def _same_member(plan: ScanPlan, uid: str, live: Mapping[str, float] | set[str]) -> bool:
    """Whether the process the plan named as ``uid`` is still registered (not gone, not restarted)."""
    if uid not in live:
        return False
    if isinstance(live, Mapping) and uid in plan.member_started:
        return abs(float(live[uid]) - plan.member_started[uid]) < 1e-3
    return True

"""The store's write policy (docs/security.md, Roles): stemstream's rules (scans/policy.py) checked on their own,
with a fake store state, and as properties over generated keys, writers and states:

* no key outside a role's rules is writable by that role, whatever the state and the value;
* a record owned by one writer is never writable or deletable by another (but admin);
* every key that scans/keys.py and the registry build is writable by exactly the role the docs say, and
  only when the writer owns what the rule asks (its registry record, a member of the scan, the scan's
  aggregator, its sector);
* the check never raises, whatever the key and body, and its denial is one short line of a known kind.
"""

from __future__ import annotations

from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stemstream.scans import keys
from stemstream.scans.policy import (
    AGGREGATOR,
    LEADER,
    NODEGROUP,
    OPERATOR,
    PRODUCER,
    ROLES,
    RULES,
    SESSION,
    scan_policy,
)
from stemstream.scans.records import ReplayRecord, ScanPlan
from stemstream.store.kvmsg import KVMsg
from stemstream.store.policy import ADMIN, STORE, WRITER, Denial, RulePolicy, Writer
from stemstream.store.registry import Record, record_key

PROPERTY = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
POLICY = scan_policy()
KINDS = {"role", "no_role", "size", "owner", "member", "member_of_job", "producer_record", "own_sector",
         "plans_aggregator"}  # fmt: skip
CHECKED_ROLES = [r for r in ROLES if r != ADMIN]


class State(dict):
    """A fake store: key -> the stored KVMsg, each stamped with its writer (the server's ``writer``)."""

    def put(self, key: str, value: Any, owner: str | None) -> State:
        props = {WRITER: owner} if owner else {}
        self[key] = KVMsg(key, 1, msgpack.packb(value, use_bin_type=True), props)
        return self


def registry(state: State, role: str, uid: str, owner: str, **extra: Any) -> None:
    state.put(record_key(role, uid), Record(uid=uid, role=role, extra=extra).to_dict(), owner)


def plan(state: State, n: int, members: tuple[str, ...], aggregator: str = "agg-0", owner: str = "daq0") -> None:
    p = ScanPlan(n, (4, 4), "stream", members=members, aggregator=aggregator, decided_by="producer-0")
    state.put(keys.scan(n), p.to_record(), owner)


def site() -> State:
    """A site where every service has its own key: ng-a holds NodeGroups a1, a2; ng-b holds b1; daq0 is the
    leader (sector 0), daq1 a producer (sector 1); agg the aggregator. Scan 7 goes to a1 and b1 via agg-0."""
    s = State()
    registry(s, NODEGROUP, "a1", "ng-a")
    registry(s, NODEGROUP, "a2", "ng-a")
    registry(s, NODEGROUP, "b1", "ng-b")
    registry(s, PRODUCER, "producer-0", "daq0", sector=0)
    registry(s, PRODUCER, "producer-1", "daq1", sector=1)
    registry(s, AGGREGATOR, "agg-0", "agg")
    plan(s, 7, ("a1", "b1"))
    return s


def check(state: State, name: str, role: str | None, key: str, value: Any = None, delete: bool = False):
    body = b"" if delete else msgpack.packb(value if value is not None else {"x": 1}, use_bin_type=True)
    return POLICY.check(Writer(name, role, authenticated=True), KVMsg(key, 0, body), state)


def replay(sector: int, producer: str) -> dict[str, Any]:
    return ReplayRecord(sector, producer, "test", 1, ("/x",), 1.0).to_record()


NAMES = ("daq0", "daq1", "ng-a", "ng-b", "agg", "op", "sess")
# (key, value or None, the writers who may write it; every other (name, role) of the site may not)
CASES: list[tuple[str, Any, set[tuple[str, str]]]] = [
    (record_key(NODEGROUP, "a1"), None, {("ng-a", NODEGROUP)}),
    (record_key(NODEGROUP, "new"), None, {(name, NODEGROUP) for name in NAMES}),  # a new record: any NodeGroup's
    (keys.nodegroup(7, "a1"), None, {("ng-a", NODEGROUP)}),
    (keys.nodegroup(7, "b1"), None, {("ng-b", NODEGROUP)}),
    (keys.nodegroup(7, "a2"), None, set()),  # a2 is ng-a's, but not a member of scan 7
    (keys.nodegroup(8, "a1"), None, set()),  # no plan for scan 8
    (keys.counted(7), None, {("ng-a", NODEGROUP), ("ng-b", NODEGROUP)}),  # rank 0 of the job: a member's
    (keys.preview(7, 0), None, {("ng-a", NODEGROUP), ("ng-b", NODEGROUP)}),
    (keys.counted(8), None, set()),
    (keys.analyses(7), None, {("ng-a", NODEGROUP), ("ng-b", NODEGROUP)}),
    (keys.analyses(8), None, set()),
    (record_key(PRODUCER, "producer-1"), None, {("daq1", PRODUCER), ("daq1", LEADER)}),
    (keys.producer(7, "producer-1"), None, {("daq1", PRODUCER), ("daq1", LEADER)}),
    (keys.producer(7, "producer-0"), None, {("daq0", PRODUCER), ("daq0", LEADER)}),
    (keys.replay(7, 1), replay(1, "producer-1"), {("daq1", PRODUCER), ("daq1", LEADER)}),
    (keys.replay(7, 0), replay(0, "producer-1"), set()),  # producer-1 is sector 1's
    (keys.scan(7), None, {("daq0", LEADER)}),  # the leader that planned it (its owner)
    (keys.scan(9), None, {(name, LEADER) for name in NAMES}),
    (keys.acquisition(7, "20260612T101530123Z-a3f9"), None, {(name, LEADER) for name in NAMES}),  # a new one
    (record_key(AGGREGATOR, "agg-0"), None, {("agg", AGGREGATOR)}),
    (keys.aggregator(7, 3), None, {("agg", AGGREGATOR)}),
    (keys.session("s1"), None, {(name, SESSION) for name in NAMES}),
    (keys.CONTROL_SCAN, None, {(n, OPERATOR) for n in NAMES}),
    (keys.session_stop("s1"), None, {(n, OPERATOR) for n in NAMES}),
    ("/store/backup/stats", None, {(n, STORE) for n in NAMES}),
    ("/elsewhere/x", None, set()),
]


@pytest.mark.parametrize(("key", "value", "allowed"), CASES, ids=[c[0] for c in CASES])
def test_every_key_of_a_scan_is_writable_by_exactly_its_owner_role(key: str, value: Any, allowed: set):
    state = site()
    for name in NAMES:
        for role in CHECKED_ROLES:
            denial = check(state, name, role, key, value)
            assert (denial is None) == ((name, role) in allowed), (name, role, key, denial)
            if denial is not None:
                assert denial.kind in KINDS and "\n" not in denial.why and len(denial.why) < 400
        assert check(state, name, ADMIN, key, value) is None  # admin writes anything
        assert check(state, name, None, key, value).kind == "no_role"


def test_deleting_follows_the_same_rules_and_an_owned_record_is_only_its_owners():
    state = site()
    assert check(state, "ng-a", NODEGROUP, record_key(NODEGROUP, "a1"), delete=True) is None
    for name, role in (("ng-b", NODEGROUP), ("daq1", PRODUCER), ("agg", AGGREGATOR)):
        assert check(state, name, role, record_key(NODEGROUP, "a1"), delete=True) is not None
    assert check(state, "daq1", LEADER, keys.scan(7), delete=True).kind == "owner"  # daq0's scan
    assert check(state, "daq0", LEADER, keys.scan(7), {"status": "received"}) is None  # its own: closing it
    # A replay record is checked by what it deletes.
    state.put(keys.replay(7, 1), replay(1, "producer-1"), "daq1")
    assert check(state, "daq1", PRODUCER, keys.replay(7, 1), delete=True) is None
    assert check(state, "daq0", PRODUCER, keys.replay(7, 1), delete=True).kind == "own_sector"


def test_values_over_a_rules_size_are_refused():
    state = site()
    big = "x" * (70 << 10)
    assert check(state, "ng-a", NODEGROUP, record_key(NODEGROUP, "a1"), {"pad": big}).kind == "size"
    assert check(state, "ng-a", NODEGROUP, keys.preview(7, 1), {"bf": b"x" * (256 << 10)}) is None  # a preview
    assert check(state, "ng-a", NODEGROUP, keys.preview(7, 1), {"bf": b"x" * (600 << 10)}).kind == "size"
    assert check(state, "op", ADMIN, "/anything", {"bf": b"x" * (900 << 10)}) is None  # the server's max_body


# ------------------------------------------------------------------------------------------ properties

_SEGMENTS = ["scans", "nodegroups", "producers", "aggregators", "sessions", "flows", "control", "store", "x", ""]
_PARTS = st.sampled_from(["7", "8", "0", "a1", "b1", "a2", "producer-0", "producer-1", "agg-0", "counted", "preview",
                          "replay", "aggregator", "nodegroups", "producers", "stop", "session", "scan", "stats",
                          "..", ".", "007", "-1", "1e3", " ", "\u00e9"]) | st.text(max_size=6)  # fmt: skip
_KEYS = st.one_of(
    st.builds(lambda seg, rest: "/" + "/".join([seg, *rest]), st.sampled_from(_SEGMENTS), st.lists(_PARTS, max_size=4)),
    st.builds(keys.nodegroup, st.integers(0, 10), _PARTS),
    st.builds(keys.producer, st.integers(0, 10), _PARTS),
    st.builds(keys.aggregator, st.integers(0, 10), st.integers(0, 300)),
    st.builds(keys.replay, st.integers(0, 10), st.integers(0, 5)),
    st.builds(keys.preview, st.integers(0, 10), st.integers(0, 5)),
    st.builds(keys.counted, st.integers(0, 10)),
    st.builds(keys.analyses, st.integers(0, 10)),
    st.builds(keys.scan, st.integers(0, 10)),
    st.builds(keys.acquisition, st.integers(0, 10), _PARTS),
    st.builds(lambda r, u: f"/{r}s/{u}", st.sampled_from([NODEGROUP, PRODUCER, AGGREGATOR, "flow", SESSION]), _PARTS),
    st.text(max_size=40),
)
_VALUES = st.one_of(
    st.none(),
    st.dictionaries(st.sampled_from(["sector", "producer", "members", "aggregator", "x"]),
                    st.one_of(st.integers(-1, 5), st.text(max_size=12), st.lists(st.text(max_size=4), max_size=3))),
    st.builds(replay, st.integers(0, 5), st.sampled_from(["producer-0", "producer-1", "nobody"])),
    st.binary(max_size=64),
)  # fmt: skip


@st.composite
def _states(draw: st.DrawFn) -> State:
    """The site, plus random records owned by random names (a random state of the store)."""
    state = site()
    for key in draw(st.lists(_KEYS, max_size=6)):
        value = draw(_VALUES)
        state.put(key, value if value is not None else {"x": 1}, draw(st.sampled_from([*NAMES, None])))
    return state


def _role_patterns(role: str) -> list[Any]:
    return [r for r in RULES if role in r.roles]


@PROPERTY
@given(_states(), _KEYS, _VALUES, st.sampled_from(CHECKED_ROLES), st.sampled_from(NAMES), st.booleans())
def test_no_key_outside_a_roles_rules_is_writable(state, key, value, role, name, delete):
    body = b"" if delete else (value if isinstance(value, bytes) else msgpack.packb(value, use_bin_type=True))
    denial = POLICY.check(Writer(name, role, authenticated=True), KVMsg(key, 0, body), state)
    if denial is None:
        assert any(r.match(key) is not None for r in _role_patterns(role)), (role, key)
    else:
        assert isinstance(denial, Denial) and denial.kind in KINDS
        assert "\n" not in denial.why and len(denial.why) < 400


@PROPERTY
@given(_states(), _KEYS, _VALUES, st.sampled_from(CHECKED_ROLES), st.sampled_from(NAMES), st.booleans())
def test_a_record_owned_by_another_writer_is_never_overwritten_or_deleted(state, key, value, role, name, delete):
    """What an owner-checked rule covers (registry records, scan records, sessions): only its owner writes."""
    owner = "someone-else"
    state.put(key, {"held": True}, owner)
    body = b"" if delete else msgpack.packb(value, use_bin_type=True)
    denial = POLICY.check(Writer(name, role, authenticated=True), KVMsg(key, 0, body), state)
    owned_rules = [r for r in _role_patterns(role) if r.match(key) is not None and "owner" in _check_names(r)]
    if owned_rules:
        assert denial is not None, (role, key)


def _check_names(rule: Any) -> set[str]:
    return {c.__name__ for c in rule.checks}


@PROPERTY
@given(st.text(max_size=300), st.binary(max_size=300), st.sampled_from([*ROLES, None, "", "nonsense"]))
def test_the_check_never_raises(key: str, body: bytes, role: str | None):
    state = site()
    state.put(key, {"x": 1}, "ng-a")
    for writer in (Writer("ng-a", role, True), Writer("", role, False)):
        denial = POLICY.check(writer, KVMsg(key, 0, body), state)
        assert denial is None or denial.kind in KINDS


def test_the_bare_store_policy_knows_only_its_own_stats_key():
    bare = RulePolicy()
    assert bare.check(Writer("b", STORE, True), KVMsg("/store/backup/stats", 0, b"x"), State()) is None
    assert bare.check(Writer("b", STORE, True), KVMsg("/scans/1", 0, b"x"), State()).kind == "role"
    assert bare.check(Writer("b", NODEGROUP, True), KVMsg("/store/backup/stats", 0, b"x"), State()).kind == "role"

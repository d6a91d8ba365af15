"""Least privilege and bounded cost in the store (issue 17), with real processes and CURVE keys.

A key directory gives every service its own key and role (docs/security.md, Roles); the store server runs as
`stemstream store serve` with stemstream's write policy. Each attack of the issue is tried with an authorised
key, as an insider would: it is refused, counted in ``/store/primary/stats`` (``denied_<kind>``), and honest
traffic loses nothing. Memory is measured on the server process (psutil RSS):

* a subscriber that never reads: growth < 2x the data added (the data added is stored once, the queue to the
  subscriber holds at most UPDATES_HWM messages), and < 30 MB while 120 MB of updates churn through;
* 50 snapshot requests never read, on a store of 20 MB: growth < 40 MB;
* 200 values of 1 MiB: refused by size (no role may store 1 MiB); a writer over its quota is refused.

The last test streams a scan through a NodeGroup and an aggregator that bind with their own server keys
(published in their registry records), producers and NodeGroups with their own client keys and roles: the
scan completes and the store denied nothing.
"""

from __future__ import annotations

import os
import select
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import psutil
import pytest
import zmq

from plane_helpers import ProcessTree, wait_scan_status
from stemstream.config import load_settings
from stemstream.errors import StoreUnavailable
from stemstream.scans import keys
from stemstream.scans.ack import ACK, ack_verdict
from stemstream.scans.plan import decide_plan
from stemstream.scans.records import ScanPlan
from stemstream.store import Registry, StoreClient
from stemstream.store.kvmsg import ICANHAZ, KVMsg
from stemstream.store.registry import Record, record_key
from stemstream.transport.keys import CurveKeys, KeyDirectory

MB = 1 << 20
ROLES = {
    "ng-a": "nodegroup",
    "ng-b": "nodegroup",
    "daq0": "leader",
    "daq1": "producer",
    "agg": "aggregator",
    "op": "operator",
    "sess": "session",
}


@pytest.fixture(scope="module")
def keydir(tmp_path_factory) -> KeyDirectory:
    d = KeyDirectory(tmp_path_factory.mktemp("privilege") / "keys")
    d.init()  # the store's server keypair and "stemstream" (admin)
    for name, role in ROLES.items():
        d.add(name, role=role)
    d.add("rogue")  # authorised, no role: it may read, not write
    # A client keypair that is the store's server keypair (what every binding host used to hold).
    shutil.copy(d.server_secret_file, d.client_secret_file("servercopy"))
    shutil.copy(d.server_public_file, d.client_public_file("servercopy"))
    for host in ("nid001", "agghost"):
        d.add(host, server=True)
    return d


class Store:
    """`stemstream store serve` with CURVE (the key directory), the write policy, short stats interval."""

    def __init__(self, keydir: KeyDirectory, log: Path, *args: str) -> None:
        self.keydir = keydir
        env = {k: v for k, v in os.environ.items() if not k.startswith("STEMSTREAM_")}
        env.update(STEMSTREAM_KEYS_DIR=str(keydir.path), STEMSTREAM_LOG_LEVEL="WARNING")
        self.log = open(log, "w")  # noqa: SIM115
        cmd = [sys.executable, "-m", "stemstream.cli", "store", "serve", "--port", "0", "--heartbeat", "0.2"]
        self.proc = subprocess.Popen(
            [*cmd, "--stats-interval", "0.3", *args], stdout=subprocess.PIPE, stderr=self.log, env=env, text=True
        )
        ready, _, _ = select.select([self.proc.stdout], [], [], 30)
        line = self.proc.stdout.readline() if ready else ""
        assert "serving at" in line, f"store did not start: {line!r}, see {log}"
        self.address = line.split()[-1]
        self.port = int(self.address.rsplit(":", 1)[1])
        self.ps = psutil.Process(self.proc.pid)

    def settings(self, name: str = "stemstream", **kw: Any):
        return load_settings(keys_dir=self.keydir.path, key_name=name, **kw)

    def client(self, name: str = "stemstream", **kw: Any) -> StoreClient:
        return StoreClient(self.address, settings=self.settings(name), timeout=10, **kw)

    def rss(self) -> int:
        return self.ps.memory_info().rss

    def counters(self, admin: StoreClient, **at_least: int) -> dict[str, int]:
        """The server's counters once they reach ``at_least`` (they are published every 0.3 s)."""

        def reached(items: dict[str, Any]) -> bool:
            counters = (items.get("/store/primary/stats") or {}).get("counters", {})
            return all(counters.get(k, 0) >= n for k, n in at_least.items())

        return admin.wait_for(reached, "/store/", timeout=20)["/store/primary/stats"]["counters"]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.log.close()


@pytest.fixture
def store(keydir: KeyDirectory, tmp_path: Path) -> Iterator[Store]:
    server = Store(keydir, tmp_path / "store.log")
    try:
        yield server
    finally:
        server.close()


def _record(role: str, uid: str, **extra: Any) -> dict[str, Any]:
    return Record(uid=uid, role=role, status="ready", extra=extra).to_dict()


def _settled(*clients: StoreClient) -> None:
    """Every write these clients made has reached the server: a marker each, seen by a fresh snapshot."""
    for i, c in enumerate(clients):
        c.set(f"/sessions/settle-{id(c)}-{i}", time.time())
    time.sleep(0.3)


# ------------------------------------------------------------------------------------------ the policy


def test_each_key_writes_only_what_its_role_owns_and_every_refusal_is_counted(store: Store):
    """The issue's store attacks with authorised keys: a fake NodeGroup, overwriting and deleting another
    service's record, forged scan records, a control request from a non-operator, a key without a role."""
    with (
        store.client("stemstream") as admin,
        store.client("ng-a", subtrees=("/nodegroups/",)) as ng_a,
        store.client("ng-b", subtrees=("/nodegroups/",)) as ng_b,
        store.client("daq0", subtrees=("/scans/", "/producers/")) as daq0,
        store.client("daq1", subtrees=("/scans/", "/producers/")) as daq1,
        store.client("agg", subtrees=("/aggregators/",)) as agg,
        store.client("op", subtrees=("/control/",)) as op,
        store.client("rogue", subtrees=("/nodegroups/",)) as rogue,
    ):
        # Honest traffic: each service registers, the leader plans scan 7 to a1 (ng-a's) and b1 (ng-b's).
        ng_a.set(record_key("nodegroup", "a1"), _record("nodegroup", "a1"), ttl=30)
        ng_b.set(record_key("nodegroup", "b1"), _record("nodegroup", "b1"), ttl=30)
        daq0.set(record_key("producer", "producer-0"), _record("producer", "producer-0", sector=0), ttl=30)
        daq1.set(record_key("producer", "producer-1"), _record("producer", "producer-1", sector=1), ttl=30)
        agg.set(record_key("aggregator", "agg-0"), _record("aggregator", "agg-0"), ttl=30)
        registry = ("/nodegroups/", "/producers/", "/aggregators/")
        admin.wait_for(lambda it: sum(k.startswith(registry) for k in it) == 5, "/", timeout=10)
        plan = ScanPlan(7, (2, 2), "stream", members=("a1", "b1"), aggregator="agg-0", decided_by="producer-0")
        daq0.set(keys.scan(7), plan.to_record())
        admin.wait_for(lambda it: keys.scan(7) in it, keys.scan(7), timeout=10)

        # The attacks (each one refused; the kind it is counted under).
        attacks = {
            "role": [
                (daq1, record_key("nodegroup", "zz-evil"), _record("nodegroup", "zz-evil")),  # a fake NodeGroup
                (agg, record_key("nodegroup", "zz-evil2"), _record("nodegroup", "zz-evil2")),
                (daq1, keys.counted(7), {"scan": 7, "status": "counted", "path": "/tmp/forged.h5"}),
                (daq1, keys.nodegroup(7, "a1"), {"uid": "a1", "status": "received", "received": 16}),
                (daq1, keys.scan(7), {**plan.to_record(), "members": ["zz-evil"]}),  # not the leader
                (daq1, keys.CONTROL_SCAN, {"scan": 99, "scan_shape": [1024, 1024], "fallback_dir": "/etc"}),
                (ng_a, keys.session_stop("s1"), True),
            ],
            "owner": [
                (ng_b, record_key("nodegroup", "a1"), _record("nodegroup", "a1", hijacked=True)),  # overwrite
                (daq1, record_key("producer", "producer-0"), _record("producer", "producer-0", sector=1)),
            ],
            "member": [(ng_b, keys.nodegroup(7, "a1"), {"uid": "a1", "status": "received"})],  # a1 is ng-a's
            "no_role": [(rogue, record_key("nodegroup", "r1"), _record("nodegroup", "r1"))],
        }
        deletes = {"owner": [(ng_b, record_key("nodegroup", "a1")), (daq1, record_key("producer", "producer-0"))]}
        expected = {kind: len(v) + len(deletes.get(kind, [])) for kind, v in attacks.items()}
        for items in attacks.values():
            for client, key, value in items:
                client.set(key, value)
        for items in deletes.values():
            for client, key in items:
                client.delete(key)
        # With CURVE the key decides: what an update declares (role, writer) counts for nothing.
        ctx = zmq.Context()
        push = _raw_push(ctx, store, "daq1")
        forged_props = {"role": "admin", "writer": "ng-a"}
        KVMsg(
            record_key("nodegroup", "a1"), 0, msgpack.packb(_record("nodegroup", "a1", hijacked=1)), forged_props
        ).send(push)
        push.close()
        ctx.term()
        expected["role"] += 1

        # Honest writes after the attacks all land: each service writes what it owns.
        ng_a.set(keys.nodegroup(7, "a1"), {"uid": "a1", "status": "received"})
        ng_b.set(keys.nodegroup(7, "b1"), {"uid": "b1", "status": "received"})
        ng_a.set(keys.counted(7), {"scan": 7, "status": "counted", "path": "/data/counted/scan_7.h5"})
        daq1.set(keys.producer(7, "producer-1"), {"producer": "producer-1", "sector": 1, "status": "done"})
        agg.set(keys.aggregator(7, 1), {"aggregator": "agg-0", "sector": 1, "status": "done"})
        op.set(keys.CONTROL_SCAN, {"scan": 8, "scan_shape": [2, 2]})
        honest = [keys.nodegroup(7, "a1"), keys.nodegroup(7, "b1"), keys.counted(7), keys.producer(7, "producer-1"),
                  keys.aggregator(7, 1), keys.CONTROL_SCAN]  # fmt: skip
        items = admin.wait_for(lambda it: all(k in it for k in honest), "/", timeout=10)

        total = sum(expected.values())
        counters = store.counters(admin, denied=total)
        assert counters["denied"] == total, counters
        for kind, n in expected.items():
            assert counters.get(f"denied_{kind}") == n, (kind, counters)

        # Nothing of the attacks is in the store; the owners' records are as their owners wrote them.
        assert not any("zz-evil" in k or k.endswith("/r1") for k in items)
        assert "hijacked" not in items[record_key("nodegroup", "a1")]["extra"]
        assert items[record_key("producer", "producer-0")]["extra"] == {"sector": 0}
        assert items[keys.scan(7)]["members"] == ["a1", "b1"]
        assert items[keys.counted(7)]["path"] == "/data/counted/scan_7.h5"
        assert items[keys.CONTROL_SCAN]["scan"] == 8
        # The next plan (the leader's decision from the registry) has no fake member.
        nodegroups = [r.uid for r in Registry(admin).members("nodegroup")]
        assert nodegroups == ["a1", "b1"]
        # Each stored value names its writer (the key's name, not what a client said).
        assert _writer(admin, keys.counted(7)) == "ng-a" and _writer(admin, keys.scan(7)) == "daq0"

        # A re-roled key counts at once (the server re-reads authorized/ at most once a second).
        store.keydir.authorize("ng-b", role="operator")
        try:
            time.sleep(1.2)
            ng_b.set(record_key("nodegroup", "b2"), _record("nodegroup", "b2"))
            op_b = keys.session_stop("s2")
            ng_b.set(op_b, True)
            admin.wait_for(lambda it: op_b in it, "/control/", timeout=10)
            counters = store.counters(admin, denied=total + 1)
            assert counters["denied_role"] == expected["role"] + 1
        finally:
            store.keydir.authorize("ng-b", role="nodegroup")


def _writer(client: StoreClient, key: str) -> str | None:
    entry = client._replica.entries.get(key)
    return None if entry is None else entry.properties.get("writer")


def test_forged_scan_records_do_not_acknowledge_a_scan(store: Store):
    """Forged /scans/<n>/... records would make producers release a scan never counted: they are refused,
    so the producers' verdict stays "wait"."""
    with store.client("stemstream") as admin, store.client("daq0") as daq0, store.client("daq1") as daq1:
        daq0.set(record_key("producer", "producer-0"), _record("producer", "producer-0", sector=0), ttl=30)
        plan = ScanPlan(5, (2, 2), "stream", members=("a1",), aggregator="agg-0", ack="counted")
        daq0.set(keys.scan(5), plan.to_record())
        admin.wait_for(lambda it: keys.scan(5) in it, keys.scan(5), timeout=10)
        forged = {
            keys.counted(5): {"scan": 5, "status": "counted", "path": "/tmp/x.h5", "frames": 4},
            keys.nodegroup(5, "a1"): {"uid": "a1", "status": "received", "received": 16, "sent": 16},
        }
        for m in range(4):
            forged[keys.producer(5, f"producer-{m}")] = {"producer": f"producer-{m}", "sector": m, "status": "done",
                                                         "sent_total": 4}  # fmt: skip
        for key, value in forged.items():
            daq1.set(key, value)
        counters = store.counters(admin, denied=len(forged))
        assert counters["denied"] == len(forged)
        items = admin.items(keys.scan_prefix(5))
        assert items == {}
        verdict, _ = ack_verdict(plan, {keys.scan(5): plan.to_record(), **items}, {"a1": 0.0})
        assert verdict != ACK


def test_the_server_key_is_never_a_client_key(store: Store, keydir: KeyDirectory):
    """A client holding the store's server keypair (every binding host used to) gets nothing and injects
    nothing, even where an old key directory still lists server.key in authorized/."""
    server = keydir.server_keys()
    as_client = CurveKeys(server.public, server.secret, server.public)
    planted = keydir.authorized_dir / "server-old.key"
    planted.write_text((keydir.path / "server.key").read_text())
    ctx = zmq.Context()
    try:
        with store.client("stemstream") as admin:
            sub = ctx.socket(zmq.SUB)
            push = ctx.socket(zmq.PUSH)
            dealer = ctx.socket(zmq.DEALER)
            for sock, offset in ((sub, 1), (push, 2), (dealer, 0)):
                sock.linger = 0
                sock.curve_secretkey, sock.curve_publickey = as_client.secret, as_client.public
                sock.curve_serverkey = as_client.server_public
                if sock is sub:
                    sock.setsockopt(zmq.SUBSCRIBE, b"")
                sock.connect(f"tcp://127.0.0.1:{store.port + offset}")
            KVMsg("/nodegroups/zz-evil", 0, msgpack.packb(_record("nodegroup", "zz-evil")), {}).send(push)
            dealer.send_multipart([ICANHAZ, b"/"])
            admin.set("/sessions/after", 1)
            admin.wait_for(lambda it: "/sessions/after" in it, "/sessions/", timeout=10)
            time.sleep(0.5)
            assert not sub.poll(300) and not dealer.poll(300), "the server key got data as a client"
            assert "/nodegroups/zz-evil" not in admin.items("/nodegroups/")
            # The same through the client API: no snapshot, a one-line error.
            with pytest.raises(StoreUnavailable):
                StoreClient(store.address, settings=store.settings("servercopy"), timeout=1.0).start()
            for sock in (sub, push, dealer):
                sock.close(linger=0)
    finally:
        planted.unlink()
        ctx.destroy(linger=0)
    assert "holds a server key" in Path(store.log.name).read_text()


# ------------------------------------------------------------------------------------------ the bounds


def test_values_of_1_mib_are_refused_by_size_and_a_writer_over_its_quota_is_refused(keydir: KeyDirectory, tmp_path):
    """200 keys of 1 MiB (the issue: +200 MB in the store and every client mirroring "/") are refused by
    size; a NodeGroup writing previews (its largest records) is stopped by its quota of 32 MiB."""
    store = Store(keydir, tmp_path / "store.log", "--quota-bytes", str(32 * MB))
    try:
        with store.client("stemstream") as admin, store.client("ng-a", subtrees=("/nodegroups/",)) as ng_a:
            ng_a.set(record_key("nodegroup", "a1"), _record("nodegroup", "a1"), ttl=60)
            admin.wait_for(lambda it: record_key("nodegroup", "a1") in it, "/nodegroups/", timeout=10)
            plan = ScanPlan(7, (2, 2), "stream", members=("a1",), aggregator="agg-0")
            admin.set(keys.scan(7), plan.to_record())
            admin.wait_for(lambda it: keys.scan(7) in it, keys.scan(7), timeout=10)
            before = store.rss()
            ctx = zmq.Context()
            push = _raw_push(ctx, store, "ng-a")
            big = msgpack.packb(b"x" * (MB - 64))  # just under 1 MiB: the server's max_body lets it in
            for i in range(200):
                KVMsg(f"/nodegroups/big-{i}", 0, big).send(push)
            preview = b"p" * (400 << 10)
            for rank in range(120):  # 48 MB of previews for its scan: over its 32 MiB
                KVMsg(keys.preview(7, rank), 0, msgpack.packb({"rank": rank, "bf": preview})).send(push)
            push.close()
            ctx.term()
            counters = store.counters(admin, denied_size=200, denied=200 + 120 - 82)
            grown = store.rss() - before
            held = admin.items(keys.preview_prefix(7))
        print(f"200 x 1 MiB and 120 x 400 KiB previews, quota 32 MiB: +{grown / MB:.1f} MB, {len(held)} held")
        assert counters["denied_size"] == 200
        assert 70 <= len(held) <= 82 and counters["denied_quota"] == 120 - len(held), (len(held), counters)
        assert grown < 2 * 32 * MB, f"the store grew {grown / MB:.0f} MB for a 32 MiB quota"
    finally:
        store.close()


def _raw_push(ctx: zmq.Context, store: Store, name: str) -> zmq.Socket:
    """An attacker's PUSH to the collector with key ``name``: no client-side checks, no replica."""
    keys_ = store.keydir.client_keys(name)
    push = ctx.socket(zmq.PUSH)
    push.linger = 5000
    push.curve_secretkey, push.curve_publickey, push.curve_serverkey = keys_.secret, keys_.public, keys_.server_public
    push.connect(f"tcp://127.0.0.1:{store.port + 2}")
    return push


def _slow_socket(ctx: zmq.Context, kind: int, keys_: CurveKeys) -> zmq.Socket:
    """A socket that holds as little as ZeroMQ and the kernel allow: it will never read."""
    sock = ctx.socket(kind)
    sock.linger = 0
    sock.rcvhwm = 1
    sock.setsockopt(zmq.RCVBUF, 4096)
    sock.curve_secretkey, sock.curve_publickey, sock.curve_serverkey = keys_.secret, keys_.public, keys_.server_public
    return sock


def test_a_subscriber_that_never_reads_costs_the_server_a_bounded_amount(store: Store, keydir: KeyDirectory):
    ctx = zmq.Context()
    try:
        with store.client("stemstream") as writer, store.client("op", subtrees=("/data/",)) as reader:
            slow = _slow_socket(ctx, zmq.SUB, keydir.client_keys("op"))
            slow.setsockopt(zmq.SUBSCRIBE, b"")
            slow.connect(f"tcp://127.0.0.1:{store.port + 1}")
            time.sleep(0.5)
            before = store.rss()
            value = b"v" * (256 << 10)
            for i in range(160):  # 40 MB of new data
                writer.set(f"/data/{i}", value)
            reader.wait_for(lambda it: len(it) == 160, "/data/", timeout=30)
            added = store.rss() - before
            print(f"never-reading subscriber: 40 MB added, +{added / MB:.1f} MB")
            assert added < 2 * 40 * MB, f"the store grew {added / MB:.0f} MB for 40 MB added"

            churn_before = store.rss()
            small = b"c" * 4096
            for i in range(30_000):  # 120 MB of updates to 100 keys
                writer.set(f"/data/churn-{i % 100}", [i, small])
            reader.wait_for(lambda it: (it.get("/data/churn-99") or [0])[0] == 29_999, "/data/", timeout=60)
            churned = store.rss() - churn_before
            print(f"never-reading subscriber: 120 MB churned, +{churned / MB:.1f} MB")
            assert churned < 30 * MB, f"the store grew {churned / MB:.0f} MB while 120 MB churned through"
            slow.close(linger=0)
    finally:
        ctx.destroy(linger=0)


def test_snapshot_requests_never_read_cost_the_server_a_bounded_amount(store: Store, keydir: KeyDirectory):
    ctx = zmq.Context()
    dealers = []
    try:
        with store.client("stemstream") as writer:
            value = b"s" * (10 << 10)
            for i in range(2000):  # 20 MB in the store
                writer.set(f"/data/{i}", value)
            with store.client("op", subtrees=("/data/",)) as check:  # applied: another client sees them
                check.wait_for(lambda it: len(it) == 2000, "/data/", timeout=30)
            before = store.rss()
            for _ in range(50):
                dealer = _slow_socket(ctx, zmq.DEALER, keydir.client_keys("op"))
                dealer.connect(f"tcp://127.0.0.1:{store.port}")
                dealer.send_multipart([ICANHAZ, b"/"])
                dealers.append(dealer)
            time.sleep(2.0)
            # An honest client still gets its snapshot meanwhile.
            with store.client("op", subtrees=("/data/",)) as honest:
                assert len(honest.items("/data/")) == 2000
            grown = store.rss() - before
            print(f"50 unread snapshots of 20 MB: +{grown / MB:.1f} MB")
            assert grown < 40 * MB, f"50 unread snapshots of 20 MB cost the store {grown / MB:.0f} MB"
    finally:
        for dealer in dealers:
            dealer.close(linger=0)
        ctx.destroy(linger=0)


# ------------------------------------------------------------------------------------- end to end


def test_a_scan_streams_with_a_key_per_service_and_hosts_own_server_keys(keydir: KeyDirectory, tmp_path: Path):
    """Store, aggregator (key agg, server key agghost), NodeGroup (key ng-a, server key nid001) and four
    producers (daq0 the leader, daq1) as processes: the NodeGroup and the aggregator publish their server keys,
    the others connect with them, the scan is received whole, and the store denied nothing."""
    from stemstream.plane.requests import request_scan

    env = {"STEMSTREAM_KEYS_DIR": str(keydir.path)}
    scan, shape = 1, (4, 4)
    store = Store(keydir, tmp_path / "store.log")
    try:
        with ProcessTree(tmp_path / "logs", env=env) as tree:
            a = store.address
            tree.start("aggregator", "aggregator", "--store", a,
                       env={"STEMSTREAM_KEY_NAME": "agg", "STEMSTREAM_SERVER_KEY_NAME": "agghost"})  # fmt: skip
            tree.start("ng", "nodegroup", "--store", a, "--uid", "a1", "--results", tmp_path / "results",
                       env={"STEMSTREAM_KEY_NAME": "ng-a", "STEMSTREAM_SERVER_KEY_NAME": "nid001"})  # fmt: skip
            for m in range(4):
                name = "daq0" if m == 0 else "daq1"
                tree.start(f"producer-{m}", "producer", "--store", a, "--sector", m, "--threads", 1,
                           env={"STEMSTREAM_KEY_NAME": name})  # fmt: skip
            with store.client("op") as client:
                registry = Registry(client)
                registry.wait_for_members("aggregator", 1, status="ready", timeout=60)
                registry.wait_for_members("nodegroup", 1, status="ready", timeout=60)
                registry.wait_for_members("producer", 4, status="ready", timeout=60)
                ng = registry.members("nodegroup")[0]
                assert ng.server_key == keydir.server_keys("nid001").public.decode()
                assert registry.members("aggregator")[0].server_key == keydir.server_keys("agghost").public.decode()
                request_scan(client, scan, shape, loss_rate=0.0)
                record = wait_scan_status(client, scan, ("received", "incomplete"), timeout=90)
                tree.check_alive()
                assert record["status"] == "received", record
                assert record["received"] == record["sent"] == 4 * shape[0] * shape[1]
                assert decide_plan(registry, 2, shape, decided_by="x").aggregator_server_key == (
                    keydir.server_keys("agghost").public.decode()
                )
                counters = store.counters(client, updates=1)
                assert counters.get("denied", 0) == 0, counters
    finally:
        store.close()


# ------------------------------------------------------------------------------ lost updates are noticed


@pytest.mark.parametrize("subtrees", [("/gap/", "/other/"), ("/",)], ids=["subtrees", "whole tree"])
def test_a_client_that_falls_behind_loses_updates_at_the_hwm_notices_and_resyncs(monkeypatch, caplog, subtrees):
    """The server drops what a subscriber does not take (a small HWM here); the client sees the gap (the
    global sequence for the whole tree; each segment's ``prev`` and HUGZ's ``last`` for subtrees) and
    resyncs by snapshot, so it ends with every key's last value."""
    from stemstream.store import StoreServer, link, ports

    monkeypatch.setattr(ports, "UPDATES_HWM", 20)
    monkeypatch.setattr(link, "PUB_HWM", 20)  # the client's receive queue
    caplog.set_level("WARNING", logger="stemstream.store")
    srv = StoreServer("127.0.0.1", None, heartbeat_s=2.0).start()
    try:
        with StoreClient(srv.address, subtrees=subtrees, timeout=10) as lagging, StoreClient(srv.address) as writer:
            lagging.set("/gap/first", 0)
            lagging.wait_for(lambda it: "/gap/first" in it, "/gap/", timeout=10)
            value = b"g" * (8 << 10)
            with lagging._replica.lock:  # its agent stops reading: 24 MB go by
                for i in range(3000):
                    writer.set(f"/gap/{i % 1000}", [i, value])
                with StoreClient(srv.address, subtree="/gap/") as check:
                    check.wait_for(lambda it: (it.get("/gap/999") or [0])[0] == 2999, "/gap/", timeout=30)
            lagging.wait_for(
                lambda it: all((it.get(f"/gap/{k}") or [0])[0] == 2000 + k for k in range(1000)), "/gap/", timeout=30
            )
    finally:
        srv.stop()
    notices = [r.getMessage() for r in caplog.records if "missed updates" in r.getMessage()]

    assert notices, "the lagging client never noticed that it missed updates"


def test_the_binary_star_peer_follows_on_its_own_queue_whatever_bounds_the_clients(monkeypatch):
    """Clients' queue on P+1 is bounded (1 message here, so a burst drops); the passive server follows on P+4
    with its own generous queue, so it keeps up without a single resync."""
    from plane_helpers import free_port_block
    from stemstream.store import StoreServer, ports

    monkeypatch.setattr(ports, "UPDATES_HWM", 1)
    base_p, base_b = free_port_block(5), free_port_block(5)
    primary = StoreServer("127.0.0.1", base_p, peer=f"tcp://127.0.0.1:{base_b}", heartbeat_s=0.2)
    backup = StoreServer("127.0.0.1", base_b, role="backup", peer=f"tcp://127.0.0.1:{base_p}", heartbeat_s=0.2)
    primary.start()
    backup.start()
    try:
        with StoreClient(primary.address, backup=backup.address, subtree="/burst/", timeout=10) as client:
            client.set("/burst/first", 0)
            deadline = time.monotonic() + 10
            while not (backup.state == "passive" and backup.stats.get("peer_syncs") and backup.sequence > 0):
                assert time.monotonic() < deadline, (primary.state, backup.state)
                time.sleep(0.05)
            value = b"b" * 2048
            for i in range(5000):
                client.set(f"/burst/{i % 500}", [i, value])
            deadline = time.monotonic() + 30
            while backup.sequence < primary.sequence or primary.stats.get("updates", 0) < 5001:
                assert time.monotonic() < deadline, (backup.sequence, primary.sequence)
                time.sleep(0.05)
            assert backup.stats.get("resyncs", 0) == 0, backup.stats
            assert backup.stats.get("followed", 0) >= 5000
    finally:
        primary.stop()
        backup.stop()

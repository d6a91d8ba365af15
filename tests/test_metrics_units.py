"""Metrics parts without child processes: the send meter (back-pressure), the exporter's port range, the
health verdicts, scan outcomes, scrape targets, and a store pair's failover as its metrics show it."""

from __future__ import annotations

import threading
import time
import urllib.request
from typing import Any

import numpy as np
import pytest
import zmq

from plane_helpers import free_port_block
from stemstream.config import load_settings
from stemstream.errors import ConfigError
from stemstream.metrics.catalog import BY_ROLE, SPECS
from stemstream.metrics.collectors import ScanCollector, StoreCollector, scan_outcome
from stemstream.metrics.exporter import MetricsExporter, serve_metrics
from stemstream.metrics.health import check
from stemstream.metrics.targets import scrape_targets, write_targets
from stemstream.scans.records import ScanRecord
from stemstream.store import Record, StoreClient, StoreServer
from stemstream.transport.actor import SendMeter, send_parts

# ------------------------------------------------------------------------------------------ send meter


def test_send_meter_counts_payload_bytes_and_time_blocked_at_the_hwm():
    ctx = zmq.Context()
    sent = threading.Event()

    def read_later(pull: zmq.Socket) -> None:
        time.sleep(0.5)
        while not sent.is_set():
            if pull.poll(50):
                pull.recv_multipart()

    try:
        pull = ctx.socket(zmq.PULL)
        pull.setsockopt(zmq.RCVHWM, 1)
        port = pull.bind_to_random_port("tcp://127.0.0.1")
        push = ctx.socket(zmq.PUSH)
        push.setsockopt(zmq.SNDHWM, 1)
        push.connect(f"tcp://127.0.0.1:{port}")
        payload = np.zeros((144, 576), np.uint16)  # len() is 144, the bytes 165,888
        meter = SendMeter()
        send_parts(push, [b"header", payload], meter=meter, timeout=5)
        assert (meter.messages, meter.bytes, meter.blocked) == (1, payload.nbytes, 0)
        # Fill every queue on the way (nobody reads) until nothing moves for 0.2 s, then send once more: it
        # waits until a reader starts.
        deadline, refused = time.monotonic() + 20, 0
        while refused < 4 and time.monotonic() < deadline:
            try:
                push.send_multipart([b"h", payload], flags=zmq.NOBLOCK, copy=False)
                refused = 0
            except zmq.Again:
                refused += 1
                time.sleep(0.05)
        reader = threading.Thread(target=read_later, args=(pull,))
        reader.start()
        started = time.monotonic()
        try:
            send_parts(push, [b"header", payload], meter=meter, timeout=10)
        finally:
            sent.set()
            reader.join()
        waited = time.monotonic() - started
        assert meter.messages == 2 and meter.bytes == 2 * payload.nbytes
        assert meter.blocked == 1 and 0.4 <= meter.blocked_s <= waited + 0.01
    finally:
        ctx.destroy(linger=0)


# ------------------------------------------------------------------------------------------- exporter


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.read().decode()


def test_each_process_takes_the_next_free_port_of_the_range_and_says_so_when_none_is_left():
    base = free_port_block(2)
    settings = load_settings(port_range=f"{base}-{base + 1}")
    first = serve_metrics("127.0.0.1", settings=settings)
    second = serve_metrics("127.0.0.1", settings=settings)
    try:
        assert (first.port, second.port) == (base, base + 1)
        assert first.url == f"http://127.0.0.1:{base}/metrics"
        assert "process_cpu_seconds_total" in _get(second.url)
        with pytest.raises(ConfigError, match=rf"no free port in STEMSTREAM_PORT_RANGE={base}-{base + 1}"):
            serve_metrics("127.0.0.1", settings=settings)
    finally:
        first.close()
        second.close()
    third = serve_metrics("127.0.0.1", settings=settings)  # closed ports are free again
    assert third.port == base
    third.close()


@pytest.mark.parametrize("value", ["40000", "abc-def", "50000-40000", "80-90", "60000-70000"])
def test_a_bad_port_range_is_a_one_line_error_naming_the_variable(value: str):
    with pytest.raises(ConfigError, match=r"^STEMSTREAM_PORT_RANGE: .*\(got ") as info:
        load_settings(port_range=value)
    assert "\n" not in str(info.value)


def test_metrics_off_serves_nothing_and_advertises_nothing():
    off = serve_metrics(settings=load_settings(metrics=False))
    assert not off.serving and off.url is None

    class Advertised:
        def advertise(self, name: str, endpoint: str) -> None:
            raise AssertionError("nothing to advertise")

    server = StoreServer(port=None)
    assert off.watch(server) is server
    with pytest.raises(TypeError, match="no collector"):
        off.watch(Advertised())


def test_catalogue_names_are_prometheus_names_and_every_role_lists_known_ones():
    for name, spec in SPECS.items():
        assert name.startswith("stemstream_") and name == name.lower()
        assert name.endswith("_total") == (spec.kind == "counter"), name
        assert not {"instance", "job", "service", "host"} & set(spec.labels), "clashes with target labels"
    for role, names in BY_ROLE.items():
        assert set(names) <= set(SPECS), role


# --------------------------------------------------------------------------------------------- health


class FakeStore:
    """Registry records that change as the fake clock runs (``script(t)`` gives the records at time t)."""

    server = "tcp://fake:1"

    def __init__(self, script: Any) -> None:
        self.script = script
        self.t = 0.0

    def clock(self) -> float:
        return self.t

    def sleep(self, dt: float) -> None:
        self.t += dt

    def items(self, prefix: str = "/") -> dict[str, Any]:
        return {f"/{r.role}s/{r.uid}": r.to_dict() for r in self.script(self.t) if f"/{r.role}s/".startswith(prefix)}

    def get(self, key: str, default: Any = None) -> Any:
        return self.items().get(key, default)


def _record(role: str, uid: str, t: float, *, status: str = "ready", beat: float = 1.0, **counts: int) -> Record:
    return Record(uid=uid, role=role, status=status, heartbeat=1000 + (t // beat) * beat, counts=dict(counts))


def _check(script: Any, role: str, uid: str | None = None, scrape: Any = None) -> Any:
    store = FakeStore(script)
    kwargs = {"scrape": scrape} if scrape else {}
    return check(store, role, uid, window=5, clock=store.clock, sleep=store.sleep, **kwargs)


def test_health_idle_process_with_a_moving_heartbeat_is_ok():
    verdict = _check(lambda t: [_record("aggregator", "agg", t, received=10)], "aggregator")
    assert verdict.ok and verdict.line == "aggregators: ok, heartbeat moving: agg ready"


def test_health_busy_process_whose_counts_move_is_ok_and_one_whose_counts_stand_still_is_stalled():
    moving = _check(lambda t: [_record("nodegroup", "ng", t, scans_open=1, received=int(t * 10))], "nodegroup", "ng")
    assert moving.ok, moving.line
    still = _check(lambda t: [_record("nodegroup", "ng", t, scans_open=1, received=7)], "nodegroup", "ng")
    assert not still.ok
    assert still.line == "nodegroup ng: ng: stalled, 1 scan(s) open and no progress in 5 s (nothing moved)"


def test_health_reads_progress_from_the_metrics_endpoint_when_there_is_one():
    def script(t: float) -> list[Record]:
        rec = _record("producer", "p0", t, status="streaming", sent=0)  # its record's counts move per scan only
        rec.endpoints["metrics"] = "http://p0:40000/metrics"
        rec.scan_number = 4
        return [rec]

    calls: list[tuple[str, str, str]] = []
    live = _check(script, "producer", scrape=lambda url, role, uid: calls.append((url, role, uid)) or len(calls))
    assert live.ok and "p0 streaming (streaming scan 4)" in live.line
    assert calls[0] == ("http://p0:40000/metrics", "producer", "p0")
    dead = _check(script, "producer", scrape=lambda url, role, uid: None)
    assert not dead.ok and "its metrics endpoint does not answer" in dead.line


def test_health_unhealthy_verdicts_are_one_line_each():
    assert _check(lambda t: [], "nodegroup").line == "nodegroups: not registered in the store at tcp://fake:1"
    stuck = _check(lambda t: [_record("aggregator", "agg", 0)], "aggregator")
    assert not stuck.ok and "agg: heartbeat did not move in 5 s" in stuck.line
    stopping = _check(lambda t: [_record("aggregator", "agg", t, status="stopping")], "aggregator")
    assert stopping.line == "aggregators: agg is stopping"
    gone = _check(lambda t: [_record("aggregator", "agg", t)] if t < 1 else [], "aggregator")
    assert gone.line == "aggregators: agg left the registry (stopped, or its record expired)"
    one_bad = _check(lambda t: [_record("producer", "a", t), _record("producer", "b", 0)], "producer")
    assert not one_bad.ok and "b: heartbeat" in one_bad.line and "\n" not in one_bad.line
    assert not _check(lambda t: [], "flow").ok


# ------------------------------------------------------------------------------ scans, targets, store


def _scan(**fields: Any) -> dict[str, Any]:
    return {"scan": 1, "scan_shape": [2, 2], "route": "stream", "members": ["ng"], "status": "streaming",
            "decided_at": 100.0, **fields}  # fmt: skip


@pytest.mark.parametrize(
    ("record", "counted", "outcome"),
    [
        (_scan(), None, "open"),
        (_scan(status="received", closed_at=101.0, ack="counted"), None, "open"),  # counting still to come
        (_scan(status="received", closed_at=101.0, ack="received"), None, "received"),
        (_scan(status="received", closed_at=101.0, ack="counted"), {"status": "partial"}, "partial"),
        (_scan(status="received", closed_at=101.0), {"status": "counted", "path": "/x.h5"}, "counted"),
        (_scan(status="on_disk", replayed=True, closed_at=101.0), {"status": "partial"}, "replayed"),
        (_scan(route="disk", members=[], status="writing"), None, "open"),
        (_scan(route="disk", members=[], status="on_disk", closed_at=101.0), None, "on_disk"),
    ],
)
def test_scan_outcomes(record: dict[str, Any], counted: dict[str, Any] | None, outcome: str):
    from stemstream.scans.records import CountedRecord

    parsed = ScanRecord.parse(record)
    assert parsed is not None
    assert scan_outcome(parsed, record, CountedRecord.parse(counted) if counted else None) == outcome


def test_scan_collector_counts_outcomes_and_the_oldest_open_scan():
    items = {
        "/scans/1": _scan(decided_at=50.0),
        "/scans/2": _scan(scan=2, status="received", closed_at=101.0),
        "/scans/2/counted": {"status": "counted", "path": "/c.h5"},
        "/scans/3": _scan(scan=3, decided_at=90.0),
        "/scans/0": _scan(scan=0, decided_at=1.0, status="received", closed_at=2.0, ack="received"),  # before
    }
    store = FakeStore(lambda t: [])
    store.items = lambda prefix="/": {k: v for k, v in items.items() if k.startswith(prefix)}  # type: ignore[method-assign]
    store.keys = lambda prefix="/": [k for k in items if k.startswith(prefix)]  # type: ignore[attr-defined]
    store.get = lambda key, default=None: items.get(key, default)  # type: ignore[method-assign]
    collector = ScanCollector(store, "session", "s1", since=10.0, clock=lambda: 110.0)
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in collector.collect() for s in f.samples}
    base = (("role", "session"), ("uid", "s1"))
    assert samples[("stemstream_scans", (("outcome", "open"), *base))] == 2
    assert samples[("stemstream_scans", (("outcome", "counted"), *base))] == 1
    assert samples[("stemstream_scans", (("outcome", "received"), *base))] == 0  # scan 0 is before `since`
    assert samples[("stemstream_scan_open_oldest_seconds", base)] == 60.0


def test_targets_one_per_endpoint_with_service_and_host_labels(tmp_path):
    def rec(role: str, uid: str, url: str | None, host: str = "h1") -> tuple[str, dict[str, Any]]:
        r = Record(uid=uid, role=role, status="ready", host=host, endpoints={"metrics": url} if url else {})
        return f"/{role}s/{uid}", r.to_dict()

    items = dict(
        [
            rec("nodegroup", "ng-0", "http://n1:40001/metrics", "n1"),
            rec("nodegroup", "ng-1", "http://n1:40001/metrics", "n1"),  # same process
            rec("producer", "p0", "http://daq0:40000/metrics", "daq0"),
            rec("aggregator", "agg", None),  # metrics off: not a target
        ]
    )
    items["/store/primary/stats"] = {"endpoints": {"metrics": "http://store-a:40000/metrics"}}
    items["/store/backup/stats"] = {"endpoints": {}}
    items["/sessions/s1"] = {"status": "running", "metrics": "http://wf:40010/custom"}
    store = FakeStore(lambda t: [])
    store.items = lambda prefix="/": {k: v for k, v in items.items() if k.startswith(prefix)}  # type: ignore[method-assign]
    groups = scrape_targets(store)
    assert groups == [
        {"targets": ["daq0:40000"], "labels": {"service": "producer", "host": "daq0"}},
        {"targets": ["n1:40001"], "labels": {"service": "nodegroup", "host": "n1"}},
        {"targets": ["store-a:40000"], "labels": {"service": "store", "host": "store-a"}},
        {"targets": ["wf:40010"], "labels": {"service": "session", "host": "wf", "__metrics_path__": "/custom"}},
    ]
    out = tmp_path / "sd" / "stemstream.json"
    write_targets(groups, out)
    import json

    assert json.loads(out.read_text()) == groups
    assert [p.name for p in out.parent.iterdir()] == ["stemstream.json"], "no temporary file left behind"


def _store_samples(server: StoreServer) -> dict[str, float]:
    return {s.name: s.value for f in StoreCollector(server).collect() for s in f.samples if "kind" not in s.labels}


def test_store_pair_metrics_show_the_backup_following_then_a_failover_and_no_backup_left():
    base_p, base_b = free_port_block(4), free_port_block(4)
    primary = StoreServer("127.0.0.1", base_p, peer=f"tcp://127.0.0.1:{base_b}", heartbeat_s=0.1)
    backup = StoreServer("127.0.0.1", base_b, role="backup", peer=f"tcp://127.0.0.1:{base_p}", heartbeat_s=0.1)
    exporter = MetricsExporter("127.0.0.1")
    exporter.watch(backup)
    primary.start()
    backup.start()
    try:
        with StoreClient(primary.address, backup=backup.address, timeout=5) as client:
            client.set("/pair/a", 1)
            deadline = time.monotonic() + 10
            while not (backup.state == "passive" and backup.sequence >= primary.sequence > 0):
                assert time.monotonic() < deadline, (primary.state, backup.state)
                time.sleep(0.05)
            assert _store_samples(primary)["stemstream_store_active"] == 1
            following = _store_samples(backup)
            assert following["stemstream_store_active"] == 0
            assert following["stemstream_store_peer_configured"] == following["stemstream_store_peer_alive"] == 1
            assert following["stemstream_store_failovers_total"] == 0
            primary.stop()
            client.wait_for(lambda items: client.server == backup.address and client.connected, "/", timeout=10)
            took_over = _store_samples(backup)
            assert took_over["stemstream_store_active"] == 1 and took_over["stemstream_store_peer_alive"] == 0
            assert took_over["stemstream_store_failovers_total"] == 1
            assert took_over["stemstream_store_sequence"] >= 1
    finally:
        primary.stop()
        backup.stop()


def test_a_session_serves_the_outcomes_of_its_own_scans_and_is_a_scrape_target():
    from prometheus_client.parser import text_string_to_metric_families

    from stemstream.scans import keys
    from stemstream.sessions.metrics import session_metrics

    server = StoreServer(port=None).start()
    try:
        with StoreClient(server.address, timeout=5) as client:
            client.set("/scans/1", _scan(decided_at=time.time() - 60))  # before the session: not its scan
            exporter = session_metrics(client, "s1", nodegroups=3)
            try:
                client.set("/scans/2", _scan(scan=2, decided_at=time.time() + 0.01))
                client.set(keys.session("s1"), {"status": "running", "metrics": exporter.url})
                client.wait_for(lambda items: "/scans/2" in items and keys.session("s1") in items, "/")
                samples = {
                    (s.name, s.labels.get("outcome") or s.labels.get("member")): s.value
                    for f in text_string_to_metric_families(_get(exporter.url))
                    for s in f.samples
                    if s.labels.get("role") == "session" and s.labels.get("uid") == "s1"
                }
                assert samples[("stemstream_scans", "open")] == 1
                assert samples[("stemstream_session_nodegroups_expected", None)] == 3
                assert samples[("stemstream_registry_members", "nodegroup")] == 0
                netloc = exporter.url.split("/")[2]
                assert {"targets": [netloc], "labels": {"service": "session", "host": "127.0.0.1"}} in scrape_targets(
                    client
                )
            finally:
                exporter.close()
    finally:
        server.stop()


def test_the_aggregator_counts_nodegroups_that_went_without_stopping():
    from stemstream.plane.aggregator import Aggregator
    from stemstream.store import Registry

    server = StoreServer(port=None).start()
    try:
        with StoreClient(server.address, timeout=5) as client:
            agg = Aggregator(client, uid="agg-lost", publish_interval=0.1).start()
            try:
                registry = Registry(client, ttl=5)
                stopped = registry.register("nodegroup", "ng-stopped", status="ready")
                died = registry.register("nodegroup", "ng-died", status="ready")
                deadline = time.monotonic() + 5
                while {"ng-stopped", "ng-died"} - set(agg._nodegroup_status):  # the watch has seen both
                    assert time.monotonic() < deadline
                    time.sleep(0.05)
                stopped.update(status="stopping")  # what NodeGroup.stop() says before it deregisters
                time.sleep(0.3)
                stopped.close()
                died.close()  # gone without a word: as when its record expires
                deadline = time.monotonic() + 5
                while agg.counts()["nodegroups_lost"] < 1:
                    assert time.monotonic() < deadline, agg.counts()
                    time.sleep(0.05)
                time.sleep(0.3)
                assert agg.counts()["nodegroups_lost"] == 1
            finally:
                agg.stop()
    finally:
        server.stop()

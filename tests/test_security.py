"""ZeroMQ CURVE (docs/security.md): the settings decision, `stemstream keys`, and real sockets: a CURVE store,
a Binary Star pair, a NodeGroup and a whole streamed scan in separate processes. A client without an
authorised key gets nothing and injects nothing; no secret key text reaches a log."""

from __future__ import annotations

import ast
import os
import re
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
import zmq

from plane_helpers import ProcessTree, free_port_block, start_store, store_client, wait_scan_status
from stemstream.cli import main
from stemstream.config import curve_enabled, get_settings, is_loopback, load_settings
from stemstream.errors import ConfigError, SecurityError, StoreUnavailable
from stemstream.nodes.consumer import CollectingConsumer, NullConsumer
from stemstream.plane.nodegroup import NodeGroup
from stemstream.store import Registry, StoreClient, StoreServer
from stemstream.store.kvmsg import KVMsg
from stemstream.transport.keys import CurveKeys, KeyDirectory
from stemstream.transport.security import CurveSecurity, has_authenticator, stop_authenticator
from stemstream.transport.sockets import CURVE_HANDSHAKE_BYTES, make_socket, term_context
from stemstream.wire.protocol import EndMessage, ExpectMessage, SectorHeader

SRC = Path(__file__).resolve().parents[1] / "src" / "stemstream"
Z85 = re.compile(rb'secret-key = "([^"]{40})"')


class Keys:
    """A key directory made by `keys init` plus a keypair ``rogue`` that is not authorised."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.dir = KeyDirectory(path)
        self.dir.init()
        self.dir.add("rogue", authorize=False)

    def settings(self, **overrides: Any):
        return load_settings(keys_dir=self.path, **overrides)

    def client(self, name: str) -> CurveKeys:
        return self.dir.client_keys(name)

    def secrets(self) -> list[str]:
        """Every secret key in the directory, as z85 text (what must never be in a log)."""
        found = [m.group(1).decode() for p in self.path.rglob("*.key_secret") for m in Z85.finditer(p.read_bytes())]
        assert len(found) == 3  # server, stemstream, rogue
        return found


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> Keys:
    return Keys(tmp_path_factory.mktemp("curve") / "keys")


@pytest.fixture
def curve_env(keys: Keys, monkeypatch) -> Iterator[Keys]:
    """STEMSTREAM_KEYS_DIR in this process's environment (and its children's): CURVE on for everything."""
    monkeypatch.setenv("STEMSTREAM_KEYS_DIR", str(keys.path))
    get_settings.cache_clear()
    yield keys
    monkeypatch.delenv("STEMSTREAM_KEYS_DIR")
    get_settings.cache_clear()


def _raw_push(ctx: zmq.Context, endpoint: str, curve: CurveKeys | None) -> zmq.Socket:
    """A PUSH that queues whatever it is given (no IMMEDIATE): it would deliver if the handshake passed."""
    sock = ctx.socket(zmq.PUSH)
    sock.linger = 0
    sock.sndtimeo = 2000
    if curve is not None:
        sock.curve_secretkey, sock.curve_publickey = curve.secret, curve.public
        sock.curve_serverkey = curve.server_public
    sock.connect(endpoint)
    return sock


def _forged(keys: Keys) -> CurveKeys:
    """The rogue's own keypair, with the (public) server key: a correct CURVE client, just not authorised."""
    return keys.client("rogue")


# ----------------------------------------------------------------------------------------- settings


@pytest.mark.parametrize(
    ("env", "expect"),
    [
        ({}, False),  # the local demo and the tests: all loopback, no keys
        ({"store_host": "localhost", "bind_host": "::1", "store_backup_host": "127.0.0.2"}, False),
        ({"keys_dir": "/k"}, True),
        ({"keys_dir": "/k", "store_host": "10.0.0.5"}, True),
        ({"curve": "off", "store_host": "10.0.0.5", "bind_host": "0.0.0.0"}, False),
        ({"curve": "on", "keys_dir": "/k"}, True),
        ({"store_host": "10.0.0.5"}, ConfigError),
        ({"store_backup_host": "store-b.example.org"}, ConfigError),
        ({"bind_host": "0.0.0.0"}, ConfigError),
        ({"curve": "on"}, ConfigError),
    ],
)
def test_curve_decision(env: dict[str, str], expect: Any):
    settings = load_settings(**env)
    if expect is ConfigError:
        with pytest.raises(ConfigError) as info:
            curve_enabled(settings)
        msg = str(info.value)
        assert "\n" not in msg
        assert "stemstream keys init" in msg and "STEMSTREAM_KEYS_DIR" in msg and "STEMSTREAM_CURVE=off" in msg
    else:
        assert curve_enabled(settings) is expect


def test_curve_decision_counts_the_hosts_a_component_really_uses():
    settings = load_settings()
    assert curve_enabled(settings, ("127.0.0.1",)) is False
    with pytest.raises(ConfigError, match="'node17'"):
        curve_enabled(settings, ("node17",))
    with pytest.raises(ConfigError, match=r"10\.1\.2\.3"):
        StoreClient("tcp://10.1.2.3:5560", settings=settings)  # --store pointing elsewhere: no silent plaintext
    assert is_loopback("[::1]") and is_loopback("127.8.9.10") and not is_loopback("*")


def test_bad_curve_value_is_a_one_line_config_error(monkeypatch):
    monkeypatch.setenv("STEMSTREAM_CURVE", "maybe")
    with pytest.raises(ConfigError, match="STEMSTREAM_CURVE") as info:
        load_settings()
    assert "\n" not in str(info.value)


# ------------------------------------------------------------------------------------------- keys CLI


def test_keys_cli_init_add_list_revoke(tmp_path: Path, capsys, monkeypatch):
    monkeypatch.delenv("STEMSTREAM_KEYS_DIR", raising=False)
    d = tmp_path / "facility"
    assert main(["keys", "init", str(d)]) == 0
    assert main(["keys", "add", "site-a", "--dir", str(d), "--role", "nodegroup"]) == 0
    assert main(["keys", "add", "site-b", "--dir", str(d), "--no-authorize"]) == 0
    assert main(["keys", "add", "nid001", "--dir", str(d), "--server"]) == 0
    capsys.readouterr()

    secrets = sorted(d.rglob("*.key_secret"))
    names = sorted(p.name for p in secrets)
    assert names == [
        "nid001.key_secret",
        "server.key_secret",
        "site-a.key_secret",
        "site-b.key_secret",
        "stemstream.key_secret",
    ]
    for path in secrets:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    # No server key is ever authorised as a client key: neither the store's nor a host's own.
    assert sorted(p.name for p in (d / "authorized").iterdir()) == ["site-a.key", "stemstream.key"]
    assert not any("secret" in p.read_text() for p in (d / "authorized").iterdir())

    assert main(["keys", "list", "--dir", str(d)]) == 0
    listing = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in listing.splitlines()[1:]}
    assert set(rows) == {"server", "nid001", "stemstream", "site-a", "site-b"}
    assert rows["site-a"][3] == "yes" and rows["site-b"][3] == "no" and rows["nid001"][3] == "no"
    assert rows["site-a"][5] == "nodegroup" and rows["stemstream"][5] == "admin" and rows["site-b"][5] == "-"
    assert rows["nid001"][1] == "host"
    kd = KeyDirectory(d)
    assert rows["site-a"][2] == kd.client_keys("site-a").public.decode()
    assert rows["nid001"][2] == kd.server_keys("nid001").public.decode()
    for path in secrets:
        secret = Z85.search(path.read_bytes()).group(1).decode()
        assert secret not in listing

    monkeypatch.setenv("STEMSTREAM_KEYS_DIR", str(d))  # --dir defaults to it
    assert main(["keys", "revoke", "site-a"]) == 0
    assert not (d / "authorized" / "site-a.key").exists()
    assert (d / "clients" / "site-a.key_secret").exists()
    assert main(["keys", "authorize", "site-b"]) == 0
    assert (d / "authorized" / "site-b.key").exists()
    assert main(["keys", "authorize", "site-b", "--role", "operator"]) == 0  # again: a new role
    assert 'role = "operator"' in (d / "authorized" / "site-b.key").read_text()
    capsys.readouterr()

    # Mistakes: one line on stderr, exit status 1, nothing half-made.
    for argv in (
        ["keys", "init", str(d)],
        ["keys", "add", "site-a"],
        ["keys", "add", "server"],
        ["keys", "add", "../escape"],
        ["keys", "add", "site-c", "--role", "superuser"],
        ["keys", "add", "nid002", "--server", "--role", "nodegroup"],
        ["keys", "authorize", str(d / "server.key")],
        ["keys", "authorize", str(d / "servers" / "nid001.key")],
        ["keys", "revoke", "nobody"],
        ["keys", "list", "--dir", str(tmp_path / "missing")],
    ):
        code = main(argv)
        err = capsys.readouterr().err
        if argv[1] == "list":
            assert code == 0  # an empty directory lists nothing
            continue
        assert code == 1, argv
        assert err.startswith("stemstream: error:") and err.count("\n") == 1, err
    assert sorted(p.name for p in (d / "authorized").iterdir()) == ["site-b.key", "stemstream.key"]
    monkeypatch.delenv("STEMSTREAM_KEYS_DIR")
    assert main(["keys", "list"]) == 1
    assert "STEMSTREAM_KEYS_DIR" in capsys.readouterr().err


def test_secrets_stay_out_of_reprs_and_settings_and_open_files_are_refused(keys: Keys, tmp_path: Path):
    secret = keys.client("stemstream").secret.decode()
    settings = keys.settings()
    assert secret not in repr(keys.client("stemstream"))
    assert secret not in repr(settings) and secret not in settings.model_dump_json()
    assert secret not in repr(CurveSecurity(keys.path))

    copy = KeyDirectory(tmp_path / "k")
    copy.init()
    path = copy.client_secret_file("stemstream")
    path.chmod(0o644)
    with pytest.raises(SecurityError, match="chmod 600") as info:
        CurveSecurity(copy.path).keys("client")
    assert "\n" not in str(info.value)
    # A host given only the client's files (no server secret) cannot serve: it says so before binding.
    (copy.path / "server.key_secret").unlink()
    path.chmod(0o600)
    with pytest.raises(SecurityError, match="server keypair"):
        NodeGroup(NullConsumer(), None, settings=load_settings(keys_dir=copy.path))


def test_every_streaming_socket_says_whether_it_binds_or_connects():
    """make_socket without role= is plaintext whatever the settings: no call in the services may omit it."""
    missing = []
    for path in (SRC / "streaming").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            call = isinstance(node, ast.Call) and getattr(node.func, "id", None) == "make_socket"
            if call and not any(k.arg == "role" for k in node.keywords):
                missing.append(f"{path.name}:{node.lineno}")
    assert not missing, f"make_socket without role=: {missing}"


def test_no_socket_caps_messages_below_the_curve_handshake():
    """MAXMSGSIZE also caps CURVE's handshake: a literal cap below CURVE_HANDSHAKE_BYTES breaks CURVE."""
    small = []
    for path in (SRC / "streaming").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call):
                continue
            values = [k.value for k in node.keywords if k.arg == "max_msg_size"]  # bind_random(...)
            if len(node.args) == 2 and getattr(node.args[0], "attr", None) == "MAXMSGSIZE":  # setsockopt(...)
                values.append(node.args[1])
            for value in values:
                if isinstance(value, ast.Constant) and value.value < CURVE_HANDSHAKE_BYTES:
                    small.append(f"{path.name}:{node.lineno}")
    assert not small, f"MAXMSGSIZE below {CURVE_HANDSHAKE_BYTES}: {small}"


# -------------------------------------------------------------------------------------------- store


def test_curve_store_serves_authorised_clients_only(keys: Keys, ctx: zmq.Context, caplog):
    caplog.set_level("DEBUG")
    settings = keys.settings()
    server = StoreServer("127.0.0.1", None, heartbeat_s=0.2, settings=settings).start()
    try:
        assert has_authenticator(server._ctx)
        with (
            StoreClient(server.address, settings=settings, timeout=5) as writer,
            StoreClient(server.address, settings=settings, timeout=5) as reader,
        ):
            writer.set("/sec/a", {"x": 1})
            assert reader.wait_for(lambda items: "/sec/a" in items, "/sec/", timeout=5) == {"/sec/a": {"x": 1}}
            with StoreClient(server.address, settings=settings, timeout=5) as late:  # a snapshot
                assert late.get("/sec/a") == {"x": 1}

            # An unauthorised keypair and a plaintext client: no snapshot ...
            for bad in (keys.settings(key_name="rogue"), load_settings(curve="off")):
                with pytest.raises(StoreUnavailable) as info:
                    StoreClient(server.address, settings=bad, timeout=1.0).start()
                assert "\n" not in str(info.value)
            # ... no updates on the publisher, and nothing they push is applied.
            port = server.port
            subs = []
            for curve in (_forged(keys), None):
                sub = ctx.socket(zmq.SUB)
                if curve is not None:
                    sub.curve_secretkey, sub.curve_publickey = curve.secret, curve.public
                    sub.curve_serverkey = curve.server_public
                sub.setsockopt(zmq.SUBSCRIBE, b"")
                sub.connect(f"tcp://127.0.0.1:{port + 1}")
                subs.append(sub)
                push = _raw_push(ctx, f"tcp://127.0.0.1:{port + 2}", curve)
                key = "/sec/forged" if curve is not None else "/sec/plain"
                KVMsg(key, 0, msgpack.packb("injected"), {}).send(push)
            time.sleep(0.5)
            writer.set("/sec/b", 2)  # after the injections: once this is echoed, they had their chance
            reader.wait_for(lambda items: "/sec/b" in items, "/sec/", timeout=5)
            time.sleep(0.3)
            assert set(reader.items("/sec/")) == {"/sec/a", "/sec/b"}
            for sub in subs:
                assert not sub.poll(200), "an unauthorised subscriber received an update"
                sub.close(linger=0)
        assert server.stats.get("updates") == 2
    finally:
        server.stop()
    assert any("refused a connection from public key" in r.getMessage() for r in caplog.records)
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert not any(s in text for s in keys.secrets())


def test_binary_star_pair_with_curve_syncs_and_fails_over(keys: Keys):
    settings = keys.settings()
    base_p, base_b = free_port_block(5), free_port_block(5)
    primary = StoreServer("127.0.0.1", base_p, peer=f"tcp://127.0.0.1:{base_b}", heartbeat_s=0.1, settings=settings)
    backup = StoreServer(
        "127.0.0.1", base_b, role="backup", peer=f"tcp://127.0.0.1:{base_p}", heartbeat_s=0.1, settings=settings
    )
    primary.start()
    backup.start()
    try:
        with StoreClient(primary.address, backup=backup.address, settings=settings, timeout=5) as client:
            client.set("/pair/a", 1)
            client.wait_for(lambda items: "/pair/a" in items, "/pair/", timeout=5)
            deadline = time.monotonic() + 5  # the backup follows the primary over its CURVE peer links
            while not (backup.state == "passive" and backup.sequence >= primary.sequence > 0):
                assert time.monotonic() < deadline, (primary.state, backup.state, backup.sequence)
                time.sleep(0.05)
            primary.stop()
            client.wait_for(lambda items: client.server == backup.address and client.connected, "/", timeout=10)
            client.set("/pair/b", 2)
            client.wait_for(lambda items: "/pair/b" in items, "/pair/", timeout=5)
            assert backup.state == "active"
    finally:
        primary.stop()
        backup.stop()


# ----------------------------------------------------------------------------------------- NodeGroup


def _scan_messages(scan: int, uid: str) -> tuple[list[bytes], list[list[Any]], list[bytes]]:
    """A whole 1x2 scan for one NodeGroup: expects, data (2 frames x 4 sectors), ends."""
    shape = (1, 2)
    expects = [ExpectMessage("agg", scan, m, 1, shape, (uid,), {uid: 2}).encode() for m in range(4)]
    data = [[SectorHeader(scan, f, m, shape).encode(), np.full((144, 576), f + 1, np.uint16)]
            for f in range(2) for m in range(4)]  # fmt: skip
    ends = [EndMessage("agg", scan, m, {uid: 2}, 0).encode() for m in range(4)]
    return expects, data, ends


def _send_scan(ctx: zmq.Context, ng: NodeGroup, scan: int, curve: CurveKeys | None) -> list[zmq.Socket]:
    info = _raw_push(ctx, ng.endpoints["info"], curve)
    data = [_raw_push(ctx, ng.endpoints[f"data_{m}"], curve) for m in range(4)]
    expects, messages, ends = _scan_messages(scan, ng.uid)
    for msg in expects:
        info.send(msg)
    for i, parts in enumerate(messages):
        data[i % 4].send_multipart(parts)
    for msg in ends:
        info.send(msg)
    return [info, *data]


def test_nodegroup_with_curve_takes_nothing_from_unauthorised_senders(keys: Keys, ctx: zmq.Context):
    settings = keys.settings()
    server = StoreServer("127.0.0.1", None, heartbeat_s=0.2, settings=settings).start()
    sockets: list[zmq.Socket] = []
    try:
        with StoreClient(server.address, settings=settings, timeout=5) as client:
            consumer = CollectingConsumer()
            ng = NodeGroup(consumer, client, uid="ng-sec", settings=settings, scan_timeout_s=30).start()
            try:
                sockets += _send_scan(ctx, ng, 1, _forged(keys))  # a valid scan, from an unauthorised key
                sockets += _send_scan(ctx, ng, 2, None)  # and in plaintext
                time.sleep(1.0)
                counts = ng.counts()
                assert counts["received"] == 0 and counts["rejected"] == 0 and counts["scans"] == 0
                assert consumer.frames == {}
                # The authorised client's key (the aggregator's path) gets the same scan in, complete.
                sockets += _send_scan(ctx, ng, 3, keys.client("stemstream"))
                summary = ng.wait_scan(3, timeout=10)
                assert summary.status == "received" and summary.frames_complete == 2
                counts = ng.counts()
                assert counts["received"] == 8 and counts["rejected"] == 0
                assert set(consumer.frames) == {3}
            finally:
                for sock in sockets:
                    sock.close(linger=0)
                ng.stop()
            assert not has_authenticator(ng._ctx)  # stopped with its context
    finally:
        server.stop()


def test_server_socket_without_its_authenticator_refuses_everyone(keys: Keys, ctx: zmq.Context):
    """libzmq admits any CURVE client when no ZAP handler runs; ours enforce the domain, so they fail closed."""
    pull = make_socket(ctx, zmq.PULL, settings=keys.settings(), role="server")
    assert has_authenticator(ctx) and pull.curve_server
    port = pull.bind_to_random_port("tcp://127.0.0.1")
    stop_authenticator(ctx)
    push = _raw_push(ctx, f"tcp://127.0.0.1:{port}", keys.client("stemstream"))  # authorised, even
    push.send(b"x")
    assert not pull.poll(1000)
    push.close()
    pull.close()


def test_curve_off_changes_nothing(ctx: zmq.Context):
    settings = load_settings()
    sock = make_socket(ctx, zmq.PULL, settings=settings, role="server")
    assert sock.curve_server == 0 and sock.mechanism == zmq.NULL
    assert not has_authenticator(ctx)
    sock.close()
    own = zmq.Context()
    term_context(own)  # no authenticator: just terminates


# -------------------------------------------------------------------------------------- end to end


def test_scan_streams_complete_with_curve_everywhere_and_no_secret_in_any_log(
    curve_env: Keys, tmp_path: Path, ctx: zmq.Context, caplog
):
    """Store, aggregator, NodeGroup and 4 producers as processes, all with CURVE from STEMSTREAM_KEYS_DIR and
    DEBUG logging; a forged client tries to inject into the aggregator meanwhile."""
    from stemstream.plane.requests import request_scan

    caplog.set_level("DEBUG")
    keys, scan, shape = curve_env, 1, (8, 8)
    results = tmp_path / "results"
    with ProcessTree(tmp_path / "logs", env={"STEMSTREAM_LOG_LEVEL": "DEBUG"}) as tree:
        address = start_store(tree)
        tree.start("aggregator", "aggregator", "--store", address)
        tree.start("ng", "nodegroup", "--store", address, "--uid", "ng-0", "--results", results)
        for m in range(4):
            tree.start(f"producer-{m}", "producer", "--store", address, "--sector", m, "--threads", 1)
        with store_client(address) as client:
            registry = Registry(client)
            registry.wait_for_members("aggregator", 1, status="ready", timeout=60)
            registry.wait_for_members("nodegroup", 1, status="ready", timeout=60)
            registry.wait_for_members("producer", 4, status="ready", timeout=60)
            endpoints = registry.members("aggregator")[0].endpoints
            forged = [_raw_push(ctx, endpoints[name], _forged(keys)) for name in ("data_0", "info_0")]
            forged += [_raw_push(ctx, endpoints[name], None) for name in ("data_1", "info_1")]
            for sock in forged:
                sock.send_multipart([b"\x80", b"forged"])  # would be counted as rejected if it got in
            request_scan(client, scan, shape, loss_rate=0.0)
            record = wait_scan_status(client, scan, ("received", "incomplete"), timeout=60)
            tree.check_alive()
            assert record["status"] == "received", record
            assert record["received"] == record["sent"] == 4 * shape[0] * shape[1]
            assert record["frames_complete"] == shape[0] * shape[1] and record["rejected"] == 0
            client.wait_for(
                lambda items: registry.members("aggregator")[0].counts.get("routed") == record["sent"],
                "/aggregators/",
                timeout=10,
            )
            agg = registry.members("aggregator")[0].counts
            assert agg["rejected"] == 0 and agg["received"] == record["sent"]
            for sock in forged:
                sock.close(linger=0)
        tree.stop_all()
        logs = {name: tree.log(name) for name in tree.procs}
    assert "refused a connection from public key" in logs["aggregator"]
    assert "ZAP authenticator started" in logs["ng"]
    secrets = keys.secrets()
    logs["<test process>"] = "\n".join(r.getMessage() for r in caplog.records)
    for name, text in logs.items():
        for secret in secrets:
            assert secret not in text, f"a secret key is in the log of {name}"
    assert os.environ["STEMSTREAM_KEYS_DIR"] == str(keys.path)

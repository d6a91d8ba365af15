"""The Clone store end to end: servers and some clients in separate processes, real sockets."""

from __future__ import annotations

import os
import random
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from contextlib import contextmanager

import msgpack
import pytest
import zmq

from stemstream.store import Registry, StoreClient

HB = "0.1"  # short heartbeats keep failover tests fast
SERVE = [sys.executable, "-m", "stemstream.cli", "store", "serve"]
ENV = {**os.environ, "STEMSTREAM_LOG_LEVEL": "WARNING"}


class ServerProcess:
    """``stemstream store serve`` in a child process; the address is read from its one stdout line."""

    def __init__(self, *args: str, log_dir) -> None:
        self.args = args
        self.log = open(log_dir / f"store-{uuid.uuid4().hex[:6]}.log", "w")  # noqa: SIM115
        cmd = [*SERVE, *args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self.log, env=ENV, text=True)
        self.address = self._read_address(timeout=20.0)
        self.port = int(self.address.rsplit(":", 1)[1])

    def _read_address(self, timeout: float) -> str:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else ""
        if "serving at" not in line:
            self.kill()
            raise AssertionError(f"store server did not start: {line!r}, see {self.log.name}")
        return line.split()[-1]

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        self.proc.wait(10)
        self.log.close()


@contextmanager
def servers(*specs, log_dir):
    started = []
    try:
        for args in specs:
            started.append(ServerProcess(*args, log_dir=log_dir))
        yield started
    finally:
        for server in started:
            server.kill()


def free_base(n: int = 5) -> int:
    """A base port with ``n`` free consecutive ports (for servers that must know each other's ports)."""
    for _ in range(200):
        base = random.randrange(20000, 60000)
        socks = []
        try:
            for i in range(n):
                s = socket.socket()
                s.bind(("127.0.0.1", base + i))
                socks.append(s)
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise AssertionError("no free ports")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    with servers(
        ["--port", "0", "--heartbeat", "0.2", "--stats-interval", "0.3"],
        log_dir=tmp_path_factory.mktemp("store"),
    ) as (server,):
        yield server


@pytest.fixture
def zctx():
    ctx = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


class Seen(list):
    """A watcher that records ``(key, value)`` in order. Watchers run on the client's agent thread, after the
    replica changed: ``wait(n)`` waits for the first ``n`` calls rather than assume they have been made."""

    def __init__(self) -> None:
        super().__init__()
        self._cond = threading.Condition()

    def __call__(self, key, value) -> None:
        with self._cond:
            self.append((key, value))
            self._cond.notify_all()

    def wait(self, n: int, timeout: float = 5.0) -> list:
        with self._cond:
            self._cond.wait_for(lambda: len(self) >= n, timeout)
        return list(self)


def recv_frames(sock: zmq.Socket, timeout: float = 5.0) -> list[bytes]:
    if not sock.poll(int(timeout * 1000)):
        raise AssertionError("nothing received in time")
    return sock.recv_multipart()


def test_late_client_gets_full_snapshot_then_live_updates_in_order(store):
    with StoreClient(store.address) as writer:
        for i in range(300):
            writer.set(f"/late/{i:03d}", {"i": i, "blob": b"\x00" * i})
        writer.wait_for(lambda items: len(items) == 300, "/late/")
        with StoreClient(store.address) as late:
            items = late.wait_for(lambda items: len(items) == 300, "/late/", timeout=5)
            assert items["/late/007"] == {"i": 7, "blob": b"\x00" * 7}
            seen = Seen()
            late.watch(seen, prefix="/late/")
            for i in range(100):
                writer.set(f"/late/{i:03d}", i)
            writer.delete("/late/299")
            late.wait_for(lambda items: "/late/299" not in items, "/late/")
            assert seen.wait(101) == [(f"/late/{i:03d}", i) for i in range(100)] + [("/late/299", None)]
            assert late.get("/late/050") == 50 and late.connected and late.server == store.address


def test_own_writes_are_visible_at_once_and_echoes_do_not_refire(store):
    with StoreClient(store.address) as client:
        seen = Seen()
        client.watch(seen, prefix="/own/")
        client.set("/own/a", [1, 2, 3])
        assert client.get("/own/a") == [1, 2, 3]  # before any round trip
        client.set("/own/a", "second")
        assert client.get("/own/a") == "second"
        with StoreClient(store.address, subtree="/own/") as other:
            other.wait_for(lambda items: items.get("/own/a") == "second", "/own/")
        assert seen.wait(2) == [("/own/a", [1, 2, 3]), ("/own/a", "second")]
        client.delete("/own/a")
        assert client.get("/own/a", "gone") == "gone"


def test_subtree_clients_see_only_their_subtree(store):
    with StoreClient(store.address) as writer, StoreClient(store.address, subtree="/sub/a/") as sub:
        for part in ("a", "b"):
            for i in range(5):
                writer.set(f"/sub/{part}/{i}", i)
        sub.wait_for(lambda items: len(items) == 5, "/")
        writer.set("/sub/a/last", "x")
        writer.set("/sub/b/last", "y")
        sub.wait_for(lambda items: "/sub/a/last" in items)
        assert set(sub.items("/")) == {f"/sub/a/{i}" for i in range(5)} | {"/sub/a/last"}
        assert sub.get("/sub/b/0") is None


CHILD = """
import sys, threading
from stemstream.store import Registry, StoreClient
client = StoreClient(sys.argv[1]).start()
registration = Registry(client, ttl=1.0).register("producer", uid="doomed", status="ready")
print("registered", flush=True)
threading.Event().wait()
"""


def test_a_client_of_several_subtrees_follows_each_live_whatever_the_hwm_settings(store, caplog):
    """Subscriptions travel on the SUB's send queue: with STEMSTREAM_SNDHWM=2 ZeroMQ would drop all but two of
    them, and the client would hear neither its subtrees nor HUGZ (and resync on silence, again and again)."""
    from stemstream.config import load_settings

    caplog.set_level("WARNING", logger="stemstream.store")
    subtrees = ("/multi/a/", "/multi/b/", "/multi/c/", "/multi/d/", "/multi/e/")
    settings = load_settings(sndhwm=2, rcvhwm=2)
    with StoreClient(store.address, subtrees=subtrees, settings=settings) as reader, StoreClient(store.address) as w:
        time.sleep(1.0)  # five heartbeats: a client that hears no HUGZ resyncs within three
        for t in subtrees:
            w.set(f"{t}x", t)
        items = reader.wait_for(lambda it: len(it) == 5, "/multi/", timeout=5)
        assert sorted(items.values()) == list(subtrees)
    assert not [r for r in caplog.records if "syncing with" in r.getMessage()], "the client resynced"


def test_records_of_a_sigkilled_client_process_vanish_within_ttl(store):
    cmd = [sys.executable, "-c", CHILD, store.address]
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, env=ENV, text=True)
    try:
        with StoreClient(store.address) as client:
            registry = Registry(client, ttl=1.0)
            (record,) = registry.wait_for_members("producer", 1, timeout=15, status="ready")
            assert record.uid == "doomed" and record.pid == child.pid
            # Alive past its TTL: the registration refreshes it.
            client.wait_for(
                lambda items: items["/producers/doomed"]["heartbeat"] > record.heartbeat + 1.1,
                "/producers/doomed",
            )
            child.send_signal(signal.SIGKILL)
            killed = time.monotonic()
            client.wait_for(lambda items: not items, "/producers/", timeout=5)
            assert time.monotonic() - killed < 1.0 + 0.6  # TTL plus the server's and our scheduling
            assert registry.members("producer") == []
    finally:
        child.kill()
        child.wait(10)


def test_garbage_on_every_port_loses_no_good_update(store, zctx):
    host, port = "127.0.0.1", store.port
    dealer = zctx.socket(zmq.DEALER)
    push = zctx.socket(zmq.PUSH)
    xsub = zctx.socket(zmq.XSUB)
    for sock, offset in ((dealer, 0), (xsub, 1), (push, 2)):
        sock.linger = 0
        sock.connect(f"tcp://{host}:{port + offset}")
    junk_requests = [[b"GIMME"], [b"ICANHAZ?", b"/", b"extra"], [b"ICANHAZ?", b"\xff\xfe"], [b""]]
    junk_updates = [
        [b"one frame"],
        [b"/k", b"short", uuid.uuid4().bytes, b"", b"v"],
        [b"nokey", bytes(8), uuid.uuid4().bytes, b"", b"v"],
        [b"/k", bytes(8), uuid.uuid4().bytes, b"no equals sign", b"v"],
        [b"/k", bytes(8), uuid.uuid4().bytes, b"ttl=forever\n", b"v"],
        [b"/big", bytes(8), uuid.uuid4().bytes, b"", b"x" * ((1 << 20) + 1)],
    ]

    def spray():
        for frames in junk_requests:
            dealer.send_multipart(frames)
        for frames in junk_updates:
            push.send_multipart(frames)
        xsub.send_multipart([b"not a subscription"])
        for offset in range(3):  # not even ZeroMQ: raw bytes on a TCP connection
            with socket.create_connection((host, port + offset), timeout=2) as raw:
                raw.sendall(os.urandom(64))

    with StoreClient(store.address) as writer, StoreClient(store.address, subtree="/flood/") as reader:
        seen = Seen()
        reader.watch(seen, prefix="/flood/")
        for i in range(200):
            if i % 20 == 0:
                spray()
            writer.set(f"/flood/{i}", i)
        reader.wait_for(lambda items: len(items) == 200, "/flood/", timeout=10)
        assert [value for _, value in seen.wait(200)] == list(range(200))

        def rejected(items):
            counters = items.get("/store/primary/stats", {}).get("counters", {})
            wanted = ("bad_command", "bad_request", "bad_frames", "bad_sequence", "bad_key", "bad_properties")
            wanted += ("oversized", "bad_ttl", "bad_subscription")
            return all(counters.get(k, 0) >= 10 for k in wanted)

        stats = writer.wait_for(rejected, "/store/", timeout=10)["/store/primary/stats"]
        assert stats["state"] == "active"


def test_zguide_style_raw_client_interoperates(store, zctx):
    with StoreClient(store.address, subtree="/raw/") as ours:
        ours.set("/raw/ours", {"x": 1})
        with StoreClient(store.address, subtree="/raw/") as check:  # the server has it (ours sees it at once)
            check.wait_for(lambda items: "/raw/ours" in items, "/raw/")
        snapshot = zctx.socket(zmq.DEALER)
        subscriber = zctx.socket(zmq.SUB)
        publisher = zctx.socket(zmq.PUSH)
        for sock in (snapshot, subscriber, publisher):
            sock.linger = 0
        subscriber.setsockopt(zmq.SUBSCRIBE, b"/raw/")
        subscriber.setsockopt(zmq.SUBSCRIBE, b"HUGZ")
        subscriber.connect(f"tcp://127.0.0.1:{store.port + 1}")
        snapshot.connect(f"tcp://127.0.0.1:{store.port}")
        publisher.connect(f"tcp://127.0.0.1:{store.port + 2}")
        while recv_frames(subscriber)[0] != b"HUGZ":  # the XPUB answers a subscription with HUGZ
            pass  # (an echo of our own set may come first)
        snapshot.send_multipart([b"ICANHAZ?", b"/raw/"])
        state = {}
        while True:
            key, seq, uid, _props, body = recv_frames(snapshot)
            if key == b"KTHXBAI":
                sequence = struct_seq(seq)
                assert body == b"/raw/" and uid == b""
                break
            assert len(seq) == 8 and len(uid) == 16
            state[key] = body
        assert msgpack.unpackb(state[b"/raw/ours"]) == {"x": 1}

        publisher.send_multipart([b"/raw/theirs", bytes(8), uuid.uuid4().bytes, b"", b"hello"])
        while True:  # as a zguide client: skip HUGZ and what the snapshot already had
            key, seq, _, _, body = recv_frames(subscriber)
            if key != b"HUGZ" and struct_seq(seq) > sequence:
                break
        assert (key, body) == (b"/raw/theirs", b"hello")
        ours.wait_for(lambda items: items.get("/raw/theirs") == b"hello", "/raw/")  # not msgpack: raw bytes
        # An empty body deletes.
        publisher.send_multipart([b"/raw/theirs", bytes(8), uuid.uuid4().bytes, b"", b""])
        ours.wait_for(lambda items: "/raw/theirs" not in items, "/raw/")


def struct_seq(frame: bytes) -> int:
    return int.from_bytes(frame, "big", signed=True)


def test_cli_get_and_ls(store):
    with StoreClient(store.address) as client:
        client.set("/cli/a", {"n": 1})
        client.set("/cli/b", "two")
        client.wait_for(lambda items: len(items) == 2, "/cli/")
    cli = [sys.executable, "-m", "stemstream.cli", "store"]
    out = subprocess.run(
        [*cli, "ls", "/cli/", "--address", store.address], capture_output=True, text=True, env=ENV, timeout=30
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ['/cli/a  {"n": 1}', '/cli/b  "two"']
    out = subprocess.run(
        [*cli, "get", "/cli/zzz", "--address", store.address],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=30,
    )
    assert out.returncode == 1 and "no key '/cli/zzz'" in out.stderr


def test_restarted_server_is_resynced_and_repopulated_by_its_clients(tmp_path):
    first = ServerProcess("--port", "0", "--heartbeat", HB, log_dir=tmp_path)
    second = None
    try:
        with (
            StoreClient(first.address) as writer,
            StoreClient(first.address) as watcher,
            StoreClient(first.address, subtrees=("/elsewhere/",)) as outside,
        ):
            for i in range(20):
                writer.set(f"/restart/{i}", i)
            writer.set("/restart/ephemeral", "e", ttl=30)
            for i in range(3):  # keys a client writes but does not mirror
                outside.set(f"/restart/outside-{i}", i)
            watcher.wait_for(lambda items: len(items) == 24, "/restart/")
            time.sleep(2.2)  # past the window in which recent writes are resent anyway (max(10 hb, 2 s))
            first.kill()
            second = ServerProcess("--port", str(first.port), "--heartbeat", HB, log_dir=tmp_path)
            # The writers re-publish what they wrote; the watcher resyncs and sees it come back.
            with StoreClient(second.address) as fresh:
                fresh.wait_for(lambda items: len(items) == 24, "/restart/", timeout=10)
            writer.set("/restart/new", "after")
            items = watcher.wait_for(lambda items: "/restart/new" in items, "/restart/", timeout=10)
            assert items["/restart/5"] == 5 and items["/restart/ephemeral"] == "e"
            assert watcher.connected and writer.connected
    finally:
        first.kill()
        if second is not None:
            second.kill()


def test_primary_killed_clients_carry_on_against_the_backup(tmp_path):
    p, b = free_base(), free_base()
    primary_addr, backup_addr = f"tcp://127.0.0.1:{p}", f"tcp://127.0.0.1:{b}"
    common = ["--heartbeat", HB, "--stats-interval", "0.2"]
    pair = servers(
        ["--port", str(p), "--primary-with-backup", backup_addr, *common],
        ["--port", str(b), "--backup-of", primary_addr, *common],
        log_dir=tmp_path,
    )
    with (
        pair as (primary, _backup),
        StoreClient(primary_addr, backup=backup_addr, timeout=10) as writer,
        StoreClient(primary_addr, backup=backup_addr, timeout=10) as reader,
    ):
        for i in range(100):
            writer.set(f"/ha/{i}", i)
        reader.wait_for(lambda items: len(items) == 100, "/ha/")
        # The backup has followed the primary this far (its stats come through the primary).
        writer.wait_for(lambda it: it.get("/store/backup/stats", {}).get("sequence", 0) >= 100, "/store/")
        for i in range(100, 150):  # in flight when the primary dies
            writer.set(f"/ha/{i}", i)
        primary.kill()
        killed = time.monotonic()
        for i in range(150, 200):  # sent while the pair fails over
            writer.set(f"/ha/{i}", i)
        items = reader.wait_for(lambda items: len(items) == 200, "/ha/", timeout=10)
        assert items == {f"/ha/{i}": i for i in range(200)}
        assert reader.server == backup_addr and time.monotonic() - killed < 5
        writer.set("/ha/after", "new")
        reader.wait_for(lambda items: items.get("/ha/after") == "new", "/ha/", timeout=5)
        writer.wait_for(lambda _: writer.connected and writer.server == backup_addr, timeout=5)


GONE_WRITER = """
import sys, threading
from stemstream.store import StoreClient
client = StoreClient(sys.argv[1], backup=sys.argv[2]).start()
client.set("/live/gone/plain", "orphan")
client.set("/live/gone/ephemeral", "outlives its writer", ttl=30)
client.set("/live/gone/short", "expires", ttl=0.3)
print("written", flush=True)
threading.Event().wait()
"""


def test_backup_follows_live_updates_and_serves_them_after_the_primary_is_sigkilled(tmp_path):
    """The backup has taken its snapshot before the first write, so it can hold the writes only by following
    the primary's update stream; then the primary is SIGKILLed and every key is read from the backup."""
    p, b = free_base(), free_base()
    primary_addr, backup_addr = f"tcp://127.0.0.1:{p}", f"tcp://127.0.0.1:{b}"
    common = ["--heartbeat", HB, "--stats-interval", "0.1"]
    pair = servers(
        ["--port", str(p), "--primary-with-backup", backup_addr, *common],
        ["--port", str(b), "--backup-of", primary_addr, *common],
        log_dir=tmp_path,
    )
    child = None
    with (
        pair as (primary, _backup),
        StoreClient(primary_addr, backup=backup_addr, timeout=10) as writer,
        StoreClient(primary_addr, backup=backup_addr, timeout=10) as reader,
    ):

        def backup_stats(items):
            return items.get("/store/backup/stats") or {}

        def synced(items):
            stats = backup_stats(items)
            return stats.get("state") == "passive" and stats.get("counters", {}).get("peer_syncs", 0) >= 1

        # 1. The backup has finished its snapshot sync (its stats come through the primary and say so).
        syncs = backup_stats(reader.wait_for(synced, "/store/", timeout=10))["counters"]["peer_syncs"]

        # 2. Only now the writes: sets, a delete, ephemeral keys, and keys whose writer process then dies.
        short = Seen()
        reader.watch(short, prefix="/live/gone/short")
        expected = {f"/live/w/{i}": i for i in range(50)}
        for key, value in expected.items():
            writer.set(key, value)
        writer.delete("/live/w/49")
        del expected["/live/w/49"]
        writer.set("/live/w/ephemeral", "kept", ttl=30)
        expected["/live/w/ephemeral"] = "kept"
        cmd = [sys.executable, "-c", GONE_WRITER, primary_addr, backup_addr]
        child = subprocess.Popen(cmd, stdout=subprocess.PIPE, env=ENV, text=True)
        try:
            ready, _, _ = select.select([child.stdout], [], [], 20)
            assert ready and child.stdout.readline() == "written\n"
            expected["/live/gone/plain"] = "orphan"
            expected["/live/gone/ephemeral"] = "outlives its writer"
            # Applied by the primary (the reader sees them), then the writer is gone: nobody can resend them.
            reader.wait_for(lambda items: items == expected, "/live/")
            assert short.wait(2) == [("/live/gone/short", "expires"), ("/live/gone/short", None)]
        finally:
            child.kill()
            child.wait(10)
        n_updates = 50 + 1 + 1 + 3 + 1  # sets, the delete, the ephemeral set, the child's sets, the expiry

        # 3. The backup received all of it live: it followed past the primary's sequence after the last write,
        # holds the keys, and took no snapshot since step 1.
        seen_at = time.time()
        primary_stats = reader.wait_for(
            lambda items: items.get("/store/primary/stats", {}).get("time", 0) > seen_at, "/store/", timeout=10
        )["/store/primary/stats"]

        def followed_or_resynced(items):
            stats = backup_stats(items)
            counters = stats.get("counters", {})
            return stats.get("sequence", 0) >= primary_stats["sequence"] or counters.get("peer_syncs") != syncs

        stats = backup_stats(reader.wait_for(followed_or_resynced, "/store/", timeout=10))
        assert stats["state"] == "passive" and stats["counters"]["peer_syncs"] == syncs, stats
        assert stats["counters"]["followed"] >= n_updates, stats
        assert stats["keys"] >= len(expected), f"the backup followed {stats['sequence']} but holds {stats['keys']}"

        # 4. SIGKILL the primary: the reader fails over and reads every key from the backup, as does a new client.
        primary.kill()
        reader.wait_for(lambda _: reader.connected and reader.server == backup_addr, timeout=10)
        assert reader.items("/live/") == expected
        with StoreClient(backup_addr, timeout=10) as fresh:
            assert fresh.items("/live/") == expected
            final = backup_stats(fresh.wait_for(lambda items: backup_stats(items).get("state") == "active"))
        assert final["counters"]["peer_syncs"] == syncs  # still no snapshot taken after the writes

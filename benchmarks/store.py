"""Clone store throughput and snapshot time, beside raw pyzmq PUB/SUB of the same messages in the same run.

* updates/s: client A ``set``s N keys -> server (separate process) -> client B's watch callback saw the last.
* snapshot: ``StoreClient(subtree=...).start()`` on a store holding K keys (best of 3), i.e. ICANHAZ? ->
  K kvmsgs -> KTHXBAI -> replica built.
* raw: the same five-frame kvmsgs through one PUB -> SUB pair (sender and receiver threads in this
  process, no server hop, no HWM drops): N messages for the rate, K messages for the "snapshot";
  best of 3.

Usage: python benchmarks/store.py [--updates 20000] [--keys 10000] [--value-bytes 100]
"""

from __future__ import annotations

import argparse
import os
import select
import signal
import subprocess
import sys
import threading
import time

import zmq

from stemstream.store import KVMsg, StoreClient
from stemstream.store.kvmsg import encode_value


def start_server() -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "stemstream.cli", "store", "serve", "--port", "0"]
    env = {**os.environ, "STEMSTREAM_LOG_LEVEL": "WARNING"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
    ready, _, _ = select.select([proc.stdout], [], [], 30)
    line = proc.stdout.readline() if ready else ""
    if "serving at" not in line:
        proc.kill()
        raise SystemExit(f"store server did not start: {line!r}")
    return proc, line.split()[-1]


def store_updates(address: str, n: int, value: bytes) -> float:
    done = threading.Event()
    seen = 0

    def on_change(key: str, _value: object) -> None:
        nonlocal seen
        seen += 1
        if seen == n:
            done.set()

    with StoreClient(address, subtree="/bench/") as reader, StoreClient(address, subtree="/bench/") as writer:
        # The writer's own watch would fire on its local writes: the reader is the one that counts.
        reader.watch(on_change, prefix="/bench/")
        t0 = time.perf_counter()
        for i in range(n):
            writer.set(f"/bench/{i}", value)
        if not done.wait(120):
            raise SystemExit(f"reader saw {seen} of {n} updates")
        return n / (time.perf_counter() - t0)


def store_snapshot(address: str, k: int, value: bytes) -> float:
    with StoreClient(address, subtree="/snap/") as writer:
        for i in range(k):
            writer.set(f"/snap/{i}", value)
        writer.wait_for(lambda items: len(items) == k, "/snap/", timeout=60)
        # Wait for the echoes too, so the server holds every key before we time a snapshot of them.
        with StoreClient(address, subtree="/snap/", timeout=60) as check:
            check.wait_for(lambda items: len(items) == k, "/snap/", timeout=60)
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        with StoreClient(address, subtree="/snap/", timeout=60) as client:
            elapsed = time.perf_counter() - t0
            assert len(client.items("/snap/")) == k
        best = min(best, elapsed)
    return best


def raw_pubsub(n: int, value: bytes) -> float:
    """Seconds to move ``n`` kvmsgs PUB -> SUB, after the subscription is known to be live."""
    ctx = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    sub = ctx.socket(zmq.SUB)
    for sock in (pub, sub):
        sock.sndhwm = sock.rcvhwm = 0
        sock.linger = 0
    port = pub.bind_to_random_port("tcp://127.0.0.1")
    sub.setsockopt(zmq.SUBSCRIBE, b"/")
    sub.connect(f"tcp://127.0.0.1:{port}")
    probe = KVMsg("/probe", 0, value).frames()
    while True:  # slow joiner: publish until the subscriber hears one
        pub.send_multipart(probe)
        if sub.poll(50):
            break
    while sub.poll(50):
        sub.recv_multipart()
    messages = [KVMsg(f"/bench/{i}", i + 1, value).frames() for i in range(n)]
    received = threading.Event()

    def receive() -> None:
        for _ in range(n):
            sub.recv_multipart()
        received.set()

    thread = threading.Thread(target=receive)
    thread.start()
    t0 = time.perf_counter()
    for frames in messages:
        pub.send_multipart(frames)
    received.wait(120)
    elapsed = time.perf_counter() - t0
    thread.join()
    ctx.destroy(linger=0)
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--updates", type=int, default=20000)
    parser.add_argument("--keys", type=int, default=10000)
    parser.add_argument("--value-bytes", type=int, default=100)
    args = parser.parse_args()
    value = encode_value(b"x" * args.value_bytes)

    proc, address = start_server()
    try:
        rate = store_updates(address, args.updates, value)
        snapshot_s = store_snapshot(address, args.keys, value)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)
    # Best of 3 for the baseline too: on a shared machine a single run says more about the neighbours.
    raw_rate = args.updates / min(raw_pubsub(args.updates, value) for _ in range(3))
    raw_snapshot_s = min(raw_pubsub(args.keys, value) for _ in range(3))

    print(f"Clone store, {args.value_bytes}-byte values, server in a separate process")
    print(f"{'':28} {'store':>12} {'raw PUB/SUB':>12} {'store/raw':>10}")
    print(f"{'updates/s (set -> watch)':28} {rate:12,.0f} {raw_rate:12,.0f} {rate / raw_rate:10.2f}")
    print(
        f"{f'snapshot of {args.keys} keys, ms':28} {1000 * snapshot_s:12.1f} {1000 * raw_snapshot_s:12.1f} "
        f"{snapshot_s / raw_snapshot_s:10.2f}"
    )


if __name__ == "__main__":
    main()

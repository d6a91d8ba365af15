"""Helpers of the data-plane tests: process trees with captured output, a store process, waits, the
simulator's ground truth. Every wait has a timeout; every process is killed in ``finally``."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def free_port_block(n: int = 3, host: str = "127.0.0.1") -> int:
    """A base port with ``n`` consecutive free ports (the store binds port .. port+2)."""
    for _ in range(200):
        with socket.socket() as probe:
            probe.bind((host, 0))
            base = probe.getsockname()[1]
        if base + n > 65000:
            continue
        socks: list[socket.socket] = []
        try:
            for k in range(n):
                s = socket.socket()
                socks.append(s)
                s.bind((host, base + k))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError(f"no block of {n} free ports")


class ProcessTree:
    """Child processes started with ``python -m stemstream.cli``, each in its own session, output in
    ``<log_dir>/<name>.log``. Leaving the ``with`` block stops them all (SIGTERM, then SIGKILL); when
    the block raised, the tail of every log is printed for debugging."""

    def __init__(self, log_dir: Path, env: dict[str, str] | None = None) -> None:
        self.log_dir = log_dir
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.env = {**os.environ, "STEMSTREAM_LOG_LEVEL": "INFO", **(env or {})}
        self.env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), self.env.get("PYTHONPATH", "")])
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, *args: Any, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        return self.start_argv(name, [sys.executable, "-m", "stemstream.cli", *(str(a) for a in args)], env=env)

    def start_argv(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        """Start any command line (e.g. ``mpiexec -n 2 python -m stemstream.cli ...``) as ``name``."""
        with open(self.log_dir / f"{name}.log", "ab") as out:
            proc = subprocess.Popen(
                argv,
                env={**self.env, **(env or {})},
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd=self.log_dir,
            )
        self.procs[name] = proc
        return proc

    def stop(self, name: str, grace: float = 10.0) -> int | None:
        proc = self.procs[name]
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
        return proc.returncode

    def stop_all(self, grace: float = 10.0) -> None:
        for proc in self.procs.values():  # signal everyone first, then wait
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for name in list(self.procs):
            proc = self.procs[name]
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.stop(name, grace=0)
        for proc in self.procs.values():  # whatever a process left behind in its group (e.g. a killed parent's)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)

    def wait_exit(self, name: str, timeout: float) -> int:
        return self.procs[name].wait(timeout)

    def check_alive(self, *names: str) -> None:
        for name in names or self.procs:
            code = self.procs[name].poll()
            if code is not None:
                raise AssertionError(f"{name} exited with {code}:\n{self.tail(name)}")

    def log(self, name: str) -> str:
        return (self.log_dir / f"{name}.log").read_text(errors="replace")

    def tail(self, name: str, lines: int = 40) -> str:
        return "\n".join(self.log(name).splitlines()[-lines:])

    def dump(self) -> None:
        for name in self.procs:
            print(f"----- {name} (rc={self.procs[name].poll()}) -----\n{self.tail(name)}", file=sys.stderr)

    def __enter__(self) -> ProcessTree:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        try:
            if exc_type is not None:
                self.dump()
        finally:
            self.stop_all()


def start_store(tree: ProcessTree, timeout: float = 30.0) -> str:
    """Start a store server process and return its address once a client can talk to it."""
    from stemstream.store import StoreClient

    port = free_port_block(3)
    tree.start("store", "store", "serve", "--port", port)
    address = f"tcp://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while True:
        tree.check_alive("store")
        try:
            with StoreClient(address, timeout=2.0) as client:
                client.set("/test/ping", 1)
                client.wait_for(lambda items: "/test/ping" in items, prefix="/test/", timeout=2.0)
            return address
        except Exception:
            if time.monotonic() > deadline:
                raise


@contextlib.contextmanager
def store_client(address: str) -> Iterator[Any]:
    from stemstream.store import StoreClient

    with StoreClient(address, timeout=5.0) as client:
        yield client


def wait_scan_status(
    client: Any,
    scan_number: int,
    statuses: tuple[str, ...],
    timeout: float,
) -> dict[str, Any]:
    """Wait for ``/scans/<n>`` to reach one of ``statuses``; the record."""
    key = f"/scans/{scan_number}"

    def done(items: dict[str, Any]) -> bool:
        rec = items.get(key)
        return isinstance(rec, dict) and rec.get("status") in statuses

    return client.wait_for(done, prefix=key, timeout=timeout)[key]


def wait_until(
    predicate: Callable[[], bool],
    timeout: float,
    what: str,
    tree: ProcessTree | None = None,
) -> None:
    """Poll ``predicate`` every 0.1 s (for conditions that are not in the store); fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if tree is not None:
            tree.check_alive()
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.1)


def read_results(results_dir: Path, uid: str, scan_number: int) -> dict[str, Any]:
    return json.loads((results_dir / f"{uid}_scan{scan_number}.json").read_text())


def expected_frame(sim: Any, i: int) -> np.ndarray:
    """Frame ``i`` as a NodeGroup should assemble it: the simulator's pixels, lost sectors zero."""
    frame = sim.frame(i)
    rows = frame.shape[0] // sim.n_sectors
    for m in range(sim.n_sectors):
        if sim.is_lost(i, m):
            frame[m * rows : (m + 1) * rows] = 0
    return frame


def crc(frame: np.ndarray) -> int:
    return zlib.crc32(memoryview(np.ascontiguousarray(frame)).cast("B"))


def push_socket(ctx: Any, endpoint: str, linger: int = 0, timeout_ms: int = 5000) -> Any:
    """A PUSH socket connected to ``endpoint`` that gives up a send after ``timeout_ms``."""
    import zmq

    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, linger)
    sock.setsockopt(zmq.SNDTIMEO, timeout_ms)
    sock.connect(endpoint)
    return sock


def pull_socket(ctx: Any, timeout_ms: int = 5000) -> tuple[Any, str]:
    """A PULL socket bound to a free loopback port, and its endpoint; a receive gives up after ``timeout_ms``."""
    import zmq

    sock = ctx.socket(zmq.PULL)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, timeout_ms)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    return sock, f"tcp://127.0.0.1:{port}"

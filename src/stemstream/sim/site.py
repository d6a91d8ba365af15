"""A whole facility on one machine, for the demo and benchmarks: a Prefect server (embedded SQLite),
the Clone store and four simulated receiving-server producers, each a real process.

Everything it starts is stopped on exit (also on Ctrl-C); every wait has a timeout.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from stemstream.errors import StemstreamError

logger = logging.getLogger(__name__)


def free_port_block(n: int, host: str = "127.0.0.1") -> int:
    """A base port with ``n`` consecutive free ports."""
    for _ in range(200):
        with socket.socket() as probe:
            probe.bind((host, 0))
            base = probe.getsockname()[1]
        if base + n > 65000:
            continue
        socks = []
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
    raise StemstreamError(f"no block of {n} free ports on {host}")


class LocalSite:
    """Start with ``with LocalSite(directory) as site:``; ``site.store`` and ``site.prefect_url`` then."""

    def __init__(self, directory: Path, *, prefect: bool = True, producers: int = 4, producer_threads: int = 2):
        self.directory = Path(directory)
        self.prefect = prefect
        self.n_producers = producers
        self.producer_threads = producer_threads
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.store = ""
        self.prefect_url = ""
        self.fallback_dir = self.directory / "fallback"
        self.log_dir = self.directory / "logs"
        self._saved_env: dict[str, str | None] = {}

    # ---- processes

    def _start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_dir / f"{name}.log", "ab") as out:
            proc = subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env={**os.environ, **(env or {})}, start_new_session=True,
            )  # fmt: skip
        self.procs[name] = proc
        return proc

    def _check(self, name: str) -> None:
        code = self.procs[name].poll()
        if code is not None:
            tail = (self.log_dir / f"{name}.log").read_text(errors="replace").splitlines()[-5:]
            raise StemstreamError(f"{name} exited with code {code}: {' | '.join(tail)}")

    def _cli(self, *args: Any) -> list[str]:
        return [sys.executable, "-m", "stemstream.cli", *(str(a) for a in args)]

    def start_prefect(self, timeout: float = 120.0) -> str:
        port = free_port_block(1)
        home = self.directory / "prefect"
        env = {
            "PREFECT_HOME": str(home.absolute()),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_SERVER_API_HOST": "127.0.0.1",
            "PREFECT_SERVER_API_PORT": str(port),
        }
        prefect = str(Path(sys.executable).parent / "prefect")
        self._start("prefect-server", [prefect, "server", "start", "--host", "127.0.0.1", "--port", str(port)], env)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + timeout
        while True:
            self._check("prefect-server")
            try:
                with urllib.request.urlopen(f"{url}/api/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise StemstreamError(f"the Prefect server did not answer within {timeout:.0f} s; see {self.log_dir}")
            time.sleep(0.5)
        # This process's flows report to it (Prefect reads its settings from the environment).
        for key, value in {"PREFECT_API_URL": f"{url}/api", "PREFECT_HOME": env["PREFECT_HOME"]}.items():
            self._saved_env.setdefault(key, os.environ.get(key))
            os.environ[key] = value
        self.prefect_url = url
        return url

    def start_store(self, timeout: float = 30.0) -> str:
        from stemstream.store import StoreClient

        port = free_port_block(3)
        self._start("store", self._cli("store", "serve", "--host", "127.0.0.1", "--port", port))
        address = f"tcp://127.0.0.1:{port}"
        deadline = time.monotonic() + timeout
        while True:
            self._check("store")
            try:
                with StoreClient(address, timeout=2.0) as client:
                    client.items("/")
                break
            except StemstreamError:
                if time.monotonic() > deadline:
                    raise
        self.store = address
        return address

    def start_producers(self, timeout: float = 60.0) -> None:
        from stemstream.store import Registry, StoreClient

        for m in range(self.n_producers):
            args = ["--store", self.store, "--sector", m, "--threads", self.producer_threads]
            self._start(f"producer-{m}", self._cli("producer", *args, "--fallback-dir", self.fallback_dir.absolute()))
        with StoreClient(self.store, timeout=10) as client:
            Registry(client).wait_for_members("producer", self.n_producers, status="ready", timeout=timeout)

    def stop(self, grace: float = 10.0) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for proc in self.procs.values():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
        self.procs.clear()
        for key, value in self._saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        self._saved_env.clear()

    def __enter__(self) -> LocalSite:
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            if self.prefect:
                self.start_prefect()
            self.start_store()
            self.start_producers()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

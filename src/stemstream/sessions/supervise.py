"""Supervise what a session runs: processes here (restarted with backoff when one dies) and the NodeGroups'
job (resubmitted with backoff when it ends early).

Library code (no Prefect): the session loop (:class:`stemstream.sessions.runner.SessionRunner`) calls
:meth:`Supervisor.check` and :meth:`JobWatch.check` periodically and logs what they return, so the run's logs
say which process died, with what exit code, and when it came back.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from stemstream.allocation import Allocation, AllocationRequest, Allocator
from stemstream.config import Settings
from stemstream.errors import AllocationError

logger = logging.getLogger(__name__)


@dataclass
class ProcessSpec:
    """What to run: a name for logs, the argv, extra environment, where its output goes."""

    name: str
    argv: Sequence[str]
    env: dict[str, str] = field(default_factory=dict)
    log_path: Path | None = None
    restart: bool = True


@dataclass(frozen=True)
class SupervisorEvent:
    name: str
    kind: str  # "started" | "died" | "restarted" | "gave_up"
    pid: int | None
    exit_code: int | None = None
    restarts: int = 0
    message: str = ""


class SupervisedProcess:
    """One child process in its own process group, restarted with exponential backoff when it dies."""

    def __init__(
        self, spec: ProcessSpec, *, backoff_s: float = 1.0, max_backoff_s: float = 30.0, max_restarts: int = 20
    ) -> None:
        self.spec = spec
        self._backoff_s = backoff_s
        self._max_backoff_s = max_backoff_s
        self._max_restarts = max_restarts
        self._proc: subprocess.Popen[bytes] | None = None
        self._restart_at: float | None = None
        self.restarts = 0
        self.gave_up = False

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> SupervisorEvent:
        env = {**os.environ, **self.spec.env}
        out = subprocess.DEVNULL
        if self.spec.log_path is not None:
            self.spec.log_path.parent.mkdir(parents=True, exist_ok=True)
            out = open(self.spec.log_path, "ab")  # noqa: SIM115 - handed to the child, closed below
        try:
            self._proc = subprocess.Popen(
                list(self.spec.argv), env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        finally:
            if out is not subprocess.DEVNULL:
                out.close()
        logger.info("started %s (pid %d)", self.spec.name, self._proc.pid)
        return SupervisorEvent(self.spec.name, "started", self._proc.pid, restarts=self.restarts)

    def check(self) -> list[SupervisorEvent]:
        """Notice a death, schedule or perform a restart; returns what happened."""
        events: list[SupervisorEvent] = []
        if self._proc is None or self.gave_up:
            return events
        code = self._proc.poll()
        if code is not None and self._restart_at is None:
            delay = min(self._backoff_s * 2**self.restarts, self._max_backoff_s)
            msg = f"{self.spec.name} (pid {self._proc.pid}) exited with code {code}"
            if not self.spec.restart or self.restarts >= self._max_restarts:
                self.gave_up = True
                logger.error("%s; not restarting (%d restarts so far)", msg, self.restarts)
                events.append(SupervisorEvent(self.spec.name, "gave_up", self._proc.pid, code, self.restarts, msg))
                return events
            logger.warning("%s; restarting in %.1f s", msg, delay)
            events.append(SupervisorEvent(self.spec.name, "died", self._proc.pid, code, self.restarts, msg))
            self._restart_at = time.monotonic() + delay
        if self._restart_at is not None and time.monotonic() >= self._restart_at:
            self._restart_at = None
            self.restarts += 1
            started = self.start()
            events.append(
                SupervisorEvent(
                    self.spec.name,
                    "restarted",
                    started.pid,
                    restarts=self.restarts,
                    message=f"{self.spec.name} restarted as pid {started.pid} (restart {self.restarts})",
                )
            )
        return events

    def stop(self, grace_s: float = 5.0) -> int | None:
        """SIGTERM the process group, SIGKILL after ``grace_s``; returns the exit code."""
        self._restart_at = None
        self.gave_up = True
        proc = self._proc
        if proc is None:
            return None
        if proc.poll() is None:
            _signal_group(proc.pid, signal.SIGTERM)
            try:
                proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                _signal_group(proc.pid, signal.SIGKILL)
                proc.wait(grace_s)
        return proc.returncode


def _signal_group(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, sig)


class Supervisor:
    """A set of supervised processes, started together, checked together, stopped in reverse order."""

    def __init__(self, **kwargs: float) -> None:
        self._kwargs = kwargs
        self.processes: dict[str, SupervisedProcess] = {}

    def add(self, spec: ProcessSpec) -> SupervisedProcess:
        proc = SupervisedProcess(spec, **self._kwargs)  # type: ignore[arg-type]
        self.processes[spec.name] = proc
        proc.start()
        return proc

    def check(self) -> list[SupervisorEvent]:
        events: list[SupervisorEvent] = []
        for proc in self.processes.values():
            events.extend(proc.check())
        return events

    def stop(self) -> None:
        for proc in reversed(list(self.processes.values())):
            proc.stop()

    def __enter__(self) -> Supervisor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def aggregator_spec(settings: Settings, log_dir: Path) -> ProcessSpec:
    """An aggregator on this host, talking to the settings' store and its backup."""
    from stemstream.store.client import store_addresses

    address, backup = store_addresses(settings)
    argv = [sys.executable, "-m", "stemstream.cli", "aggregator", "--store", address]
    if backup:
        argv += ["--store-backup", backup]
    env = {"STEMSTREAM_LOG_LEVEL": settings.log_level}
    return ProcessSpec(name="aggregator", argv=argv, env=env, log_path=log_dir / "aggregator.log")


@dataclass
class JobWatch:
    """Follows the NodeGroups' job during a session and resubmits it, with backoff, when it ends early."""

    allocator: Allocator
    request: AllocationRequest
    allocation: Allocation
    backoff_s: float = 2.0
    max_backoff_s: float = 60.0
    max_restarts: int = 20
    restarts: int = 0
    _retry_at: float | None = None

    def check(self) -> list[str]:
        """What happened since the last call (lines for the run's log)."""
        events: list[str] = []
        if self._retry_at is None:
            state = self.allocator.state(self.allocation)
            if not state.finished:
                return events
            if self.restarts >= self.max_restarts:
                raise AllocationError(
                    f"NodeGroup job {self.allocation.job_id} ended ({state.value}) after {self.restarts} restarts; "
                    "giving up: see its log"
                )
            delay = min(self.backoff_s * 2**self.restarts, self.max_backoff_s)
            self._retry_at = time.monotonic() + delay
            events.append(
                f"NodeGroup job {self.allocation.job_id} ended early ({state.value}); resubmitting in {delay:.0f} s"
            )
        elif time.monotonic() >= self._retry_at:
            self._retry_at = None
            self.restarts += 1
            old = self.allocation.job_id
            self.allocation = self.allocator.submit(self.request)
            events.append(f"NodeGroup job resubmitted as {self.allocation.job_id} (was {old}; restart {self.restarts})")
        return events


def event_lines(events: list[SupervisorEvent]) -> list[str]:
    """Supervisor events as lines for the run's log."""
    return [e.message or f"{e.name}: {e.kind} (pid {e.pid})" for e in events]

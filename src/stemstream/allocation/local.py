"""Run the NodeGroups on this machine under ``mpiexec``: for demos, tests and single-host set-ups."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import psutil

from stemstream.allocation.base import Allocation, AllocationRequest, JobState, nodegroup_args
from stemstream.errors import AllocationError

logger = logging.getLogger(__name__)


# What a clean_env job keeps of this environment: enough to find programs and a home, nothing of stemstream's.
KEPT_ENV = ("PATH", "HOME", "USER", "LANG", "LC_ALL", "TMPDIR", "VIRTUAL_ENV")


def default_command() -> list[str]:
    """``<venv>/bin/stemstream nodegroup``: the console script beside this interpreter."""
    return [str(Path(sys.executable).parent / "stemstream"), "nodegroup"]


def default_mpiexec() -> str:
    """The ``mpiexec`` installed in this interpreter's environment (the ``mpich`` wheel)."""
    return str(Path(sys.executable).parent / "mpiexec")


class LocalAllocator:
    """Start ``mpiexec -n N <command> <nodegroup args>`` in its own process group.

    ``command`` replaces ``stemstream nodegroup`` (tests pass a sleeper); ``mpiexec`` defaults to the one in
    this venv, and ``use_mpi=False`` runs the command once without MPI. The job's output goes to
    ``<output_dir>/nodegroups-<job id>.log``. ``clean_env=True`` starts the job as a batch system on another
    machine would: with only the basics of this environment (:data:`KEPT_ENV`) and the request's ``extra_env``,
    so that what the NodeGroups need must be on their command line.
    """

    name = "local"

    def __init__(
        self,
        command: Sequence[str] | None = None,
        *,
        mpiexec: str | None = None,
        use_mpi: bool = True,
        grace_s: float = 5.0,
        clean_env: bool = False,
    ) -> None:
        self.command = list(command) if command is not None else default_command()
        self.mpiexec = (mpiexec or default_mpiexec()) if use_mpi else None
        self.grace_s = grace_s
        self.clean_env = clean_env
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._logs: dict[str, Path] = {}
        self._cancelled: set[str] = set()
        self._reported: set[str] = set()

    def check_machine(self, machine: str) -> None:
        if machine != "local":
            raise AllocationError(
                f"machine {machine!r} unknown to the local allocator; use machine 'local' or another backend"
            )

    def argv(self, request: AllocationRequest) -> list[str]:
        """The full command line the job runs."""
        args = [*self.command, *nodegroup_args(request)]
        if self.mpiexec is None:
            return args
        return [self.mpiexec, "-n", str(request.n_tasks), *args]

    def submit(self, request: AllocationRequest) -> Allocation:
        self.check_machine(request.machine)
        argv = self.argv(request)
        if self.mpiexec is not None and not Path(self.mpiexec).exists():
            raise AllocationError(f"mpiexec not found at {self.mpiexec}; pip install mpich in this venv")
        out_dir = Path(request.output_dir)
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise AllocationError(
                f"cannot create output_dir {out_dir}: {exc.strerror}; choose a writable directory"
            ) from None
        inherited = {k: v for k, v in os.environ.items() if k in KEPT_ENV} if self.clean_env else os.environ
        env = {**inherited, **request.extra_env}
        log_path = out_dir / f"nodegroups-starting-{os.getpid()}-{time.monotonic_ns()}.log"
        try:
            with open(log_path, "ab") as log:
                proc = subprocess.Popen(
                    argv, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                    start_new_session=True,
                )  # fmt: skip
        except OSError as exc:
            raise AllocationError(f"cannot start {argv[0]}: {exc.strerror}; check the command") from None
        job_id = f"local-{proc.pid}"
        final_log = out_dir / f"nodegroups-{job_id}.log"
        try:
            log_path.rename(final_log)  # named after the pid; the child keeps writing to the same file
        except OSError:
            final_log = log_path
        self._procs[job_id] = proc
        self._logs[job_id] = final_log
        logger.info("started %d NodeGroup(s) locally as %s; log in %s", request.n_tasks, job_id, final_log)
        return Allocation(backend=self.name, job_id=job_id, request=request, submitted=time.time())

    def _proc(self, allocation: Allocation) -> subprocess.Popen[bytes]:
        proc = self._procs.get(allocation.job_id)
        if proc is None:
            raise AllocationError(
                f"local job {allocation.job_id} is not one this allocator started; ask the one that did"
            )
        return proc

    def log_path(self, allocation: Allocation) -> Path:
        """Where the job's output goes."""
        self._proc(allocation)
        return self._logs[allocation.job_id]

    def exit_code(self, allocation: Allocation) -> int | None:
        """The job's exit code, or None while it runs."""
        return self._proc(allocation).poll()

    def state(self, allocation: Allocation) -> JobState:
        code = self._proc(allocation).poll()
        if code is None:
            return JobState.RUNNING
        if allocation.job_id in self._cancelled:
            return JobState.CANCELLED
        if allocation.job_id not in self._reported:
            self._reported.add(allocation.job_id)
            if code == 0:
                logger.info("local job %s completed", allocation.job_id)
            else:
                log = self._logs.get(allocation.job_id)
                logger.warning("local job %s exited with code %d; see %s", allocation.job_id, code, log)
        return JobState.COMPLETED if code == 0 else JobState.FAILED

    def cancel(self, allocation: Allocation) -> None:
        """SIGTERM the job's process group (mpiexec forwards it), SIGKILL what is left after ``grace_s``."""
        proc, job_id = self._proc(allocation), allocation.job_id
        if proc.poll() is not None:
            return
        self._cancelled.add(job_id)
        # mpiexec (hydra) starts its proxies in their own sessions: remember them to kill them too if needed.
        try:
            family = psutil.Process(proc.pid).children(recursive=True)
        except psutil.Error:
            family = []
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(self.grace_s)
        except subprocess.TimeoutExpired:
            logger.warning("local job %s ignored SIGTERM for %.1f s; killing it", job_id, self.grace_s)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        _gone, alive = psutil.wait_procs(family, timeout=self.grace_s)
        for child in alive:
            with contextlib.suppress(psutil.Error):
                child.kill()
        logger.info("cancelled local job %s (exit code %s)", job_id, proc.returncode)

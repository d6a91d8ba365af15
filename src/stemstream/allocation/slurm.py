"""Allocate nodes with the Slurm command-line tools, from a login node of the cluster."""

from __future__ import annotations

import logging
import subprocess
from collections.abc import Sequence
from pathlib import Path

from stemstream.allocation.base import (
    Allocation,
    AllocationRequest,
    JobState,
    one_line,
    render_batch_script,
    slurm_state,
)
from stemstream.errors import AllocationError

logger = logging.getLogger(__name__)


class SlurmAllocator:
    """``sbatch --parsable`` a rendered batch script, ``squeue``/``sacct`` for its state, ``scancel`` it.

    ``machines`` are the cluster names this login node submits to; ``executable`` and ``prologue`` are
    passed to :func:`render_batch_script`. The Slurm commands are configurable (full paths, wrappers).
    """

    name = "slurm"

    def __init__(
        self,
        *,
        machines: Sequence[str] = ("perlmutter",),
        executable: str = "stemstream",
        prologue: Sequence[str] = (),
        template: Path | None = None,
        sbatch: str = "sbatch",
        squeue: str = "squeue",
        sacct: str = "sacct",
        scancel: str = "scancel",
        timeout_s: float = 60.0,
    ) -> None:
        self.machines = tuple(machines)
        self.executable = executable
        self.prologue = tuple(prologue)
        self.template = template
        self.sbatch, self.squeue, self.sacct, self.scancel = sbatch, squeue, sacct, scancel
        self.timeout_s = timeout_s

    def _run(self, argv: list[str], *, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        try:
            return subprocess.run(
                argv, input=stdin, capture_output=True, text=True, timeout=self.timeout_s, check=False
            )
        except FileNotFoundError:
            raise AllocationError(f"{argv[0]} not found; run on a Slurm login node or pass a path") from None
        except subprocess.TimeoutExpired:
            raise AllocationError(
                f"{argv[0]} did not answer in {self.timeout_s:g} s; Slurm may be overloaded, try again later"
            ) from None

    def check_machine(self, machine: str) -> None:
        if machine not in self.machines:
            raise AllocationError(f"machine {machine!r} unknown; choose one of {', '.join(self.machines)}")

    def batch_script(self, request: AllocationRequest) -> str:
        return render_batch_script(request, self.template, executable=self.executable, prologue=self.prologue)

    def submit(self, request: AllocationRequest) -> Allocation:
        self.check_machine(request.machine)
        script = self.batch_script(request)
        try:
            # Slurm opens --output before the script runs: the directory must exist already.
            Path(request.output_dir).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise AllocationError(
                f"cannot create output_dir {request.output_dir}: {exc.strerror}; choose a writable directory"
            ) from None
        done = self._run([self.sbatch, "--parsable"], stdin=script)
        if done.returncode != 0:
            raise AllocationError(
                f"sbatch refused the job ({one_line(done.stderr) or f'exit code {done.returncode}'}); "
                "check account, qos and constraint"
            )
        # --parsable prints "jobid" or "jobid;cluster".
        job_id = done.stdout.strip().split(";", 1)[0]
        if not job_id.isdigit():
            raise AllocationError(f"sbatch printed {one_line(done.stdout)!r}, not a job id; check sbatch")
        return Allocation.submitted_now(self.name, job_id, request, "Slurm job")

    def state(self, allocation: Allocation) -> JobState:
        job_id = allocation.job_id
        done = self._run([self.squeue, "-h", "-j", job_id, "-o", "%T"])
        raw = done.stdout.strip() if done.returncode == 0 else ""
        if not raw:
            # Gone from the queue (squeue prints nothing, or "Invalid job id"): ask the accounting database.
            done = self._run([self.sacct, "-n", "-X", "-P", "-j", job_id, "-o", "State"])
            lines = [line.strip() for line in done.stdout.splitlines() if line.strip()]
            if done.returncode != 0 or not lines:
                detail = one_line(done.stderr) or "no record"
                raise AllocationError(f"Slurm job {job_id} unknown to squeue and sacct ({detail}); check it")
            raw = lines[-1]
        return slurm_state(raw.splitlines()[0])

    def cancel(self, allocation: Allocation) -> None:
        done = self._run([self.scancel, allocation.job_id])
        if done.returncode != 0:
            if self.state(allocation).finished:
                logger.info("Slurm job %s had already ended", allocation.job_id)
                return
            raise AllocationError(
                f"scancel {allocation.job_id} failed ({one_line(done.stderr) or done.returncode}); "
                "cancel it by hand with scancel"
            )
        logger.info("cancelled Slurm job %s", allocation.job_id)

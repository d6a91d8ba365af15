"""What every allocation backend shares: the request, the job states, the ``Allocator`` protocol.

An allocation is a batch job (or, locally, one ``mpiexec``) that runs ``n_nodes * nodegroups_per_node``
NodeGroup processes, each registering itself in the store at ``store_address`` (failing over to
``store_backup``) and counting what it receives into ``output_dir`` as ``counting`` says. Everything a NodeGroup
needs is on its command line: a batch job's environment is not the session's.
"""

from __future__ import annotations

import logging
import re
import shlex
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from importlib import resources
from pathlib import Path
from typing import Protocol

import jinja2

from stemstream.counting.params import CountingParams
from stemstream.errors import AllocationError

logger = logging.getLogger(__name__)

TEMPLATE_PACKAGE = "stemstream.allocation"
TEMPLATE_NAME = "templates/nodegroups.sbatch.j2"

# Values that end up in #SBATCH directives or on a command line must be one plain token.
_TOKEN = re.compile(r"^[A-Za-z0-9_.,:@&|+/=-]+$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class JobState(StrEnum):
    PENDING = "PENDING"
    RUNNING = "RUNNING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"

    @property
    def finished(self) -> bool:
        return self in (JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED)


@dataclass(kw_only=True)
class AllocationRequest:
    """Nodes to allocate and how to start the NodeGroups on them."""

    machine: str = "local"
    n_nodes: int = 1
    nodegroups_per_node: int = 2
    minutes: int = 60
    store_address: str
    store_backup: str | None = None
    output_dir: str
    counting: CountingParams = field(default_factory=CountingParams)
    account: str | None = None
    qos: str = "realtime"
    constraint: str = "cpu"
    extra_env: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("n_nodes", "nodegroups_per_node", "minutes"):
            if getattr(self, name) < 1:
                raise AllocationError(f"{name} must be at least 1 (got {getattr(self, name)})")
        for name in ("machine", "store_address", "store_backup", "qos", "constraint", "account"):
            value = getattr(self, name)
            if value is not None and not _TOKEN.match(value):
                raise AllocationError(f"{name} {value!r} must be one word without spaces or quotes")
        if not self.output_dir or "\n" in self.output_dir:
            raise AllocationError(f"output_dir {self.output_dir!r} must be a non-empty one-line path")
        for key in self.extra_env:
            if not _ENV_NAME.match(key):
                raise AllocationError(f"extra_env name {key!r} is not a valid environment variable name")

    @property
    def n_tasks(self) -> int:
        """How many NodeGroup processes the allocation runs in all."""
        return self.n_nodes * self.nodegroups_per_node


@dataclass
class Allocation:
    """A submitted request: which backend holds it and under which job id."""

    backend: str
    job_id: str
    request: AllocationRequest
    submitted: float

    @classmethod
    def submitted_now(cls, backend: str, job_id: str, request: AllocationRequest, how: str) -> Allocation:
        """A job just submitted (``how``: "Slurm job", ...), logged with what it asked for."""
        logger.info("submitted %s %s on %s: %d NodeGroup(s) on %d node(s)",
                    how, job_id, request.machine, request.n_tasks, request.n_nodes)  # fmt: skip
        return cls(backend=backend, job_id=job_id, request=request, submitted=time.time())


class Allocator(Protocol):
    """Gets compute nodes running NodeGroups, reports on them and gives them back."""

    name: str

    def check_machine(self, machine: str) -> None:
        """Raise a one-line AllocationError unless jobs can be submitted to ``machine`` now."""
        ...

    def submit(self, request: AllocationRequest) -> Allocation:
        """Submit the job; returns at once (the job may still be pending)."""
        ...

    def state(self, allocation: Allocation) -> JobState:
        """The job's state now."""
        ...

    def cancel(self, allocation: Allocation) -> None:
        """End the job; a job that already ended is left as it is."""
        ...


def nodegroup_args(request: AllocationRequest) -> list[str]:
    """The ``stemstream nodegroup`` arguments (after the sub-command) for one NodeGroup process."""
    backup = ["--store-backup", request.store_backup] if request.store_backup else []
    output = ["--output-dir", request.output_dir]
    return ["--store", request.store_address, *backup, "--consumer", "count", *output, *request.counting.argv()]


# Slurm job states (squeue %T / sacct State) to ours. A NodeGroup job serves until it is cancelled or
# reaches its time limit, so TIMEOUT is the ordinary end of a session, not a failure.
_SLURM_STATES: dict[str, JobState] = {
    "PENDING": JobState.PENDING,
    "CONFIGURING": JobState.PENDING,
    "REQUEUED": JobState.PENDING,
    "REQUEUE_HOLD": JobState.PENDING,
    "REQUEUE_FED": JobState.PENDING,
    "RESV_DEL_HOLD": JobState.PENDING,
    "SUSPENDED": JobState.PENDING,
    "STOPPED": JobState.PENDING,
    "RUNNING": JobState.RUNNING,
    "COMPLETING": JobState.RUNNING,
    "SIGNALING": JobState.RUNNING,
    "STAGE_OUT": JobState.RUNNING,
    "RESIZING": JobState.RUNNING,
    "COMPLETED": JobState.COMPLETED,
    "TIMEOUT": JobState.COMPLETED,
    "CANCELLED": JobState.CANCELLED,
    "REVOKED": JobState.CANCELLED,
    "FAILED": JobState.FAILED,
    "NODE_FAIL": JobState.FAILED,
    "BOOT_FAIL": JobState.FAILED,
    "OUT_OF_MEMORY": JobState.FAILED,
    "PREEMPTED": JobState.FAILED,
    "DEADLINE": JobState.FAILED,
    "SPECIAL_EXIT": JobState.FAILED,
}


def slurm_state(raw: str) -> JobState:
    """Map a Slurm state ("RUNNING", "CANCELLED by 1234", "OUT_OF_MEMORY", ...) to a :class:`JobState`."""
    word = raw.strip().split(" ", 1)[0].rstrip("+").upper()
    state = _SLURM_STATES.get(word)
    if state is None:
        logger.warning("unknown Slurm job state %r; treating it as PENDING", raw)
        return JobState.PENDING
    return state


def one_line(text: object) -> str:
    """``text`` with its lines joined, for error messages that must stay on one line."""
    return "; ".join(part.strip() for part in str(text).splitlines() if part.strip())


def _load_template(template: Path | None) -> str:
    if template is not None:
        try:
            return Path(template).read_text()
        except OSError as exc:
            raise AllocationError(f"cannot read batch-script template {template}: {exc.strerror}") from None
    return resources.files(TEMPLATE_PACKAGE).joinpath(TEMPLATE_NAME).read_text()


def render_batch_script(
    request: AllocationRequest,
    template: Path | None = None,
    *,
    executable: str = "stemstream",
    prologue: Sequence[str] = (),
    job_name: str = "stemstream-nodegroups",
) -> str:
    """The Slurm batch script that starts the request's NodeGroups with ``srun``.

    ``executable`` is the ``stemstream`` command on the compute nodes; ``prologue`` holds shell lines run
    before it (``module load ...``, ``source .../bin/activate``). The default template is package data
    (``stemstream/allocation/templates/nodegroups.sbatch.j2``, mirrored in ``infra/`` for operators).
    """
    if not _TOKEN.match(job_name):
        raise AllocationError(f"job name {job_name!r} must be one word without spaces or quotes")
    log_path = f"{request.output_dir.rstrip('/')}/{job_name}-%j.log"
    if any(ch.isspace() or ch in "\"'" for ch in log_path):
        raise AllocationError(f"output_dir {request.output_dir!r} must not hold spaces or quotes for Slurm")
    env = jinja2.Environment(
        undefined=jinja2.StrictUndefined, keep_trailing_newline=True, trim_blocks=True, lstrip_blocks=True
    )
    env.filters["q"] = lambda value: shlex.quote(str(value))
    try:
        tmpl = env.from_string(_load_template(template))
        return tmpl.render(
            request=request,
            job_name=job_name,
            executable=executable,
            nodegroup_args=nodegroup_args(request),
            prologue=list(prologue),
            log_path=log_path,
        )
    except jinja2.TemplateError as exc:
        raise AllocationError(f"batch-script template is broken: {one_line(exc)}; fix the template") from None

"""Compute nodes for the NodeGroups: one ``Allocator`` protocol, backends ``local``, ``slurm`` and ``sfapi``.

Library code, no Prefect: the session flow wraps these calls in tasks.
"""

from __future__ import annotations

from typing import Any

from stemstream.allocation.base import (
    Allocation,
    AllocationRequest,
    Allocator,
    JobState,
    nodegroup_args,
    render_batch_script,
    slurm_state,
)
from stemstream.backends import load_backend
from stemstream.errors import AllocationError

__all__ = [
    "BACKENDS",
    "Allocation",
    "AllocationRequest",
    "Allocator",
    "JobState",
    "get_allocator",
    "nodegroup_args",
    "render_batch_script",
    "slurm_state",
]

# name -> "module:class", imported on demand (the sfapi backend pulls in httpx/authlib).
BACKENDS = {
    "local": "stemstream.allocation.local:LocalAllocator",
    "slurm": "stemstream.allocation.slurm:SlurmAllocator",
    "sfapi": "stemstream.allocation.sfapi:SfapiAllocator",
}


def get_allocator(name: str, **kwargs: Any) -> Allocator:
    """The allocator called ``name``, built with ``kwargs`` (see each backend's constructor)."""
    allocator: Allocator = load_backend(BACKENDS, name, AllocationError, "allocation", **kwargs)
    return allocator

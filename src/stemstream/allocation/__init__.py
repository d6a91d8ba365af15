"""Compute nodes for the NodeGroups: one ``Allocator`` protocol, backends ``local``, ``slurm`` and ``sfapi``.

Library code, no Prefect: the session flow wraps these calls in tasks.
"""

from __future__ import annotations

import importlib
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
    target = BACKENDS.get(name)
    if target is None:
        raise AllocationError(f"allocation backend {name!r} unknown; choose one of {', '.join(BACKENDS)}")
    module_name, class_name = target.split(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    allocator: Allocator = cls(**kwargs)
    return allocator

"""Pluggable backends named in settings ("local", "slurm", "globus", ...), imported only when chosen (some
pull in heavy clients such as httpx or globus_sdk)."""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

from stemstream.errors import StemstreamError


def load_backend(backends: Mapping[str, str], name: str, error: type[StemstreamError], what: str, **kwargs: Any) -> Any:
    """``backends[name]`` ("module:class") built with ``kwargs``; ``error`` naming the choices if unknown."""
    target = backends.get(name)
    if target is None:
        raise error(f"{what} backend {name!r} unknown; choose one of {', '.join(backends)}")
    module_name, class_name = target.split(":")
    return getattr(importlib.import_module(module_name), class_name)(**kwargs)

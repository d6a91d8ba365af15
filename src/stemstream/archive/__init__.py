"""Long-term storage for counted files: one ``Archiver`` protocol, backends ``local`` and ``globus``.

Library code, no Prefect: the session flow wraps these calls in tasks.
"""

from __future__ import annotations

from typing import Any

from stemstream.archive.base import Archiver, ArchiveResult, sha256_file
from stemstream.backends import load_backend
from stemstream.errors import ArchiveError

__all__ = ["BACKENDS", "ArchiveResult", "Archiver", "get_archiver", "sha256_file"]

# name -> "module:class", imported on demand (the globus backend pulls in globus_sdk).
BACKENDS = {
    "local": "stemstream.archive.local:LocalArchiver",
    "globus": "stemstream.archive.globus:GlobusArchiver",
}


def get_archiver(name: str, **kwargs: Any) -> Archiver:
    """The archiver called ``name``, built with ``kwargs`` (see each backend's constructor)."""
    archiver: Archiver = load_backend(BACKENDS, name, ArchiveError, "archive", **kwargs)
    return archiver

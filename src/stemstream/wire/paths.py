"""Paths that come from the store or the wire, checked against the directories this process was configured with.

A scan request names a fallback directory, a scan plan a raw directory, a counted record its file, a scan record
its raw files: any of them may have been written by a buggy or hostile client (docs/security.md). A process that
creates, writes, archives or catalogues such a path first resolves it (``..`` and symbolic links followed) and
refuses it unless it lies under one of its configured roots (Settings: ``fallback_dir``, ``fallback_root``,
``output_dir``). The refusal is one line saying what to do (:class:`UnsafePath`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from stemstream.errors import ProtocolError


class UnsafePath(ProtocolError):
    """A path from the store or the wire that resolves outside every configured root."""


def _resolved(path: str | os.PathLike[str]) -> Path:
    return Path(os.path.abspath(Path(path).expanduser())).resolve(strict=False)


def under_roots(path: str | os.PathLike[str], roots: Iterable[str | os.PathLike[str] | None], what: str) -> Path:
    """``path`` resolved, if it is one of ``roots`` or lies under one (a relative path is relative to the first
    root); raises :class:`UnsafePath` otherwise. ``what`` names the path in the error ("fallback_dir of the scan
    request"). Roots of None are skipped; with no root at all every path is refused."""
    bases = [_resolved(r) for r in roots if r is not None and str(r) != ""]
    text = os.fspath(path)
    if not bases:
        raise UnsafePath(f"{what} {text!r}: no root is configured to hold it")
    if "\x00" in text or len(text) > 4096:
        raise UnsafePath(f"{what}: not a usable path")
    candidate = _resolved(bases[0] / text) if not Path(text).is_absolute() else _resolved(text)
    for base in bases:
        if candidate == base or candidate.is_relative_to(base):
            return candidate
    shown = ", ".join(str(b) for b in bases)
    raise UnsafePath(f"{what} {text[:200]!r} resolves to {candidate}, outside {shown}; name a directory under it")

"""What every archive backend shares: the result record and the ``Archiver`` protocol."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from stemstream.errors import ArchiveError

CHUNK = 8 * 1024 * 1024


@dataclass
class ArchiveResult:
    """Where a counted file went, how big it was and how long archiving took."""

    backend: str
    destination: str
    task_id: str | None
    bytes: int
    seconds: float


class Archiver(Protocol):
    """Copies a counted file to long-term storage."""

    name: str

    def archive(self, path: Path, *, scan_number: int, label: str | None = None) -> ArchiveResult:
        """Block until ``path`` is safely archived, or raise ArchiveError; never deletes ``path``."""
        ...


def sha256_file(path: Path, chunk: int = CHUNK) -> str:
    """The SHA-256 hex digest of a file's content."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def source_file(path: Path) -> Path:
    """``path`` as a Path, checked to be a regular file (a one-line ArchiveError otherwise)."""
    path = Path(path)
    if not path.is_file():
        what = "does not exist" if not path.exists() else "is not a regular file"
        raise ArchiveError(f"cannot archive {path}: it {what}; pass the path of one counted file")
    return path


def default_label(scan_number: int) -> str:
    return f"stemstream scan {scan_number}"


def one_line(text: object) -> str:
    """``text`` with its lines joined, for error messages that must stay on one line."""
    return "; ".join(part.strip() for part in str(text).splitlines() if part.strip())

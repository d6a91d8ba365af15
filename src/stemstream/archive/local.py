"""Archive to a directory on a mounted file system: copy to a temporary name, verify SHA-256, rename."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import time
from pathlib import Path

from stemstream.archive.base import CHUNK, ArchiveResult, sha256_file, source_file
from stemstream.errors import ArchiveError

logger = logging.getLogger(__name__)


class LocalArchiver:
    """Copy counted files into ``destination_dir`` (created if needed) under their own names.

    The copy is written to a hidden temporary file, flushed to disk, read back and compared with the
    source's SHA-256 before it is renamed into place, so a reader never sees a partial file. Archiving the
    same file again is a no-op; a different file already at the destination is an error, never overwritten.
    """

    name = "local"

    def __init__(self, destination_dir: Path | str, *, chunk_size: int = CHUNK) -> None:
        self.destination_dir = Path(destination_dir)
        self.chunk_size = chunk_size

    def archive(self, path: Path, *, scan_number: int, label: str | None = None) -> ArchiveResult:
        t0 = time.monotonic()
        path = source_file(path)
        dest = self.destination_dir / path.name
        kept = f"the counted file is kept at {path}"
        try:
            self.destination_dir.mkdir(parents=True, exist_ok=True)
            if dest.exists():
                return self._already_there(path, dest, scan_number, t0)
            tmp = dest.with_name(f".{dest.name}.{os.getpid()}.partial")
            try:
                source_sum = self._copy(path, tmp)
                copied_sum = sha256_file(tmp, self.chunk_size)
                if copied_sum != source_sum:
                    raise ArchiveError(
                        f"checksum mismatch copying scan {scan_number} to {dest}; {kept}; "
                        "check the destination storage and retry"
                    )
                shutil.copystat(path, tmp)
                os.replace(tmp, dest)
                _fsync_dir(self.destination_dir)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()
        except OSError as exc:
            raise ArchiveError(
                f"cannot archive scan {scan_number} to {dest}: {exc.strerror or exc}; {kept}; "
                "free space or fix permissions and retry"
            ) from None
        size = dest.stat().st_size
        seconds = time.monotonic() - t0
        logger.info(
            "archived scan %d (%s) to %s: %d bytes in %.2f s, sha256 %s",
            scan_number, label or path.name, dest, size, seconds, source_sum[:12],
        )  # fmt: skip
        return ArchiveResult(self.name, str(dest), None, size, seconds)

    def _copy(self, src: Path, dst: Path) -> str:
        """Copy ``src`` to ``dst`` (fsync'ed), returning the SHA-256 of what was read."""
        digest = hashlib.sha256()
        with open(src, "rb") as fin, open(dst, "xb") as fout:
            while block := fin.read(self.chunk_size):
                digest.update(block)
                fout.write(block)
            fout.flush()
            os.fsync(fout.fileno())
        return digest.hexdigest()

    def _already_there(self, path: Path, dest: Path, scan_number: int, t0: float) -> ArchiveResult:
        if sha256_file(dest, self.chunk_size) != sha256_file(path, self.chunk_size):
            raise ArchiveError(
                f"{dest} already exists with different content; the counted file is kept at {path}; "
                "move the old file away or archive to another directory"
            )
        logger.info("scan %d is already archived at %s (same sha256)", scan_number, dest)
        return ArchiveResult(self.name, str(dest), None, dest.stat().st_size, time.monotonic() - t0)


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

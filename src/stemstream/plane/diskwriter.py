"""One producer's sector of a scan written to disk as 4D Camera raw files (the disk fallback and replays)."""

from __future__ import annotations

import contextlib
import threading
from pathlib import Path
from typing import Any

from stemstream.errors import FallbackError
from stemstream.wire.protocol import N_SECTORS, SECTOR_SHAPE
from stemstream.wire.rawfile import RawScanWriter, acquisition_dir, sidecar_name


class SectorDiskWriter:
    """One producer's sector of a scan written as 4D Camera raw files (thread-safe ``write``)."""

    def __init__(
        self,
        directory: Path,
        scan_number: int,
        scan_shape: tuple[int, int],
        sector: int,
        *,
        n_sectors: int = N_SECTORS,
        sector_shape: tuple[int, int] = SECTOR_SHAPE,
        start: str = "",
    ) -> None:
        self.sector = sector
        self.directory = directory
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise FallbackError(f"cannot create fallback directory {directory}: {exc.strerror}") from None
        self._writer = RawScanWriter(
            directory,
            scan_number,
            scan_shape,
            n_sectors=n_sectors,
            sector_shape=sector_shape,
            start=start,
        )
        self._lock = threading.Lock()
        self.written = 0

    def write(self, frame_number: int, buffer: Any) -> None:
        with self._lock:
            self._writer.write(frame_number, self.sector, buffer)
            self.written += 1

    def close(self) -> list[Path]:
        """Fsync and close the files, mark them complete; the paths. Raises FallbackError (then retry)."""
        with self._lock:
            self._writer.close()
            return [Path(p) for p in self._writer.paths]

    def discard(self) -> list[Path]:
        """The scan was acknowledged: close and delete the files written so far (a spill), their sidecar,
        and their directory when it was the acquisition's own and is empty now. The paths deleted."""
        with self._lock:
            with contextlib.suppress(FallbackError):
                self._writer.close()
            paths = [Path(p) for p in self._writer.paths]
            extra = [d / sidecar_name(self._writer.scan_number, self.sector) for d in {p.parent for p in paths}]
            for path in [*paths, *extra]:
                with contextlib.suppress(OSError):
                    path.unlink()
            own = acquisition_dir(self._writer.scan_number, self._writer.start) if self._writer.start else None
            for d in {p.parent for p in paths}:
                if d.name == own:
                    with contextlib.suppress(OSError):
                        d.rmdir()  # only when empty: the other sectors' files may be there
            return paths

"""One producer's sector of a scan written to disk as 4D Camera raw files (the disk fallback and replays)."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from stemstream.errors import FallbackError
from stemstream.wire.protocol import N_SECTORS, SECTOR_SHAPE
from stemstream.wire.rawfile import RawScanWriter


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
    ) -> None:
        self.sector = sector
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
        )
        self._lock = threading.Lock()
        self.written = 0

    def write(self, frame_number: int, buffer: Any) -> None:
        with self._lock:
            self._writer.write(frame_number, self.sector, buffer)
            self.written += 1

    def close(self) -> list[Path]:
        with self._lock:
            self._writer.close()
            return [Path(p) for p in self._writer.paths]

"""Simulator and raw-writer throughput, side by side with a plain numpy ``tofile`` of the same bytes.

    python benchmarks/sim.py [--scan-shape 64 64] [--dir /tmp]

1. Simulator: ``sector(i, m)`` for every sector of a scan, after a warm-up that fills the noise pool.
2. Writer: the same sectors written with ``RawScanWriter`` (header + sector per ``writev``) against
   ``ndarray.tofile`` of the same sector arrays into four plain files (no headers), taking turns every
   ``_CHUNK`` frames so that other load hits both alike; finished files are deleted as it goes, so
   everything stays in the page cache (no writeback, no fsync): this compares the writers' overhead, not
   disks. The sectors are made before either clock starts (32 distinct frames reused round-robin).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from stemstream.sim import FourDCameraSim
from stemstream.wire.rawfile import HEADER_BYTES, RawScanWriter

_CHUNK = 128  # frames one method writes before the other takes its turn


def bench_sim(scan_shape: tuple[int, int]) -> tuple[float, int]:
    sim = FourDCameraSim(scan_shape, seed=1)
    warm = min(sim.n_frames // 4, 4 * sim.pool_size)
    for i in range(warm):
        for m in range(sim.n_sectors):
            sim.sector(i, m)
    start = time.perf_counter()
    for i in range(warm, sim.n_frames):
        for m in range(sim.n_sectors):
            sim.sector(i, m)
    return (sim.n_frames - warm) / (time.perf_counter() - start), sim.n_frames - warm


def bench_write(scan_shape: tuple[int, int], root: Path) -> tuple[float, float, int]:
    sim = FourDCameraSim(scan_shape, seed=2, loss_rate=0.0)
    n_distinct = 32
    sectors = [[np.ascontiguousarray(sim.sector(i, m)) for m in range(4)] for i in range(n_distinct)]
    n = sim.n_frames
    (root / "raw").mkdir()
    (root / "plain").mkdir()
    # Untimed: the first GB a process writes is slow (page-cache allocation) whichever method writes it.
    with open(root / "warm-up", "wb") as f:
        for i in range(n // 4):
            for m in range(4):
                sectors[i % n_distinct][m].tofile(f)
    (root / "warm-up").unlink()

    # Each turn writes new files and the finished ones are deleted (their dirty pages dropped unwritten),
    # so the page cache never fills and the disk never throttles either method.
    t_raw = t_plain = 0.0
    chunk_bytes = _CHUNK * (HEADER_BYTES + sectors[0][0].nbytes)
    with RawScanWriter(root / "raw", 1, scan_shape, max_file_bytes=chunk_bytes) as writer:
        for turn, lo in enumerate(range(0, n, _CHUNK)):
            frames = range(lo, min(n, lo + _CHUNK))
            start = time.perf_counter()
            for i in frames:
                frame = sectors[i % n_distinct]
                for m in range(4):
                    writer.write(i, m, frame[m])
            t_raw += time.perf_counter() - start
            for path in writer.paths[:-4]:
                path.unlink(missing_ok=True)
            start = time.perf_counter()
            files = [open(root / "plain" / f"module{m}_{turn}.bin", "wb") for m in range(4)]  # noqa: SIM115
            for i in frames:
                frame = sectors[i % n_distinct]
                for m in range(4):
                    frame[m].tofile(files[m])
            for f in files:
                f.close()
            t_plain += time.perf_counter() - start
            for f in files:
                Path(f.name).unlink()
    raw_bytes = writer.bytes_written
    plain_bytes = n * 4 * sectors[0][0].nbytes
    assert raw_bytes == plain_bytes + n * 4 * HEADER_BYTES
    shutil.rmtree(root / "raw")
    shutil.rmtree(root / "plain")
    return raw_bytes / t_raw / 1e9, plain_bytes / t_plain / 1e9, raw_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scan-shape", type=int, nargs=2, default=[64, 64], metavar=("ROWS", "COLS"))
    parser.add_argument("--dir", type=Path, default=None, help="where to write (default: a temp dir)")
    args = parser.parse_args()
    shape = (args.scan_shape[0], args.scan_shape[1])

    fps, frames = bench_sim(shape)
    print(f"simulator     {fps:9,.0f} frames/s  ({frames:,} frames x 4 sector() calls, after warm-up)")

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        raw_gbs, plain_gbs, nbytes = bench_write(shape, Path(tmp))
    print(f"RawScanWriter {raw_gbs:9.2f} GB/s      ({nbytes / 1e9:.2f} GB, header + sector per writev)")
    print(f"numpy tofile  {plain_gbs:9.2f} GB/s      (same sectors, no headers, turns of {_CHUNK} frames)")
    print(f"ratio         {raw_gbs / plain_gbs:9.2f}           (writer / tofile)")


if __name__ == "__main__":
    main()

"""``stemstream demo``: the pipeline end to end on one machine, as far as it is built.

Stage 1: simulate a scan, write it as 4D Camera raw files, read them back with stempy's multi-pass reader,
electron-count them with stempy, and compare the events with the simulator's ground truth.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from stemstream.commands.sim import add_sim_arguments, clear_scan_files, make_sim
from stemstream.errors import CountingError

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("demo", help="simulate, write, read back and count a small scan")
    add_sim_arguments(parser, scan_shape=(32, 32))
    parser.add_argument("--out", type=Path, default=Path("data/demo"), help="raw files go here")
    parser.add_argument("--threads", type=int, default=2, help="stempy reader threads (default: 2)")
    parser.set_defaults(func=_demo)


def _demo(args: argparse.Namespace) -> int:
    import time
    import warnings

    import numpy as np

    from stemstream.streaming.rawfile import write_scan

    try:
        import stempy.image as stempy_image
        import stempy.io as stempy_io
    except ImportError as exc:
        raise CountingError(f"the demo counts with stempy, which does not import: {exc}") from None

    sim = make_sim(args)
    out: Path = args.out
    clear_scan_files(out, sim.scan_number)  # an earlier demo's files: the writer never overwrites

    t0 = time.perf_counter()
    paths = write_scan(sim, out)
    t_write = time.perf_counter() - t0
    nbytes = sum(p.stat().st_size for p in paths)
    lost = sim.lost_sectors()

    t0 = time.perf_counter()
    reader = stempy_io.reader(
        [str(p) for p in paths],
        version=stempy_io.FileVersion.VERSION5,
        backend="multi-pass",
        threads=args.threads,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        counted = stempy_image.electron_count(reader)
    t_count = time.perf_counter() - t0

    rows = sim.sector_shape[0]
    hits = events = strikes = 0
    for i in range(sim.n_frames):
        truth = sim.ground_truth(i)
        # Strikes whose centre fell in a lost sector cannot be found: score the received ones only.
        sectors = truth // (rows * sim.frame_shape[1])
        received = np.array([(i, int(m)) not in lost for m in sectors], dtype=bool)
        truth = truth[received]
        found = np.asarray(counted.data[i, 0])
        hits += np.intersect1d(truth, found).size
        events += found.size
        strikes += truth.size

    n_sectors = sim.n_frames * sim.n_sectors
    table = [
        (
            "scan",
            f"{sim.scan_shape[0]} x {sim.scan_shape[1]} ({sim.n_frames:,} frames), number {sim.scan_number}",
        ),
        ("sectors lost", f"{len(lost):,} of {n_sectors:,} ({len(lost) / n_sectors:.2%})"),
        ("written", f"{nbytes / 1e9:.3f} GB in {len(paths)} files under {out}"),
        ("write rate", f"{nbytes / 1e9 / t_write:.2f} GB/s ({t_write:.2f} s)"),
        (
            "counted (stempy)",
            f"{sim.n_frames / t_count:,.0f} frames/s ({t_count:.2f} s, {args.threads} threads)",
        ),
        ("events", f"{events:,} ({events / sim.n_frames:.1f} per frame)"),
        ("recall", f"{hits / max(strikes, 1):.2%} of {strikes:,} strikes in received sectors"),
        ("precision", f"{hits / max(events, 1):.2%}"),
    ]
    print("stemstream demo, stage 1: simulate -> raw files -> stempy read -> stempy count")
    for name, value in table:
        print(f"  {name:<18} {value}")
    return 0

"""``stemstream sim``: the 4D Camera simulator from the command line."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from stemstream.commands.options import subcommands

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    sub = subcommands(subparsers, "sim", "simulate 4D Camera scans")
    write = sub.add_parser("write", help="write a simulated scan as 4D Camera raw files (stempy version 5)")
    add_sim_arguments(write, scan_shape=(16, 16))
    write.add_argument("--out", type=Path, required=True, help="directory for the raw files (created)")
    write.add_argument(
        "--max-file-mb", type=float, default=None, help="start a new file per sector past this size (MB)"
    )
    write.add_argument("--keep-lost", action="store_true", help="write the sectors the simulator loses too")
    write.add_argument("--overwrite", action="store_true", help="delete this scan's raw files in --out first")
    write.set_defaults(func=_write)


def add_sim_arguments(parser: argparse.ArgumentParser, *, scan_shape: tuple[int, int]) -> None:
    """The simulator's options, shared with ``stemstream demo``."""
    parser.add_argument(
        "--scan-shape",
        type=int,
        nargs=2,
        metavar=("ROWS", "COLS"),
        default=list(scan_shape),
        help=f"probe positions (default: {scan_shape[0]} {scan_shape[1]})",
    )
    parser.add_argument("--scan-number", type=int, default=1, help="scan number (default: 1)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument(
        "--loss-rate", type=float, default=0.001, help="fraction of sectors lost upstream (default: 0.001)"
    )
    parser.add_argument(
        "--electrons-per-frame", type=float, default=20.0, help="mean electrons per frame (default: 20)"
    )


def make_sim(args: argparse.Namespace):
    """A ``FourDCameraSim`` from the options of :func:`add_sim_arguments`."""
    from stemstream.sim import FourDCameraSim
    from stemstream.wire.protocol import check_scan_number

    check_scan_number(args.scan_number, "--scan-number")

    return FourDCameraSim(
        tuple(args.scan_shape),
        scan_number=args.scan_number,
        seed=args.seed,
        loss_rate=args.loss_rate,
        electrons_per_frame=args.electrons_per_frame,
    )


def clear_scan_files(directory: Path, scan_number: int) -> int:
    """Delete scan ``scan_number``'s raw files in ``directory`` (the writer never overwrites); how many."""
    from stemstream.wire.rawfile import raw_file_name

    if not directory.is_dir():
        return 0
    pattern = raw_file_name(scan_number, 0).replace("module0_00000", "module*")
    removed = 0
    for old in directory.glob(pattern):
        old.unlink()
        removed += 1
    if removed:
        logger.info("removed %d raw files of scan %d from %s", removed, scan_number, directory)
    return removed


def _write(args: argparse.Namespace) -> int:
    import time

    from tqdm import tqdm

    from stemstream.wire.rawfile import write_scan

    sim = make_sim(args)
    if args.overwrite:
        clear_scan_files(args.out, sim.scan_number)
    max_bytes = int(args.max_file_mb * 1e6) if args.max_file_mb else None
    start = time.perf_counter()
    with tqdm(total=sim.n_frames, unit="frame", desc=f"scan {sim.scan_number}") as bar:
        skip = not args.keep_lost
        paths = write_scan(sim, args.out, skip_lost=skip, max_file_bytes=max_bytes, progress=bar.update)
    elapsed = time.perf_counter() - start
    nbytes = sum(p.stat().st_size for p in paths)
    lost = 0 if args.keep_lost else len(sim.lost_sectors())
    print(
        f"wrote {sim.scan_shape[0]}x{sim.scan_shape[1]} scan {sim.scan_number}: {len(paths)} files, "
        f"{nbytes / 1e9:.3f} GB in {elapsed:.2f} s ({nbytes / 1e9 / elapsed:.2f} GB/s), "
        f"{lost} sectors lost, to {args.out}"
    )
    return 0

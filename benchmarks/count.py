"""Counting throughput: stempy (in RAM, from raw files, per frame) against our engines, on the same frames.

    python benchmarks/count.py [--frames 2000] [--engines stempy,cpu,gpu] [--batch 64]
    python benchmarks/count.py --sweep [--sweep-frames 256]      # the density sweep only

Frames come from the 4D Camera simulator (``stemstream.sim``), all in RAM before any timing starts. Every
engine counts them in batches, as a NodeGroup would, with the same thresholds and dark reference; every
engine's events are checked against the stempy engine's before its rate is printed. Ratios are to the
stempy engine (``electron_count_frame`` per frame). "per core" is frames per CPU-second of this process
(all its threads), which stays meaningful on a machine shared with other work, where wall-clock rates
do not. Note: stempy's in-RAM ``electron_count`` (PyReader, its "classic" path) needs a dark reference
(it dereferences a null pointer without one) and subtracts it differently from every other path (see
docs/counting.md): its events are not compared here.

The density sweep (``--sweep``) counts seeded simulated frames at ~20, ~200, ~1,000, ~15,000 and ~22,000
events per frame with every engine in this one process: CPU-seconds per frame (``time.process_time``, all
threads, median of 3 passes over the frames), the ratio to stempy, and the cores each engine needs for the
4D Camera's 87 kHz, per density. The dense settings lower the background threshold (``background_n_sigma``)
until noise maxima dominate: the frames a dark-less or high-dose scan gives. The simulator itself cannot make
them (at most 500 electrons per frame, 3 pixels apart; its fixed dark pattern is only +-1 count, so counting
it without a dark reference stays sparse).
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from stemstream.counting import compute_thresholds, get_engine, gpu_available
from stemstream.counting.thresholds import Thresholds
from stemstream.sim.camera import FourDCameraSim
from stemstream.wire.rawfile import write_scan

SHAPE = (576, 576)
DETECTOR_HZ = 87_000  # 4D Camera frames per second


@dataclass
class Result:
    name: str
    frames: int
    seconds: float
    cpu_seconds: float
    cores: int
    note: str = ""

    @property
    def rate(self) -> float:
        return self.frames / self.seconds

    @property
    def per_core(self) -> float:
        return self.frames / max(self.cpu_seconds, 1e-9)


class Clock:
    """Wall and process CPU time of a block."""

    def __enter__(self) -> Clock:
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self.wall
        self.cpu = time.process_time() - self.cpu


def make_frames(n: int) -> tuple[FourDCameraSim, np.ndarray]:
    cols = 50
    rows = -(-n // cols)
    sim = FourDCameraSim((rows, cols), seed=1, loss_rate=0.0, pool_size=16)
    frames = np.empty((n, *SHAPE), np.uint16)
    for i in range(n):
        frames[i] = sim.frame(i)
    return sim, frames


def bench_engine(
    name: str,
    threads: int | None,
    frames: np.ndarray,
    thresholds: Thresholds,
    dark: np.ndarray,
    batch: int,
    reference: list[np.ndarray] | None,
) -> tuple[Result, list[np.ndarray]]:
    engine = get_engine(name, threads=threads)
    engine.count(frames[:batch], thresholds, dark=dark)  # warm-up: compilation, buffers, caches
    events: list[np.ndarray] = []
    with Clock() as clock:
        for i in range(0, len(frames), batch):
            events += engine.count(frames[i : i + batch], thresholds, dark=dark)
    if reference is not None:
        same = all(np.array_equal(a, b) for a, b in zip(events, reference, strict=True))
        assert same, f"{name} (threads={threads}) disagrees with stempy"
    cores = getattr(engine, "threads", 1) if name == "cpu" else 1
    label = f"{name} engine" + (f", {cores} thread{'s' if cores > 1 else ''}" if name == "cpu" else "")
    note = "incl. H2D/D2H" if name == "gpu" else ""
    return Result(label, len(frames), clock.wall, clock.cpu, cores, note), events


def bench_stempy_in_ram(frames: np.ndarray, dark: np.ndarray) -> Result:
    """stempy.image.electron_count on a PyReader over the frames (thresholds included, as stempy does),
    on the last core only (the core the streaming path counts on)."""
    import stempy.image as simage
    import stempy.io as sio

    n = len(frames)
    reader = sio.PyReader(frames, list(range(n)), (n, 1), 32, n)
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {max(before)})
    try:
        with Clock() as clock, warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            simage.electron_count(reader, darkreference=dark, scan_dimensions=(n, 1))
    finally:
        os.sched_setaffinity(0, before)
    return Result("stempy electron_count, frames in RAM", n, clock.wall, clock.cpu, 1, "incl. thresholds")


def bench_stempy_files(sim: FourDCameraSim, n: int, dark: np.ndarray, workdir: Path) -> Result:
    """stempy.image.electron_count on the raw files of the same scan, multi-pass reader, all cores."""
    import stempy.image as simage
    import stempy.io as sio

    files = write_scan(sim, workdir / "raw")
    cores = os.cpu_count() or 1
    names = [str(f) for f in files]
    reader = sio.reader(names, version=sio.FileVersion.VERSION5, backend="multi-pass", threads=cores)
    with Clock() as clock:
        simage.electron_count(reader, darkreference=dark)
    note = f"{sim.n_frames} frames, page cache, incl. thresholds"
    return Result("stempy electron_count, raw files", sim.n_frames, clock.wall, clock.cpu, cores, note)


def bench_streaming_path(n_frames: int, engine: str, dark: np.ndarray, workdir: Path) -> Result:
    """The whole streaming count path: 4 producer processes -> aggregator -> one NodeGroup process counting
    with ``engine`` on its counting thread -> rank 0 writes the HDF5. Timed from the first sector sent to
    the file written, so thresholds, assembly, counting, gathering and writing are all inside."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from plane import StreamingPlane

    dark_path = workdir / "dark.npy"
    np.save(dark_path, dark)
    os.environ["STEMSTREAM_DARK_DIR"] = str(workdir)  # a dark must lie under the dark directory
    args: tuple[object, ...] = ("--consumer", "count", "--engine", engine, "--dark", dark_path)
    args += ("--output-dir", workdir / "counted", "--workers", 1)
    n_cpus = os.cpu_count() or 1
    plane_cpus = None
    if n_cpus >= 2:
        # Counting gets one core of its own, as stempy in RAM does; the data plane (on the real system:
        # DAQ servers, aggregator host, and the compute node's other cores) runs on the others.
        plane_cpus = ",".join(str(c) for c in range(n_cpus - 1))
        args += ("--worker-cpus", n_cpus - 1)
    with StreamingPlane(1, 1, workdir, consumer_args=args, warm_up=0, cpus=plane_cpus) as plane:
        plane.count(64)  # warm-up: connections made, engine compiled
        record = plane.count(n_frames)
    where = f"counting on core {n_cpus - 1}, the data plane on cores {plane_cpus}" if plane_cpus else "one core"
    steady = record["frames"] / (record["last_count"] - record["first_count"])
    wait = record["thresholds_at"] - record["started"]
    note = f"first sector sent -> file written; steady counting {steady:.0f} frames/s; thresholds after {wait:.2f} s"
    print(f"  ({engine}: {record['frames']} frames; {where})")
    return Result(f"streaming path, {engine} engine", record["frames"], record["seconds"], float("nan"), 1, note)


@dataclass(frozen=True)
class Density:
    """A simulator setting and the background n-sigma its thresholds are computed with."""

    label: str
    electrons: float
    background_n_sigma: float
    note: str


DENSITIES = (
    Density("~20", 20.0, 4.0, "20 electrons/frame (the simulator's default), background 4 sigma (stempy's)"),
    Density("~200", 200.0, 4.0, "200 electrons/frame, background 4 sigma"),
    Density("~1,000", 500.0, 2.75, "500 electrons/frame (the simulator's most), background 2.75 sigma"),
    Density("~15,000", 500.0, 1.5, "500 electrons/frame, background 1.5 sigma: noise-dominated"),
    Density("~22,000", 500.0, 1.0, "500 electrons/frame, background 1 sigma: noise-dominated"),
)


def density_frames(density: Density, n: int) -> tuple[np.ndarray, np.ndarray, Thresholds]:
    """n seeded frames of a density, the dark reference and thresholds from 40 frames spread over them."""
    cols = 50
    sim = FourDCameraSim(
        (-(-n // cols), cols), seed=1, loss_rate=0.0, pool_size=16, electrons_per_frame=density.electrons
    )
    frames = np.empty((n, *SHAPE), np.uint16)
    for i in range(n):
        frames[i] = sim.frame(i)
    dark = sim.dark_reference() - 11.0  # below the data: stempy's uint16 subtraction never wraps
    sample = frames[:: max(1, n // 40)][:40]
    thresholds = compute_thresholds(sample, dark=dark, background_n_sigma=density.background_n_sigma)
    return frames, dark, thresholds


def cpu_seconds_per_frame(
    engine: object,
    frames: np.ndarray,
    thresholds: Thresholds,
    dark: np.ndarray,
    batch: int,
    reference: list[np.ndarray] | None,
    repeats: int = 3,
) -> tuple[float, float, list[np.ndarray]]:
    """(CPU-seconds per frame, wall seconds per frame), medians of ``repeats`` passes; the first pass's events."""
    engine.count(frames[:batch], thresholds, dark=dark)  # type: ignore[attr-defined]  # warm-up
    cpu, wall, first = [], [], None
    for _ in range(repeats):
        events: list[np.ndarray] = []
        with Clock() as clock:
            for i in range(0, len(frames), batch):
                events += engine.count(frames[i : i + batch], thresholds, dark=dark)  # type: ignore[attr-defined]
        cpu.append(clock.cpu / len(frames))
        wall.append(clock.wall / len(frames))
        if reference is not None:
            same = all(np.array_equal(a, b) for a, b in zip(events, reference, strict=True))
            assert same, f"{getattr(engine, 'name', engine)} disagrees with stempy"
        first = first or events
    assert first is not None
    return float(np.median(cpu)), float(np.median(wall)), first


def density_sweep(n: int, batch: int, with_gpu: bool) -> None:
    cores = os.cpu_count() or 1
    columns = [("stempy", None), ("cpu", 1)] + ([("cpu", cores)] if cores > 1 else [])
    names = ["stempy"] + [f"cpu {t} thr" for _, t in columns[1:]]
    gpu = with_gpu and gpu_available()
    print(
        f"density sweep: {n} simulated frames per density, batches of {batch}, one process, {cores} cores.\n"
        "ms: CPU-milliseconds per frame (time.process_time, all threads of the process; median of 3 passes); "
        "x: stempy's ms / the engine's ms (per core). Every engine's events equal stempy's, frame by frame.\n"
    )
    head = f"{'events/frame':>12s}  {'bg, x-ray':>12s}  {'stempy ms':>9s}"
    for name in names[1:]:
        head += f"  {name + ' ms':>12s} {'x':>5s}"
    head += f"  {'gpu frames/s':>12s}" if gpu else ""
    print(head + "  setting")
    capacity: list[tuple[float, list[str]]] = []
    for density in DENSITIES:
        frames, dark, thresholds = density_frames(density, n)
        per_frame: list[float] = []
        reference = None
        for name, threads in columns:
            engine = get_engine(name, threads=threads)
            cpu_s, _, events = cpu_seconds_per_frame(engine, frames, thresholds, dark, batch, reference)
            reference = reference or events
            per_frame.append(cpu_s)
        gpu_rate = None
        if gpu:
            _, wall, _ = cpu_seconds_per_frame(get_engine("gpu"), frames, thresholds, dark, batch, reference)
            gpu_rate = 1 / wall
        mean_events = float(np.mean([e.size for e in reference or []]))
        row = f"{mean_events:12,.0f}  {f'{thresholds.background:.2f}, {thresholds.xray:.2f}':>12s}"
        row += f"  {1e3 * per_frame[0]:9.3f}"
        for s in per_frame[1:]:
            row += f"  {1e3 * s:12.3f} {per_frame[0] / s:5.1f}"
        row += f"  {gpu_rate:12,.0f}" if gpu_rate is not None else ""
        print(row + f"  {density.note}")
        needs = [str(math.ceil(DETECTOR_HZ * s)) for s in per_frame]
        if gpu_rate is not None:
            needs.append(f"{math.ceil(DETECTOR_HZ / gpu_rate)} GPU(s)")
        capacity.append((mean_events, needs))
        del frames
    print(f"\ncapacity: cores to count {DETECTOR_HZ:,} frames/s = 87,000 x CPU-seconds per frame, rounded up")
    print(f"{'events/frame':>12s}" + "".join(f"  {m:>10s}" for m in names) + (f"  {'gpu':>10s}" if gpu else ""))
    for mean_events, needs in capacity:
        print(f"{mean_events:12,.0f}" + "".join(f"  {x:>10s}" for x in needs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=2000, help="frames to count (default 2000)")
    parser.add_argument("--engines", default="stempy,cpu,gpu", help="comma-separated: stempy,cpu,gpu")
    parser.add_argument("--batch", type=int, default=64, help="frames per engine call (default 64)")
    parser.add_argument("--no-readers", action="store_true", help="skip stempy's PyReader and raw-file runs")
    parser.add_argument(
        "--streaming",
        default="stempy",
        help="engines to run the streaming count path with, comma-separated ('' to skip; default stempy)",
    )
    parser.add_argument("--sweep", action="store_true", help="run the density sweep only")
    parser.add_argument("--sweep-frames", type=int, default=256, help="frames per density (default 256)")
    args = parser.parse_args()
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    cores = os.cpu_count() or 1
    if args.sweep:
        density_sweep(args.sweep_frames, args.batch, "gpu" in engines)
        return

    print(f"making {args.frames} simulated frames ...", flush=True)
    sim, frames = make_frames(args.frames)
    # The simulator's dark is its mean background; lowered so that stempy's uint16 subtraction never wraps.
    dark = sim.dark_reference() - 11.0
    thresholds: Thresholds = compute_thresholds(frames[:: max(1, args.frames // 40)][:40], dark=dark)
    print(f"thresholds: background {thresholds.background:.2f}, x-ray {thresholds.xray:.2f}; {cores} cores\n")

    results: list[Result] = []
    reference = None
    if "stempy" in engines or not engines:
        result, reference = bench_engine("stempy", None, frames, thresholds, dark, args.batch, None)
        results.append(result)
    if "cpu" in engines:
        for threads in sorted({1, cores}):
            result, _ = bench_engine("cpu", threads, frames, thresholds, dark, args.batch, reference)
            results.append(result)
    if "gpu" in engines:
        if gpu_available():
            result, _ = bench_engine("gpu", None, frames, thresholds, dark, args.batch, reference)
            results.append(result)
        else:
            print("gpu: no CUDA device with cupy here, skipped")
    if not args.no_readers:
        results.append(bench_stempy_in_ram(frames, dark))
        workdir = Path(tempfile.mkdtemp(prefix="stemstream-bench-"))
        try:
            results.append(bench_stempy_files(sim, args.frames, dark, workdir))
        finally:
            shutil.rmtree(workdir, ignore_errors=True)

    base = next((r.rate for r in results if r.name == "stempy engine"), None)
    base_core = next((r.per_core for r in results if r.name == "stempy engine"), None)
    widths = {"frames/s": 9, "x stempy": 8, "threads": 7, "per core": 9}
    cells = [f"{c:>{widths[c]}s}" for c in ("frames/s", "x stempy", "threads", "per core", "x stempy")]
    print(f"{'method':38s} {' '.join(cells)}  note")
    for r in results:
        ratio = f"{r.rate / base:8.1f}" if base else f"{'-':>8s}"
        core_ratio = f"{r.per_core / base_core:8.1f}" if base_core else f"{'-':>8s}"
        row = f"{r.name:38s} {r.rate:9.0f} {ratio} {r.cores:7d} {r.per_core:9.0f} {core_ratio}"
        print(f"{row}  {r.note}")
    print("(frames/s: wall clock; per core: frames per CPU-second of this process)")
    if args.streaming:
        print("\nstreaming count path (same frame count; the simulator's frames, made in the producers):")
        workdir = Path(tempfile.mkdtemp(prefix="stemstream-bench-stream-"))
        try:
            stream = [bench_streaming_path(args.frames, e, dark, workdir) for e in args.streaming.split(",")]
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        in_ram = next((r for r in results if r.name.startswith("stempy electron_count, frames in RAM")), None)
        for r in stream:
            ratio = f"{r.rate / in_ram.rate:.2f} x stempy in RAM" if in_ram else ""
            print(f"{r.name:38s} {r.rate:9.0f} frames/s  {ratio}  ({r.note})")
        if in_ram:
            print(f"{'stempy electron_count, frames in RAM':38s} {in_ram.rate:9.0f} frames/s  (one core)")


if __name__ == "__main__":
    main()

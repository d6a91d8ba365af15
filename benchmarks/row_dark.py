"""Row-dark counting rate: stempy's whole-scan counter (the stempy engine) against the cpu (and gpu) engine.

    python benchmarks/row_dark.py [--frames 200] [--batch 64]

Simulated 576 x 576 frames (~20 electrons each, no dark: with one, stempy's row-dark scale leaves nothing to
count, docs/counting.md), thresholds from their first 40; each engine counts them in batches with row-dark
``mean`` and ``median`` and none, its events checked equal to the stempy engine's before its rate is printed.
"per core" is frames per CPU-second of this process (``time.process_time``, all threads).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from stemstream.counting import compute_thresholds, get_engine, gpu_available
from stemstream.sim import FourDCameraSim


def rate(engine, frames, thresholds, row_dark: str, batch: int) -> tuple[float, float, list[np.ndarray]]:
    engine.count(frames[:batch], thresholds, row_dark=row_dark)  # warm-up: compilation, buffers
    wall, cpu = time.perf_counter(), time.process_time()
    events: list[np.ndarray] = []
    for i in range(0, len(frames), batch):
        events += engine.count(frames[i : i + batch], thresholds, row_dark=row_dark)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return len(frames) / wall, len(frames) / max(cpu, 1e-9), events


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=200)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    sim = FourDCameraSim((1, args.frames), seed=3, loss_rate=0.0, pool_size=8)
    frames = np.stack([sim.frame(i) for i in range(args.frames)])
    thresholds = compute_thresholds(frames[:40])
    engines = {"stempy": get_engine("stempy"), "cpu, 1 thread": get_engine("cpu", threads=1)}
    engines["cpu, all threads"] = get_engine("cpu")
    if gpu_available():
        engines["gpu"] = get_engine("gpu")
    print(f"{args.frames} frames 576x576, batches of {args.batch}; frames/s (wall), frames per CPU-second")
    print(f"{'row_dark':8} {'engine':18} {'frames/s':>10} {'per core':>10} {'x stempy/core':>14}")
    for row_dark in ("none", "mean", "median"):
        reference = None
        base = None
        for name, engine in engines.items():
            wall, per_core, events = rate(engine, frames, thresholds, row_dark, args.batch)
            if reference is None:
                reference, base = events, per_core
            else:
                assert all(np.array_equal(a, b) for a, b in zip(events, reference, strict=True)), name
            print(f"{row_dark:8} {name:18} {wall:10.0f} {per_core:10.0f} {per_core / base:14.1f}")


if __name__ == "__main__":
    main()

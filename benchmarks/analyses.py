"""What the live analyses cost a NodeGroup rank: CPU per frame of each built-in on sparse frames.

    python benchmarks/analyses.py [--frames 8192] [--electrons 20 100] [--batches 4 16 64]

Events are the 4D Camera simulator's ground truth (~20 or ~100 electrons per frame, a bright-field disk
and a uniform background), all in RAM before any timing. Each analysis processes them in batches of the
counting engines' sizes (stempy 4, cpu 16, gpu 64), as ``RankAnalyses.process`` does after each counted
batch (packing the batch, which every analysis shares, is timed apart as "pack"); CPU seconds
(``time.process_time``) per frame, median of 3 passes. Then the rest of a rank's share: "send", the
once-a-second delta (``take`` + ``encode_partial``) per frame counted in that second at 1,000 frames/s, and
"recompute", a pass over the kept events after a detector change, per frame kept. The issue's budget is
0.1 ms (100 us) of CPU per frame for each built-in.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from stemstream.analyses import EventBatch, ScanGeometry, specs_for
from stemstream.analyses.rank import RankAnalyses, encode_partial
from stemstream.analyses.runner import AnalysisSet
from stemstream.sim.camera import FourDCameraSim

BUDGET_US = 100.0


def _events(frames: int, electrons: float) -> list[np.ndarray]:
    side = int(np.ceil(np.sqrt(frames)))
    sim = FourDCameraSim((side, side), seed=7, electrons_per_frame=electrons)
    return [sim.ground_truth(i) for i in range(frames)]


def _median_cpu(fn, passes: int = 3) -> float:
    times = []
    for _ in range(passes):
        t0 = time.process_time()
        fn()
        times.append(time.process_time() - t0)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=8192)
    parser.add_argument("--electrons", type=float, nargs="+", default=[20.0, 100.0])
    parser.add_argument("--batches", type=int, nargs="+", default=[4, 16, 64])
    args = parser.parse_args()
    names = ["sum", "virtual", "com", "radial"]
    worst = 0.0
    for electrons in args.electrons:
        events = _events(args.frames, electrons)
        side = int(np.ceil(np.sqrt(args.frames)))
        scan = ScanGeometry((side, side))
        mean = np.mean([e.size for e in events])
        print(f"\n{args.frames} frames, {mean:.1f} events per frame (us of CPU per frame, median of 3)")
        print(f"{'batch':>6} {'pack':>7} " + " ".join(f"{n:>8}" for n in [*names, "radial+pp"]))
        for size in args.batches:
            chunks = [
                (np.arange(lo, min(lo + size, len(events))), events[lo : lo + size])
                for lo in range(0, len(events), size)
            ]
            pack = _median_cpu(lambda chunks=chunks: [EventBatch.from_frames(f, e, (576, 576)) for f, e in chunks])
            row = [pack]
            for name, params in [(n, {}) for n in names] + [("radial", {"per_position": True})]:
                aset = AnalysisSet({name: params}, scan)
                analysis, partial = aset.analyses[name], aset.partials[name]
                analysis.process(partial, EventBatch.from_frames([0], [events[0]], (576, 576)))  # masks, maps

                def run(chunks=chunks, analysis=analysis, partial=partial):
                    for f, e in chunks:
                        analysis.process(partial, EventBatch.from_frames(f, e, (576, 576)))

                row.append(max(0.0, _median_cpu(run) - pack))
            us = [1e6 * t / len(events) for t in row]
            worst = max(worst, *us[1:])
            print(f"{size:>6} {us[0]:>7.2f} " + " ".join(f"{u:>8.2f}" for u in us[1:]))
        # The once-a-second delta and the recompute after a detector change, all four built-ins together.
        rank = RankAnalyses(specs_for(names), 0)
        rank.begin(1, scan.scan_shape, scan.frame_shape)
        for lo in range(0, len(events), 16):
            rank.process(1, list(range(lo, min(lo + 16, len(events)))), events[lo : lo + 16])
        per_second = 1000
        sends = []
        for _ in range(3):
            sample = AnalysisSet(specs_for(names), scan)
            for lo in range(0, per_second, 16):
                sample.process(EventBatch.from_frames(np.arange(lo, lo + 16), events[lo : lo + 16], (576, 576)))
            t0 = time.process_time()
            for partial in sample.take().values():
                encode_partial(partial)
            sends.append(time.process_time() - t0)
        send = statistics.median(sends) / per_second
        centres = iter(range(10))

        def recompute(rank: RankAnalyses = rank, centres=centres) -> None:
            centre = [280.0 + next(centres), 290.0]
            virtual = {"detectors": {"bf": [0, 30], "adf": [70, 250]}, "center": centre}
            specs = {"virtual": virtual, "radial": {"center": centre}}
            rank.apply({"kind": "analysis_params", "scan": 1, "specs": specs})

        again = _median_cpu(recompute) / len(events)
        print(f"send (delta of 1 s at {per_second} frames/s, 4 built-ins): {1e6 * send:.2f} us per frame")
        print(f"recompute virtual + radial from kept events: {1e6 * again:.2f} us per frame kept")
    verdict = "OK" if worst < BUDGET_US else "OVER"
    print(f"\nworst built-in: {worst:.1f} us per frame (budget {BUDGET_US:.0f} us): {verdict}")
    return 0 if worst < BUDGET_US else 1


if __name__ == "__main__":
    raise SystemExit(main())

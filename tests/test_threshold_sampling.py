"""Threshold sampling (docs/counting.md, Threshold sampling): one seeded choice of sample frames on every path.

The same raw data counted while streaming (a CountingService, one rank, in this process) and by
``stemstream count`` (:func:`count_raw_files`, with stempy and with the cpu engine) must take the same sample
frames, so give identical thresholds, identical stability figures and identical events; the draw is seeded, so
it is the same from run to run and process to process.
"""

from __future__ import annotations

import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from stemstream.config import environment
from stemstream.counting import compute_thresholds, count_raw_files, read_counted
from stemstream.counting.params import CountingParams
from stemstream.counting.thresholds import choose_sample, sample_candidates, sample_halves
from stemstream.nodes.config import CountingConfig
from stemstream.nodes.consumer import ScanInfo, ScanSummary
from stemstream.nodes.ranks import LocalTransport
from stemstream.nodes.service import CountingService
from stemstream.scans import keys
from stemstream.scans.records import PreviewRecord
from stemstream.sim import FourDCameraSim
from stemstream.store import StoreClient
from stemstream.wire.rawfile import RawScanWriter

SCAN = (8, 10)  # 80 frames
SAMPLES, WINDOW = 12, 60
SECTOR_ROWS = 144


def test_candidates_are_seeded_the_same_in_every_process():
    here = sample_candidates(1000, 40, 400).tolist()
    assert here == sample_candidates(1000, 40, 400).tolist()
    code = "from stemstream.counting.thresholds import sample_candidates as s; print(s(1000, 40, 400).tolist())"
    there = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert there.stdout.strip() == str(here)
    # Pinned: a change of the draw changes every sample a site has recorded; make it on purpose.
    assert here[:8] == [311, 12, 14, 83, 146, 5, 111, 86]


def test_window_equal_to_samples_is_the_first_complete_frames_and_a_wider_one_spreads():
    first = sample_candidates(1000, 40, 40)
    assert sorted(first[:40].tolist()) == list(range(40))
    assert first[40:].tolist() == list(range(40, 80))  # stand-ins for incomplete frames, in order
    incomplete = {3, 17, 39}
    chosen = choose_sample(first, lambda f: f not in incomplete, 40)
    assert sorted(chosen) == [f for f in range(80) if f not in incomplete][:40]

    spread = sample_candidates(1000, 40, 400)
    assert spread.size == 80 and len(set(spread.tolist())) == 80
    assert max(spread.tolist()) < 400 and max(spread[:40].tolist()) > 300
    # A scan smaller than the window: drawn from all of it.
    assert sorted(sample_candidates(30, 40, 400).tolist()) == list(range(30))
    # Halves: every other frame of the sample in its drawn order, disjoint, together the sample.
    a, b = sample_halves(chosen)
    assert not set(a) & set(b) and sorted(a + b) == sorted(chosen) and len(a) == len(b) == 20


def _scan(directory: Path) -> tuple[np.ndarray, set[tuple[int, int]], np.ndarray]:
    """Raw files of a simulated scan with lost sectors (some inside the sample's window), and the frames as
    assembled (lost sectors zeroed)."""
    sim = FourDCameraSim(SCAN, scan_number=4, seed=21, loss_rate=0.04, pool_size=6, xray_rate=0.5)
    lost = set(sim.lost_sectors()) | {(7, m) for m in range(4)}  # frame 7: nothing of it arrives
    frames = np.stack([sim.frame(i) for i in range(sim.n_frames)])
    with RawScanWriter(directory, sim.scan_number, SCAN) as writer:
        for i in range(sim.n_frames):
            for m in range(4):
                if (i, m) in lost:
                    frames[i, m * SECTOR_ROWS : (m + 1) * SECTOR_ROWS] = 0
                else:
                    writer.write(i, m, sim.sector(i, m))
    assert {f for f, _ in lost if f < WINDOW} - {7}, "the seed must lose sectors inside the window"
    return frames, lost, sim.dark_reference() - 11.0


def _stream(tmp_path: Path, client: StoreClient, frames: np.ndarray, lost: set, params: CountingParams) -> dict:
    config = CountingConfig(output_dir=tmp_path / "stream", params=params, workers=0, preview_interval_s=0.1)
    service = CountingService(config, transport=LocalTransport(), uids=["ng"], store=client).start()
    try:
        consumer = service.consumer("ng")
        consumer.begin_scan(ScanInfo(4, SCAN, (576, 576), 4, ("ng",), 0))
        incomplete = []
        for f in range(frames.shape[0]):
            consumer.frame_buffer(4, f)[...] = frames[f]
            missing = tuple(m for m in range(4) if (f, m) in lost)
            consumer.frame_ready(4, f, missing)
            if missing:
                incomplete.append((f, missing))
        n = frames.shape[0]
        summary = ScanSummary(
            expected=4 * n, received=4 * n - len(lost), frames_complete=n - len(incomplete),
            frames_incomplete=len(incomplete), incomplete=incomplete, status="received",
        )  # fmt: skip
        consumer.end_scan(4, summary)
        record = service.wait_written(4, timeout=60)
        deadline = time.monotonic() + 10  # the final preview follows the events to rank 0
        while time.monotonic() < deadline:
            preview = PreviewRecord.parse(client.get(keys.preview(4, 0)))
            if preview is not None and preview.final:
                break
            time.sleep(0.05)
    finally:
        service.stop()
    assert record["status"] == "counted", record
    record["preview"] = preview
    return record


def test_streaming_and_count_take_the_same_sample_thresholds_and_events(tmp_path: Path, client: StoreClient):
    raw = tmp_path / "raw"
    raw.mkdir()
    frames, lost, dark = _scan(raw)
    np.save(tmp_path / "dark.npy", dark)
    params = {"threshold_samples": SAMPLES, "threshold_window": WINDOW, "dark": tmp_path / "dark.npy"}
    with environment(dark_dir=tmp_path):  # a dark must lie under the dark directory
        counting = {engine: CountingParams(engine=engine, **params) for engine in ("stempy", "cpu")}
    streamed = _stream(tmp_path, client, frames, lost, counting["cpu"])
    files = {
        engine: count_raw_files(raw, tmp_path / f"{engine}.h5", scan_number=4, params=counting[engine])
        for engine in ("stempy", "cpu")
    }
    s_data, s_meta = read_counted(streamed["path"])
    sample = [int(f) for f in s_meta["threshold_sample_frames"]]

    # The sample: SAMPLES complete frames, spread over the window (not the first ones), as documented.
    incomplete = {f for f, _ in lost}
    assert len(sample) == SAMPLES and not set(sample) & incomplete and max(sample) < WINDOW
    assert sorted(sample) != [f for f in range(WINDOW) if f not in incomplete][:SAMPLES]
    want = compute_thresholds(frames[sorted(sample)], dark=dark)
    assert (s_meta["thresholds"].background, s_meta["thresholds"].xray) == (want.background, want.xray)

    # The stability figure: each half of the sample on its own, recorded as [[bg, xray] of A, of B].
    halves = np.asarray(s_meta["threshold_halves"])
    assert halves.shape == (2, 2)
    for row, half in zip(halves, sample_halves(sample), strict=True):
        t = compute_thresholds(frames[half], dark=dark)
        assert row.tolist() == [t.background, t.xray]
    assert not np.array_equal(halves[0], halves[1])  # two different halves: a figure, not a copy

    # stemstream count, with stempy and with our engine: the same sample, thresholds, figure and events.
    s_events = np.asarray(s_data.data).ravel()
    for engine, path in files.items():
        data, meta = read_counted(path)
        assert [int(f) for f in meta["threshold_sample_frames"]] == sample, engine
        assert meta["thresholds"] == s_meta["thresholds"], engine
        np.testing.assert_array_equal(meta["threshold_halves"], halves)
        events = np.asarray(data.data).ravel()
        differ = [f for f in range(len(events)) if not np.array_equal(events[f], s_events[f])]
        assert not differ, f"{engine}: frames {differ[:10]} differ from the streamed file"

    # The scan's preview carries the thresholds and the same figure.
    preview = streamed["preview"]
    assert preview is not None and preview.final
    assert preview.thresholds == (want.background, want.xray)
    assert [list(h) for h in preview.threshold_halves] == halves.tolist()
    assert all(math.isfinite(x) for h in preview.threshold_halves for x in h)

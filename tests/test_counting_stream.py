"""Counting on the NodeGroups, with real processes: the streamed-and-counted file against stempy itself.

stempy reads the same simulated scan from raw files (its multi-pass reader assembles the frames, lost
sectors zero-filled) and counts every frame with ``stempy.image.electron_count_frame`` at the thresholds
the streamed file records; the events must be identical frame by frame. The thresholds themselves must be
stempy's for the seeded sample (docs/counting.md), and ``stemstream count`` on the same raw files must take
the same sample and give the same thresholds and events. An MPI job of 2 ranks x 2 NodeGroups must write the
same file as 1 rank x 1 NodeGroup.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

from plane_helpers import ProcessTree, start_store, store_client
from stemstream.config import environment
from stemstream.scans import keys

SCAN = 3
SHAPE = (24, 24)
SEED = 5
LOSS = 0.004  # enough that some frames are incomplete, some entirely lost sectors in the sample window


def _sim():
    from stemstream.sim import FourDCameraSim

    return FourDCameraSim(SHAPE, scan_number=SCAN, seed=SEED, loss_rate=LOSS)


def _dark_file(tmp_path: Path) -> Path:
    # Below the simulator's dark level, so that stempy's uint16 subtraction never wraps (docs/counting.md).
    path = tmp_path / "dark.npy"
    np.save(path, _sim().dark_reference() - 11.0)
    return path


def _stream_and_count(
    tmp_path: Path,
    *,
    ranks: int,
    groups_per_rank: int,
    engine: str,
    dark: Path,
    window: int = 40,
    row_dark: str = "none",
) -> dict:
    """Run store + aggregator + NodeGroups (under mpiexec when ranks > 1) + 4 producers; one scan."""
    from stemstream.plane.requests import request_scan
    from stemstream.store import Registry

    out = tmp_path / "counted"
    with ProcessTree(tmp_path / "logs", env={"STEMSTREAM_DARK_DIR": str(dark.parent)}) as tree:
        address = start_store(tree)
        tree.start("aggregator", "aggregator", "--store", address)
        args = ["nodegroup", "--store", address, "--consumer", "count", "--count", groups_per_rank]
        args += ["--output-dir", out, "--engine", engine, "--dark", dark, "--uid", "ng", "--threshold-window", window]
        args += ["--row-dark", row_dark]
        if ranks > 1:
            mpiexec = Path(sys.executable).parent / "mpiexec"
            argv = [str(mpiexec), "-n", str(ranks), sys.executable, "-m", "stemstream.cli", *map(str, args)]
            tree.start_argv("nodegroups", argv)
        else:
            tree.start("nodegroups", *args)
        with store_client(address) as client:
            registry = Registry(client)
            registry.wait_for_members("aggregator", 1, status="ready", timeout=60)
            registry.wait_for_members("nodegroup", ranks * groups_per_rank, status="ready", timeout=90)
            for m in range(4):
                tree.start(f"producer-{m}", "producer", "--store", address, "--sector", m, "--threads", 2)
            registry.wait_for_members("producer", 4, status="ready", timeout=60)
            request_scan(client, SCAN, SHAPE, seed=SEED, loss_rate=LOSS)
            key = keys.counted(SCAN)
            record = client.wait_for(lambda items: key in items, prefix=key, timeout=240)[key]
            tree.check_alive()
            assert record["status"] == "counted", record
            return record


def _stempy_from_raw_files(files: list[Path], thresholds, dark: np.ndarray) -> list[np.ndarray]:
    import stempy.image as simage
    import stempy.io as sio

    reader = sio.reader([str(f) for f in files], version=sio.FileVersion.VERSION5, backend="multi-pass")
    events = []
    for position in range(SHAPE[0] * SHAPE[1]):
        blocks = list(reader.read_frames(position))
        if not blocks:  # every sector of the frame lost: stempy has no frame, so no events
            events.append(np.zeros(0, np.uint32))
            continue
        (block,) = blocks
        frame = np.asarray(block.data).reshape(576, 576)
        counted = simage.electron_count_frame(
            frame,
            darkreference=dark,
            background_threshold=thresholds.background,
            xray_threshold=thresholds.xray,
        )
        events.append(np.asarray(counted.data[0, 0], dtype=np.uint32))
    return events


@pytest.mark.slow
def test_streamed_counts_equal_stempy_reading_raw_files(tmp_path: Path):
    from stemstream.counting import compute_thresholds, count_raw_files, counting_params, read_counted
    from stemstream.wire.rawfile import write_scan

    sim = _sim()
    lost = sim.lost_sectors()
    assert {f for f, _ in lost if f < 80}, "the seed must lose sectors inside the threshold sample window"
    dark_path = _dark_file(tmp_path)
    dark = np.load(dark_path)
    window = 200  # the sample spread over the first 200 frames (docs/counting.md, Threshold sampling)
    record = _stream_and_count(tmp_path, ranks=1, groups_per_rank=2, engine="stempy", dark=dark_path, window=window)

    sparse, meta = read_counted(record["path"])
    assert tuple(sparse.scan_shape) == SHAPE and tuple(sparse.frame_shape) == (576, 576)
    thresholds = meta["thresholds"]

    # Thresholds: stempy's, from 40 complete frames of the first 200, whoever received them.
    incomplete = {f for f, _ in lost}
    sample = [int(f) for f in meta["threshold_sample_frames"]]
    assert len(set(sample)) == 40 and not set(sample) & incomplete and max(sample) < window
    want = compute_thresholds(np.stack([sim.frame(f) for f in sorted(sample)]), dark=dark)
    assert (thresholds.background, thresholds.xray) == (want.background, want.xray)

    # Events: identical to stempy's, frame by frame, incomplete frames included.
    ours = [np.asarray(e, dtype=np.uint32) for e in np.asarray(sparse.data).ravel()]
    files = write_scan(sim, tmp_path / "raw")
    theirs = _stempy_from_raw_files(files, thresholds, dark)
    assert len(ours) == len(theirs) == SHAPE[0] * SHAPE[1]
    differ = [f for f, (a, b) in enumerate(zip(ours, theirs, strict=True)) if not np.array_equal(a, b)]
    assert not differ, f"frames {differ[:10]} differ from stempy's"

    # stemstream count on the same raw files, with stempy: the same sample, thresholds, figure and events.
    with environment(dark_dir=tmp_path):
        params = counting_params(engine="stempy", dark=dark_path, threshold_window=window)
        counted, counted_meta = read_counted(
            count_raw_files(files, tmp_path / "count.h5", scan_number=SCAN, params=params)
        )
    assert [int(f) for f in counted_meta["threshold_sample_frames"]] == sample
    assert counted_meta["thresholds"] == thresholds
    np.testing.assert_array_equal(counted_meta["threshold_halves"], meta["threshold_halves"])
    assert np.isfinite(meta["threshold_halves"]).all()
    assert all(np.array_equal(a, b) for a, b in zip(ours, np.asarray(counted.data).ravel(), strict=True))
    assert record["events"] == sum(e.size for e in ours) > 0

    # Metadata and accounting.
    assert sorted(map(tuple, meta["missing_sectors"].tolist())) == sorted(lost)
    assert meta["frames_incomplete"] == record["frames_incomplete"] == len(incomplete)
    assert meta["messages"]["received"] + meta["messages"]["lost_upstream"] == 4 * SHAPE[0] * SHAPE[1]
    assert meta["timings"]["last_frame"] >= meta["timings"]["first_frame"] > 0
    assert record["seconds_after_last_frame"] >= 0

    # Against the simulator's ground truth, in frames whose sectors all arrived.
    hits = truth_total = found_total = 0
    for f in range(SHAPE[0] * SHAPE[1]):
        if f in incomplete:
            continue
        truth = set(sim.ground_truth(f).tolist())
        found = set(ours[f].tolist())
        hits += len(truth & found)
        truth_total += len(truth)
        found_total += len(found)
    recall, precision = hits / truth_total, hits / found_total
    print(f"recall {recall:.4f}, precision {precision:.4f} over {truth_total} strikes")
    assert recall >= 0.95 and precision >= 0.95


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists(Path(sys.executable).parent / "mpiexec"), reason="no mpiexec in the venv")
def test_two_ranks_of_two_nodegroups_write_the_same_file_as_one(tmp_path: Path):
    import h5py

    from stemstream.counting import read_counted

    dark = _dark_file(tmp_path)
    one = _stream_and_count(tmp_path / "one", ranks=1, groups_per_rank=1, engine="cpu", dark=dark)
    four = _stream_and_count(tmp_path / "four", ranks=2, groups_per_rank=2, engine="cpu", dark=dark)
    assert four["ranks"] == 2 and len(four["members"]) == 4 and len(one["members"]) == 1

    a, meta_a = read_counted(one["path"])
    b, meta_b = read_counted(four["path"])
    assert meta_a["thresholds"] == meta_b["thresholds"]
    assert list(meta_a["threshold_sample_frames"]) == list(meta_b["threshold_sample_frames"])
    for x, y in zip(np.asarray(a.data).ravel(), np.asarray(b.data).ravel(), strict=True):
        assert np.array_equal(x, y)
    np.testing.assert_array_equal(meta_a["missing_sectors"], meta_b["missing_sectors"])
    with h5py.File(one["path"]) as fa, h5py.File(four["path"]) as fb:
        assert set(fa.keys()) == set(fb.keys())
        np.testing.assert_array_equal(fa["electron_events/frames"][()].shape, fb["electron_events/frames"][()].shape)


def test_a_streamed_scan_is_counted_with_the_sessions_dark_and_row_dark(tmp_path: Path):
    """The NodeGroups take --dark and --row-dark (CountingParams): the file records both (the dark's path and
    SHA-256) and its events equal stemstream count's with the stempy engine (stempy's whole-scan row-dark)
    on the same scan's raw files, frame by frame."""
    import hashlib

    from stemstream.counting import count_raw_files, counting_params, read_counted
    from stemstream.wire.rawfile import write_scan

    # A small dark: with stempy's row-dark the scale is optimized mean / raw mean, so a dark near the data's
    # level would leave no event to compare (docs/counting.md, Row-dark).
    dark_path = tmp_path / "dark.npy"
    np.save(dark_path, np.full((576, 576), 2.0, np.float32))
    record = _stream_and_count(tmp_path, ranks=1, groups_per_rank=2, engine="cpu", dark=dark_path, row_dark="mean")
    sparse, meta = read_counted(record["path"])
    assert meta["row_dark"] == "mean" and meta["dark"] == str(dark_path.resolve())
    assert meta["dark_sha256"] == hashlib.sha256(dark_path.read_bytes()).hexdigest()
    assert meta["counting_options"]["apply_row_dark_subtraction"] and meta["counting_options"]["dark_reference"]
    files = write_scan(_sim(), tmp_path / "raw")
    with environment(dark_dir=tmp_path):
        params = counting_params(engine="stempy", dark=dark_path, row_dark="mean")
        theirs, their_meta = read_counted(count_raw_files(files, tmp_path / "c.h5", scan_number=SCAN, params=params))
    assert their_meta["thresholds"] == meta["thresholds"]
    ours, theirs = np.asarray(sparse.data).ravel(), np.asarray(theirs.data).ravel()
    assert sum(e.size for e in ours) > 0
    differ = [f for f, (a, b) in enumerate(zip(ours, theirs, strict=True)) if not np.array_equal(a, b)]
    assert not differ, f"frames {differ[:10]} differ from stempy's"

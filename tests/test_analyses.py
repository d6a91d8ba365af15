"""Analyses of counted events (stemstream.analyses), offline: every built-in that stempy has equals stempy's
sparse function on the same counted file; those stempy lacks (annulus, DPC, centre finding) equal a numpy
reference on dense frames from the simulator; partials split over "ranks" and batches merge to the one-pass
result; a plug-in from a package of its own (entry point) runs; ``stemstream analyse`` writes the
``/analyses`` group that stempy's loader ignores, and PNGs.

The live path (NodeGroups, 2 ranks) is tests/test_analyses_live.py.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from stemstream.analyses import EventBatch, ScanGeometry, analyse_events, merge, specs_for
from stemstream.analyses.builtin import find_centre
from stemstream.analyses.runner import AnalysisSet, settle
from stemstream.errors import AnalysisError

SHAPE = (24, 20)
PLUGIN = Path(__file__).parent / "data" / "plugin"
EMPTY = (0, 7, 8, 100, 479)  # frames without events (as frames whose sectors were all lost)


def _sim(shape=SHAPE, seed=4):
    from stemstream.sim import FourDCameraSim

    return FourDCameraSim(shape, seed=seed)


def _events(shape=SHAPE, seed=4, empty=EMPTY) -> list[np.ndarray]:
    sim = _sim(shape, seed)
    events = [sim.ground_truth(i) for i in range(sim.n_frames)]
    for f in empty:
        events[f] = np.zeros(0, np.uint32)
    return events


@pytest.fixture(scope="module")
def counted(tmp_path_factory) -> Path:
    """A counted file (write_counted, stempy's layout) of a simulated scan with some empty frames."""
    from stemstream.counting import write_counted

    path = tmp_path_factory.mktemp("analyses") / "scan_9_counted.h5"
    return write_counted(path, _events(), scan_shape=SHAPE, metadata={"scan_number": 9})


@pytest.fixture(scope="module")
def sparse(counted):
    import stempy.io as sio

    return sio.load_electron_counts(str(counted))


@pytest.fixture(scope="module")
def ours(counted):
    from stemstream.analyses.files import analyse_file

    outcomes, _ = analyse_file(
        counted, ["sum", "virtual", "com", "radial"], {"radial": {"per_position": True}}, write=False, pngs=False
    )
    return outcomes


# ---- equal to stempy, on the same counted file


def test_summed_pattern_equals_stempy_calculate_sum_sparse(sparse, ours):
    import stempy.image as si

    theirs = si.calculate_sum_sparse(sparse.data, sparse.frame_shape)
    mine = ours["sum"].results["pattern"]
    assert mine.dtype == theirs.dtype and mine.shape == theirs.shape
    assert np.array_equal(mine, theirs) and mine.sum() > 0


def test_bright_field_equals_stempy_virtual_darkfield_at_the_found_centre(sparse, ours):
    import stempy.image as si

    row, col = ours["virtual"].params["center"]
    assert ours["virtual"].params["center_auto"] is True
    assert np.array_equal(ours["virtual"].results["center"], [row, col])
    theirs = si.virtual_darkfield(sparse, col, row, 60.0)  # stempy: centers_x is the column
    assert np.array_equal(ours["virtual"].results["bf"], theirs) and theirs.sum() > 0
    # The annulus is the outer disk less the inner one: stempy's difference, exactly.
    adf = si.virtual_darkfield(sparse, col, row, 250.0).astype(np.int64) - si.virtual_darkfield(sparse, col, row, 70.0)
    assert np.array_equal(ours["virtual"].results["adf"], adf)


@pytest.mark.parametrize("centre,radius", [((287.0, 287.0), 5.0), ((280.5, 291.25), 33.0), ((0.0, 575.0), 100.0)])
def test_bright_field_equals_stempy_at_given_centres_on_exact_pixel_distances(sparse, counted, centre, radius):
    """Integer centres and radii put pixels exactly on the rim: stempy counts ``r < radius``, so do we."""
    import stempy.image as si

    from stemstream.analyses.files import load_events

    events, scan = load_events(counted)
    specs = {"virtual": {"detectors": {"bf": [0, radius]}, "center": list(centre)}}
    out = analyse_events(specs, events, scan)["virtual"]
    assert out.params["center_auto"] is False and out.params["center"] == list(centre)
    assert np.array_equal(out.results["bf"], si.virtual_darkfield(sparse, centre[1], centre[0], radius))


@pytest.mark.parametrize("replace_nans", [True, False])
@pytest.mark.parametrize("version", [0, 1])
def test_centre_of_mass_equals_stempy_com_sparse(sparse, counted, replace_nans, version):
    """float32 after the same cast, stempy's (y, x) order (com[0] the mean column), empty frames NaN or
    replaced by the mean (stempy's default), for both of stempy's implementations."""
    import stempy.image as si

    from stemstream.analyses.files import load_events

    events, scan = load_events(counted)
    out = analyse_events({"com": {"replace_nans": replace_nans}}, events, scan)["com"]
    theirs = si.com_sparse(sparse, replace_nans=replace_nans, version=version)
    mine = out.results["com"]
    assert mine.dtype == theirs.dtype == np.float32 and mine.shape == theirs.shape == (2, *SHAPE)
    assert np.array_equal(mine, theirs, equal_nan=True)
    empty = np.unravel_index(list(EMPTY), SHAPE)
    assert np.isnan(mine[0][empty]).all() != replace_nans


@pytest.mark.filterwarnings("ignore:Mean of empty slice")
def test_centre_of_mass_of_a_scan_without_events_equals_stempy(tmp_path):
    import stempy.image as si
    import stempy.io as sio

    from stemstream.counting import write_counted

    path = write_counted(tmp_path / "empty.h5", [np.zeros(0, np.uint32)] * 12, scan_shape=(3, 4))
    sparse = sio.load_electron_counts(str(path))
    events = [np.zeros(0, np.uint32)] * 12
    out = analyse_events(specs_for(["com", "sum", "virtual", "radial"]), events, ScanGeometry((3, 4)))
    assert np.array_equal(out["com"].results["com"], si.com_sparse(sparse), equal_nan=True)
    assert np.isnan(out["com"].results["com"]).all()
    assert out["sum"].results["pattern"].sum() == 0 and out["virtual"].results["bf"].sum() == 0
    assert out["virtual"].params["center"] == [287.5, 287.5]  # a flat pattern: the frame centre


def test_radial_profile_equals_stempy_radial_sum_sparse(sparse, ours):
    import stempy.image as si

    centre = ours["radial"].params["center"]
    assert centre == ours["virtual"].params["center"]
    theirs = si.radial_sum_sparse(sparse, centre)  # stempy: center is (row, col)
    mine = ours["radial"].results["per_position"]
    assert mine.shape == theirs.shape and np.array_equal(mine, theirs)
    assert np.array_equal(ours["radial"].results["profile"], theirs.sum(axis=(0, 1)))


@pytest.mark.parametrize("centre", [[287.0, 287.0], [10.0, 20.0], [300.5, 250.25]])
def test_radial_profile_equals_stempy_at_given_centres(sparse, counted, centre):
    """Integer centres put events exactly on bin edges (and on the closed last edge)."""
    import stempy.image as si

    from stemstream.analyses.files import load_events

    events, scan = load_events(counted)
    out = analyse_events({"radial": {"center": centre, "per_position": True}}, events, scan)["radial"]
    assert np.array_equal(out.results["per_position"], si.radial_sum_sparse(sparse, centre))


def test_events_on_bin_edges_and_rims_equal_stempy(tmp_path):
    """Events placed exactly on the radial bins' edges (the last one closed: r = 288 counts, beyond does
    not) and on a detector's rim, from an integer centre."""
    import stempy.image as si
    import stempy.io as sio

    from stemstream.counting import write_counted

    centre = (287, 287)
    flat = lambda r, c: r * 576 + c  # noqa: E731
    frames = [
        [flat(287, 287), flat(287, 288), flat(287, 289)],  # r = 0, 1, 2
        [flat(575, 287), flat(287 - 287, 287), flat(287, 0)],  # r = 288 (last edge), 287, 287
        [flat(287 + 240, 287 + 166), flat(287 + 166, 287 + 240)],  # r = 291.8..: beyond the last bin
        [flat(287 + 30, 287 + 40), flat(287 + 40, 287 + 30), flat(287 + 50, 287)],  # r = 50 exactly, 3 times
        [],
        [flat(575, 575), flat(0, 0)],
    ]
    events = [np.asarray(sorted(f), np.uint32) for f in frames]
    path = write_counted(tmp_path / "edges.h5", events, scan_shape=(2, 3))
    sparse = sio.load_electron_counts(str(path))
    specs = {
        "radial": {"center": list(centre), "per_position": True},
        "virtual": {"center": list(centre), "detectors": {"bf": [0, 50], "wide": [0, 288]}},
    }
    out = analyse_events(specs, events, ScanGeometry((2, 3)))
    assert np.array_equal(out["radial"].results["per_position"], si.radial_sum_sparse(sparse, centre))
    assert out["radial"].results["profile"][287] == 3  # two at 287, one at 288 exactly
    for name, radius in (("bf", 50), ("wide", 288)):
        assert np.array_equal(out["virtual"].results[name], si.virtual_darkfield(sparse, centre[1], centre[0], radius))
    assert out["virtual"].results["bf"].ravel()[3] == 0  # on the rim: not inside


# ---- equal to a numpy reference on dense frames (what stempy lacks)


@pytest.fixture(scope="module")
def dense() -> np.ndarray:
    """The simulated scan as dense frames: 1 where an electron struck, 0 elsewhere."""
    events = _events()
    frames = np.zeros((len(events), 576, 576), np.uint8)
    for f, e in enumerate(events):
        frames[f].flat[e] = 1
    return frames


def _reference_centre(pattern: np.ndarray, b: int = 4) -> tuple[float, float]:
    """find_centre's definition, written out on a dense pattern with loops over blocks."""
    r, c = pattern.shape[0] // b, pattern.shape[1] // b
    blocks = np.zeros((r, c))
    for i in range(r):
        for j in range(c):
            blocks[i, j] = pattern[i * b : (i + 1) * b, j * b : (j + 1) * b].sum()
    smooth = np.zeros((r, c))
    for i in range(r):
        for j in range(c):
            smooth[i, j] = blocks[max(i - 1, 0) : i + 2, max(j - 1, 0) : j + 2].sum()
    keep = smooth >= (smooth.min() + smooth.max()) / 2
    yy, xx = np.mgrid[0:r, 0:c] * b + (b - 1) / 2
    w = np.where(keep, smooth, 0)
    return (yy * w).sum() / w.sum(), (xx * w).sum() / w.sum()


def test_centre_found_from_the_summed_pattern_equals_a_numpy_reference(dense, ours):
    ry, rx = _reference_centre(dense.sum(axis=0, dtype=np.int64))
    assert ours["virtual"].params["center"] == [round(ry, 1), round(rx, 1)]
    assert abs(ry - 287.5) < 2 and abs(rx - 287.5) < 2  # the simulator's disk is at the frame centre


@pytest.mark.parametrize("shift", [(13, -21), (-30, 8)])
def test_centre_finding_follows_a_shifted_disk(dense, shift):
    """The disk moved on the detector (frames rolled): the centre found moves with it."""
    rolled = np.roll(dense, shift, axis=(1, 2))
    events = [np.flatnonzero(frame).astype(np.uint32) for frame in rolled]
    out = analyse_events(specs_for(["virtual"]), events, ScanGeometry(SHAPE))["virtual"]
    ry, rx = _reference_centre(rolled.sum(axis=0, dtype=np.int64))
    assert out.params["center"] == [round(ry, 1), round(rx, 1)]
    assert abs(ry - 287.5 - shift[0]) < 2 and abs(rx - 287.5 - shift[1]) < 2


@pytest.mark.parametrize("inner,outer", [(20.0, 45.5), (55.0, 57.0), (0.0, 1000.0)])
def test_annulus_equals_a_numpy_reference(dense, inner, outer):
    centre = (283.25, 290.0)
    yy, xx = np.mgrid[0:576, 0:576]
    r = np.sqrt((yy - centre[0]) ** 2 + (xx - centre[1]) ** 2)
    ring = ((r >= inner) & (r < outer)).astype(np.uint8)
    want = np.einsum("fij,ij->f", dense, ring, dtype=np.int64).reshape(SHAPE)
    events = [np.flatnonzero(frame).astype(np.uint32) for frame in dense]
    specs = {"virtual": {"detectors": {"ring": [inner, outer]}, "center": list(centre)}}
    out = analyse_events(specs, events, ScanGeometry(SHAPE))["virtual"]
    assert np.array_equal(out.results["ring"], want)


@pytest.mark.parametrize("rotation", [0.0, 30.0, -117.5])
@pytest.mark.parametrize("reference", [None, [280.0, 290.5]])
def test_dpc_equals_a_numpy_reference(dense, rotation, reference):
    yy, xx = np.mgrid[0:576, 0:576]
    total = dense.sum(axis=(1, 2), dtype=np.int64)
    with np.errstate(invalid="ignore", divide="ignore"):
        cy = np.einsum("fij,ij->f", dense, yy, dtype=np.int64) / total
        cx = np.einsum("fij,ij->f", dense, xx, dtype=np.int64) / total
    pattern = dense.sum(axis=0, dtype=np.int64)
    ref = reference or [(pattern * yy).sum() / pattern.sum(), (pattern * xx).sum() / pattern.sum()]
    t = np.radians(rotation)
    dx, dy = cx - ref[1], cy - ref[0]
    ux, uy = dx * np.cos(t) - dy * np.sin(t), dx * np.sin(t) + dy * np.cos(t)
    events = [np.flatnonzero(frame).astype(np.uint32) for frame in dense]
    out = analyse_events({"com": {"rotation_deg": rotation, "reference": reference}}, events, ScanGeometry(SHAPE))
    res = out["com"].results
    np.testing.assert_allclose(res["reference"], ref, rtol=1e-12)
    mag, ang = np.hypot(ux, uy).astype(np.float32), np.arctan2(uy, ux).astype(np.float32)
    np.testing.assert_allclose(res["dpc_magnitude"].ravel(), mag, rtol=1e-6, atol=1e-6, equal_nan=True)
    np.testing.assert_allclose(res["dpc_angle"].ravel(), ang, rtol=1e-6, atol=1e-6, equal_nan=True)
    assert np.isnan(res["dpc_magnitude"].ravel()[list(EMPTY)]).all()
    assert np.isfinite(np.delete(res["dpc_magnitude"].ravel(), list(EMPTY))).all()


# ---- partials: split any way, merged, the same


@pytest.mark.parametrize("ranks,batch", [(1, 1), (2, 5), (3, 64), (4, 7)])
def test_partials_split_over_ranks_and_batches_merge_to_the_one_pass_result(ranks, batch):
    """What the NodeGroups do: each rank adds its own frames (any order, any batch size), rank 0 adds the
    ranks' partials (taken in several deltas), then refines and finishes."""
    events = _events()
    scan = ScanGeometry(SHAPE)
    specs = specs_for(["sum", "virtual", "com", "radial"], {"radial": {"per_position": True}})
    once = analyse_events(specs, events, scan)
    rng = np.random.default_rng(ranks * 100 + batch)
    order = rng.permutation(scan.n_frames)
    total = AnalysisSet(specs, scan)
    for r in range(ranks):
        mine = order[r::ranks]
        rank = AnalysisSet(specs, scan)
        for lo in range(0, mine.size, batch):
            frames = mine[lo : lo + batch]
            rank.process(EventBatch.from_frames(frames, [events[f] for f in frames], scan.frame_shape))
            if rng.random() < 0.3:  # a delta sent while the scan streams
                for name, partial in rank.take().items():
                    total.add(name, partial)
        for name, partial in rank.take().items():
            total.add(name, partial)
    from stemstream.analyses.runner import events_source

    settle(total, events_source(events, scan.frame_shape))
    merged = total.outcomes("merged")
    assert set(merged) == set(once)
    for name in once:
        assert merged[name].params == once[name].params
        for key, value in once[name].results.items():
            assert np.array_equal(merged[name].results[key], value, equal_nan=True), (name, key)


def test_merge_adds_array_by_array():
    a = {"x": np.array([1, 2], np.uint32)}
    merge(object(), a, {"x": np.array([3, 4], np.uint32), "y": np.ones(2)})
    assert a["x"].tolist() == [4, 6] and a["y"].tolist() == [1, 1]


# ---- registry and plug-ins


@pytest.fixture
def plugin(monkeypatch):
    """The test package on sys.path: its dist-info declares the entry point, as `pip install` would."""
    monkeypatch.syspath_prepend(str(PLUGIN))
    yield
    sys.modules.pop("stemstream_testplugin", None)


def test_a_plug_in_from_its_own_package_runs_offline(plugin, counted, tmp_path):
    import shutil

    from stemstream.analyses import registry
    from stemstream.analyses.files import analyse_file, read_results

    counted = shutil.copy(counted, tmp_path / "scan_9_counted.h5")
    assert "occupancy" in registry.available()
    assert "occupancy" in registry.names("all")
    outcomes, _ = analyse_file(counted, ["occupancy"], {"occupancy": {"busy": 25}}, pngs=False)
    events = _events()
    want = np.array([e.size for e in events]).reshape(SHAPE)
    assert np.array_equal(outcomes["occupancy"].results["events"], want)
    stored, _ = read_results(counted)
    assert stored["occupancy"].params == {"busy": 25}
    assert np.array_equal(stored["occupancy"].results["busy_frames"], np.flatnonzero(want.ravel() > 25))


def test_unknown_analyses_and_bad_parameters_are_one_line_errors():
    from stemstream.analyses import registry

    with pytest.raises(AnalysisError, match="no analysis named 'nope'; installed: com, radial, sum, virtual"):
        registry.names("sum,nope")
    with pytest.raises(AnalysisError, match="need 0 <= inner < outer"):
        registry.create("virtual", {"detectors": {"bf": [10, 5]}})
    with pytest.raises(AnalysisError, match="centre must be"):
        registry.create("radial", {"center": "middle"})
    with pytest.raises(AnalysisError, match="'virtual' with parameters"):
        registry.create("virtual", {"radius": 3})
    assert registry.names(None) == registry.names("default") == ["sum", "virtual", "com", "radial"]
    assert registry.with_needs(["com", "virtual"]) == ["com", "sum", "virtual"]


def test_an_analysis_that_raises_is_dropped_and_the_others_go_on(monkeypatch):
    from stemstream.analyses import builtin

    def broken(self, partial, batch):
        raise ValueError("boom")

    monkeypatch.setattr(builtin.CentreOfMass, "process", broken)
    out = analyse_events(specs_for(["com", "sum"]), _events(), ScanGeometry(SHAPE))
    assert out["com"].error == "process failed: ValueError: boom" and not out["com"].results
    assert out["sum"].error is None and out["sum"].results["pattern"].sum() > 0


def test_find_centre_of_a_flat_pattern_is_the_frame_centre():
    assert find_centre(np.zeros((576, 576))) == (287.5, 287.5)
    assert find_centre(np.ones((8, 6))) == (3.5, 2.5)


# ---- the command and the file


def test_stemstream_analyse_writes_a_group_stempy_ignores_and_pngs(tmp_path, counted):
    import shutil

    import stempy.io as sio

    from stemstream.analyses.files import read_results
    from stemstream.cli import main
    from stemstream.counting import read_counted

    path = shutil.copy(counted, tmp_path / "scan_9_counted.h5")
    assert main(["analyse", str(path), "--analysis", "com", "--params", '{"com": {"rotation_deg": 10}}']) == 0
    assert main(["analyse", str(path), "--analysis", "virtual"]) == 0
    stored, _ = read_results(path)
    assert set(stored) == {"com", "sum", "virtual"}
    assert stored["com"].params["rotation_deg"] == 10 and stored["com"].how == "offline"
    with h5py.File(path) as f:
        assert json.loads(f["analyses/virtual"].attrs["params"])["center_auto"] is True
        assert f["analyses/virtual/bf"].shape == SHAPE
    # stempy's loader and ours still read the file as before.
    sparse = sio.load_electron_counts(str(path))
    assert tuple(sparse.scan_shape) == SHAPE
    _, meta = read_counted(path)
    assert meta["scan_number"] == 9
    pngs = sorted(p.name for p in (tmp_path / "scan_9_analyses").iterdir())
    assert pngs == [
        "com.com_col.png", "com.com_row.png", "com.dpc_angle.png", "com.dpc_magnitude.png", "sum.pattern.png",
        "virtual.adf.png", "virtual.bf.png",
    ]  # fmt: skip
    import matplotlib.image

    bf = matplotlib.image.imread(tmp_path / "scan_9_analyses" / "virtual.bf.png")
    assert bf.shape[:2] == SHAPE and bf.std() > 0


def test_stemstream_analyse_errors_are_one_line(tmp_path, capsys):
    from stemstream.cli import main

    assert main(["analyse", str(tmp_path / "missing.h5"), "--analysis", "com"]) == 1
    assert "not a readable counted file" in capsys.readouterr().err
    assert main(["analyse", str(tmp_path / "x.h5"), "--analysis", "nope"]) == 1
    assert "no analysis named 'nope'" in capsys.readouterr().err
    assert main(["analyse", "--list"]) == 0
    assert capsys.readouterr().out.split() == ["com", "radial", "sum", "virtual"]

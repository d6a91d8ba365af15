"""The live path in one process, fast: ranks (RankAnalyses) and rank 0's Board wired by a queue as the rank
messages would be, and the live view's routes over HTTP. The real NodeGroups are tests/test_analyses_live.py.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections import deque

import msgpack
import numpy as np
import pytest

from stemstream.analyses import ScanGeometry, analyse_events, specs_for
from stemstream.analyses.board import Board
from stemstream.analyses.rank import RankAnalyses, decode_partial, encode_partial
from stemstream.errors import AnalysisError

SHAPE = (16, 16)
SPECS = specs_for(["sum", "virtual", "com", "radial"], {"radial": {"per_position": True}})


def _events(shape=SHAPE, seed=3) -> list[np.ndarray]:
    from stemstream.sim import FourDCameraSim

    sim = FourDCameraSim(shape, seed=seed)
    return [sim.ground_truth(i) for i in range(sim.n_frames)]


class Job:
    """``n`` ranks and a Board; messages go through msgpack, as over MPI."""

    def __init__(self, n: int = 2) -> None:
        self.queue: deque[tuple[int, dict]] = deque()
        self.ranks = [RankAnalyses(SPECS, r) for r in range(n)]
        self.board = Board(SPECS, lambda r, m: self.queue.append((r, self._wire(m))), n, write_pngs=False)

    @staticmethod
    def _wire(message: dict) -> dict:
        return msgpack.unpackb(msgpack.packb(message), raw=False)

    def to_board(self, message: dict | None) -> None:
        if message is not None:
            self.board.on_message(self._wire(message))

    def deliver(self) -> None:
        while self.queue:
            rank, message = self.queue.popleft()
            self.ranks[rank].apply(message)


def _stream(job: Job, events, *, change=None, change_at=0.5, finish_first=None):
    """Frames dealt round the ranks in batches of 8; deltas sent every 4 batches; ``change`` (detector
    settings) posted when ``change_at`` of the frames are counted, after rank ``finish_first`` (if any) has
    already sent its final partial."""
    n = len(events)
    for rank in job.ranks:
        rank.begin(1, SHAPE, (576, 576))
    order = np.arange(n)
    shares = {r: order[r :: len(job.ranks)] for r in range(len(job.ranks))}
    if finish_first is not None:  # this rank counts everything it has first, and reports
        mine = shares[finish_first]
        for lo in range(0, mine.size, 8):
            job.ranks[finish_first].process(1, list(mine[lo : lo + 8]), [events[f] for f in mine[lo : lo + 8]])
        job.to_board(job.ranks[finish_first].message(1, final=True, counted=mine.size))
    done = 0
    changed = False
    for step, lo in enumerate(range(0, n, 8 * len(job.ranks))):
        for r, rank in enumerate(job.ranks):
            if r == finish_first:
                continue
            mine = shares[r][lo // len(job.ranks) : lo // len(job.ranks) + 8]
            rank.process(1, list(mine), [events[f] for f in mine])
            done += len(mine)
        if step % 4 == 3:
            for r, rank in enumerate(job.ranks):
                if r != finish_first:
                    job.to_board(rank.message(1, counted=done))
            job.board.tick(now=1e9 + step)
            job.deliver()
        if change is not None and not changed and done >= change_at * n:
            job.board.set_settings(change, scan=1)
            job.deliver()
            changed = True
    for r, rank in enumerate(job.ranks):
        if r != finish_first:
            job.to_board(rank.message(1, final=True, counted=len(shares[r])))
    return job.board.before_write(1, events, SHAPE, (576, 576), range(len(job.ranks)))


def _written(job: Job, write) -> dict:
    import h5py

    from stemstream.analyses.files import read_results

    path = "/dev/shm/stemstream-board-test.h5" if __import__("os").path.isdir("/dev/shm") else "board.h5"
    with h5py.File(path, "w") as f:
        write(f)
    job.board.after_write(1, {"status": "counted", "frames": SHAPE[0] * SHAPE[1], "path": None})
    outcomes, history = read_results(path)
    __import__("os").unlink(path)
    return {"outcomes": outcomes, "history": history}


def _assert_equal_offline(outcomes, events, specs):
    offline = analyse_events(specs, events, ScanGeometry(SHAPE))
    for name, want in offline.items():
        assert outcomes[name].params == want.params, name
        for key, value in want.results.items():
            assert np.array_equal(outcomes[name].results[key], value, equal_nan=True), (name, key)


def test_two_ranks_merged_on_the_board_equal_the_offline_run():
    events = _events()
    job = Job(2)
    got = _written(job, _stream(job, events))
    outcomes = got["outcomes"]
    assert outcomes["sum"].how == outcomes["com"].how == "merged"
    _assert_equal_offline(outcomes, events, SPECS)
    assert got["history"] == []


def test_a_change_mid_scan_is_recomputed_on_the_ranks_from_their_kept_events():
    events = _events()
    job = Job(3)
    change = {"center": [283.0, 291.5], "detectors": {"bf": [0, 30], "ring": [40, 80]}}
    got = _written(job, _stream(job, events, change=change))
    outcomes = got["outcomes"]
    # Every rank recomputed with the new parameters and sent it whole: merged, and right.
    assert outcomes["virtual"].how == "merged" and outcomes["radial"].how == "merged"
    specs = {
        **SPECS,
        "virtual": {**change, "center_auto": False},
        "radial": {**SPECS["radial"], "center": [283.0, 291.5]},
    }
    _assert_equal_offline(outcomes, events, specs)
    assert [h["settings"]["detectors"] for h in got["history"]] == [{"bf": [0.0, 30.0], "ring": [40.0, 80.0]}]


def test_a_change_after_a_rank_finished_is_recomputed_on_rank_0_from_the_gathered_events():
    events = _events()
    job = Job(2)
    change = {"center": None, "detectors": {"bf": [0, 20]}}
    got = _written(job, _stream(job, events, change=change, finish_first=0))
    outcomes = got["outcomes"]
    assert outcomes["virtual"].how == "recomputed" and outcomes["sum"].how == "merged"
    specs = {**SPECS, "virtual": {"detectors": {"bf": [0, 20]}, "center": None}}
    _assert_equal_offline(outcomes, events, specs)


def test_a_rank_with_other_parameters_is_sent_the_target_again():
    events = _events()
    job = Job(2)
    job.ranks[1].specs["com"] = {"rotation_deg": 45.0}  # as if it missed a settings message
    for rank in job.ranks:
        rank.begin(1, SHAPE, (576, 576))
        rank.process(1, list(range(rank.rank, 40, 2)), [events[f] for f in range(rank.rank, 40, 2)])
        job.to_board(rank.message(1, counted=20))
    job.board.tick()
    # Rank 1 is sent the whole target (the refined centre goes to both ranks; only rank 1 gets com).
    assert [(r, m["scan"]) for r, m in job.queue if "com" in m["specs"]] == [(1, 1)]
    job.deliver()
    job.to_board(job.ranks[1].message(1, counted=20))
    _, outcomes, facts = job.board.view(1)
    assert outcomes["com"].params["rotation_deg"] == 0.0 and facts["pending"] == []
    assert outcomes["sum"].results["pattern"].sum() == sum(events[f].size for f in range(40))


def test_partials_travel_sparse_when_mostly_zero_and_never_as_objects():
    a = np.zeros(10_000, np.uint32)
    a[[3, 700, 9999]] = [1, 2, 3]
    dense = np.arange(12, dtype=np.int64).reshape(3, 4)
    wire = encode_partial({"a": a, "d": dense})
    assert wire["a"][2] is not None and len(wire["a"][3]) == 12  # three uint32 values
    assert wire["d"][2] is None
    back = decode_partial(msgpack.unpackb(msgpack.packb(wire), raw=False))
    assert np.array_equal(back["a"], a) and np.array_equal(back["d"], dense) and back["d"].flags.writeable
    with pytest.raises(AnalysisError, match="cannot be decoded"):
        decode_partial({"x": ["|O", [1], None, b"\0" * 8]})
    with pytest.raises(AnalysisError, match="cannot be decoded"):
        decode_partial({"x": ["<u4", [4], b"\xff\xff\x00\x00", b"\1\0\0\0"]})


# ---- the view's routes


@pytest.fixture
def view():
    from stemstream.analyses.page import LiveView, ViewConfig

    events = _events()
    job = Job(1)
    posted: list[dict] = []
    job.ranks[0].begin(1, SHAPE, (576, 576))
    job.ranks[0].process(1, list(range(100)), events[:100])
    job.to_board(job.ranks[0].message(1, counted=100, share=256, incomplete=2))
    v = LiveView(job.board, ViewConfig(ports=range(41000, 41100), interval_s=0.1), post=posted.append).start()
    try:
        yield v, posted
    finally:
        v.stop()


def _get(url: str, body: dict | None = None) -> tuple[int, bytes]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_the_view_answers_only_under_its_token(view):
    v, _ = view
    assert v.url.startswith("http://127.0.0.1:410") and v.url.endswith(f"/{v.token}/") and len(v.token) >= 20
    status, body = _get(v.url)
    assert status == 200 and b"EventSource" in body
    root = v.url.rsplit("/", 2)[0]
    for path in ("/", "/x/", f"/{v.token[:-1]}/api/state", "/docs", "/openapi.json", f"/{v.token}x/events"):
        assert _get(root + path)[0] == 404, path
    state = json.loads(_get(v.url + "api/state")[1])
    assert state["shown"] == 1 and state["progress"]["counted"] == 100 and state["progress"]["incomplete"] == 2
    assert set(state["view"]["images"]) >= {"sum.pattern", "virtual.bf", "virtual.adf", "com.dpc_magnitude"}


def test_settings_are_validated_on_the_view_and_posted_to_the_control_thread(view):
    v, posted = view
    bad = [
        {"center": None, "detectors": {"bf": [10, 5]}},
        {"center": "middle", "detectors": {"bf": [0, 5]}},
        {"center": None, "detectors": {"BF!": [0, 5]}},
        {"center": None, "detectors": {"bf": [0, 5]}, "radius": 3},
        [1, 2],
    ]
    for body in bad:
        status, answer = _get(v.url + "api/settings", body)
        assert status == 400 and json.loads(answer)["error"], body
    assert posted == []
    status, answer = _get(v.url + "api/settings", {"center": [280, 290], "detectors": {"bf": [0, 25]}, "scan": 1})
    assert status == 200
    assert posted == [
        {"kind": "_settings", "settings": {"center": [280.0, 290.0], "detectors": {"bf": [0.0, 25.0]}}, "scan": 1,
         "source": "page"}
    ]  # fmt: skip


def test_server_sent_events_come_at_the_interval(view):
    v, _ = view
    with urllib.request.urlopen(v.url + "events", timeout=10) as r:
        assert r.headers["Content-Type"].startswith("text/event-stream")
        messages = []
        while len(messages) < 3:
            line = r.readline()
            if line.startswith(b"data: "):
                messages.append(json.loads(line[6:]))
    assert "view" in messages[0] and "view" not in messages[1]  # images once, then only what changed
    assert messages[2]["at"] - messages[1]["at"] < 1.0


def test_a_change_and_back_before_the_ranks_report_counts_each_frame_once():
    """Parameters A, then B, then A again before a rank reports: its next message is a whole partial at A
    ("reset"), which must replace what rank 0 holds at A, not add to it."""
    events = _events()
    job = Job(2)
    a = {"center": [287.5, 287.0], "detectors": {"bf": [0, 50], "adf": [60, 200]}}
    job.board.set_settings(a)
    job.deliver()
    for rank in job.ranks:
        rank.begin(1, SHAPE, (576, 576))
        frames = list(range(rank.rank, 128, 2))
        rank.process(1, frames, [events[f] for f in frames])
        job.to_board(rank.message(1, counted=64))
    job.board.set_settings({"center": [280.0, 280.0], "detectors": {"bf": [0, 10]}}, scan=1)
    job.board.set_settings(a, scan=1)
    job.deliver()
    for rank in job.ranks:
        frames = list(range(128 + rank.rank, 256, 2))
        rank.process(1, frames, [events[f] for f in frames])
        job.to_board(rank.message(1, final=True, counted=128))
    outcomes = _written(job, job.board.before_write(1, events, SHAPE, (576, 576), [0, 1]))["outcomes"]
    assert outcomes["virtual"].how == outcomes["radial"].how == "merged"
    specs = {**SPECS, "virtual": {**a, "center_auto": False}, "radial": {**SPECS["radial"], "center": a["center"]}}
    _assert_equal_offline(outcomes, events, specs)

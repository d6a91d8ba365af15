"""Rank 0 of a counting job: one threshold decision per scan, then the gathered events written to one file.

Every rank sends rank 0 (``nodes.ranks`` messages): ``hello`` (its NodeGroups), and per scan ``begin``,
``sample`` (its complete frames among the scan's threshold-sample candidates), ``progress``, ``ended`` (with
its incomplete candidate frames) and ``events``. The :class:`Coordinator` picks the sample (the first
``threshold_samples`` complete frames in candidate order, :func:`sample_candidates`, waiting
``sample_grace_s`` for a frame that later frames overtook), computes the thresholds as stempy does and their
stability figure (:func:`sample_thresholds`) and sends them to the scan's ranks; once
every rank's events are in (or the scan made no progress for ``scan_timeout_s``) it writes
``<output_dir>/scan_<n>_counted.h5`` and publishes ``/scans/<n>/counted``.
"""

from __future__ import annotations

import logging
import math
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from stemstream.counting import Thresholds, write_counted
from stemstream.counting.output import counted_path_for
from stemstream.counting.thresholds import halves_array as _halves_array
from stemstream.counting.thresholds import sample_candidates, sample_thresholds
from stemstream.errors import CountingError, StemstreamError, WaitTimeout
from stemstream.nodes.ranks import RankTransport
from stemstream.nodes.workers import ProcessCounter, SharedBatch
from stemstream.scans import keys
from stemstream.scans.plan import KeyValue
from stemstream.scans.records import CountedRecord

if TYPE_CHECKING:
    from stemstream.nodes.config import CountingConfig

logger = logging.getLogger(__name__)


@dataclass
class _CoordScan:
    """What rank 0 gathers of a scan."""

    number: int
    start: str  # the acquisition of the scan number
    members: tuple[str, ...]
    scan_shape: tuple[int, int]
    candidates: np.ndarray  # the frames tried for the threshold sample, in order (sample_candidates)
    samples: dict[int, bytes] = field(default_factory=dict)
    incomplete: set[int] = field(default_factory=set)
    ended_ranks: set[int] = field(default_factory=set)
    events: dict[int, dict[str, Any]] = field(default_factory=dict)
    thresholds: Thresholds | None = None
    thresholds_at: float | None = None
    sample_frames: list[int] = field(default_factory=list)  # in candidate order
    halves: list[list[float]] | None = None  # the stability figure (half_thresholds)
    failed: str | None = None
    decided: bool = False
    first_sample_at: float | None = None
    given_up: set[int] = field(default_factory=set)
    stall: tuple[int, float] | None = None  # (frame the sample waits for, since when)
    touched: float = field(default_factory=time.monotonic)
    written: bool = False


class Coordinator:
    """Rank 0's part of the counting service (runs on rank 0's control thread)."""

    def __init__(
        self,
        config: CountingConfig,
        transport: RankTransport,
        store: KeyValue | None,
        engine_name: str,
        counter: ProcessCounter | None,
        post: Callable[[dict[str, Any]], None],
    ) -> None:
        self.config = config
        self.transport = transport
        self.store = store
        self.engine_name = engine_name
        self.counter = counter
        self._post = post  # back onto the control thread (thresholds computed by a worker process)
        self._uid_rank: dict[str, int] = {}
        self._heard: dict[int, float] = {}  # rank -> when rank 0 last heard from it (monotonic)
        self._scans: dict[tuple[int, str], _CoordScan] = {}
        self._written: dict[tuple[int, str], dict[str, Any]] = {}
        self._written_cond = threading.Condition()
        self.analyses: Any = None  # analyses.board.Board: results into the file (before_write, after_write)

    def wait_written(self, scan_number: int, timeout: float, start: str | None = None) -> dict[str, Any]:
        """The ``/scans/<n>/counted`` record once the scan's file is written (or failed): the newest written
        acquisition of ``scan_number``, or ``start``'s."""
        deadline = time.monotonic() + timeout

        def written() -> dict[str, Any] | None:
            for (n, s), record in reversed(self._written.items()):
                if n == scan_number and (start is None or s == start):
                    return record
            return None

        with self._written_cond:
            while (record := written()) is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise WaitTimeout(f"scan {scan_number} not written within {timeout:.0f} s")
                self._written_cond.wait(left)
            return record

    def files(self) -> dict[str, int]:
        """Scans written so far, by the status of their counted record (counted, partial, failed)."""
        out: dict[str, int] = {}
        with self._written_cond:
            for record in self._written.values():
                status = str(record.get("status", ""))
                out[status] = out.get(status, 0) + 1
        return out

    def heard(self, rank: int) -> None:
        self._heard[rank] = time.monotonic()

    def on_message(self, kind: Any, message: dict[str, Any]) -> None:
        if kind == "hello":
            for uid in message["uids"]:
                self._uid_rank[uid] = int(message["rank"])
            return
        n = int(message["scan"])
        key = (n, str(message.get("start") or ""))
        cs = self._scans.get(key)
        if kind == "_decided":  # from our own thresholds worker
            if cs is not None:
                self._decided(cs, message["thresholds"], message["error"], message["halves"])
            return
        if cs is None:
            if kind == "progress":
                return  # the scan is written already
            if kind != "begin":
                logger.error("scan %d: %r before its begin; ignored", n, kind)
                return
            shape = (int(message["scan_shape"][0]), int(message["scan_shape"][1]))
            cs = self._scans[key] = _CoordScan(
                number=n,
                start=key[1],
                members=tuple(message["members"]),
                scan_shape=shape,
                candidates=sample_candidates(
                    shape[0] * shape[1], self.config.threshold_samples, self.config.threshold_window
                ),
            )
        cs.touched = time.monotonic()
        if kind == "sample":
            cs.first_sample_at = cs.first_sample_at or time.time()
            if not cs.decided:
                cs.samples.setdefault(int(message["frame"]), message["data"])
        elif kind == "ended":
            cs.ended_ranks.add(int(message["rank"]))
            cs.incomplete.update(int(f) for f in message["incomplete"])
        elif kind == "events":
            cs.events[int(message["rank"])] = message
        elif kind not in ("begin", "progress"):
            logger.error("scan %d: unknown message kind %r", n, kind)
            return
        self._try_decide(cs, time.monotonic())
        self._try_write(cs)

    def tick(self, now: float) -> None:
        """Timers: a sample frame waited for too long, a scan that stopped making progress."""
        for cs in list(self._scans.values()):
            if not cs.decided:
                self._try_decide(cs, now)
            if not cs.written and now - cs.touched > self.config.scan_timeout_s:
                ranks = self._ranks_of(cs) or set()
                missing = sorted(ranks - set(cs.events))
                timeout = self.config.scan_timeout_s
                if missing and all(now - self._heard.get(r, -math.inf) <= timeout for r in missing):
                    continue  # those ranks are alive and counting (an earlier scan, say): not stalled
                logger.error(
                    "scan %d: no word from rank(s) %s for %.0f s; writing what was counted",
                    cs.number,
                    missing,
                    self.config.scan_timeout_s,
                )
                self._write(cs, partial=missing)

    # ---- thresholds

    def _ranks_of(self, cs: _CoordScan) -> set[int] | None:
        """The ranks holding the scan's members, or None while a member's rank is not known yet."""
        ranks = set()
        for uid in cs.members:
            if uid not in self._uid_rank:
                return None
            ranks.add(self._uid_rank[uid])
        return ranks

    def _owner_ended(self, cs: _CoordScan, frame: int) -> bool:
        uid = cs.members[frame % len(cs.members)]
        return self._uid_rank.get(uid, -1) in cs.ended_ranks

    def _try_decide(self, cs: _CoordScan, now: float) -> None:
        if cs.decided:
            return
        if self._ranks_of(cs) is None:
            return
        want = self.config.threshold_samples
        highest = max(cs.samples, default=-1)
        chosen: list[int] = []
        for f in cs.candidates.tolist():
            if f in cs.samples:
                chosen.append(f)
                if len(chosen) == want:
                    break
            elif f in cs.incomplete or self._owner_ended(cs, f) or f in cs.given_up:
                continue
            elif f < highest:
                # Later frames are in and this one is not: wait for it, but not for ever (a sector of it
                # may have been lost upstream, and its rank reports that only at the scan's end).
                if cs.stall is None or cs.stall[0] != f:
                    cs.stall = (f, now)
                if now - cs.stall[1] < self.config.sample_grace_s:
                    return
                cs.given_up.add(f)
                logger.info("scan %d: frame %d left out of the threshold sample (not complete in time)", cs.number, f)
            else:
                return
        cs.decided = True
        cs.sample_frames = chosen
        if not chosen:
            error = f"no complete frame among the {cs.candidates.size} sample candidates to compute thresholds from"
            self._decided(cs, None, error, None)
            return
        shape = self.config.frame_shape
        sigmas = (self.config.background_n_sigma, self.config.xray_n_sigma)
        if self.counter is not None:
            # On a counting core, not on this process's (which receives): ~0.1 s of CPU per scan.
            sample = SharedBatch(len(chosen), shape)
            for k, f in enumerate(sorted(chosen)):
                sample.array[k] = np.frombuffer(cs.samples[f], np.uint16).reshape(shape)
            cs.samples.clear()
            future = self.counter.thresholds(sample, chosen, *sigmas)

            def done(fut: Any, number: int = cs.number, start: str = cs.start, sample: SharedBatch = sample) -> None:
                sample.release()
                result = halves = None
                try:
                    answer = fut.result()
                    result, halves, error = Thresholds.from_dict(answer["thresholds"]), answer["halves"], None
                except CountingError as exc:
                    error = str(exc)
                except Exception as exc:  # a worker that died
                    error = f"thresholds: the counting worker failed: {exc}"
                message = {"kind": "_decided", "scan": number, "start": start, "thresholds": result}
                self._post({**message, "error": error, "halves": halves})

            future.add_done_callback(done)
            return
        frames = np.stack([np.frombuffer(cs.samples[f], np.uint16).reshape(shape) for f in sorted(chosen)])
        cs.samples.clear()
        try:
            thresholds, halves = sample_thresholds(
                frames, chosen, dark=self.config.dark, gain=self.config.gain, background_n_sigma=sigmas[0],
                xray_n_sigma=sigmas[1],
            )  # fmt: skip
        except CountingError as exc:
            self._decided(cs, None, str(exc), None)
        else:
            self._decided(cs, thresholds, None, halves)

    def _decided(
        self, cs: _CoordScan, thresholds: Thresholds | None, error: str | None, halves: list[list[float]] | None
    ) -> None:
        """The scan's thresholds (or why there are none) and their stability figure: sent to every rank of the
        scan."""
        cs.thresholds, cs.failed, cs.halves = thresholds, error, halves
        cs.thresholds_at = time.time()
        if cs.failed:
            logger.error("scan %d: %s", cs.number, cs.failed)
        else:
            assert cs.thresholds is not None
            logger.info(
                "scan %d: thresholds from %d frames (%.2f s after the first came): background %.2f, x-ray %.2f",
                cs.number,
                len(cs.sample_frames),
                cs.thresholds_at - (cs.first_sample_at or cs.thresholds_at),
                cs.thresholds.background,
                cs.thresholds.xray,
            )
        reply = {
            "kind": "thresholds",
            "scan": cs.number,
            "start": cs.start,
            "thresholds": cs.thresholds.to_dict() if cs.thresholds else None,
            "halves": cs.halves,
            "error": cs.failed,
        }
        for r in sorted(self._ranks_of(cs) or ()):
            self.transport.send(r, reply)
        self._try_write(cs)

    # ---- the file

    def _try_write(self, cs: _CoordScan) -> None:
        ranks = self._ranks_of(cs)
        if cs.written or ranks is None or not ranks <= set(cs.events) or cs.thresholds_at is None:
            return
        self._write(cs, partial=[])

    def _write(self, cs: _CoordScan, partial: list[int]) -> None:
        cs.written = True
        self._scans.pop((cs.number, cs.start), None)
        gathered = _gather(cs, self.config.n_sectors)
        n_frames = len(gathered.events)
        incomplete_frames = sorted({f for f, _ in gathered.missing})
        n_events = int(sum(e.size for e in gathered.events))
        summaries = gathered.summaries
        firsts = [s["first_ts"] for s in summaries.values() if s.get("first_ts")]
        lasts = [s["last_ts"] for s in summaries.values() if s.get("last_ts")]
        count_span = [t for m in cs.events.values() for t in (m.get("first_count"), m.get("last_count")) if t]
        messages = {
            key: sum(int(s.get(key, 0)) for s in summaries.values())
            for key in ("expected", "received", "lost_upstream", "frames_complete", "frames_incomplete")
        }
        messages["rejected"] = sum(sum(s.get("rejected", {}).values()) for s in summaries.values())
        # Frames no sector of which reached a NodeGroup, beyond what it hands over (plane.nodelife): not in the
        # file's list of incomplete frames, so the file is partial (the producers replay the scan to disk).
        absent = sum(int(s.get("absent", 0)) for s in summaries.values())
        errors = [*gathered.failures, *([f"{absent} frames never arrived at all"] if absent else [])]
        record = CountedRecord(
            scan=cs.number,
            status="failed" if gathered.failures else ("partial" if partial or absent else "counted"),
            error="; ".join(errors) or None,
            frames=n_frames,
            frames_incomplete=len(incomplete_frames),
            events=n_events,
            engine=self.engine_name,
            thresholds=cs.thresholds.to_dict() if cs.thresholds else None,
            background_n_sigma=self.config.background_n_sigma,
            members=cs.members,
            ranks=len(cs.events),
            ranks_missing=tuple(partial),
            first_frame=min(firsts) if firsts else None,
            last_frame=max(lasts) if lasts else None,
            messages=messages,
            engine_seconds=sum(float(m.get("engine_s") or 0) for m in cs.events.values()),
            first_count=min(count_span) if count_span else None,
            last_count=max(count_span) if count_span else None,
            thresholds_at=cs.thresholds_at,
            host=socket.gethostname(),
            start=cs.start,
        )
        if not gathered.failures:
            path = counted_path_for(self.config.output_dir, cs.number, cs.start)
            metadata = {
                "engine": self.engine_name,
                "source": "stream",
                "scan_number": cs.number,
                "start": cs.start,
                "counting_options": {
                    "dark_reference": self.config.dark is not None,
                    "gain": self.config.gain is not None,
                    "apply_row_dark_subtraction": self.config.row_dark != "none",
                    "apply_row_dark_use_mean": self.config.row_dark == "mean",
                },
                "row_dark": self.config.row_dark,
                **self.config.params.dark_record(),
                "thresholds": cs.thresholds,
                "background_n_sigma": self.config.background_n_sigma,
                "xray_n_sigma": self.config.xray_n_sigma,
                "threshold_sample_frames": cs.sample_frames,
                "threshold_halves": _halves_array(cs.halves),
                "frames_incomplete": len(incomplete_frames),
                "missing_sectors": np.asarray(sorted(gathered.missing), dtype=np.int64).reshape(-1, 2),
                "members": list(cs.members),
                "ranks_missing": partial,
                "messages": messages,
                "timings": {
                    "first_frame": record.first_frame or 0.0,
                    "last_frame": record.last_frame or 0.0,
                    "thresholds": cs.thresholds_at or 0.0,
                    "counted": gathered.counted_at,
                },
            }
            extra = None
            if self.analyses is not None:
                ranks = self._ranks_of(cs)
                try:
                    extra = self.analyses.before_write(
                        cs.number, gathered.events, cs.scan_shape, self.config.frame_shape, ranks
                    )
                except Exception:  # the counted file matters more than its analyses
                    logger.exception("scan %d: analyses failed; the file is written without them", cs.number)
            try:
                written = write_counted(path, gathered.events, scan_shape=cs.scan_shape, metadata=metadata, extra=extra)
            except (OSError, StemstreamError) as exc:
                record = replace(record, status="failed", error=f"writing {path} failed: {exc}; free space there")
            else:
                now = time.time()
                record = replace(
                    record,
                    path=str(written.resolve()),
                    written_at=now,
                    seconds_after_last_frame=(now - record.last_frame) if record.last_frame else None,
                )
        log = logger.error if record.status == "failed" else logger.info
        log(
            "scan %d: %s (%d frames, %d incomplete, %d events)%s",
            cs.number,
            record.path or record.status,
            n_frames,
            len(incomplete_frames),
            n_events,
            f": {record.error}" if record.error else "",
        )
        value = record.to_record()
        if self.store is not None:
            try:
                self.store.set(keys.counted(cs.number), value)
            except StemstreamError as exc:
                logger.error("scan %d: the counted record did not reach the store: %s", cs.number, exc)
        if self.analyses is not None:
            self.analyses.after_write(cs.number, value)
        with self._written_cond:
            self._written[(cs.number, cs.start)] = value
            while len(self._written) > 4096:
                del self._written[next(iter(self._written))]
            self._written_cond.notify_all()


@dataclass
class _Gathered:
    events: list[np.ndarray]
    missing: list[tuple[int, int]]  # (frame, sector) pairs not counted
    summaries: dict[str, dict[str, Any]]
    failures: list[str]
    counted_at: float


def _gather(cs: _CoordScan, n_sectors: int) -> _Gathered:
    """Every rank's events of the scan, frame by frame, and what is missing from them."""
    n_frames = cs.scan_shape[0] * cs.scan_shape[1]
    events: list[np.ndarray] = [np.zeros(0, np.uint32)] * n_frames
    missing: list[tuple[int, int]] = []
    summaries: dict[str, dict[str, Any]] = {}
    failures = [cs.failed] if cs.failed else []
    counted_at = 0.0
    for msg in cs.events.values():
        frames = np.frombuffer(msg["frames"], np.uint32)
        lengths = np.frombuffer(msg["lengths"], np.uint32)
        flat = np.frombuffer(msg["events"], np.uint32)
        for f, part in zip(frames.tolist(), np.split(flat, np.cumsum(lengths)[:-1]), strict=False):
            if 0 <= f < n_frames:
                events[f] = part
        for f, sectors in msg["incomplete"]:
            missing.extend((int(f), int(s)) for s in sectors)
        summaries.update(msg["summaries"])
        if msg.get("failed") and msg["failed"] not in failures:
            failures.append(msg["failed"])
        counted_at = max(counted_at, float(msg.get("counted_at") or 0))
    # Frames of a NodeGroup that never reported (its rank died or went silent) were not counted: the file
    # says so, with every sector of them missing, so that nothing claims to be counted that is not.
    n_members = len(cs.members)
    for i, uid in enumerate(cs.members):
        if uid not in summaries:
            for f in range(i, n_frames, n_members):
                missing.extend((f, s) for s in range(n_sectors))
    return _Gathered(events, missing, summaries, failures, counted_at)

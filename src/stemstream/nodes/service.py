"""Electron counting on the NodeGroups: frames counted as they arrive, one sparse HDF5 file per scan.

One :class:`CountingService` per NodeGroup process (per MPI rank) serves every NodeGroup of that process
through :meth:`CountingService.consumer`, a :class:`~stemstream.nodes.consumer.FrameConsumer`.

Per scan:

1. **Batches.** ``frame_buffer`` hands out slots of batch buffers ``(B, 576, 576)``: the NodeGroup writes
   each sector straight into its slot, and the engine later reads runs of ready slots in place (no copy
   between assembly and counting). ``B`` is 1 for stempy (it counts frame by frame), 16 for the cpu engine
   and 64 for the gpu engine.
2. **One threshold per scan.** The *sample* is the first ``threshold_frames`` complete frames of the scan
   in frame-number order, whichever rank holds them: each rank sends its complete frames among the first
   ``2 x threshold_frames`` to rank 0, which computes the thresholds as stempy does
   (:func:`~stemstream.counting.compute_thresholds`) once and sends them to every rank of the scan.
   A frame in that window that has not arrived is waited for until its rank reports the scan's end, or
   for ``sample_grace_s`` once later frames are in (sectors lost upstream make it incomplete; it cannot
   be in the sample). Frames wait in their slots until the thresholds are known.
3. **Counting** runs on one thread per rank, off the receiving threads; the cpu and gpu engines are
   parallel inside. Complete frames are counted as they arrive; incomplete ones (missing rows zeroed, as
   stempy's reader fills them) when the NodeGroup hands them over after every expected message is in;
   frames with every sector lost have no events, as in stempy.
4. **Gather and write.** When its NodeGroups have ended the scan and every frame is counted, a rank sends
   its events to rank 0, which writes ``<output_dir>/scan_<n>_counted.h5``
   (:func:`~stemstream.counting.write_counted`) and publishes ``/scans/<n>/counted`` in the store.

While a scan streams, each rank publishes ``/scans/<n>/preview/<rank>`` about once a second: frames counted
of its share, and the bright-field events per probe position so far (a live virtual bright-field image).

Messages between ranks are :mod:`stemstream.nodes.ranks` (MPI point-to-point, msgpack maps).
"""

from __future__ import annotations

import logging
import math
import queue
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from stemstream.counting import CountingEngine, Thresholds, compute_thresholds, get_engine, write_counted
from stemstream.errors import CountingError, StemstreamError, WaitTimeout
from stemstream.log import RateLimitedLog
from stemstream.nodes.consumer import ScanInfo, ScanSummary
from stemstream.nodes.ranks import RankTransport
from stemstream.nodes.workers import ProcessCounter, SharedBatch, unpack
from stemstream.scans import keys
from stemstream.scans.plan import KeyValue
from stemstream.wire.protocol import FRAME_SHAPE, N_SECTORS

logger = logging.getLogger(__name__)
_rlog = RateLimitedLog(logger)

DEFAULT_BATCH = {"stempy": 4, "cpu": 16, "gpu": 64}
BF_RADIUS = 60.0  # pixels around the frame centre counted as bright field in the live preview
PREVIEW_MAX_SIDE = 256  # the preview image is binned down to at most this many positions a side
_IDLE_FLUSH_S = 0.02  # a batch whose filling paused this long is counted as far as it is ready
_BUFFER_WAIT_S = 2.0  # past this wait for a free batch, one more is allocated (never deadlock)

_FREE, _FILLING, _READY, _COUNTING, _DONE = range(5)


def counted_path(output_dir: Path, scan_number: int) -> Path:
    return Path(output_dir) / f"scan_{scan_number}_counted.h5"


@dataclass
class CountingConfig:
    """How a NodeGroup process counts; identical on every rank of a job."""

    output_dir: Path
    engine: str = "stempy"
    background_n_sigma: float = 4.0
    xray_n_sigma: float = 10.0
    threshold_frames: int = 40
    dark: np.ndarray | None = None
    gain: np.ndarray | None = None
    batch: int | None = None  # frames per engine call (default by engine)
    workers: int | None = None  # counting processes over shared memory (default: 1 for stempy, else 0)
    worker_cpus: list[int] | None = None  # pin the counting processes to these cores
    max_buffered_frames: int = 512  # frames in batch buffers before frame_buffer waits (soft: see above)
    sample_grace_s: float = 2.0
    scan_timeout_s: float = 60.0  # rank 0 writes what it has when a scan makes no progress this long
    preview_interval_s: float = 1.0
    frame_shape: tuple[int, int] = FRAME_SHAPE
    n_sectors: int = N_SECTORS

    def __post_init__(self) -> None:
        if not (0.5 <= self.background_n_sigma <= 20):
            raise CountingError(f"background n-sigma {self.background_n_sigma} is out of range; use 0.5 .. 20")
        if self.threshold_frames < 1:
            raise CountingError(f"threshold_frames must be >= 1, got {self.threshold_frames}")
        if self.batch is not None and self.batch < 1:
            raise CountingError(f"batch must be >= 1, got {self.batch}")
        if self.workers is not None and not 0 <= self.workers <= 1024:
            raise CountingError(f"workers must be 0 (count in this process) .. 1024, got {self.workers}")


class _Batch:
    """A batch buffer and the state of each of its slots."""

    def __init__(self, size: int, frame_shape: tuple[int, int], shared: bool = False) -> None:
        self.shared = SharedBatch(size, frame_shape) if shared else None
        self.data = self.shared.array if self.shared else np.empty((size, *frame_shape), dtype=np.uint16)
        self.size = size
        self.reset(-1)

    def reset(self, scan: int) -> None:
        self.scan = scan
        self.frames = [-1] * self.size
        self.state = [_FREE] * self.size
        self.n_assigned = 0
        self.last_assign = time.monotonic()
        self.queued = False

    def ready_runs(self) -> list[tuple[int, int]]:
        """Contiguous runs ``[i, j)`` of ready slots."""
        runs, i = [], 0
        while i < self.n_assigned:
            if self.state[i] == _READY:
                j = i
                while j < self.n_assigned and self.state[j] == _READY:
                    j += 1
                runs.append((i, j))
                i = j
            else:
                i += 1
        return runs

    def finished(self) -> bool:
        return all(s == _DONE for s in self.state[: self.n_assigned])


@dataclass
class _LocalScan:
    """What one rank holds of a scan."""

    number: int
    members: tuple[str, ...]
    scan_shape: tuple[int, int]
    local_uids: set[str]
    window: int
    ended: set[str] = field(default_factory=set)
    summaries: dict[str, dict[str, Any]] = field(default_factory=dict)
    thresholds: Thresholds | None = None
    failed: str | None = None
    events: dict[int, np.ndarray] = field(default_factory=dict)
    incomplete: dict[int, tuple[int, ...]] = field(default_factory=dict)
    batches: set[_Batch] = field(default_factory=set)  # holding slots of this scan
    queue: deque[_Batch] = field(default_factory=deque)  # batches with ready slots, oldest first
    outstanding: int = 0  # slots handed out and not yet done
    counted: int = 0
    engine_s: float = 0.0  # seconds inside the engine
    first_count: float | None = None  # time.time() of the first and last engine call
    last_count: float | None = None
    share: int = 0  # frames of this scan routed to this rank's NodeGroups
    reported: bool = False
    all_ended_at: float | None = None
    bf: np.ndarray | None = None  # bright-field events per frame (uint16), for the preview
    preview_dirty: bool = False

    @property
    def n_frames(self) -> int:
        return self.scan_shape[0] * self.scan_shape[1]

    @property
    def all_ended(self) -> bool:
        return self.local_uids <= self.ended


@dataclass
class _CoordScan:
    """What rank 0 gathers of a scan."""

    number: int
    members: tuple[str, ...]
    scan_shape: tuple[int, int]
    window: int
    samples: dict[int, bytes] = field(default_factory=dict)
    incomplete: set[int] = field(default_factory=set)
    ended_ranks: set[int] = field(default_factory=set)
    events: dict[int, dict[str, Any]] = field(default_factory=dict)
    thresholds: Thresholds | None = None
    thresholds_at: float | None = None
    sample_frames: list[int] = field(default_factory=list)
    failed: str | None = None
    decided: bool = False
    first_sample_at: float | None = None
    given_up: set[int] = field(default_factory=set)
    stall: tuple[int, float] | None = None  # (frame the sample waits for, since when)
    touched: float = field(default_factory=time.monotonic)
    written: bool = False


class CountingService:
    """Counts the frames of every NodeGroup in this process; rank 0 of the job also writes the files."""

    def __init__(
        self,
        config: CountingConfig,
        *,
        transport: RankTransport,
        uids: list[str],
        store: KeyValue | None = None,
        engine: CountingEngine | None = None,
    ) -> None:
        self.config = config
        self.transport = transport
        self.rank = transport.rank
        self.uids = list(uids)
        self.store = store
        self.engine = engine if engine is not None else get_engine(config.engine)
        self.batch_size = config.batch or DEFAULT_BATCH.get(self.engine.name, 16)
        # stempy holds the GIL while counting: count it in worker processes unless told otherwise.
        self.workers = config.workers if config.workers is not None else (1 if self.engine.name == "stempy" else 0)
        self._counter: ProcessCounter | None = None
        self._in_flight = 0
        self._all_batches: list[_Batch] = []
        self._cap = max(2, math.ceil(config.max_buffered_frames / self.batch_size))
        self._cond = threading.Condition()
        self._free: list[_Batch] = []
        self._n_batches = 0
        self._to_count = 0  # slots handed over (ready) or being counted: what counting will free
        self._filling: _Batch | None = None
        self._where: dict[tuple[int, int], tuple[_Batch, int]] = {}
        self._scans: dict[int, _LocalScan] = {}
        self._finished: set[int] = set()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._error: BaseException | None = None
        self._inbox: queue.Queue[dict[str, Any]] = queue.Queue()
        # rank 0 only
        self._uid_rank: dict[str, int] = {}
        self._heard: dict[int, float] = {}  # rank -> when rank 0 last heard from it (monotonic)
        self._coord: dict[int, _CoordScan] = {}
        self._written: dict[int, dict[str, Any]] = {}
        self._written_cond = threading.Condition()
        self._inside = _bright_field_mask(config.frame_shape)

    # ---- life cycle

    def start(self) -> CountingService:
        if self.workers:
            self._counter = ProcessCounter(
                self.engine.name,
                self.workers,
                dark=self.config.dark,
                gain=self.config.gain,
                frame_shape=self.config.frame_shape,
                cpus=self.config.worker_cpus,
            )
        # Allocate and touch every buffer now: first-touch page faults cost ~200 us per sector copy on the
        # receiving threads (measured), which is more than the copy itself.
        with self._cond:
            while self._n_batches < self._cap:
                b = self._new_batch()
                b.data.fill(0)
                self._free.append(b)
        self.transport.start(self._inbox.put)
        for name, target in (("count", self._count_loop), ("control", self._control_loop)):
            t = threading.Thread(target=self._guard(target), name=f"counting-{name}-{self.rank}", daemon=True)
            t.start()
            self._threads.append(t)
        self.transport.send(0, {"kind": "hello", "rank": self.rank, "uids": self.uids})
        logger.info(
            "counting on rank %d of %d: engine %s, batches of %d, NodeGroups %s",
            self.rank,
            self.transport.size,
            self.engine.name,
            self.batch_size,
            ", ".join(self.uids),
        )
        return self

    def stop(self) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        for t in self._threads:
            t.join(10)
        self.transport.close()
        if self._counter is not None:
            self._counter.close()
        for b in self._all_batches:
            if b.shared is not None:
                b.shared.release()
        self._all_batches.clear()

    def maybe_raise(self) -> None:
        if self._error is not None:
            raise self._error

    def _guard(self, target: Any) -> Any:
        def run() -> None:
            try:
                target()
            except BaseException as exc:  # kept for maybe_raise on the main thread
                logger.exception("counting thread failed")
                self._error = exc

        return run

    def consumer(self, uid: str) -> CountingConsumer:
        if uid not in self.uids:
            raise ValueError(f"NodeGroup {uid!r} was not declared to this counting service")
        return CountingConsumer(self, uid)

    def wait_written(self, scan_number: int, timeout: float) -> dict[str, Any]:
        """Rank 0: the ``/scans/<n>/counted`` record once the scan's file is written (or failed)."""
        deadline = time.monotonic() + timeout
        with self._written_cond:
            while scan_number not in self._written:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise WaitTimeout(f"scan {scan_number} not written within {timeout:.0f} s")
                self._written_cond.wait(left)
            return self._written[scan_number]

    # ---- the consumer side (NodeGroup threads)

    def _begin(self, uid: str, info: ScanInfo) -> None:
        announce = None
        with self._cond:
            ls = self._scans.get(info.scan_number)
            if ls is None:
                local = {u for u in info.members if u in self.uids}
                ls = _LocalScan(
                    number=info.scan_number,
                    members=tuple(info.members),
                    scan_shape=tuple(info.scan_shape),  # type: ignore[arg-type]
                    local_uids=local,
                    window=min(info.n_frames, 2 * self.config.threshold_frames),
                    share=sum(len(range(info.members.index(u), info.n_frames, len(info.members))) for u in local),
                    bf=np.zeros(info.n_frames, np.uint16),
                )
                self._scans[info.scan_number] = ls
                announce = {
                    "kind": "begin",
                    "rank": self.rank,
                    "scan": info.scan_number,
                    "members": list(info.members),
                    "scan_shape": list(info.scan_shape),
                }
        if announce is not None:
            self.transport.send(0, announce)

    def _frame_buffer(self, scan_number: int, frame: int) -> np.ndarray:
        with self._cond:
            ls = self._scans[scan_number]
            while True:
                b = self._filling
                if b is not None and b.scan == scan_number and b.n_assigned < b.size:
                    k = b.n_assigned
                    b.n_assigned += 1
                    b.frames[k] = frame
                    b.state[k] = _FILLING
                    b.last_assign = time.monotonic()
                    self._where[(scan_number, frame)] = (b, k)
                    ls.outstanding += 1
                    if b.n_assigned == b.size:
                        self._filling = None
                    return b.data[k]
                self._filling = None
                fresh = self._take_batch(scan_number)
                if self._filling is None:
                    self._filling = fresh
                    ls.batches.add(fresh)
                else:  # another thread installed one while we waited
                    self._free.append(fresh)

    def _take_batch(self, scan_number: int) -> _Batch:
        """A free batch (waits while the pool is at its cap, then grows it rather than deadlock).

        Only frames waiting to be counted hold it back: the wait is back-pressure on counting that is
        behind (or thresholds that are late), and only counting frees those slots. A batch can also be held
        by a frame still in assembly, which only the NodeGroup frees: a frame with sectors lost upstream, or
        every frame a scan had in flight when its aggregator died, until that scan times out (minutes in
        production). Waiting _BUFFER_WAIT_S per batch for those throttled every other scan to a few frames
        a second while it lasted, so the next scan stalled behind the dead one: the pool grows instead."""
        deadline = time.monotonic() + _BUFFER_WAIT_S
        while not self._free and self._n_batches >= self._cap and self._to_count >= self.config.max_buffered_frames:
            left = deadline - time.monotonic()
            if left <= 0 or self._stop.is_set():
                _rlog.warning(
                    "pool",
                    "counting buffers full (%d frames): allocating more; thresholds late or counting too slow?",
                    self._n_batches * self.batch_size,
                )
                break
            self._cond.wait(left)
        if not self._free and self._n_batches >= self._cap and self._to_count < self.config.max_buffered_frames:
            _rlog.warning(
                "pool-held",
                "counting buffers held by frames still in assembly (%d frames in the pool, %d to count): "
                "allocating more",
                self._n_batches * self.batch_size,
                self._to_count,
            )
        b = self._free.pop() if self._free else self._new_batch()
        b.reset(scan_number)
        return b

    def _new_batch(self) -> _Batch:
        b = _Batch(self.batch_size, self.config.frame_shape, shared=self.workers > 0)
        self._all_batches.append(b)
        self._n_batches += 1
        return b

    def _frame_ready(self, scan_number: int, frame: int, missing: tuple[int, ...]) -> None:
        sample = None
        with self._cond:
            b, k = self._where.pop((scan_number, frame))
            ls = self._scans[scan_number]
            if missing:
                ls.incomplete[frame] = tuple(missing)
            if len(missing) >= self.config.n_sectors:
                b.state[k] = _DONE  # nothing of it arrived: no events, as stempy gives
                self._slots_done(ls, b, 1)
            else:
                b.state[k] = _READY
                self._to_count += 1
                if not b.queued:
                    b.queued = True
                    ls.queue.append(b)
                if not missing and ls.thresholds is None and ls.failed is None and frame < ls.window:
                    sample = b.data[k].tobytes()  # under the lock: the slot cannot be reused meanwhile
            self._cond.notify_all()
        if sample is not None:
            self.transport.send(
                0, {"kind": "sample", "rank": self.rank, "scan": scan_number, "frame": frame, "data": sample}
            )

    def _end(self, uid: str, scan_number: int, summary: ScanSummary) -> None:
        ended = None
        with self._cond:
            ls = self._scans[scan_number]
            ls.ended.add(uid)
            ls.summaries[uid] = summary.to_dict()
            if ls.all_ended and ls.all_ended_at is None:
                ls.all_ended_at = time.monotonic()
                ended = {
                    "kind": "ended",
                    "rank": self.rank,
                    "scan": scan_number,
                    "incomplete": sorted(f for f in ls.incomplete if f < ls.window),
                }
            self._cond.notify_all()
        if ended is not None:
            self.transport.send(0, ended)
            self._maybe_report(scan_number)

    # ---- counting (one thread)

    def _slots_done(self, ls: _LocalScan, b: _Batch, n: int) -> None:
        ls.outstanding -= n
        if b.finished() and b is not self._filling:
            self._release(ls, b)

    def _release(self, ls: _LocalScan, b: _Batch) -> None:
        ls.batches.discard(b)
        if b.queued:
            ls.queue.remove(b)
        b.reset(-1)
        self._free.append(b)
        self._cond.notify_all()

    def _pick_work(self, now: float) -> tuple[_LocalScan, _Batch, list[tuple[int, int]]] | None:
        """The oldest batch with ready slots that is due: full, or no longer filling, or idle, or its
        scan has ended here. Its ready runs are marked as being counted."""
        for ls in self._scans.values():
            if ls.thresholds is None and ls.failed is None:
                continue
            if ls.all_ended and self._filling is not None and self._filling.scan == ls.number:
                self._filling = None  # nothing more comes for this scan
            for b in ls.queue:
                due = b is not self._filling or b.n_assigned == b.size or now - b.last_assign > _IDLE_FLUSH_S
                if not due:
                    continue
                ls.queue.remove(b)
                b.queued = False
                runs = b.ready_runs()
                for i, j in runs:
                    for k in range(i, j):
                        b.state[k] = _COUNTING
                return ls, b, runs
        return None

    def _count_loop(self) -> None:
        last_preview = 0.0
        most = max(1, self.workers) * 2  # keep every worker busy, and one more batch queued for each
        while not self._stop.is_set():
            now = time.monotonic()
            with self._cond:
                work = self._pick_work(now) if self._in_flight < most else None
                if work is None:
                    self._cond.wait(_IDLE_FLUSH_S / 2)
                else:
                    self._in_flight += 1
            if now - last_preview >= self.config.preview_interval_s:
                last_preview = now
                self._publish_previews()
            self._check_stalled(now)
            if work is None:
                continue
            ls, b, runs = work
            if ls.failed is not None:
                self._counted(ls, b, runs, [], ls.failed, 0.0)
                continue
            assert ls.thresholds is not None
            t0 = time.perf_counter()
            if self._counter is not None and b.shared is not None:
                future = self._counter.submit(b.shared, runs, ls.thresholds)
                future.add_done_callback(lambda fut, ls=ls, b=b, runs=runs, t0=t0: self._collect(fut, ls, b, runs, t0))
                continue
            results: list[tuple[int, list[np.ndarray]]] = []
            error = None
            try:
                for i, j in runs:
                    ev = self.engine.count(b.data[i:j], ls.thresholds, dark=self.config.dark, gain=self.config.gain)
                    results.append((i, ev))
            except StemstreamError as exc:
                error = f"counting failed: {exc}"
            self._counted(ls, b, runs, results, error, time.perf_counter() - t0)

    def _collect(self, future: Any, ls: _LocalScan, b: _Batch, runs: list[tuple[int, int]], t0: float) -> None:
        """A worker process's answer (called on the pool's result thread)."""
        try:
            results, error = unpack(future.result()), None
        except Exception as exc:  # a worker's error, or a worker that died
            results, error = [], f"counting failed in a worker process: {exc}"
        self._counted(ls, b, runs, results, error, time.perf_counter() - t0)

    def _counted(
        self,
        ls: _LocalScan,
        b: _Batch,
        runs: list[tuple[int, int]],
        results: list[tuple[int, list[np.ndarray]]],
        error: str | None,
        spent: float,
    ) -> None:
        if error is not None and error != ls.failed:
            logger.error("scan %d: %s", ls.number, error)
        with self._cond:
            self._in_flight -= 1
            if error is None:
                ls.engine_s += spent
                ls.last_count = time.time()
                ls.first_count = ls.first_count or ls.last_count - spent
            elif ls.failed is None:
                ls.failed = error
            for i, ev in results:
                for k, e in enumerate(ev, start=i):
                    f = b.frames[k]
                    ls.events[f] = e
                    if ls.bf is not None and e.size:
                        ls.bf[f] = int(np.count_nonzero(self._inside[e]))
            n = 0
            for i, j in runs:
                for k in range(i, j):
                    b.state[k] = _DONE
                n += j - i
            ls.counted += n
            self._to_count -= n
            ls.preview_dirty = True
            self._slots_done(ls, b, n)
            self._cond.notify_all()
        self._maybe_report(ls.number)

    def _check_stalled(self, now: float) -> None:
        """A rank whose scan ended but whose thresholds never came gives up (rank 0 lost?)."""
        stale = []
        with self._cond:
            for ls in self._scans.values():
                waiting = ls.thresholds is None and ls.failed is None and ls.all_ended_at is not None
                if waiting and now - ls.all_ended_at > self.config.scan_timeout_s:
                    ls.failed = f"no thresholds from rank 0 within {self.config.scan_timeout_s:.0f} s"
                    stale.append(ls.number)
                    self._cond.notify_all()
        for n in stale:
            logger.error("scan %d: no thresholds from rank 0; giving up on counting it", n)

    def _maybe_report(self, scan_number: int) -> None:
        with self._cond:
            ls = self._scans.get(scan_number)
            if ls is None or ls.reported or not ls.all_ended or ls.outstanding:
                return
            if ls.thresholds is None and ls.failed is None:
                return
            ls.reported = True
            del self._scans[scan_number]
            self._finished.add(scan_number)
            if self._filling is not None and self._filling.scan == scan_number:
                self._filling = None
            for b in list(ls.batches):
                self._release(ls, b)
        frames = np.fromiter(sorted(ls.events), np.uint32, count=len(ls.events))
        arrays = [ls.events[int(f)] for f in frames]
        lengths = np.fromiter((a.size for a in arrays), np.uint32, count=len(arrays))
        flat = np.concatenate(arrays).astype(np.uint32, copy=False) if arrays else np.zeros(0, np.uint32)
        self._publish_preview(ls, final=True)
        self.transport.send(
            0,
            {
                "kind": "events",
                "rank": self.rank,
                "scan": scan_number,
                "frames": frames.tobytes(),
                "lengths": lengths.tobytes(),
                "events": flat.tobytes(),
                "incomplete": [[f, list(m)] for f, m in sorted(ls.incomplete.items())],
                "summaries": ls.summaries,
                "failed": ls.failed,
                "counted_at": time.time(),
                "engine_s": ls.engine_s,
                "first_count": ls.first_count,
                "last_count": ls.last_count,
            },
        )
        logger.info(
            "scan %d: rank %d counted %d frames (%d incomplete)%s",
            scan_number,
            self.rank,
            ls.counted,
            len(ls.incomplete),
            f"; failed: {ls.failed}" if ls.failed else "",
        )

    # ---- live preview

    def _publish_previews(self) -> None:
        with self._cond:
            dirty = [ls for ls in self._scans.values() if ls.preview_dirty]
            # A scan that this rank's NodeGroups still hold open is not stalled here either: each of them
            # closes it by its own scan timeout (what came, then the rest as incomplete). Without this, a scan
            # whose data stopped (aggregator killed mid-scan) was written off as partial by rank 0 with the
            # same timeout, measured from the last frame counted, just before the NodeGroups closed it.
            held = [ls.number for ls in self._scans.values() if not ls.preview_dirty and not ls.all_ended]
        for n in held:
            self.transport.send(0, {"kind": "progress", "rank": self.rank, "scan": n})
        for ls in dirty:
            # Counting is progress: rank 0 must not write a scan off as stalled while a rank still counts it.
            self.transport.send(0, {"kind": "progress", "rank": self.rank, "scan": ls.number})
            self._publish_preview(ls)

    def _publish_preview(self, ls: _LocalScan, final: bool = False) -> None:
        if self.store is None or ls.bf is None:
            return
        with self._cond:
            ls.preview_dirty = False
            image = _binned(ls.bf.reshape(ls.scan_shape))
            record = {
                "rank": self.rank,
                "counted": ls.counted + sum(1 for m in ls.incomplete.values() if len(m) >= self.config.n_sectors),
                "share": ls.share,
                "shape": list(image.shape),
                "bf": image.astype(np.uint32).tobytes(),
                "final": final,
                "at": time.time(),
            }
        try:
            self.store.set(keys.preview(ls.number, self.rank), record)
        except StemstreamError as exc:
            _rlog.warning("preview", "scan %d: preview not published: %s", ls.number, exc)

    # ---- control messages (one thread; rank 0 also coordinates)

    def _control_loop(self) -> None:
        while not self._stop.is_set():
            try:
                message = self._inbox.get(timeout=0.1)
            except queue.Empty:
                message = None
            if message is not None:
                try:
                    self._on_message(message)
                except Exception:
                    logger.exception("rank %d: a %r message could not be handled", self.rank, message.get("kind"))
            if self.rank == 0:
                self._coordinate_timers(time.monotonic())

    def _on_message(self, message: dict[str, Any]) -> None:
        kind = message.get("kind")
        if isinstance(message.get("rank"), int):
            self._heard[message["rank"]] = time.monotonic()
        if kind == "thresholds":
            self._on_thresholds(message)
            return
        if self.rank != 0:
            logger.error("rank %d got a %r message, which only rank 0 handles", self.rank, kind)
            return
        if kind == "hello":
            for uid in message["uids"]:
                self._uid_rank[uid] = int(message["rank"])
            return
        n = int(message["scan"])
        cs = self._coord.get(n)
        if kind == "_decided":  # from our own thresholds worker
            if cs is not None:
                self._decided(cs, message["thresholds"], message["error"])
            return
        if cs is None:
            if kind == "progress":
                return  # the scan is written already
            if kind != "begin":
                logger.error("scan %d: %r before its begin; ignored", n, kind)
                return
            shape = (int(message["scan_shape"][0]), int(message["scan_shape"][1]))
            cs = self._coord[n] = _CoordScan(
                number=n,
                members=tuple(message["members"]),
                scan_shape=shape,
                window=min(shape[0] * shape[1], 2 * self.config.threshold_frames),
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

    def _on_thresholds(self, message: dict[str, Any]) -> None:
        n = int(message["scan"])
        with self._cond:
            ls = self._scans.get(n)
            if ls is None:
                return
            if message.get("error"):
                ls.failed = str(message["error"])
            else:
                ls.thresholds = Thresholds.from_dict(message["thresholds"])
            self._cond.notify_all()
        self._maybe_report(n)

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
        ranks = self._ranks_of(cs)
        if ranks is None:
            return
        want = self.config.threshold_frames
        highest = max(cs.samples, default=-1)
        chosen: list[int] = []
        for f in range(cs.window):
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
            error = f"no complete frame among the first {cs.window} of the scan to compute thresholds from"
            self._decided(cs, None, error)
            return
        shape = self.config.frame_shape
        settings = (self.config.background_n_sigma, self.config.xray_n_sigma)
        if self._counter is not None:
            # On a counting core, not on this process's (which receives): ~0.1 s of CPU per scan.
            sample = SharedBatch(len(chosen), shape)
            for k, f in enumerate(chosen):
                sample.array[k] = np.frombuffer(cs.samples[f], np.uint16).reshape(shape)
            cs.samples.clear()
            future = self._counter.thresholds(sample, *settings)

            def done(fut: Any, cs: _CoordScan = cs, sample: SharedBatch = sample) -> None:
                sample.release()
                try:
                    result, error = Thresholds.from_dict(fut.result()), None
                except CountingError as exc:
                    result, error = None, str(exc)
                except Exception as exc:  # a worker that died
                    result, error = None, f"thresholds: the counting worker failed: {exc}"
                self._inbox.put({"kind": "_decided", "scan": cs.number, "thresholds": result, "error": error})

            future.add_done_callback(done)
            return
        frames = np.stack([np.frombuffer(cs.samples[f], np.uint16).reshape(shape) for f in chosen])
        cs.samples.clear()
        try:
            thresholds = compute_thresholds(
                frames, dark=self.config.dark, gain=self.config.gain, background_n_sigma=settings[0],
                xray_n_sigma=settings[1],
            )  # fmt: skip
        except CountingError as exc:
            self._decided(cs, None, str(exc))
        else:
            self._decided(cs, thresholds, None)

    def _decided(self, cs: _CoordScan, thresholds: Thresholds | None, error: str | None) -> None:
        """The scan's thresholds (or why there are none): sent to every rank of the scan."""
        cs.thresholds, cs.failed = thresholds, error
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
            "thresholds": cs.thresholds.to_dict() if cs.thresholds else None,
            "error": cs.failed,
        }
        for r in sorted(self._ranks_of(cs) or ()):
            self.transport.send(r, reply)
        self._try_write(cs)

    def _coordinate_timers(self, now: float) -> None:
        for cs in list(self._coord.values()):
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

    def _try_write(self, cs: _CoordScan) -> None:
        ranks = self._ranks_of(cs)
        if cs.written or ranks is None or not ranks <= set(cs.events) or cs.thresholds_at is None:
            return
        self._write(cs, partial=[])

    def _write(self, cs: _CoordScan, partial: list[int]) -> None:
        cs.written = True
        self._coord.pop(cs.number, None)
        n_frames = cs.scan_shape[0] * cs.scan_shape[1]
        empty = np.zeros(0, np.uint32)
        events: list[np.ndarray] = [empty] * n_frames
        missing_pairs: list[tuple[int, int]] = []
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
                missing_pairs.extend((int(f), int(s)) for s in sectors)
            summaries.update(msg["summaries"])
            if msg.get("failed") and msg["failed"] not in failures:
                failures.append(msg["failed"])
            counted_at = max(counted_at, float(msg.get("counted_at") or 0))
        engine_s = sum(float(m.get("engine_s") or 0) for m in cs.events.values())
        count_span = [t for m in cs.events.values() for t in (m.get("first_count"), m.get("last_count")) if t]
        firsts = [s["first_ts"] for s in summaries.values() if s.get("first_ts")]
        lasts = [s["last_ts"] for s in summaries.values() if s.get("last_ts")]
        messages = {
            key: sum(int(s.get(key, 0)) for s in summaries.values())
            for key in ("expected", "received", "lost_upstream", "frames_complete", "frames_incomplete")
        }
        messages["rejected"] = sum(sum(s.get("rejected", {}).values()) for s in summaries.values())
        # Frames of a NodeGroup that never reported (its rank died or went silent) were not counted: the
        # file says so, with every sector of them missing, so that nothing claims to be counted that is not.
        n_members = len(cs.members)
        for i, uid in enumerate(cs.members):
            if uid not in summaries:
                for f in range(i, n_frames, n_members):
                    missing_pairs.extend((f, s) for s in range(self.config.n_sectors))
        incomplete_frames = sorted({f for f, _ in missing_pairs})
        n_events = int(sum(e.size for e in events))
        record: dict[str, Any] = {
            "scan": cs.number,
            "frames": n_frames,
            "frames_incomplete": len(incomplete_frames),
            "events": n_events,
            "engine": self.engine.name,
            "thresholds": cs.thresholds.to_dict() if cs.thresholds else None,
            "background_n_sigma": self.config.background_n_sigma,
            "members": list(cs.members),
            "ranks": len(cs.events),
            "first_frame": min(firsts) if firsts else None,
            "last_frame": max(lasts) if lasts else None,
            "messages": messages,
            "engine_seconds": engine_s,
            "first_count": min(count_span) if count_span else None,
            "last_count": max(count_span) if count_span else None,
            "thresholds_at": cs.thresholds_at,
            "host": socket.gethostname(),
        }
        if failures:
            record.update(status="failed", error="; ".join(failures), path=None)
        else:
            path = counted_path(self.config.output_dir, cs.number)
            metadata = {
                "engine": self.engine.name,
                "source": "stream",
                "scan_number": cs.number,
                "thresholds": cs.thresholds,
                "background_n_sigma": self.config.background_n_sigma,
                "xray_n_sigma": self.config.xray_n_sigma,
                "threshold_sample_frames": cs.sample_frames,
                "frames_incomplete": len(incomplete_frames),
                "missing_sectors": np.asarray(sorted(missing_pairs), dtype=np.int64).reshape(-1, 2),
                "members": list(cs.members),
                "ranks_missing": partial,
                "messages": messages,
                "timings": {
                    "first_frame": record["first_frame"] or 0.0,
                    "last_frame": record["last_frame"] or 0.0,
                    "thresholds": cs.thresholds_at or 0.0,
                    "counted": counted_at,
                },
            }
            try:
                written = write_counted(path, events, scan_shape=cs.scan_shape, metadata=metadata)
            except (OSError, StemstreamError) as exc:
                record.update(status="failed", error=f"writing {path} failed: {exc}; free space there", path=None)
            else:
                now = time.time()
                record.update(
                    status="partial" if partial else "counted",
                    path=str(written.resolve()),
                    written_at=now,
                    seconds_after_last_frame=(now - record["last_frame"]) if record["last_frame"] else None,
                )
                if partial:
                    record["ranks_missing"] = partial
        log = logger.error if record["status"] == "failed" else logger.info
        log(
            "scan %d: %s (%d frames, %d incomplete, %d events)%s",
            cs.number,
            record.get("path") or record["status"],
            n_frames,
            len(incomplete_frames),
            n_events,
            f": {record.get('error')}" if record.get("error") else "",
        )
        if self.store is not None:
            try:
                self.store.set(keys.counted(cs.number), record)
            except StemstreamError as exc:
                logger.error("scan %d: the counted record did not reach the store: %s", cs.number, exc)
        with self._written_cond:
            self._written[cs.number] = record
            self._written_cond.notify_all()


class CountingConsumer:
    """One NodeGroup's view of the :class:`CountingService` (a FrameConsumer)."""

    # Producers hold a scan until its counted file is written (plane.retention).
    acknowledges = "counted"

    def __init__(self, service: CountingService, uid: str) -> None:
        self._service = service
        self.uid = uid

    def begin_scan(self, scan: ScanInfo) -> None:
        self._service._begin(self.uid, scan)

    def frame_buffer(self, scan_number: int, frame_number: int) -> np.ndarray:
        return self._service._frame_buffer(scan_number, frame_number)

    def frame_ready(self, scan_number: int, frame_number: int, missing_sectors: tuple[int, ...]) -> None:
        self._service._frame_ready(scan_number, frame_number, missing_sectors)

    def end_scan(self, scan_number: int, summary: ScanSummary) -> None:
        self._service._end(self.uid, scan_number, summary)


def _bright_field_mask(frame_shape: tuple[int, int]) -> np.ndarray:
    rows, cols = frame_shape
    yy, xx = np.mgrid[0:rows, 0:cols]
    cy, cx = (rows - 1) / 2, (cols - 1) / 2
    return (((yy - cy) ** 2 + (xx - cx) ** 2) <= BF_RADIUS**2).ravel()


def _binned(image: np.ndarray) -> np.ndarray:
    """Sum ``image`` in blocks so that neither side exceeds PREVIEW_MAX_SIDE (store values stay small)."""
    rows, cols = image.shape
    f = max(1, math.ceil(max(rows, cols) / PREVIEW_MAX_SIDE))
    if f == 1:
        return image
    pad = np.zeros((math.ceil(rows / f) * f, math.ceil(cols / f) * f), image.dtype)
    pad[:rows, :cols] = image
    return pad.reshape(pad.shape[0] // f, f, pad.shape[1] // f, f).sum(axis=(1, 3))


def preview_image(items: dict[str, Any], scan_number: int) -> tuple[np.ndarray | None, int, int]:
    """From store items under ``/scans/<n>/preview/``: (bright-field image so far, frames counted, frames)."""
    prefix = keys.preview_prefix(scan_number)
    image = None
    counted = share = 0
    for key, rec in items.items():
        if not key.startswith(prefix) or not isinstance(rec, dict):
            continue
        shape = tuple(int(x) for x in rec.get("shape", ()))
        part = np.frombuffer(rec.get("bf", b""), np.uint32)
        if len(shape) != 2 or part.size != shape[0] * shape[1]:
            continue
        part = part.reshape(shape).astype(np.float64)
        image = part if image is None else image + part
        counted += int(rec.get("counted", 0))
        share += int(rec.get("share", 0))
    return image, counted, share

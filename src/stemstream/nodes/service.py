"""Electron counting on the NodeGroups: frames counted as they arrive, one sparse HDF5 file per scan.

One :class:`CountingService` per NodeGroup process (per MPI rank) serves every NodeGroup of that process
through :meth:`CountingService.consumer`, a :class:`~stemstream.nodes.consumer.FrameConsumer`. Its parts:
the configuration (``nodes.config``), the batch pool (``nodes.batches``), the count loop (here), what a rank
holds of a scan and sends to rank 0 (``nodes.localscan``), rank 0's threshold decision and file
(``nodes.coordinator``), the live preview (``nodes.preview``), messages between ranks (``nodes.ranks``)
and counting worker processes (``nodes.workers``).

Per scan:

1. **Batches.** ``frame_buffer`` hands out slots of batch buffers ``(B, 576, 576)``: the NodeGroup writes
   each sector straight into its slot, and the engine later reads runs of ready slots in place (no copy
   between assembly and counting). ``B`` is 1 for stempy (it counts frame by frame), 16 for the cpu engine
   and 64 for the gpu engine.
2. **One threshold per scan.** The *sample* is the first ``threshold_samples`` complete frames of the
   scan's seeded candidates (:func:`~stemstream.counting.thresholds.sample_candidates`, docs/counting.md),
   whichever rank holds them: each rank sends its complete candidate frames to rank 0, which computes the
   thresholds as stempy does (:func:`~stemstream.counting.compute_thresholds`) and their stability figure
   once and sends them to every rank of the scan. A candidate that has not arrived is waited for until its
   rank reports the scan's end, or for ``sample_grace_s`` once later frames are in (sectors lost upstream
   make it incomplete; it cannot be in the sample). Frames wait in their slots until the thresholds are known.
3. **Counting** runs on one thread per rank, off the receiving threads; the cpu and gpu engines are
   parallel inside. Complete frames are counted as they arrive; incomplete ones (missing rows zeroed, as
   stempy's reader fills them) when the NodeGroup hands them over after every expected message is in;
   frames with every sector lost have no events, as in stempy.
4. **Gather and write.** When its NodeGroups have ended the scan and every frame is counted, a rank sends
   its events to rank 0, which writes ``<output_dir>/scan_<n>_counted.h5``
   (:func:`~stemstream.counting.write_counted`) and publishes ``/scans/<n>/counted`` in the store.

While a scan streams, each rank publishes ``/scans/<n>/preview/<rank>`` about once a second: frames counted
of its share, and the bright-field events per probe position so far (a live virtual bright-field image).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import replace
from typing import Any

import numpy as np

from stemstream.analyses.board import Board
from stemstream.analyses.rank import RankAnalyses
from stemstream.counting import CountingEngine, Thresholds, get_engine
from stemstream.counting.thresholds import sample_candidates
from stemstream.errors import CountingError, StemstreamError
from stemstream.log import RateLimitedLog
from stemstream.nodes.batches import COUNTING, DONE, READY, Batch, BatchPool
from stemstream.nodes.config import DEFAULT_BATCH, CountingConfig
from stemstream.nodes.consumer import ScanInfo, ScanSummary
from stemstream.nodes.coordinator import Coordinator
from stemstream.nodes.localscan import LocalScan, ScanKey, events_message, frames_and_events
from stemstream.nodes.preview import bright_field_mask, preview_record
from stemstream.nodes.ranks import RankTransport
from stemstream.nodes.workers import ProcessCounter, unlink_orphaned_segments, unpack
from stemstream.scans import keys
from stemstream.scans.plan import KeyValue
from stemstream.scans.records import AnalysesRecord

logger = logging.getLogger(__name__)
_rlog = RateLimitedLog(logger)

_IDLE_FLUSH_S = 0.02  # a batch whose filling paused this long is counted as far as it is ready


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
        self._cond = threading.Condition()
        self._scans: dict[ScanKey, LocalScan] = {}
        self._finished: set[ScanKey] = set()
        self._stop = threading.Event()
        self._pool = BatchPool(
            self.batch_size,
            config.frame_shape,
            shared=self.workers > 0,
            max_buffered_frames=config.max_buffered_frames,
            cond=self._cond,
            stop=self._stop,
        )
        self._threads: list[threading.Thread] = []
        self._error: BaseException | None = None
        self._inbox: queue.Queue[dict[str, Any]] = queue.Queue()
        self._coordinator: Coordinator | None = None  # rank 0 only
        self._inside = bright_field_mask(config.frame_shape)
        self._frames_counted = 0  # by the engine, every scan (metrics)
        self._frames_failed = 0  # whose counting failed
        self.analyses = RankAnalyses(config.analyses or {}, self.rank)  # docs/analyses.md
        self._board: Board | None = None  # rank 0: every rank's analyses merged, and the live view's state
        self._view: Any = None

    # ---- life cycle

    def start(self) -> CountingService:
        if self.workers:
            unlink_orphaned_segments()  # of an earlier counting process on this node that was killed
            self._counter = ProcessCounter(
                self.engine.name,
                self.workers,
                dark=self.config.dark,
                gain=self.config.gain,
                row_dark=self.config.row_dark,
                frame_shape=self.config.frame_shape,
                cpus=self.config.worker_cpus,
            )
        if self.rank == 0:
            self._coordinator = Coordinator(
                self.config, self.transport, self.store, self.engine.name, self._counter, self._inbox.put
            )
            if self.analyses.enabled:
                self._start_board()
        with self._cond:
            self._pool.prefill()
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
        if self._view is not None:
            self._view.stop()
        if self._counter is not None:
            self._counter.close()
        self._pool.close()

    def maybe_raise(self) -> None:
        if self._error is not None:
            raise self._error

    def counts(self) -> dict[str, int]:
        """Frames counted (and failed), frames waiting to be counted (handed over, not counted yet) and how long
        the oldest of them has waited (``lag_ms``), scans open on this rank; rank 0 adds the files it wrote by
        status (``files.<status>``)."""
        now = time.monotonic()
        with self._cond:
            waiting = [b.ready_since for ls in self._scans.values() for b in ls.queue]
            out = {
                "frames_counted": self._frames_counted,
                "frames_failed": self._frames_failed,
                "frames_to_count": self._pool.to_count,
                "lag_ms": int((now - min(waiting)) * 1000) if waiting else 0,
                "scans_open": len(self._scans),
            }
        if self._coordinator is not None:
            out.update({f"files.{status}": n for status, n in self._coordinator.files().items()})
        return out

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

    def wait_written(self, scan_number: int, timeout: float, start: str | None = None) -> dict[str, Any]:
        """Rank 0: the ``/scans/<n>/counted`` record once the scan's file is written (or failed); the newest
        acquisition of ``scan_number``, or ``start``."""
        if self._coordinator is None:
            raise CountingError(f"rank {self.rank} does not write files; ask rank 0")
        return self._coordinator.wait_written(scan_number, timeout, start)

    # ---- the consumer side (NodeGroup threads)

    def _begin(self, uid: str, info: ScanInfo) -> ScanKey:
        announce = None
        key = (info.scan_number, info.start)
        with self._cond:
            ls = self._scans.get(key)
            if ls is None:
                local = {u for u in info.members if u in self.uids}
                ls = LocalScan(
                    number=info.scan_number,
                    start=info.start,
                    members=tuple(info.members),
                    scan_shape=tuple(info.scan_shape),  # type: ignore[arg-type]
                    local_uids=local,
                    candidates=frozenset(self._candidates(info.n_frames).tolist()),
                    share=sum(len(range(info.members.index(u), info.n_frames, len(info.members))) for u in local),
                    bf=np.zeros(info.n_frames, np.uint16),
                )
                self._scans[key] = ls
                announce = ls.message("begin", self.rank, members=list(info.members), scan_shape=list(info.scan_shape))
        if announce is not None:
            self.analyses.begin(info.scan_number, tuple(info.scan_shape), self.config.frame_shape)  # type: ignore[arg-type]
            self.transport.send(0, announce)
        return key

    def _candidates(self, n_frames: int) -> np.ndarray:
        c = self.config
        return sample_candidates(n_frames, c.threshold_samples, c.threshold_window)

    def _frame_buffer(self, key: ScanKey, frame: int) -> np.ndarray:
        with self._cond:
            ls = self._scans[key]
            b, k, taken = self._pool.slot(key, frame)
            if taken is not None:
                ls.batches.add(taken)
            ls.outstanding += 1
            return b.data[k]

    def _frame_ready(self, key: ScanKey, frame: int, missing: tuple[int, ...]) -> None:
        sample = None
        with self._cond:
            b, k = self._pool.locate(key, frame)
            ls = self._scans[key]
            if missing:
                ls.incomplete[frame] = tuple(missing)
            if len(missing) >= self.config.n_sectors:
                b.state[k] = DONE  # nothing of it arrived: no events, as stempy gives
                self._slots_done(ls, b, 1)
            else:
                b.state[k] = READY
                self._pool.to_count += 1
                if not b.queued:
                    b.queued = True
                    b.ready_since = time.monotonic()
                    ls.queue.append(b)
                if not missing and ls.thresholds is None and ls.failed is None and frame in ls.candidates:
                    sample = b.data[k].tobytes()  # under the lock: the slot cannot be reused meanwhile
            self._cond.notify_all()
        if sample is not None:
            self.transport.send(0, ls.message("sample", self.rank, frame=frame, data=sample))

    def _end(self, uid: str, key: ScanKey, summary: ScanSummary) -> None:
        ended = None
        with self._cond:
            ls = self._scans[key]
            ls.ended.add(uid)
            ls.summaries[uid] = summary.to_dict()
            if ls.all_ended and ls.all_ended_at is None:
                ls.all_ended_at = time.monotonic()
                ended = ls.message(
                    "ended", self.rank, incomplete=sorted(f for f in ls.incomplete if f in ls.candidates)
                )
            self._cond.notify_all()
        if ended is not None:
            self.transport.send(0, ended)
            self._maybe_report(key)

    # ---- counting (one thread)

    def _slots_done(self, ls: LocalScan, b: Batch, n: int) -> None:
        ls.outstanding -= n
        if b.finished() and b is not self._pool.filling:
            self._release(ls, b)

    def _release(self, ls: LocalScan, b: Batch) -> None:
        ls.batches.discard(b)
        if b.queued:
            ls.queue.remove(b)
        self._pool.release(b)

    def _pick_work(self, now: float) -> tuple[LocalScan, Batch, list[tuple[int, int]]] | None:
        """The oldest batch with ready slots that is due: full, or no longer filling, or idle, or its
        scan has ended here. Its ready runs are marked as being counted."""
        for ls in self._scans.values():
            if ls.thresholds is None and ls.failed is None:
                continue
            if ls.all_ended:
                self._pool.stop_filling(ls.key)  # nothing more comes for this scan
            for b in ls.queue:
                due = b is not self._pool.filling or b.n_assigned == b.size or now - b.last_assign > _IDLE_FLUSH_S
                if not due:
                    continue
                ls.queue.remove(b)
                b.queued = False
                runs = b.ready_runs()
                for i, j in runs:
                    for k in range(i, j):
                        b.state[k] = COUNTING
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
                    ev = self.engine.count(
                        b.data[i:j],
                        ls.thresholds,
                        dark=self.config.dark,
                        gain=self.config.gain,
                        row_dark=self.config.row_dark,
                    )
                    results.append((i, ev))
            except StemstreamError as exc:
                error = f"counting failed: {exc}"
            self._counted(ls, b, runs, results, error, time.perf_counter() - t0)

    def _collect(self, future: Any, ls: LocalScan, b: Batch, runs: list[tuple[int, int]], t0: float) -> None:
        """A worker process's answer (called on the pool's result thread)."""
        try:
            results, error = unpack(future.result()), None
        except Exception as exc:  # a worker's error, or a worker that died
            results, error = [], f"counting failed in a worker process: {exc}"
        self._counted(ls, b, runs, results, error, time.perf_counter() - t0)

    def _counted(
        self,
        ls: LocalScan,
        b: Batch,
        runs: list[tuple[int, int]],
        results: list[tuple[int, list[np.ndarray]]],
        error: str | None,
        spent: float,
    ) -> None:
        if error is not None and error != ls.failed:
            logger.error("scan %d: %s", ls.number, error)
        if error is None and results:  # before the slots are done, so before the scan can be reported
            self.analyses.process(ls.number, *frames_and_events(b, results))
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
                    b.state[k] = DONE
                n += j - i
            ls.counted += n
            if error is None:
                self._frames_counted += n
            else:
                self._frames_failed += n
            self._pool.to_count -= n
            ls.preview_dirty = True
            self._slots_done(ls, b, n)
            self._cond.notify_all()
        self._maybe_report(ls.key)

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

    def _maybe_report(self, key: ScanKey) -> None:
        with self._cond:
            ls = self._scans.get(key)
            if ls is None or ls.reported or not ls.all_ended or ls.outstanding:
                return
            if ls.thresholds is None and ls.failed is None:
                return
            ls.reported = True
            del self._scans[key]
            self._finished.add(key)
            self._pool.stop_filling(key)
            for b in list(ls.batches):
                self._release(ls, b)
        self._publish_preview(ls, final=True)
        self._send_partials(ls, final=True)
        self.transport.send(0, events_message(ls, self.rank))
        logger.info(
            "scan %d: rank %d counted %d frames (%d incomplete)%s",
            ls.number,
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
            held = [ls for ls in self._scans.values() if not ls.preview_dirty and not ls.all_ended]
        for ls in held:
            self.transport.send(0, ls.message("progress", self.rank))
        for ls in dirty:
            # Counting is progress: rank 0 must not write a scan off as stalled while a rank still counts it.
            self.transport.send(0, ls.message("progress", self.rank))
            self._publish_preview(ls)
            self._send_partials(ls)

    def _publish_preview(self, ls: LocalScan, final: bool = False) -> None:
        if self.store is None or ls.bf is None:
            return
        with self._cond:
            ls.preview_dirty = False
            gone = sum(1 for m in ls.incomplete.values() if len(m) >= self.config.n_sectors)
            record = preview_record(
                self.rank, ls.bf, ls.scan_shape, ls.counted + gone, ls.share, final, ls.thresholds, ls.halves
            )
            record = replace(record, start=ls.start)
        try:
            self.store.set(keys.preview(ls.number, self.rank), record.to_record(), ttl=self.config.preview_ttl_s)
        except StemstreamError as exc:
            _rlog.warning("preview", "scan %d: preview not published: %s", ls.number, exc)

    # ---- analyses (docs/analyses.md): partials to rank 0; rank 0 merges them and serves the live view

    def _send_partials(self, ls: LocalScan, final: bool = False) -> None:
        gone = sum(1 for m in ls.incomplete.values() if len(m) >= self.config.n_sectors)
        progress = {"counted": ls.counted + gone, "share": ls.share, "incomplete": len(ls.incomplete)}
        message = self.analyses.message(ls.number, final=final, **progress)
        if message is not None:
            self.transport.send(0, message)

    def _start_board(self) -> None:
        def record(scan: int, value: dict[str, Any]) -> None:
            if self.store is not None:
                self.store.set(keys.analyses(scan), AnalysesRecord.from_record(value).to_record())

        self._board = Board(self.analyses.specs, self.transport.send, self.transport.size, record=record)
        assert self._coordinator is not None
        self._coordinator.analyses = self._board
        if self.config.view is not None:
            from stemstream.analyses.page import LiveView

            self._view = LiveView(self._board, self.config.view, post=self._inbox.put).start()

    @property
    def view_url(self) -> str | None:
        """Rank 0: the live view's address (with its token), None elsewhere or without a view."""
        return self._view.url if self._view is not None else None

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
            if self._coordinator is not None:
                self._coordinator.tick(time.monotonic())
            if self._board is not None:
                self._board.tick()

    def _on_message(self, message: dict[str, Any]) -> None:
        kind = message.get("kind")
        if kind == "thresholds":
            self._on_thresholds(message)
            return
        if kind == "analysis_params":
            self.analyses.apply(message)
            return
        if self._coordinator is None:
            logger.error("rank %d got a %r message, which only rank 0 handles", self.rank, kind)
            return
        if isinstance(message.get("rank"), int):
            self._coordinator.heard(message["rank"])
        if kind in ("partials", "_settings") and self._board is not None:
            self._board.on_message(message)
            return
        self._coordinator.on_message(kind, message)

    def _on_thresholds(self, message: dict[str, Any]) -> None:
        key = (int(message["scan"]), str(message.get("start") or ""))
        with self._cond:
            ls = self._scans.get(key)
            if ls is None:
                return
            if message.get("error"):
                ls.failed = str(message["error"])
            else:
                ls.thresholds = Thresholds.from_dict(message["thresholds"])
                ls.halves = message.get("halves")
            self._cond.notify_all()
        self._maybe_report(key)


class CountingConsumer:
    """One NodeGroup's view of the :class:`CountingService` (a FrameConsumer)."""

    # Producers hold a scan until its counted file is written (plane.retention).
    acknowledges = "counted"

    def __init__(self, service: CountingService, uid: str) -> None:
        self._service = service
        self.uid = uid
        # The acquisition of each scan number this NodeGroup has begun last: it ends one acquisition of a
        # number before it begins the next, so the frames of a number are always the newest begun's.
        self._current: dict[int, ScanKey] = {}

    def begin_scan(self, scan: ScanInfo) -> None:
        self._current[scan.scan_number] = self._service._begin(self.uid, scan)

    def frame_buffer(self, scan_number: int, frame_number: int) -> np.ndarray:
        return self._service._frame_buffer(self._current[scan_number], frame_number)

    def frame_ready(self, scan_number: int, frame_number: int, missing_sectors: tuple[int, ...]) -> None:
        self._service._frame_ready(self._current[scan_number], frame_number, missing_sectors)

    def end_scan(self, scan_number: int, summary: ScanSummary) -> None:
        self._service._end(self.uid, self._current[scan_number], summary)

    @property
    def registry_fields(self) -> dict[str, Any]:
        """Added to the NodeGroup's registry record: the live view's address (rank 0)."""
        url = self._service.view_url
        return {"view": url} if url else {}

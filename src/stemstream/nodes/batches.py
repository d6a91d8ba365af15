"""Batch buffers the NodeGroup assembles frames into and the engine counts in place (no copy between them).

A :class:`Batch` is a ``(B, rows, cols)`` uint16 array (in shared memory when worker processes count it)
with a state per slot. The :class:`BatchPool` hands slots out to the receiving threads one frame at a time,
filling one batch per scan at a time, and takes batches back once every slot is counted. It shares the
counting service's condition variable: every method expects it held.
"""

from __future__ import annotations

import logging
import threading
import time

import numpy as np

from stemstream.log import RateLimitedLog
from stemstream.nodes.workers import SharedBatch

logger = logging.getLogger(__name__)
_rlog = RateLimitedLog(logger)

FREE, FILLING, READY, COUNTING, DONE = range(5)
BUFFER_WAIT_S = 2.0  # past this wait for a free batch, one more is allocated (never deadlock)


class Batch:
    """A batch buffer and the state of each of its slots."""

    def __init__(self, size: int, frame_shape: tuple[int, int], shared: bool = False) -> None:
        self.shared = SharedBatch(size, frame_shape) if shared else None
        self.data = self.shared.array if self.shared else np.empty((size, *frame_shape), dtype=np.uint16)
        self.size = size
        self.reset(-1)

    def reset(self, scan: int) -> None:
        self.scan = scan
        self.frames = [-1] * self.size
        self.state = [FREE] * self.size
        self.n_assigned = 0
        self.last_assign = time.monotonic()
        self.queued = False
        self.ready_since = 0.0  # when it was last queued with ready slots (the counting lag)

    def assign(self, frame: int) -> int:
        """The next slot, now filling with ``frame``."""
        k = self.n_assigned
        self.n_assigned += 1
        self.frames[k] = frame
        self.state[k] = FILLING
        self.last_assign = time.monotonic()
        return k

    def ready_runs(self) -> list[tuple[int, int]]:
        """Contiguous runs ``[i, j)`` of ready slots."""
        runs, i = [], 0
        while i < self.n_assigned:
            if self.state[i] == READY:
                j = i
                while j < self.n_assigned and self.state[j] == READY:
                    j += 1
                runs.append((i, j))
                i = j
            else:
                i += 1
        return runs

    def finished(self) -> bool:
        return all(s == DONE for s in self.state[: self.n_assigned])


class BatchPool:
    """Every batch of one counting service: the free ones, the one being filled, and where each frame is."""

    def __init__(
        self,
        batch_size: int,
        frame_shape: tuple[int, int],
        *,
        shared: bool,
        max_buffered_frames: int,
        cond: threading.Condition,
        stop: threading.Event,
    ) -> None:
        self.batch_size = batch_size
        self.frame_shape = frame_shape
        self.shared = shared
        self.max_buffered_frames = max_buffered_frames
        self.cap = max(2, -(-max_buffered_frames // batch_size))
        self._cond = cond
        self._stop = stop
        self._all: list[Batch] = []
        self._free: list[Batch] = []
        self.filling: Batch | None = None
        self.to_count = 0  # slots handed over (ready) or being counted: what counting will free
        self._where: dict[tuple[int, int], tuple[Batch, int]] = {}

    def prefill(self) -> None:
        """Allocate and touch every buffer now: first-touch page faults cost ~200 us per sector copy on the
        receiving threads (measured), which is more than the copy itself."""
        while len(self._all) < self.cap:
            b = self._new()
            b.data.fill(0)
            self._free.append(b)

    def slot(self, scan_number: int, frame: int) -> tuple[Batch, int, Batch | None]:
        """(batch, slot, the batch if it was newly taken for this scan) for ``frame``; may wait for a batch."""
        taken = None
        while True:
            b = self.filling
            if b is not None and b.scan == scan_number and b.n_assigned < b.size:
                k = b.assign(frame)
                self._where[(scan_number, frame)] = (b, k)
                if b.n_assigned == b.size:
                    self.filling = None
                return b, k, taken
            self.filling = None
            fresh = self._take(scan_number)
            if self.filling is None:
                self.filling = taken = fresh
            else:  # another thread installed one while we waited
                self._free.append(fresh)

    def locate(self, scan_number: int, frame: int) -> tuple[Batch, int]:
        """Where ``frame`` was assigned (once: the entry is removed)."""
        return self._where.pop((scan_number, frame))

    def stop_filling(self, scan_number: int) -> None:
        """Nothing more comes for ``scan_number``: its batch is not filled any further."""
        if self.filling is not None and self.filling.scan == scan_number:
            self.filling = None

    def release(self, b: Batch) -> None:
        b.reset(-1)
        self._free.append(b)
        self._cond.notify_all()

    def close(self) -> None:
        for b in self._all:
            if b.shared is not None:
                b.shared.release()
        self._all.clear()
        self._free.clear()

    def _take(self, scan_number: int) -> Batch:
        """A free batch (waits while the pool is at its cap, then grows it rather than deadlock).

        Only frames waiting to be counted hold it back: the wait is back-pressure on counting that is
        behind (or thresholds that are late), and only counting frees those slots. A batch can also be held
        by a frame still in assembly, which only the NodeGroup frees: a frame with sectors lost upstream, or
        every frame a scan had in flight when its aggregator died, until that scan times out (minutes in
        production). Waiting BUFFER_WAIT_S per batch for those throttled every other scan to a few frames
        a second while it lasted, so the next scan stalled behind the dead one: the pool grows instead."""
        deadline = time.monotonic() + BUFFER_WAIT_S
        while not self._free and len(self._all) >= self.cap and self.to_count >= self.max_buffered_frames:
            left = deadline - time.monotonic()
            if left <= 0 or self._stop.is_set():
                _rlog.warning(
                    "pool",
                    "counting buffers full (%d frames): allocating more; thresholds late or counting too slow?",
                    len(self._all) * self.batch_size,
                )
                break
            self._cond.wait(left)
        if not self._free and len(self._all) >= self.cap and self.to_count < self.max_buffered_frames:
            _rlog.warning(
                "pool-held",
                "counting buffers held by frames still in assembly (%d frames in the pool, %d to count): "
                "allocating more",
                len(self._all) * self.batch_size,
                self.to_count,
            )
        b = self._free.pop() if self._free else self._new()
        b.reset(scan_number)
        return b

    def _new(self) -> Batch:
        b = Batch(self.batch_size, self.frame_shape, shared=self.shared)
        self._all.append(b)
        return b

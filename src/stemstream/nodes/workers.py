"""Counting in worker processes over shared-memory batch buffers, for engines that hold the GIL.

stempy's ``electron_count_frame`` holds the GIL while it counts, so in the NodeGroup's process it would
stall the receiving threads and could never use more than one core. With ``workers > 0`` the batch
buffers that the NodeGroup assembles frames into live in POSIX shared memory, and worker processes
(each with its own interpreter and engine) count slots of them in place: still no copy between
assembly and counting, and ``workers`` cores per NodeGroup process. Only slot ranges, thresholds and
the resulting events cross the process boundary (a local pipe, not a network wire).

Clean death: the workers watch their parent and exit when it is gone (a SIGKILLed NodeGroup included), and
every segment is named ``stemstream-<pid>-<process start>-<n>`` after the process that created it, so that
a NodeGroup starting on the node unlinks the segments of processes that no longer exist
(:func:`unlink_orphaned_segments`) when nothing else did (the resource tracker dies with a killed job too).
"""

from __future__ import annotations

import itertools
import logging
import multiprocessing as mp
import os
import threading
import time
from concurrent.futures import Future, ProcessPoolExecutor
from multiprocessing import shared_memory
from pathlib import Path
from typing import Any

import numpy as np

from stemstream.counting import Thresholds
from stemstream.errors import CountingError

logger = logging.getLogger(__name__)

# Worker-process globals, set once by _init.
_engine: Any = None
_dark: np.ndarray | None = None
_row_dark = "none"
_gain: np.ndarray | None = None
_frame_shape: tuple[int, int] = (0, 0)
_attached: dict[str, tuple[shared_memory.SharedMemory, np.ndarray]] = {}


SEGMENT_PREFIX = "stemstream-"
SHM_DIR = Path("/dev/shm")
PARENT_POLL_S = 0.2
_serial = itertools.count()


def _process_started(pid: int) -> int | None:
    """When process ``pid`` started, in clock ticks since boot (Linux); None if there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    try:
        return int(stat[stat.rindex(")") + 2 :].split()[19])  # field 22, after the parenthesised name
    except (ValueError, IndexError):
        return None


def segment_name() -> str:
    """A new segment's name: its creator's pid and start time (so a later process can tell it orphaned)."""
    pid = os.getpid()
    return f"{SEGMENT_PREFIX}{pid}-{_process_started(pid) or 0}-{next(_serial)}"


def unlink_orphaned_segments(directory: Path = SHM_DIR) -> list[str]:
    """Unlink the shared-memory segments of counting processes that are gone (killed before they could);
    the names unlinked. Segments of live processes (a pid reused by another process counts as gone) stay."""
    gone: list[str] = []
    try:
        names = [p.name for p in directory.glob(f"{SEGMENT_PREFIX}*")]
    except OSError:
        return gone
    for name in names:
        try:
            pid, started, _ = name[len(SEGMENT_PREFIX) :].split("-", 2)
            alive = _process_started(int(pid)) == int(started)
        except ValueError:
            continue
        if alive:
            continue
        try:
            (directory / name).unlink()
        except OSError:
            continue
        gone.append(name)
    if gone:
        logger.warning("unlinked %d shared-memory segment(s) of counting processes that died: %s",
                       len(gone), ", ".join(gone[:5]) + (" ..." if len(gone) > 5 else ""))  # fmt: skip
    return gone


class SharedBatch:
    """A ``(size, rows, cols)`` uint16 array in a shared-memory segment this process owns."""

    def __init__(self, size: int, frame_shape: tuple[int, int]) -> None:
        nbytes = size * frame_shape[0] * frame_shape[1] * 2
        try:
            self.shm = shared_memory.SharedMemory(name=segment_name(), create=True, size=nbytes)
        except OSError as exc:
            raise CountingError(
                f"cannot allocate {nbytes / 1e6:.0f} MB of shared memory for counting: {exc}; "
                "free /dev/shm or lower --buffer-frames"
            ) from None
        self.array = np.ndarray((size, *frame_shape), dtype=np.uint16, buffer=self.shm.buf)

    @property
    def name(self) -> str:
        return self.shm.name

    def release(self) -> None:
        del self.array
        self.shm.close()
        self.shm.unlink()


def _init(
    engine_name: str,
    dark: np.ndarray | None,
    gain: np.ndarray | None,
    frame_shape: tuple[int, int],
    cpus: list[int] | None,
    row_dark: str = "none",
) -> None:
    global _engine, _dark, _gain, _frame_shape, _row_dark
    from stemstream.counting import get_engine

    if cpus:
        os.sched_setaffinity(0, cpus)
    threading.Thread(target=_watch_parent, args=(os.getppid(),), name="watch-parent", daemon=True).start()

    _engine = get_engine(engine_name)
    _dark, _gain, _frame_shape, _row_dark = dark, gain, frame_shape, row_dark


def _watch_parent(parent: int) -> None:
    """A counting worker exits when the NodeGroup process that started it is gone, however it went (a
    SIGKILL leaves no one to shut the pool down): it is reparented, and its parent pid changes."""
    while True:
        time.sleep(PARENT_POLL_S)
        if os.getppid() != parent:
            os._exit(0)


def _view(name: str, size: int) -> np.ndarray:
    hit = _attached.get(name)
    if hit is None or hit[1].shape[0] != size:
        # Spawned workers share the parent's resource tracker, so attaching here adds no second owner:
        # the parent unlinks the segment (SharedBatch.release), the tracker only if the parent dies.
        shm = shared_memory.SharedMemory(name=name)
        hit = (shm, np.ndarray((size, *_frame_shape), dtype=np.uint16, buffer=shm.buf))
        _attached[name] = hit
    return hit[1]


def _count(
    name: str, size: int, runs: list[tuple[int, int]], thresholds: dict[str, Any]
) -> list[tuple[int, bytes, bytes]]:
    data = _view(name, size)
    t = Thresholds.from_dict(thresholds)
    out = []
    for i, j in runs:
        events = _engine.count(data[i:j], t, dark=_dark, gain=_gain, row_dark=_row_dark)
        lengths = np.fromiter((e.size for e in events), np.uint32, count=len(events))
        flat = np.concatenate(events).astype(np.uint32, copy=False) if events else np.zeros(0, np.uint32)
        out.append((i, lengths.tobytes(), flat.tobytes()))
    return out


def _thresholds(name: str, n: int, chosen: list[int], background_n_sigma: float, xray_n_sigma: float) -> dict[str, Any]:
    from stemstream.counting.thresholds import sample_thresholds

    shm = shared_memory.SharedMemory(name=name)
    try:
        frames = np.ndarray((n, *_frame_shape), dtype=np.uint16, buffer=shm.buf)
        t, halves = sample_thresholds(
            frames, chosen, dark=_dark, gain=_gain, background_n_sigma=background_n_sigma, xray_n_sigma=xray_n_sigma
        )
        del frames
    finally:
        shm.close()
    return {"thresholds": t.to_dict(), "halves": halves}


def unpack(result: list[tuple[int, bytes, bytes]]) -> list[tuple[int, list[np.ndarray]]]:
    """A worker's answer as ``[(first slot, [events per slot])]``."""
    unpacked = []
    for i, lengths_b, flat_b in result:
        lengths = np.frombuffer(lengths_b, np.uint32)
        flat = np.frombuffer(flat_b, np.uint32)
        parts = np.split(flat, np.cumsum(lengths)[:-1]) if lengths.size else []
        unpacked.append((i, list(parts)))
    return unpacked


class ProcessCounter:
    """``workers`` processes, each with its own ``engine_name`` engine and the dark/gain/row-dark of the session;
    ``cpus`` pins them (all to that set of cores), e.g. to keep them off the cores that receive."""

    def __init__(
        self,
        engine_name: str,
        workers: int,
        *,
        dark: np.ndarray | None,
        gain: np.ndarray | None,
        frame_shape: tuple[int, int],
        cpus: list[int] | None = None,
        row_dark: str = "none",
    ) -> None:
        self.workers = workers
        self._pool = ProcessPoolExecutor(
            max_workers=workers,
            mp_context=mp.get_context("spawn"),  # never fork a process with threads and sockets
            initializer=_init,
            initargs=(engine_name, dark, gain, frame_shape, cpus, row_dark),
        )
        # Start them now, not at the first frame: spawning and importing stempy takes a second or two.
        for f in [self._pool.submit(_noop) for _ in range(workers)]:
            f.result(timeout=120)
        logger.info("%d %s counting worker process(es) started", workers, engine_name)

    def submit(self, batch: SharedBatch, runs: list[tuple[int, int]], thresholds: Thresholds) -> Future[Any]:
        return self._pool.submit(_count, batch.name, batch.array.shape[0], runs, thresholds.to_dict())

    def thresholds(
        self, sample: SharedBatch, chosen: list[int], background_n_sigma: float, xray_n_sigma: float
    ) -> Future[Any]:
        """:func:`~stemstream.counting.thresholds.sample_thresholds` of the frames in ``sample`` (the frames
        ``chosen``, in frame-number order), in a worker; a Future of ``{"thresholds": dict, "halves": list}``.
        Through shared memory: pickling 26 MB of frames through the pool's pipe took ~1 s on a
        busy receiving process (measured)."""
        n = sample.array.shape[0]
        return self._pool.submit(_thresholds, sample.name, n, chosen, background_n_sigma, xray_n_sigma)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def _noop() -> None:
    return None

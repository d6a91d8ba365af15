"""Messages between the NodeGroup ranks of one job: MPI point-to-point, or in-process for a single rank.

The counting service (:mod:`stemstream.nodes.service`) needs two exchanges per scan: a threshold
sample gathered to rank 0 and the thresholds sent back, then every rank's events gathered to rank 0,
which writes the file. Scans overlap and ranks may hold NodeGroups that are not members of a scan, so
these are point-to-point messages rather than collectives: no rank ever waits in MPI for a scan it
does not take part in.

Every message is a msgpack map (never pickle); arrays travel as msgpack ``bin`` fields. One thread per
rank makes every MPI call (non-blocking sends, ``Iprobe`` polling), so the library needs no more than
``MPI_THREAD_SERIALIZED``; everything else talks to it through queues.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

import msgpack

logger = logging.getLogger(__name__)

Deliver = Callable[[dict[str, Any]], None]
_TAG = 7  # one tag for everything: MPI keeps messages of one (source, tag) in order, which we rely on
_POLL_S = 0.0005


class RankTransport(Protocol):
    """Ordered, reliable messages between the ranks of one job."""

    rank: int
    size: int

    def start(self, deliver: Deliver) -> None:
        """Begin delivering received messages to ``deliver`` (called from one thread, in arrival order)."""

    def send(self, dest: int, message: dict[str, Any]) -> None:
        """Queue ``message`` for rank ``dest``; messages from one rank to another arrive in send order."""

    def close(self) -> None:
        """Flush what was queued (bounded wait) and stop."""


class LocalTransport:
    """A job of one rank: messages to rank 0 are delivered on a thread of their own, as MPI's would be."""

    rank = 0
    size = 1

    def __init__(self) -> None:
        self._queue: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._thread: threading.Thread | None = None

    def start(self, deliver: Deliver) -> None:
        def run() -> None:
            while (message := self._queue.get()) is not None:
                _deliver_safely(deliver, message)

        self._thread = threading.Thread(target=run, name="ranks-local", daemon=True)
        self._thread.start()

    def send(self, dest: int, message: dict[str, Any]) -> None:
        if dest != 0:
            raise ValueError(f"a one-rank job has no rank {dest}")
        self._queue.put(message)

    def close(self) -> None:
        self._queue.put(None)
        if self._thread is not None:
            self._thread.join(10)


class MpiTransport:
    """MPI point-to-point over ``COMM_WORLD`` (or ``comm``), one thread making every MPI call."""

    def __init__(self, comm: Any = None) -> None:
        from mpi4py import MPI

        self._mpi = MPI
        self._comm = comm if comm is not None else MPI.COMM_WORLD
        self.rank = int(self._comm.Get_rank())
        self.size = int(self._comm.Get_size())
        self._outbox: queue.Queue[tuple[int, bytes]] = queue.Queue()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._deliver: Deliver | None = None

    def start(self, deliver: Deliver) -> None:
        self._deliver = deliver
        self._thread = threading.Thread(target=self._run, name=f"ranks-mpi-{self.rank}", daemon=True)
        self._thread.start()

    def send(self, dest: int, message: dict[str, Any]) -> None:
        if not 0 <= dest < self.size:
            raise ValueError(f"no rank {dest} in a job of {self.size}")
        self._outbox.put((dest, msgpack.packb(message, use_bin_type=True)))

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(15)

    def _run(self) -> None:
        mpi, comm = self._mpi, self._comm
        status = mpi.Status()
        in_flight: list[tuple[Any, bytes]] = []  # (request, buffer kept alive until the send completes)
        deadline: float | None = None
        while True:
            busy = False
            while True:
                try:
                    dest, payload = self._outbox.get_nowait()
                except queue.Empty:
                    break
                in_flight.append((comm.Isend([payload, mpi.BYTE], dest=dest, tag=_TAG), payload))
                busy = True
            in_flight = [(req, buf) for req, buf in in_flight if not req.Test()]
            while comm.Iprobe(source=mpi.ANY_SOURCE, tag=_TAG, status=status):
                buf = bytearray(status.Get_count(mpi.BYTE))
                comm.Recv([buf, mpi.BYTE], source=status.Get_source(), tag=_TAG)
                busy = True
                try:
                    message = msgpack.unpackb(bytes(buf), raw=False)
                except Exception as exc:  # a peer of ours sent it, but never let it end the thread
                    logger.error("rank %d: undecodable message from rank %d: %s", self.rank, status.Get_source(), exc)
                    continue
                if self._deliver is not None and isinstance(message, dict):
                    _deliver_safely(self._deliver, message)
            if self._stop.is_set():
                deadline = deadline or time.monotonic() + 10.0
                if (not in_flight and self._outbox.empty()) or time.monotonic() > deadline:
                    for req, _ in in_flight:
                        req.Cancel()
                    return
            if not busy:
                time.sleep(_POLL_S)


def _deliver_safely(deliver: Deliver, message: dict[str, Any]) -> None:
    try:
        deliver(message)
    except Exception:
        logger.exception("handling a %r message failed", message.get("kind"))


def make_transport(use_mpi: bool | None = None) -> RankTransport:
    """MPI when this process runs under ``mpiexec`` with more than one rank (or ``use_mpi``), else local."""
    if use_mpi is False:
        return LocalTransport()
    try:
        transport = MpiTransport()
    except ImportError:
        if use_mpi:
            raise
        return LocalTransport()
    if transport.size == 1 and not use_mpi:
        return LocalTransport()
    logger.info("rank %d of %d", transport.rank, transport.size)
    return transport

"""The simulator-driven producer process: a :class:`Producer` fed by ``stemstream.sim.FourDCameraSim``.

The only runtime module that touches the simulator, and only inside functions. Thread slot ``t`` sends
the frames of its share (``f % T == t``) in order, skipping the sectors the simulator lost upstream. The
simulator is shared by the sender threads under a lock (it caches one frame at a time).
"""

from __future__ import annotations

import logging
import threading
import time
from functools import partial
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from stemstream.errors import ProtocolError, StemstreamError
from stemstream.plane.producer import Producer
from stemstream.plane.requests import ScanRequests
from stemstream.plane.session import ProducerScanResult
from stemstream.scans import keys
from stemstream.scans.records import ProducerScanRecord, ScanRequest
from stemstream.transport.actor import Worker, run_workers

logger = logging.getLogger(__name__)


class SimOptions(BaseModel):
    """What a scan request may ask of the simulated DAQ (its ``extra``), bounded: a request is hostile."""

    model_config = ConfigDict(extra="ignore")  # the rest of ``extra`` (e.g. ``metadata``) is not the simulator's

    seed: int = Field(0, ge=0, le=2**32 - 1)
    loss_rate: float = Field(0.001, ge=0.0, le=1.0)
    dwell_s: float = Field(0.0, ge=0.0, le=10.0)  # a microscope's time per probe position (0: none)
    electrons_per_frame: float = Field(20.0, ge=0.0, le=10_000.0)  # a few: frames without events

    @classmethod
    def of(cls, request: ScanRequest, **defaults: Any) -> SimOptions:
        """The request's options over ``defaults``; a bad one is a one-line ProtocolError (the scan is refused)."""
        try:
            return cls(**{**defaults, **request.extra})
        except ValidationError as err:
            first = err.errors()[0]
            name = ".".join(str(x) for x in first["loc"])
            raise ProtocolError(
                f"scan request {request.scan_number}: {name}={repr(first.get('input'))[:80]}: {first['msg']}; "
                "the scan is refused"
            ) from None


def run_scan(
    producer: Producer,
    request: ScanRequest,
    *,
    seed: int = 0,
    loss_rate: float = 0.001,
    pregen: int = 0,
    stop: threading.Event | None = None,
) -> ProducerScanResult:
    """Acquire one simulated scan: plan it, send (or write) this producer's sector, finish it.

    ``pregen > 0`` sends ``pregen`` pre-generated sector buffers in turn instead of each frame's own
    pixels, so that generating data is not what limits a benchmark. A request's ``dwell_s`` paces the scan
    like a microscope's dwell time (each sender thread waits that long per frame it sends).
    """
    from stemstream.sim import FourDCameraSim

    options = SimOptions.of(request, seed=seed, loss_rate=loss_rate)
    seed, loss_rate, dwell_s, electrons = options.seed, options.loss_rate, options.dwell_s, options.electrons_per_frame
    m = producer.sector
    sim = FourDCameraSim(
        request.scan_shape,
        scan_number=request.scan_number,
        seed=seed,
        loss_rate=loss_rate,
        electrons_per_frame=electrons,
    )
    lost = {f for f, s in sim.lost_sectors() if s == m}
    pool = [sim.sector(i, m) for i in range(min(pregen, sim.n_frames))] if pregen > 0 else None
    stop = stop or threading.Event()
    sim_lock = threading.Lock()  # the simulator caches one frame: one caller at a time

    def source(f: int) -> Any:
        """Sector ``m`` of frame ``f`` again (the simulator is deterministic, like a DAQ's RAM ring): the
        producer holds frame numbers instead of the simulator's whole frames until the scan is counted."""
        if pool:
            return pool[f % len(pool)]
        with sim_lock:
            return sim.sector(f, m)

    session = producer.begin_scan(
        request.scan_number,
        request.scan_shape,
        fallback_dir=request.fallback_dir,
        source=source,
        metadata=request.metadata,
    )

    def send(t: int) -> None:
        frames = [f for f in session.share(t) if f not in lost]
        with session.sender(t, frames) as tx:
            for f in frames:
                if stop.is_set() or (dwell_s > 0 and stop.wait(dwell_s)):
                    return
                if pool:
                    buf = pool[f % len(pool)]
                else:
                    with sim_lock:
                        buf = sim.sector(f, m)  # a view the simulator never writes again: safe to send
                tx.send(f, buf)

    started = time.perf_counter()
    workers = [Worker(f"sender-{t}", lambda t=t: send(t)) for t in range(producer.threads)]
    run_workers(workers)
    result = session.finish()
    logger.info(
        "scan %d sector %d: %s %d sectors (%d lost upstream) in %.2f s",
        request.scan_number,
        m,
        "streamed" if result.route == "stream" else "wrote",
        result.sent_total,
        result.lost_upstream,
        time.perf_counter() - started,
    )
    return result


def serve(
    store: Any,
    sector: int,
    *,
    threads: int | None = None,
    scans: int | None = None,
    first_scan: int = 1,
    scan_shape: tuple[int, int] = (64, 64),
    seed: int = 0,
    loss_rate: float = 0.001,
    interval: float = 0.0,
    pregen: int = 0,
    fallback_dir: Path | None = None,
    uid: str | None = None,
    stop: threading.Event | None = None,
    drain_timeout: float | None = None,
    max_skew: int | None = 64,
    metrics: Any = None,
) -> list[ProducerScanResult]:
    """Run a simulated receiving server: ``scans`` scans now, or (``scans=None``) every scan requested
    through ``/control/scan`` until ``stop`` is set. ``metrics`` (a ``MetricsExporter``) exports the
    producer's counters."""
    stop = stop or threading.Event()
    results: list[ProducerScanResult] = []
    requests = ScanRequests(store).start() if scans is None else None  # watch before registering "ready"
    producer = Producer(
        store,
        sector,
        threads=threads,
        uid=uid,
        fallback_dir=fallback_dir,
        max_skew=max_skew,
    )
    if metrics is not None:
        metrics.watch(producer)  # before start: its record has the endpoint from the first
    producer.start()

    def abort_on_stop() -> None:
        """A stop makes blocked sends and plan waits give up at once: the scan under way goes to disk."""
        stop.wait()
        logger.info("producer %s stopping: sends give up; what it holds is written to disk", producer.uid)
        producer.abort()

    Worker("abort-on-stop", abort_on_stop).start()
    acquire = partial(run_scan, producer, seed=seed, loss_rate=loss_rate, pregen=pregen, stop=stop)
    try:
        if requests is None:
            for k in range(scans or 0):
                if stop.is_set():
                    break
                req = ScanRequest(first_scan + k, scan_shape)
                results.append(acquire(req))
                if interval > 0 and k + 1 < (scans or 0):
                    stop.wait(interval)  # pacing between scans, as a microscope would
        else:
            logger.info("producer %s (sector %d) waiting for scan requests", producer.uid, sector)
            while not stop.is_set():
                req = requests.get(timeout=0.2)
                if req is None:
                    continue
                try:
                    results.append(acquire(req))
                except StemstreamError as exc:  # this scan failed (disk full, no plan...): say so, serve on
                    logger.error("scan %d: %s", req.scan_number, exc)
                    store.set(
                        keys.producer(req.scan_number, producer.uid),
                        ProducerScanRecord(
                            producer.uid, sector, "failed", error=str(exc), start=producer.planned_start(req)
                        ).to_record(),
                    )
    finally:
        if requests is not None:
            requests.close()
        producer.close(drain_timeout=0.0 if stop.is_set() else drain_timeout)
    return results

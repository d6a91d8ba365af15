"""Analyses on every NodeGroup rank while scans stream: :class:`RankAnalyses` adds every counted batch to its
partials, keeps the batch's events for recomputing, and sends rank 0 what it added (``partials`` rank
messages, msgpack maps with bin fields, never pickle). Rank 0's side is ``analyses.board``; the whole live
path is described there.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from stemstream.analyses.base import EventBatch, Partial, ScanGeometry
from stemstream.analyses.runner import (
    AnalysisSet,
    Specs,
    canonical,
)
from stemstream.errors import AnalysisError

logger = logging.getLogger(__name__)


# ---- partials on the wire (msgpack maps: bin fields, never pickle)


def encode_partial(partial: Partial) -> dict[str, list[Any]]:
    """``{key: [dtype, shape, indices | None, values]}``: mostly-zero arrays (a delta of a few frames of a
    large scan) travel as their non-zero elements."""
    out: dict[str, list[Any]] = {}
    for key, value in partial.items():
        a = np.ascontiguousarray(value)
        nz = np.flatnonzero(a)
        if a.size < 2**32 and nz.size * (4 + a.itemsize) < a.nbytes:
            out[key] = [a.dtype.str, list(a.shape), nz.astype("<u4").tobytes(), a.ravel()[nz].tobytes()]
        else:
            out[key] = [a.dtype.str, list(a.shape), None, a.tobytes()]
    return out


def decode_partial(data: Mapping[str, Sequence[Any]]) -> Partial:
    """The arrays of :func:`encode_partial`, writable; raises AnalysisError for anything else."""
    out: Partial = {}
    try:
        for key, (dtype, shape, indices, values) in data.items():
            dt = np.dtype(dtype)
            if dt.kind not in "biuf" or dt.hasobject:
                raise ValueError(f"dtype {dtype!r}")
            a = np.zeros(tuple(int(s) for s in shape), dt)
            if indices is None:
                a.ravel()[:] = np.frombuffer(values, dt)
            else:
                a.ravel()[np.frombuffer(indices, "<u4")] = np.frombuffer(values, dt)
            out[str(key)] = a
    except (TypeError, ValueError, IndexError) as exc:
        raise AnalysisError(f"a partial that cannot be decoded: {exc}") from None
    return out


# ---- every rank


@dataclass
class _RankScan:
    analyses: AnalysisSet
    kept: list[EventBatch] = field(default_factory=list)
    reset: set[str] = field(default_factory=set)
    dirty: bool = False


class RankAnalyses:
    """One rank's analyses of the scans it counts. Thread-safe: batches come from the counting threads,
    parameters from the control thread."""

    def __init__(self, specs: Mapping[str, Mapping[str, Any]], rank: int = 0) -> None:
        self.specs: Specs = {n: dict(p) for n, p in specs.items()}
        self.rank = rank
        self._scans: dict[int, _RankScan] = {}
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return bool(self.specs)

    def begin(self, scan: int, scan_shape: tuple[int, int], frame_shape: tuple[int, int]) -> None:
        if not self.specs:
            return
        with self._lock:
            if scan not in self._scans:
                self._scans[scan] = _RankScan(AnalysisSet(self.specs, ScanGeometry(scan_shape, frame_shape)))

    def process(self, scan: int, frames: Sequence[int], arrays: Sequence[np.ndarray]) -> None:
        """Add counted frames (``arrays[i]``: the events of frame ``frames[i]``)."""
        if not frames:
            return
        with self._lock:
            rs = self._scans.get(scan)
            if rs is None:
                return
            batch = EventBatch.from_frames(frames, arrays, rs.analyses.scan.frame_shape)
            rs.analyses.process(batch)
            rs.kept.append(EventBatch(batch.frames, batch.offsets, batch.events, batch.frame_shape))
            rs.dirty = True

    def apply(self, message: Mapping[str, Any]) -> None:
        """An ``analysis_params`` message from rank 0: new parameters for one scan (recomputed from the
        kept events), or (``scan`` None) for the scans to come."""
        specs = message.get("specs")
        if not isinstance(specs, Mapping):
            logger.error("rank %d: analysis_params without specs; ignored", self.rank)
            return
        scan = message.get("scan")
        with self._lock:
            if scan is None:
                for name, params in specs.items():
                    if name in self.specs:
                        self.specs[name] = dict(params)
                return
            rs = self._scans.get(int(scan))
            if rs is None:
                return
            changed = [
                n
                for n, p in specs.items()
                if (n in rs.analyses.analyses or n in rs.analyses.errors)
                and (n not in rs.analyses.analyses or canonical(p) != canonical(rs.analyses.analyses[n].params()))
            ]
            for name in changed:
                rs.analyses.rebuild(name, specs[name])
            if changed:
                for batch in rs.kept:
                    rs.analyses.process(batch, only=changed)
                rs.reset.update(changed)
                rs.dirty = True
                logger.debug(
                    "scan %s: rank %d recomputed %s from %d kept batches", scan, self.rank, changed, len(rs.kept)
                )

    def message(self, scan: int, *, final: bool = False, **extra: Any) -> dict[str, Any] | None:
        """The ``partials`` message for rank 0 (what was added since the last one), or None when nothing
        changed; ``final`` also forgets the scan. ``extra`` (progress counts) is sent along."""
        with self._lock:
            rs = self._scans.pop(scan, None) if final else self._scans.get(scan)
            if rs is None or (not rs.dirty and not final):
                return None
            params = {n: canonical(a.params()) for n, a in rs.analyses.analyses.items()}
            taken = rs.analyses.take()
            reset, rs.reset, rs.dirty = rs.reset, set(), False
            errors = dict(rs.analyses.errors)
            scan_geometry = rs.analyses.scan
        return {
            "kind": "partials",
            "rank": self.rank,
            "scan": scan,
            "final": final,
            "scan_shape": list(scan_geometry.scan_shape),
            "frame_shape": list(scan_geometry.frame_shape),
            "analyses": {
                n: {"params": params[n], "reset": n in reset, "partial": encode_partial(p)}
                for n, p in taken.items()
                if n in params
            },
            "errors": errors,
            **extra,
        }

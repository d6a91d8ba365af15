"""Running analyses over a scan's events: one :class:`AnalysisSet` per scan (per rank while streaming, one
offline), and :func:`analyse_events`, the whole computation for events in memory.

Live and offline run the same steps: partials from batches of frames, added (:func:`merge`), ``refine``
until no parameter changes (an analysis whose parameters changed is recomputed from the events), then
``results``. So the same events and parameters give the same results, whichever way they were split.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from stemstream.analyses import registry
from stemstream.analyses.base import Analysis, EventBatch, Partial, ScanGeometry, merge
from stemstream.errors import AnalysisError

logger = logging.getLogger(__name__)

BATCH_FRAMES = 4096  # frames per batch when events already in memory are analysed
Specs = dict[str, dict[str, Any]]  # analysis name -> its parameters (missing ones take their defaults)


def canonical(params: Mapping[str, Any]) -> str:
    """Parameters as canonical JSON: what two sides compare to know they computed the same thing."""
    return json.dumps(params, sort_keys=True, separators=(",", ":"))


@dataclass
class Outcome:
    """One analysis's results for a scan, with what produced them."""

    name: str
    params: dict[str, Any]
    results: dict[str, np.ndarray] = field(default_factory=dict)
    error: str | None = None
    how: str = "offline"  # "merged" (partials of the ranks), "recomputed" (from all events on rank 0), "offline"


def specs_for(names: Iterable[str], params: Mapping[str, Mapping[str, Any]] | None = None) -> Specs:
    """Specs for ``names`` (plus what they need), with ``params`` per name where given."""
    params = params or {}
    return {n: dict(params.get(n, {})) for n in registry.with_needs(names)}


def apply_settings(specs: Mapping[str, Mapping[str, Any]], settings: Mapping[str, Any]) -> Specs:
    """Detector settings (``center``, ``detectors`` ...) given to every analysis that has such a parameter."""
    out: Specs = {}
    for name, params in specs.items():
        known = registry.create(name, params).params()
        out[name] = {**params, **{k: v for k, v in settings.items() if k in known}}
        if "center" in settings and "center_auto" in known:
            out[name]["center_auto"] = settings["center"] is None
    return out


def batches(
    frames: Sequence[int] | np.ndarray,
    arrays: Sequence[np.ndarray],
    frame_shape: tuple[int, int],
    size: int = BATCH_FRAMES,
) -> Iterator[EventBatch]:
    """The events of ``frames`` in batches of ``size`` frames."""
    for lo in range(0, len(arrays), size):
        yield EventBatch.from_frames(frames[lo : lo + size], arrays[lo : lo + size], frame_shape)


class AnalysisSet:
    """The analyses of one scan, their partials and their errors. An analysis that raises is dropped from
    the scan (its error kept for the record); the others go on. Not thread-safe: callers lock."""

    def __init__(self, specs: Mapping[str, Mapping[str, Any]], scan: ScanGeometry) -> None:
        self.scan = scan
        self.analyses: dict[str, Analysis] = {}
        self.partials: dict[str, Partial] = {}
        self.errors: dict[str, str] = {}
        for name, params in specs.items():
            try:
                self.analyses[name] = registry.create(name, params)
                self.partials[name] = self.analyses[name].start(scan)
            except AnalysisError as exc:
                self.errors[name] = str(exc)
                logger.error("%s", exc)
            except Exception as exc:
                self._fail(name, "start", exc)

    def _fail(self, name: str, step: str, exc: BaseException) -> None:
        self.errors[name] = f"{step} failed: {type(exc).__name__}: {exc}"
        self.analyses.pop(name, None)
        self.partials.pop(name, None)
        logger.error("analysis %r dropped for this scan: %s", name, self.errors[name])

    def params(self) -> dict[str, dict[str, Any]]:
        return {n: a.params() for n, a in self.analyses.items()}

    def process(self, batch: EventBatch, only: Iterable[str] | None = None) -> None:
        for name in list(only if only is not None else self.analyses):
            analysis = self.analyses.get(name)
            if analysis is None:
                continue
            try:
                analysis.process(self.partials[name], batch)
            except Exception as exc:
                self._fail(name, "process", exc)

    def take(self) -> dict[str, Partial]:
        """The partials so far, replaced by empty ones (what was added since the last take)."""
        taken = self.partials
        self.partials = {}
        for name, analysis in list(self.analyses.items()):
            try:
                self.partials[name] = analysis.start(self.scan)
            except Exception as exc:
                self._fail(name, "start", exc)
        return taken

    def add(self, name: str, partial: Partial) -> None:
        """Merge ``partial`` (of the same parameters) into this set's partial of ``name``."""
        analysis = self.analyses.get(name)
        if analysis is None:
            return
        try:
            merge(analysis, self.partials[name], partial)
        except Exception as exc:
            self._fail(name, "merge", exc)

    def rebuild(self, name: str, params: Mapping[str, Any]) -> None:
        """``name`` with new parameters and an empty partial (recompute it with :meth:`process`)."""
        try:
            self.analyses[name] = registry.create(name, params)
            self.partials[name] = self.analyses[name].start(self.scan)
            self.errors.pop(name, None)
        except AnalysisError as exc:
            self.analyses.pop(name, None)
            self.partials.pop(name, None)
            self.errors[name] = str(exc)
        except Exception as exc:
            self._fail(name, "start", exc)

    def refine(self, final: bool) -> dict[str, dict[str, Any]]:
        """New parameters that analyses ask for from the partials so far (``refine``), by name."""
        changes = {}
        for name, analysis in list(self.analyses.items()):
            refine = getattr(analysis, "refine", None)
            if refine is None:
                continue
            try:
                new = refine(self.partials, self.scan, final=final)
            except Exception as exc:
                self._fail(name, "refine", exc)
                continue
            if new is not None and canonical(new) != canonical(analysis.params()):
                changes[name] = dict(new)
        return changes

    def outcomes(self, how: str) -> dict[str, Outcome]:
        out: dict[str, Outcome] = {}
        for name, analysis in list(self.analyses.items()):
            try:
                results = analysis.results(self.partials[name], self.scan)
                out[name] = Outcome(name, analysis.params(), {k: np.asarray(v) for k, v in results.items()}, how=how)
            except Exception as exc:
                self._fail(name, "results", exc)
        for name, error in self.errors.items():
            out.setdefault(name, Outcome(name, {}, error=error, how=how))
        return out


def settle(aset: AnalysisSet, events: Iterable[EventBatch] | None, rounds: int = 3) -> set[str]:
    """Refine to a fixed point: an analysis whose parameters changed is rebuilt and recomputed from
    ``events`` (a re-iterable of batches). Returns the names recomputed."""
    recomputed: set[str] = set()
    for _ in range(rounds):
        changes = aset.refine(final=True)
        if not changes:
            break
        for name, params in changes.items():
            aset.rebuild(name, params)
        if events is not None:
            for batch in events:
                aset.process(batch, only=changes)
        recomputed |= set(changes)
    return recomputed


class _Batches:
    """Batches of per-frame events that can be iterated more than once."""

    def __init__(self, frames: Sequence[int] | np.ndarray, arrays: Sequence[np.ndarray], frame_shape, size: int):
        self.frames, self.arrays, self.frame_shape, self.size = frames, arrays, frame_shape, size

    def __iter__(self) -> Iterator[EventBatch]:
        return batches(self.frames, self.arrays, self.frame_shape, self.size)


def events_source(
    events: Sequence[np.ndarray], frame_shape: tuple[int, int], size: int = BATCH_FRAMES
) -> Iterable[EventBatch]:
    """Every frame's events (index = frame number), as re-iterable batches."""
    return _Batches(np.arange(len(events)), events, frame_shape, size)


def analyse_events(
    specs: Mapping[str, Mapping[str, Any]],
    events: Sequence[np.ndarray],
    scan: ScanGeometry,
    *,
    batch_frames: int = BATCH_FRAMES,
) -> dict[str, Outcome]:
    """Run ``specs`` over every frame's events (``events[f]`` for frame ``f``): the offline path."""
    if len(events) != scan.n_frames:
        raise AnalysisError(f"{len(events)} frames of events for a scan of {scan.n_frames} positions")
    aset = AnalysisSet(specs, scan)
    source = events_source(events, scan.frame_shape, batch_frames)
    for batch in source:
        aset.process(batch)
    settle(aset, source)
    return aset.outcomes("offline")

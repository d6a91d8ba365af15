"""Analyses while scans stream: :class:`Board` on rank 0, :class:`~stemstream.analyses.rank.RankAnalyses` on every
NodeGroup rank.

Each rank adds every batch it counts to its partials (:meth:`RankAnalyses.process`) and keeps the batch's
events (packed, sparse) for recomputing. About once a second, and once more, marked final, before its
events go to rank 0, it sends what it added since the last time (:meth:`RankAnalyses.message`, a
``partials`` rank message), tagged with the parameters it used. Rank 0's :class:`Board` adds the deltas of
each rank whose parameters are the scan's current ones (its *target*) and shows the sum on the live view.

Parameters change in two ways: the detector settings, changed on the live view (``set_settings``, for every
open scan and the scans to come), and ``refine`` (a centre found from the summed pattern so far, checked
on rank 0 every tick). Rank 0 sends the new parameters to the scan's ranks (``analysis_params``); each
recomputes its partial from the events it kept (nothing is counted again) and sends it whole, marked
``reset``. A rank that reports other parameters than the target is sent the target again.

When the file is written (:meth:`Board.before_write`) an analysis whose ranks all sent final partials with
the final parameters is their sum ("merged"); any other (a rank lost, parameters changed after a rank had
finished, the centre refined once more on the complete pattern) is computed again from the gathered events
("recomputed"). Either way it equals what ``stemstream analyse`` computes offline from the same file.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from stemstream.analyses import registry
from stemstream.analyses.base import Partial, ScanGeometry
from stemstream.analyses.files import GROUP, png_dir, read_results, save_pngs, write_results
from stemstream.analyses.rank import decode_partial
from stemstream.analyses.runner import (
    AnalysisSet,
    Outcome,
    Specs,
    apply_settings,
    canonical,
    events_source,
    settle,
)
from stemstream.errors import AnalysisError

logger = logging.getLogger(__name__)

REFINE_INTERVAL_S = 0.5  # rank 0 looks for a moved centre this often per scan at first ...
REFINE_BACKOFF_MAX_S = 30.0  # ... twice as long after each move (each makes the ranks recompute), up to this
KEEP_OUTCOMES = 16  # finished scans whose results rank 0 keeps in memory for the view (older: from the file)


# ---- rank 0


@dataclass
class _Contribution:
    params: str  # canonical
    partial: Partial
    final: bool = False


@dataclass
class _Progress:
    counted: int = 0
    share: int = 0
    incomplete: int = 0


@dataclass
class LiveScan:
    """What rank 0 knows of a scan being counted."""

    number: int
    geometry: ScanGeometry
    target: Specs
    contributions: dict[int, dict[str, _Contribution]] = field(default_factory=dict)
    progress: dict[int, _Progress] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    started: float = field(default_factory=time.time)
    rate: list[tuple[float, int]] = field(default_factory=list)  # (monotonic, counted) samples
    version: int = 0  # bumped whenever what the view shows changed
    refined_at: float = 0.0
    refine_every: float = REFINE_INTERVAL_S
    corrections: set[int] = field(default_factory=set)  # ranks to send the target to

    def counted(self) -> int:
        return sum(p.counted for p in self.progress.values())

    def incomplete(self) -> int:
        return sum(p.incomplete for p in self.progress.values())

    def frames_per_s(self) -> float:
        if len(self.rate) < 2:
            return 0.0
        (t0, c0), (t1, c1) = self.rate[0], self.rate[-1]
        return (c1 - c0) / (t1 - t0) if t1 > t0 else 0.0


@dataclass
class FinishedScan:
    """A written scan, as the view's strip shows it."""

    number: int
    status: str
    frames: int
    incomplete: int
    path: str | None
    written_at: float
    outcomes: dict[str, Outcome] | None  # None: read from the file when shown
    history: list[dict[str, Any]]
    thumb: bytes | None
    version: int = 0
    settings: dict[str, Any] | None = None  # detector settings changed while the view showed it
    settings_version: int = 0
    recomputed: tuple[int, dict[str, Outcome]] | None = None  # (settings version, outcomes)


Send = Callable[[int, dict[str, Any]], None]
Record = Callable[[int, dict[str, Any]], None]


class Board:
    """Rank 0: the analyses of every scan as the ranks report them, the session's detector settings, and
    the finished scans of the session. The live view reads it (from its own thread); the control thread
    feeds it. Thread-safe."""

    def __init__(
        self,
        specs: Mapping[str, Mapping[str, Any]],
        send: Send,
        n_ranks: int,
        *,
        record: Record | None = None,
        write_pngs: bool = True,
    ) -> None:
        self.specs: Specs = _complete(specs)
        self._send = send
        self._n_ranks = n_ranks
        self._record = record
        self._write_pngs = write_pngs
        self._lock = threading.RLock()
        self._scans: dict[int, LiveScan] = {}
        self._finished: OrderedDict[int, FinishedScan] = OrderedDict()
        self.settings_version = 0
        self.history: list[dict[str, Any]] = []  # every change of the session's detector settings
        self._pending: tuple[int, dict[str, Outcome], list[dict[str, Any]]] | None = None  # before_write's

    # ---- the session's detector settings

    def settings(self) -> dict[str, Any]:
        """The detector settings now: ``center`` (null: found per scan) and ``detectors``."""
        virtual = self.specs.get("virtual")
        if virtual is None:
            return {}
        params = registry.create("virtual", virtual).params()
        return {"center": None if params["center_auto"] else params["center"], "detectors": params["detectors"]}

    @staticmethod
    def check_settings(settings: Mapping[str, Any]) -> dict[str, Any]:
        """Valid detector settings (``center``, ``detectors``), or AnalysisError saying what is wrong."""
        unknown = set(settings) - {"center", "detectors"}
        if unknown:
            raise AnalysisError(f"detector settings: unknown {sorted(unknown)}; give center and detectors")
        params = registry.create("virtual", dict(settings)).params()
        return {"center": params["center"], "detectors": params["detectors"]}

    def set_settings(self, settings: Mapping[str, Any], *, source: str = "page", scan: int | None = None) -> int:
        """New detector settings for the session: the open scans are recomputed on their ranks, the scans to
        come use them, and ``scan`` (a finished one the view shows) is recomputed from its file. Recorded
        in each scan's history. Returns the settings version."""
        clean = self.check_settings(settings)
        with self._lock:
            self.settings_version += 1
            entry = {"at": time.time(), "source": source, "version": self.settings_version, "settings": clean}
            self.history.append(entry)
            self.specs = _complete(apply_settings(self.specs, clean))
            messages: list[tuple[int, dict[str, Any]]] = []
            for r in range(self._n_ranks):
                messages.append((r, {"kind": "analysis_params", "scan": None, "specs": self.specs}))
            touched = []
            for ls in self._scans.values():
                ls.target = _complete(_keep_found_centre(apply_settings(ls.target, clean), ls.target))
                ls.history.append(entry)
                ls.version += 1
                ls.refined_at, ls.refine_every = 0.0, REFINE_INTERVAL_S  # a centre to find again at the next tick
                touched.append(ls.number)
                for r in self._ranks(ls):
                    messages.append((r, {"kind": "analysis_params", "scan": ls.number, "specs": ls.target}))
            finished = self._finished.get(scan) if scan is not None else None
            if finished is not None:
                finished.history.append(entry)
                finished.settings, finished.settings_version = clean, self.settings_version
                finished.version += 1
                touched.append(finished.number)
        for rank, message in messages:
            self._send(rank, message)
        logger.info("detector settings %s (%s): scans %s", clean, source, touched)
        for n in touched:
            self._publish(n)
        return self.settings_version

    # ---- from the ranks (and the view, through the control thread)

    def on_message(self, message: Mapping[str, Any]) -> None:
        """``partials`` from a rank, or ``_settings`` posted by the live view."""
        kind = message.get("kind")
        if kind == "partials":
            self.on_partials(message)
        elif kind == "_settings":
            try:
                self.set_settings(
                    message["settings"], source=str(message.get("source", "page")), scan=message.get("scan")
                )
            except (AnalysisError, KeyError, TypeError) as exc:
                logger.error("detector settings not applied: %s", exc)

    def _scan(self, number: int, scan_shape: Sequence[int], frame_shape: Sequence[int]) -> LiveScan:
        ls = self._scans.get(number)
        if ls is None:
            geometry = ScanGeometry(
                (int(scan_shape[0]), int(scan_shape[1])), (int(frame_shape[0]), int(frame_shape[1]))
            )
            ls = self._scans[number] = LiveScan(number, geometry, _complete(self.specs))
        return ls

    def _ranks(self, ls: LiveScan) -> list[int]:
        return sorted(set(ls.contributions) | set(ls.progress))

    def on_partials(self, message: Mapping[str, Any]) -> None:
        """A ``partials`` message from a rank."""
        n, rank, final = int(message["scan"]), int(message["rank"]), bool(message.get("final"))
        with self._lock:
            if n in self._finished:
                return  # late: the file is written
            ls = self._scan(n, message["scan_shape"], message["frame_shape"])
            mine = ls.contributions.setdefault(rank, {})
            for name, entry in message.get("analyses", {}).items():
                if name not in ls.target:
                    continue
                try:
                    partial = decode_partial(entry["partial"])
                except AnalysisError as exc:
                    ls.errors[name] = f"rank {rank}: {exc}"
                    continue
                have = mine.get(name)
                if entry.get("reset") or have is None or have.params != entry["params"]:
                    mine[name] = _Contribution(entry["params"], partial, final)
                else:
                    for key, value in partial.items():
                        if key in have.partial:
                            np.add(have.partial[key], value, out=have.partial[key], casting="unsafe")
                    have.final = final
                if entry["params"] != canonical(ls.target[name]):
                    ls.corrections.add(rank)
            ls.errors.update({k: f"rank {rank}: {v}" for k, v in message.get("errors", {}).items()})
            p = ls.progress.setdefault(rank, _Progress())
            p.counted = int(message.get("counted", p.counted))
            p.share = int(message.get("share", p.share))
            p.incomplete = int(message.get("incomplete", p.incomplete))
            now = time.monotonic()
            ls.rate = [s for s in ls.rate if now - s[0] <= 3.0] + [(now, ls.counted())]
            ls.version += 1

    def tick(self, now: float | None = None) -> None:
        """Send corrections; refine (a centre found from the summed pattern so far) at most every
        ``REFINE_INTERVAL_S`` per scan, twice as long after each change (up to ``REFINE_BACKOFF_MAX_S``): each
        makes every rank recompute from all it kept, and the centre found settles as the pattern fills."""
        now = time.monotonic() if now is None else now
        messages: list[tuple[int, dict[str, Any]]] = []
        with self._lock:
            for ls in self._scans.values():
                for rank in sorted(ls.corrections):
                    messages.append((rank, {"kind": "analysis_params", "scan": ls.number, "specs": ls.target}))
                ls.corrections.clear()
                if now - ls.refined_at < ls.refine_every:
                    continue
                ls.refined_at = now
                changes = self._refine(ls)
                if changes:
                    ls.target.update(changes)
                    ls.version += 1
                    ls.refine_every = min(2 * ls.refine_every, REFINE_BACKOFF_MAX_S)
                    logger.debug("scan %d: %s", ls.number, "; ".join(f"{n} now {p}" for n, p in changes.items()))
                    for rank in self._ranks(ls):
                        messages.append((rank, {"kind": "analysis_params", "scan": ls.number, "specs": changes}))
        for rank, message in messages:
            self._send(rank, message)

    def _refine(self, ls: LiveScan) -> dict[str, dict[str, Any]]:
        loaders = registry.available()
        needing = [n for n in ls.target if n in loaders and getattr(loaders[n](), "refine", None) is not None]
        if not needing:
            return {}
        merged = self._merged(ls, only=[n for n in ls.target if n in ("sum",)] + needing)
        changes = merged.refine(final=False)
        return changes

    # ---- views of a scan

    def _merged(self, ls: LiveScan, only: Iterable[str] | None = None, pending: set[str] | None = None) -> AnalysisSet:
        """The sum of the contributions made with the target parameters. With ``pending`` (for the view), an
        analysis that no rank has reported with its target parameters yet (they are recomputing it) shows
        what was reported with the previous ones instead, and its name is added to ``pending``."""
        names = list(only) if only is not None else list(ls.target)
        aset = AnalysisSet({n: ls.target[n] for n in names if n in ls.target}, ls.geometry)
        for name in list(aset.analyses):
            want = canonical(aset.analyses[name].params())
            mine = [ls.contributions[r][name] for r in sorted(ls.contributions) if name in ls.contributions[r]]
            if pending is not None and mine and not any(c.params == want for c in mine):
                previous = mine[-1].params
                aset.rebuild(name, json.loads(previous))
                want = previous
                pending.add(name)
            for c in mine:
                if c.params == want:
                    aset.add(name, c.partial)
        return aset

    def live_numbers(self) -> list[int]:
        with self._lock:
            return sorted(self._scans)

    def finished_numbers(self) -> list[int]:
        with self._lock:
            return list(self._finished)

    def strip(self) -> list[dict[str, Any]]:
        """The session's scans, oldest first: number, status, frames, counted, incomplete, version."""
        with self._lock:
            out = [
                {
                    "scan": f.number,
                    "status": f.status,
                    "frames": f.frames,
                    "counted": f.frames,
                    "incomplete": f.incomplete,
                    "version": f.version,
                    "written_at": f.written_at,
                }
                for f in self._finished.values()
            ]
            out += [
                {
                    "scan": ls.number,
                    "status": "streaming",
                    "frames": ls.geometry.n_frames,
                    "counted": ls.counted(),
                    "incomplete": ls.incomplete(),
                    "frames_per_s": round(ls.frames_per_s(), 1),
                    "version": ls.version,
                }
                for ls in sorted(self._scans.values(), key=lambda s: s.number)
            ]
            return out

    def thumb(self, number: int) -> bytes | None:
        with self._lock:
            f = self._finished.get(number)
            return f.thumb if f is not None else None

    def version(self, number: int) -> int | None:
        with self._lock:
            if number in self._scans:
                return self._scans[number].version
            f = self._finished.get(number)
            return f.version if f is not None else None

    def view(self, number: int) -> tuple[int, dict[str, Outcome], dict[str, Any]] | None:
        """(version, outcomes, facts) of a scan for the view: merged so far while it streams; as written
        (or recomputed with the session's settings, if they changed while it was shown) once finished."""
        with self._lock:
            ls = self._scans.get(number)
            if ls is not None:
                version = ls.version
                pending: set[str] = set()
                aset = self._merged(ls, pending=pending)
                facts = {
                    "status": "streaming",
                    "frames": ls.geometry.n_frames,
                    "counted": ls.counted(),
                    "incomplete": ls.incomplete(),
                    "frames_per_s": round(ls.frames_per_s(), 1),
                    "errors": {**aset.errors, **ls.errors},
                    "pending": sorted(pending),
                }
            else:
                f = self._finished.get(number)
                if f is None:
                    return None
                version = f.version
                facts = {
                    "status": f.status,
                    "frames": f.frames,
                    "counted": f.frames,
                    "incomplete": f.incomplete,
                    "path": f.path,
                }
        if ls is not None:
            return version, aset.outcomes("merged"), facts
        return version, self._finished_outcomes(f), facts

    def _finished_outcomes(self, f: FinishedScan) -> dict[str, Outcome]:
        """A finished scan's results as written; after a settings change while it was shown, those the
        settings change recomputed from its file (kept sparse: one pass over its events, nothing counted
        again), once per settings version."""
        outcomes = f.outcomes
        if outcomes is None and f.path:
            outcomes, _ = read_results(f.path)
        outcomes = outcomes or {}
        if f.settings is None or not f.path:
            return outcomes
        if f.recomputed is not None and f.recomputed[0] == f.settings_version:
            return f.recomputed[1]
        want = apply_settings({n: o.params for n, o in outcomes.items() if not o.error}, f.settings)
        stale = [n for n, p in want.items() if canonical(_with_center(p, outcomes[n])) != canonical(outcomes[n].params)]
        if stale:
            from stemstream.analyses.files import analyse_file

            fresh, _ = analyse_file(f.path, stale, {n: want[n] for n in stale}, write=False, pngs=False)
            outcomes = {**outcomes, **{n: o for n, o in fresh.items() if n in stale}}
        f.recomputed = (f.settings_version, outcomes)
        return outcomes

    # ---- the file (rank 0's coordinator)

    def before_write(
        self,
        number: int,
        events: Sequence[np.ndarray],
        scan_shape: tuple[int, int],
        frame_shape: tuple[int, int],
        ranks: Iterable[int] | None,
    ) -> Callable[[Any], None]:
        """The scan's final results (merged, or recomputed from ``events``: module docstring); returns what
        writes them into the file being written (``write_counted``'s ``extra``)."""
        with self._lock:
            ls = self._scan(number, scan_shape, frame_shape)
            target = {n: dict(p) for n, p in ls.target.items()}
            contributions = {r: dict(c) for r, c in ls.contributions.items()}
            history = list(ls.history)
            errors = dict(ls.errors)
            geometry = ls.geometry
        ranks = sorted(set(ranks or ()) or set(contributions))
        aset = AnalysisSet(target, geometry)
        how: dict[str, str] = {}
        again: list[str] = []
        for name in list(aset.analyses):
            want = canonical(aset.analyses[name].params())
            parts = [contributions.get(r, {}).get(name) for r in ranks]
            if ranks and all(c is not None and c.final and c.params == want for c in parts):
                for c in parts:
                    aset.add(name, c.partial)  # type: ignore[union-attr]
                how[name] = "merged"
            else:
                again.append(name)
        source = events_source(events, geometry.frame_shape)
        if again:
            for batch in source:
                aset.process(batch, only=again)
        recomputed = set(again) | settle(aset, source)
        outcomes = aset.outcomes("merged")
        for name, outcome in outcomes.items():
            outcome.how = "recomputed" if name in recomputed else how.get(name, "merged")
            if name in errors and not outcome.error:
                outcome.error = errors[name]
        if recomputed:
            logger.info("scan %d: %s recomputed from the gathered events", number, sorted(recomputed))
        with self._lock:
            self._pending = (number, outcomes, history)

        def write(f: Any) -> None:
            try:
                write_results(f, outcomes, history=history)
            except Exception:  # the counted file matters more than its analyses
                logger.exception("scan %d: analyses not written into the file", number)
                if GROUP in f:
                    del f[GROUP]

        return write

    def after_write(self, number: int, record: Mapping[str, Any]) -> None:
        """The scan's file is written (or failed): it joins the strip; PNGs beside the file."""
        try:
            self._after_write(number, record)
        except Exception:  # never in the way of the counted record
            logger.exception("scan %d: the analyses' epilogue failed", number)

    def _after_write(self, number: int, record: Mapping[str, Any]) -> None:
        with self._lock:
            ls = self._scans.pop(number, None)
            pending = self._pending
            outcomes, history = (pending[1], pending[2]) if pending and pending[0] == number else (None, [])
            self._pending = None
        path = record.get("path")
        if outcomes is not None and path and self._write_pngs:
            try:
                save_pngs(outcomes, png_dir(path))
            except OSError as exc:
                logger.error("scan %d: PNGs not written: %s", number, exc)
        thumb = _thumbnail(outcomes) if outcomes else None
        finished = FinishedScan(
            number=number,
            status=str(record.get("status", "")),
            frames=int(record.get("frames", ls.geometry.n_frames if ls else 0)),
            incomplete=int(record.get("frames_incomplete", 0)),
            path=path,
            written_at=time.time(),
            outcomes=outcomes,
            history=history,
            thumb=thumb,
            version=(ls.version + 1) if ls else 1,
        )
        with self._lock:
            self._finished[number] = finished
            kept = [n for n, f in self._finished.items() if f.outcomes is not None]
            for old in kept[:-KEEP_OUTCOMES]:
                if self._finished[old].path:
                    self._finished[old].outcomes = None
        self._publish(number)

    def _publish(self, number: int) -> None:
        """The scan's analyses record (parameters, settings history, where the PNGs are) to ``record``."""
        if self._record is None:
            return
        with self._lock:
            ls = self._scans.get(number)
            f = self._finished.get(number)
            if ls is not None:
                params, history, status, path = ls.target, ls.history, "streaming", None
            elif f is not None:
                params = {n: o.params for n, o in (f.outcomes or {}).items()}
                history, status, path = f.history, f.status, f.path
            else:
                return
            value = {
                "scan": number,
                "status": status,
                "params": json.loads(json.dumps(params)),
                "history": list(history)[-100:],  # the last ones (the file has them all): the record stays small
                "pngs": str(png_dir(path)) if path else None,
                "at": time.time(),
            }
        try:
            self._record(number, value)
        except Exception as exc:  # the store is down: the file has it anyway
            logger.warning("scan %d: analyses record not published: %s", number, exc)


def _complete(specs: Mapping[str, Mapping[str, Any]]) -> Specs:
    """Every parameter of each analysis, defaults included (what the ranks report); as given where an
    analysis cannot be built (its error shows when it runs)."""
    out: Specs = {}
    for name, params in specs.items():
        try:
            out[name] = registry.create(name, params).params()
        except AnalysisError:
            out[name] = dict(params)
    return out


def _keep_found_centre(new: Specs, old: Mapping[str, Mapping[str, Any]]) -> Specs:
    """New parameters of a streaming scan: where the centre stays to be found from the summed pattern, the
    one found so far stays too (the ranks recompute once, not first at the frame centre)."""
    for name, params in new.items():
        before = old.get(name, {})
        if params.get("center_auto") and params.get("center") is None and before.get("center_auto"):
            params["center"] = before.get("center")
    return new


def _with_center(params: Mapping[str, Any], outcome: Outcome) -> dict[str, Any]:
    """``params`` whose found centre (``center_auto``) is the one the outcome used: only the settings count."""
    out = dict(params)
    if out.get("center_auto") and outcome.params.get("center_auto"):
        out["center"] = outcome.params.get("center")
    return out


def _thumbnail(outcomes: Mapping[str, Outcome]) -> bytes | None:
    """A small picture of a finished scan: its first virtual detector image."""
    from stemstream.analyses import png

    virtual = outcomes.get("virtual")
    if virtual is None or virtual.error:
        return None
    for value in virtual.results.values():
        if value.ndim == 2:
            return png.image_png(value)
    return None

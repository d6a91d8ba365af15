"""The analysis plug-in API: a small Protocol over the counted events of a batch of frames.

An analysis turns electron events into results in three steps, as LiberTEM's user-defined functions do
(``get_result_buffers`` / ``process_*`` / ``merge`` / ``get_results``), but over sparse events:

* :meth:`Analysis.start` gives an empty **partial**: a dict of numpy arrays, all zeros;
* :meth:`Analysis.process` adds one :class:`EventBatch` (any frames of the scan, in any order) to a partial;
* partials **add**: the partial of frames A and the partial of frames B, added array by array, is the
  partial of A and B. Each NodeGroup rank processes its own frames into its own partial; rank 0 adds them
  (:func:`merge`). An analysis whose partials do not add gives a ``merge(dest, src)`` method of its own;
* :meth:`Analysis.results` turns a complete partial into named arrays (written to the scan's HDF5 file).

Optional: ``needs`` (names of analyses whose merged partials ``refine`` reads) and ``refine(partials)``,
which returns new parameters once the merged partials say so (the virtual detectors' centre is found
from the summed pattern this way), or None.

Parameters are keyword arguments of the analysis's constructor, JSON values only, and :meth:`params`
gives them back: the same parameters give the same results, live or offline.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Protocol, runtime_checkable

import numpy as np

Partial = dict[str, np.ndarray]


@dataclass(frozen=True)
class ScanGeometry:
    """The shape of a scan: probe positions (rows, cols) and detector frames (rows, cols)."""

    scan_shape: tuple[int, int]
    frame_shape: tuple[int, int] = (576, 576)

    @property
    def n_frames(self) -> int:
        return self.scan_shape[0] * self.scan_shape[1]

    @property
    def n_pixels(self) -> int:
        return self.frame_shape[0] * self.frame_shape[1]


@dataclass(frozen=True, eq=False)
class EventBatch:
    """The counted events of some frames of a scan, packed: ``events[offsets[i]:offsets[i + 1]]`` are the
    flat pixel indices (``row * frame_cols + col``, uint32, as stempy gives) of frame ``frames[i]``.

    Frame numbers are probe positions (``row * scan_cols + col``), each at most once per batch. Derived
    arrays (``lengths``, ``index``, ``rows``, ``cols``) are computed once, on first use, and shared by
    every analysis that processes the batch.
    """

    frames: np.ndarray  # int64 (n,)
    offsets: np.ndarray  # int64 (n + 1,)
    events: np.ndarray  # uint32 (offsets[-1],)
    frame_shape: tuple[int, int] = (576, 576)

    @classmethod
    def from_frames(
        cls, frames: Sequence[int] | np.ndarray, arrays: Sequence[np.ndarray], frame_shape: tuple[int, int]
    ) -> EventBatch:
        """Pack per-frame event arrays."""
        lengths = np.fromiter((a.size for a in arrays), np.int64, count=len(arrays))
        offsets = np.zeros(len(arrays) + 1, np.int64)
        np.cumsum(lengths, out=offsets[1:])
        events = np.concatenate(arrays).astype(np.uint32, copy=False) if len(arrays) else np.zeros(0, np.uint32)
        return cls(np.asarray(frames, dtype=np.int64), offsets, events, (int(frame_shape[0]), int(frame_shape[1])))

    def __len__(self) -> int:
        return int(self.frames.size)

    @cached_property
    def lengths(self) -> np.ndarray:
        """Events per frame of the batch, int64."""
        return np.diff(self.offsets)

    @cached_property
    def index(self) -> np.ndarray:
        """For each event, the position of its frame in this batch (0 .. n - 1), int64."""
        return np.repeat(np.arange(len(self), dtype=np.int64), self.lengths)

    @cached_property
    def rows(self) -> np.ndarray:
        """Detector row of each event, int64."""
        return self.events.astype(np.int64) // self.frame_shape[1]

    @cached_property
    def cols(self) -> np.ndarray:
        """Detector column of each event, int64."""
        return self.events.astype(np.int64) % self.frame_shape[1]

    def per_frame(self, values: np.ndarray | None = None) -> np.ndarray:
        """Sum ``values`` (one per event; default 1) over each frame of the batch: an (n,) array."""
        return np.bincount(self.index, weights=values, minlength=len(self))


@runtime_checkable
class Analysis(Protocol):
    """One analysis of counted events (module docstring). Registered under the entry point group
    ``stemstream.analyses`` as a class (or any callable) taking its parameters as keyword arguments."""

    name: str

    def params(self) -> dict[str, Any]:
        """The constructor's keyword arguments, JSON values: recorded with the results."""
        ...

    def start(self, scan: ScanGeometry) -> Partial:
        """An empty partial for ``scan``: arrays of zeros that :meth:`process` adds to."""
        ...

    def process(self, partial: Partial, batch: EventBatch) -> None:
        """Add the events of ``batch`` to ``partial`` (in place)."""
        ...

    def results(self, partial: Partial, scan: ScanGeometry) -> dict[str, np.ndarray]:
        """The results of a complete partial, named arrays (2-D ones are also saved as images)."""
        ...


def merge(analysis: Any, dest: Partial, src: Partial) -> None:
    """Add partial ``src`` into ``dest``: the analysis's own ``merge`` if it has one, else array by array."""
    own = getattr(analysis, "merge", None)
    if own is not None:
        own(dest, src)
        return
    for key, value in src.items():
        if key in dest:
            np.add(dest[key], value, out=dest[key], casting="unsafe")
        else:
            dest[key] = value.copy()


def copy_partial(partial: Mapping[str, np.ndarray]) -> Partial:
    return {k: np.array(v, copy=True) for k, v in partial.items()}


class AnalysisBase:
    """Convenience base: ``params()`` from the constructor's keyword arguments (stored by ``_keep``),
    additive merge, no ``needs``. Built-ins and plug-ins may use it; the Protocol does not require it."""

    name = "?"
    needs: tuple[str, ...] = ()

    def _keep(self, **params: Any) -> None:
        self._params = params

    def params(self) -> dict[str, Any]:
        return dict(getattr(self, "_params", {}))

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params().items())
        return f"{type(self).__name__}({args})"

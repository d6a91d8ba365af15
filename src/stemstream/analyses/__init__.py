"""Analyses of counted events: partial results per batch of frames, merged across ranks, finalised; the same
code live (on the NodeGroups, as frames are counted) and offline (``stemstream analyse FILE.h5``).

``base`` (the Protocol, :class:`EventBatch`), ``builtin`` (summed pattern, virtual detectors, centre of
mass and DPC, radial profile), ``registry`` (entry point group ``stemstream.analyses``), ``runner`` (one
scan's analyses, offline runs), ``files`` (the ``/analyses`` group of the counted file, PNGs), ``png``
(fast palette PNGs), ``live`` (per rank and on rank 0 while scans stream) and ``page`` (the live view).
docs/analyses.md describes them.
"""

from stemstream.analyses.base import Analysis, AnalysisBase, EventBatch, Partial, ScanGeometry, merge
from stemstream.analyses.runner import AnalysisSet, Outcome, analyse_events, specs_for

__all__ = [
    "Analysis",
    "AnalysisBase",
    "AnalysisSet",
    "EventBatch",
    "Outcome",
    "Partial",
    "ScanGeometry",
    "analyse_events",
    "merge",
    "specs_for",
]

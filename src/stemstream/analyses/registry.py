"""Finding analyses by name: the entry point group ``stemstream.analyses``.

A package adds an analysis without touching stemstream by declaring, in its own ``pyproject.toml``::

    [project.entry-points."stemstream.analyses"]
    hotspots = "mypackage.analyses:Hotspots"

where ``Hotspots(**params)`` is an :class:`~stemstream.analyses.base.Analysis`. stemstream's built-ins
are registered the same way (and known without their entry points, for a source tree that is not
installed); a plug-in may not take a built-in's name.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterable, Mapping
from importlib.metadata import entry_points
from typing import Any

from stemstream.analyses.base import Analysis
from stemstream.analyses.builtin import BUILTINS
from stemstream.errors import AnalysisError

logger = logging.getLogger(__name__)

GROUP = "stemstream.analyses"
DEFAULT = ("sum", "virtual", "com", "radial")


_found: dict[tuple[str, ...], dict[str, Callable[[], Callable[..., Any]]]] = {}


def available() -> dict[str, Callable[[], Callable[..., Any]]]:
    """Every analysis that can be run, by name: a loader of its factory (imported only when loaded).

    Entry points are read once per ``sys.path`` (reading them takes milliseconds, and analyses are built
    for every merge the live view shows); a package installed into a running process is not seen."""
    key = tuple(sys.path)
    found = _found.get(key)
    if found is None:
        found = {name: (lambda cls=cls: cls) for name, cls in BUILTINS.items()}
        for ep in entry_points(group=GROUP):
            if ep.name in BUILTINS:
                if ep.value.split(":")[0] != BUILTINS[ep.name].__module__:
                    logger.warning("analysis %r from %s ignored: a built-in has that name", ep.name, ep.value)
                continue
            found.setdefault(ep.name, ep.load)
        _found.clear()
        _found[key] = found
    return dict(found)


def names(spec: str | Iterable[str] | None) -> list[str]:
    """Analysis names from a setting: ``"sum,virtual"``, a list, ``"all"`` (every one installed), or
    None / ``"default"`` (the built-ins). Unknown names raise one line listing those that exist."""
    known = available()
    if spec is None:
        return list(DEFAULT)
    wanted = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else [str(s).strip() for s in spec]
    wanted = [w for w in wanted if w]
    if wanted in (["default"], []):
        return list(DEFAULT)
    if wanted == ["all"]:
        return list(DEFAULT) + sorted(n for n in known if n not in DEFAULT)
    unknown = [w for w in wanted if w not in known]
    if unknown:
        raise AnalysisError(f"no analysis named {', '.join(map(repr, unknown))}; installed: {', '.join(sorted(known))}")
    return list(dict.fromkeys(wanted))


def create(name: str, params: Mapping[str, Any] | None = None) -> Analysis:
    """The analysis ``name`` built with ``params`` (its constructor's keyword arguments)."""
    loader = available().get(name)
    if loader is None:
        raise AnalysisError(f"no analysis named {name!r}; installed: {', '.join(sorted(available()))}")
    try:
        factory = loader()
    except Exception as exc:  # a plug-in that does not import
        raise AnalysisError(f"analysis {name!r} could not be loaded: {type(exc).__name__}: {exc}") from None
    try:
        analysis = factory(**dict(params or {}))
    except AnalysisError:
        raise
    except Exception as exc:  # wrong parameters for a plug-in
        raise AnalysisError(f"analysis {name!r} with parameters {dict(params or {})}: {exc}") from None
    if not isinstance(analysis, Analysis):
        raise AnalysisError(f"analysis {name!r}: {factory!r} did not give an Analysis (name, params, start, ...)")
    if analysis.name != name:
        raise AnalysisError(f"analysis registered as {name!r} calls itself {analysis.name!r}")
    return analysis


def with_needs(chosen: Iterable[str]) -> list[str]:
    """``chosen`` plus the analyses they need (``needs``), needed ones first."""
    out: list[str] = []

    def add(name: str, depth: int = 0) -> None:
        if name in out:
            return
        if depth > 8:
            raise AnalysisError(f"analysis {name!r}: its needs go round in a circle")
        loader = available().get(name)
        needs = getattr(loader(), "needs", ()) if loader is not None else ()
        for need in needs:
            add(need, depth + 1)
        out.append(name)

    for name in chosen:
        add(name)
    return out

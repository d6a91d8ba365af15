"""``stemstream analyse``: run analyses over a counted file (the offline path of the live analyses)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "analyse",
        help="run analyses (sum, virtual, com, radial, plug-ins) over a counted HDF5 file",
        description="Results go into the file's /analyses group and as PNGs beside it (docs/analyses.md).",
    )
    p.add_argument("file", type=Path, nargs="?", help="a counted file, e.g. scan_42_counted.h5")
    p.add_argument(
        "--analysis", "-a", action="append", default=None, help="an analysis to run (repeat; default: the built-ins)"
    )
    p.add_argument(
        "--params",
        default=None,
        help='parameters as JSON by analysis, e.g. \'{"virtual": {"detectors": {"bf": [0, 40]}, "center": null}}\'',
    )
    p.add_argument("--no-write", action="store_true", help="leave the file as it is (PNGs only)")
    p.add_argument("--png-dir", type=Path, default=None, help="default scan_<n>_analyses/ beside the file")
    p.add_argument("--no-png", action="store_true", help="no PNGs")
    p.add_argument("--list", action="store_true", help="list the analyses installed and exit")
    p.set_defaults(func=_analyse)


def _analyse(args: argparse.Namespace) -> int:
    from stemstream.analyses import registry
    from stemstream.analyses.files import analyse_file
    from stemstream.errors import AnalysisError

    if args.list:
        for name in sorted(registry.available()):
            print(name)
        return 0
    if args.file is None:
        raise AnalysisError("give a counted file: stemstream analyse scan_<n>_counted.h5 --analysis com")
    try:
        params = json.loads(args.params) if args.params else {}
    except json.JSONDecodeError as exc:
        raise AnalysisError(f'--params is not JSON ({exc}); e.g. \'{{"com": {{"rotation_deg": 12}}}}\'') from None
    if not isinstance(params, dict) or not all(isinstance(v, dict) for v in params.values()):
        raise AnalysisError('--params: give a JSON object of objects, e.g. \'{"com": {"rotation_deg": 12}}\'')
    names = registry.names(args.analysis)
    pngs: bool | Path = False if args.no_png else (args.png_dir or True)
    outcomes, written = analyse_file(args.file, names, params, write=not args.no_write, pngs=pngs)
    failed = 0
    for name, outcome in outcomes.items():
        if outcome.error:
            failed += 1
            print(f"{name}: failed: {outcome.error}")
            continue
        shapes = ", ".join(f"{k} {'x'.join(map(str, v.shape)) or 'scalar'}" for k, v in outcome.results.items())
        print(f"{name}: {shapes}; params {json.dumps(outcome.params, sort_keys=True)}")
    for path in written:
        print(path)
    return 1 if failed else 0

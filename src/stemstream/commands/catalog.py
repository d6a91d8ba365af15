"""``stemstream catalog``: list and show the scans of the catalog, and note what a scan was."""

from __future__ import annotations

import argparse
import datetime as dt
import json


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("catalog", help="list and show catalogued scans")
    parser.add_argument("--url", default=None, help="SQLAlchemy URL (default: STEMSTREAM_CATALOG_URL)")
    sub = parser.add_subparsers(dest="catalog_command", metavar="ACTION", required=True)
    ls = sub.add_parser("list", help="one line per scan: ID, scan, route, status, location, created, progress")
    ls.add_argument("--session", default=None, help="only the scans of this session UID")
    ls.set_defaults(func=_list)
    show = sub.add_parser("show", help="every field of one scan")
    show.add_argument("scan_number", type=int)
    show.set_defaults(func=_show)
    note = sub.add_parser("note", help="add a note to a scan (shown by list and show)")
    note.add_argument("scan_number", type=int)
    note.add_argument("text", help="the note, e.g. 'SrTiO3 [001], 300 kV, good focus'")
    note.add_argument("--replace", action="store_true", help="replace the scan's notes instead of adding a line")
    note.set_defaults(func=_note)


def _catalog(args: argparse.Namespace):
    from stemstream.catalog import Catalog
    from stemstream.config import get_settings

    # Only sessions and counts make a catalog: reading one where there is none says so.
    return Catalog(args.url or get_settings().catalog_url, create=False)


def _when(t: float | None) -> str:
    return dt.datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M:%S") if t else "-"


def _list(args: argparse.Namespace) -> int:
    scans = _catalog(args).list_scans(args.session)
    header = (
        f"{'ID':>4}  {'scan':>6}  {'shape':>9}  {'route':6}  {'status':10}  {'created':19}  {'progress':>8}  location"
        "  notes"
    )
    print(header)
    for s in scans:
        shape = f"{s.scan_rows}x{s.scan_cols}"
        print(
            f"{s.id:>4}  {s.scan_number:>6}  {shape:>9}  {s.route:6}  {s.status:10}  {_when(s.created):19}  "
            f"{s.progress:>7.0%}  {s.location}  {_first_line(s.notes)}"
        )
    if not scans:
        print("(no scans yet)")
    return 0


def _first_line(notes: str | None, width: int = 40) -> str:
    line = (notes or "").splitlines()[0] if notes else ""
    return line if len(line) <= width else line[: width - 3] + "..."


def _note(args: argparse.Namespace) -> int:
    row = _catalog(args).note(args.scan_number, args.text, append=not args.replace)
    print(f"scan {row.scan_number}: {row.notes}")
    return 0


def _show(args: argparse.Namespace) -> int:
    row = _catalog(args).get_scan(args.scan_number)
    print(json.dumps(row.as_dict(), indent=2, default=str))
    return 0

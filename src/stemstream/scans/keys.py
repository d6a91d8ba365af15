"""Every store key of a scan's life, a session and a control request: the one module that builds key strings.

docs/store.md lists them with their writers. Registry keys (``/<role>s/<uid>``) belong to the store's
registry (:func:`stemstream.store.registry.record_key`).

::

    /scans/<n>                      the plan, then the totals (leader producer)
    /scans/<n>/producers/<uid>      a producer's share (that producer)
    /scans/<n>/aggregator/<sector>  one aggregator thread's routing (that thread)
    /scans/<n>/nodegroups/<uid>     what a NodeGroup received (that NodeGroup)
    /scans/<n>/counted              the counted file (rank 0 of the counting job)
    /scans/<n>/preview/<rank>       the live preview of one rank (that rank)
    /scans/<n>/analyses             the live analyses: parameters, settings changes (rank 0 of the job)
    /scans/<n>/replay/<sector>      a sector written to disk after all (that sector's producer)
    /scans/<n>/acquisitions/<start> an earlier acquisition of the number: its last /scans/<n> (the leader)

Scan numbers are reused (a DAQ restart resets its counter): ``/scans/<n>`` is the newest acquisition of
``n``; every record carries the acquisition's ``start``, and a record whose ``start`` is not the plan's
belongs to another acquisition (scans/records.py).
    /sessions/<uid>                 a streaming session (the session)
    /control/scan                   a request for a scan (an operator)
    /control/session/<uid>/stop     a request to end a session (an operator)
"""

from __future__ import annotations

import re

SCANS = "/scans/"
SESSIONS = "/sessions/"
CONTROL = "/control/"
CONTROL_SCAN = f"{CONTROL}scan"

_SCAN = re.compile(r"^/scans/(\d+)$")
_SUB = re.compile(r"^/scans/(\d+)/([a-z]+)/([^/]+)$")


def scan(number: int) -> str:
    """The scan's own record: its plan, then its totals."""
    return f"{SCANS}{int(number)}"


def scan_prefix(number: int) -> str:
    """The prefix of the scan's sub-records (not the scan record itself)."""
    return f"{scan(number)}/"


def producer(number: int, uid: str) -> str:
    """One producer's record of the scan: what it sent, holds, wrote to disk."""
    return f"{scan_prefix(number)}producers/{uid}"


def aggregator(number: int, sector: int) -> str:
    """The aggregator's per-sector record: what it routed of the scan."""
    return f"{scan_prefix(number)}aggregator/{int(sector)}"


def nodegroup(number: int, uid: str) -> str:
    """What one NodeGroup received of its share."""
    return f"{scan_prefix(number)}nodegroups/{uid}"


def counted(number: int) -> str:
    """The counted file's record, written by rank 0 of the counting job."""
    return f"{scan_prefix(number)}counted"


def analyses(number: int) -> str:
    """The live analyses' results and settings, written by rank 0."""
    return f"{scan_prefix(number)}analyses"


def preview(number: int, rank: int) -> str:
    """One rank's partial preview of the scan."""
    return f"{scan_prefix(number)}preview/{int(rank)}"


def preview_prefix(number: int) -> str:
    return f"{scan_prefix(number)}preview/"


def replay(number: int, sector: int) -> str:
    """A producer's replay of its sector to disk: where the raw files are."""
    return f"{scan_prefix(number)}replay/{int(sector)}"


def acquisition(number: int, start: str) -> str:
    """An earlier acquisition of scan number ``number``: its ``/scans/<n>`` record, kept when a new
    acquisition of the number took ``/scans/<n>`` over."""
    return f"{scan_prefix(number)}acquisitions/{start}"


def session(uid: str) -> str:
    return f"{SESSIONS}{uid}"


def session_stop(uid: str) -> str:
    return f"{CONTROL}session/{uid}/stop"


def scan_number_of(key: str) -> int | None:
    """The scan number of a scan record's key (``/scans/<n>``), None for any other key."""
    m = _SCAN.match(key)
    return int(m.group(1)) if m else None


def sub_record_of(key: str) -> tuple[int, str, str] | None:
    """(scan number, kind, name) of a sub-record key such as ``/scans/7/producers/p0``; None otherwise."""
    m = _SUB.match(key)
    return (int(m.group(1)), m.group(2), m.group(3)) if m else None

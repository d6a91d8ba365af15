"""Scan catalog: sessions and scans in SQLAlchemy 2 (SQLite by default, any SQLAlchemy URL works).

Modelled on the gateway's scan list (ID, scan ID, notes, location, created, progress), plus where the scan
went (streamed or disk), its files, counts and timings.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import JSON, Float, ForeignKey, Integer, String, Text, create_engine, inspect, select, text
from sqlalchemy.exc import ArgumentError, OperationalError, SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from stemstream.counting.params import CountingParams
from stemstream.errors import CatalogError

logger = logging.getLogger(__name__)


class Base(DeclarativeBase):
    pass


class SessionRow(Base):
    """A streaming session: nodes allocated for a while, during which scans stream in."""

    __tablename__ = "sessions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    uid: Mapped[str] = mapped_column(String(128), unique=True)
    machine: Mapped[str] = mapped_column(String(64))
    n_nodes: Mapped[int] = mapped_column(Integer, default=1)
    background_n_sigma: Mapped[float] = mapped_column(Float, default=4.0)
    counting: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)  # the CountingParams used
    status: Mapped[str] = mapped_column(String(32), default="starting")
    started: Mapped[float] = mapped_column(Float, default=time.time)
    ended: Mapped[float | None] = mapped_column(Float, nullable=True)
    notes: Mapped[str] = mapped_column(Text, default="")


class ScanRow(Base):
    """One scan: where it went, its files, counts and timings."""

    __tablename__ = "scans"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    scan_number: Mapped[int] = mapped_column(Integer, unique=True, index=True)
    session_id: Mapped[int | None] = mapped_column(ForeignKey("sessions.id"), nullable=True)
    scan_rows: Mapped[int] = mapped_column(Integer, default=0)
    scan_cols: Mapped[int] = mapped_column(Integer, default=0)
    route: Mapped[str] = mapped_column(String(16), default="stream")  # stream | disk
    status: Mapped[str] = mapped_column(String(32), default="acquiring")
    progress: Mapped[float] = mapped_column(Float, default=0.0)  # 0..1
    raw_paths: Mapped[list[str]] = mapped_column(JSON, default=list)
    counted_path: Mapped[str | None] = mapped_column(Text, nullable=True)
    archive_location: Mapped[str | None] = mapped_column(Text, nullable=True)
    preview_path: Mapped[str | None] = mapped_column(Text, nullable=True)
    frames: Mapped[int] = mapped_column(Integer, default=0)
    frames_incomplete: Mapped[int] = mapped_column(Integer, default=0)
    events: Mapped[int] = mapped_column(Integer, default=0)
    thresholds: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created: Mapped[float] = mapped_column(Float, default=time.time)
    first_frame: Mapped[float | None] = mapped_column(Float, nullable=True)
    last_frame: Mapped[float | None] = mapped_column(Float, nullable=True)
    counted_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    turnaround_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    notes: Mapped[str] = mapped_column(Text, default="")
    metadata_: Mapped[dict[str, Any] | None] = mapped_column("metadata", JSON, nullable=True)  # the DAQ's
    thumbnail_path: Mapped[str | None] = mapped_column(Text, nullable=True)  # small PNG of the scan's image

    @property
    def location(self) -> str:
        return self.archive_location or self.counted_path or (self.raw_paths[0] if self.raw_paths else "")

    def as_dict(self) -> dict[str, Any]:
        """By column name (``metadata``, not the attribute's ``metadata_``)."""
        return {name: getattr(self, attr) for name, attr in _SCAN_ATTRS.items()}


# Attributes by column name (``metadata`` is ``metadata_`` on the row: SQLAlchemy keeps ``metadata`` for itself).
_SCAN_ATTRS = {a.columns[0].name: a.key for a in inspect(ScanRow).column_attrs}
_SCAN_FIELDS = {name: attr for name, attr in _SCAN_ATTRS.items() if name not in ("id", "scan_number")}
NOTES_MAX = 4000  # characters of a scan's notes


class NoCatalog(CatalogError):
    """The catalog does not exist (yet): readers say so instead of making an empty one."""


class Catalog:
    """The scan catalog. ``url`` is any SQLAlchemy URL; SQLite files get their directory created, unless
    ``create`` is false (readers): then a missing SQLite file is a one-line :class:`NoCatalog`."""

    def __init__(self, url: str, *, create: bool = True) -> None:
        self.url = url
        if url.startswith("sqlite:///") and not url.startswith("sqlite:///:memory:"):
            path = Path(url.removeprefix("sqlite:///"))
            if not create and not path.is_file():
                raise NoCatalog(
                    f"no scan catalog at {path} (STEMSTREAM_CATALOG_URL); one is made by the first session or "
                    "`stemstream count`, or give --url"
                )
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise CatalogError(
                    f"cannot make the scan catalog's directory {path.parent} ({exc.strerror}); "
                    "set STEMSTREAM_CATALOG_URL to a writable place"
                ) from None
        try:
            self._engine = create_engine(url)
            Base.metadata.create_all(self._engine)
            self._add_new_columns()
        except (ArgumentError, OperationalError, SQLAlchemyError) as exc:
            raise CatalogError(
                f"cannot open the scan catalog at {url!r} ({type(exc).__name__}); "
                "set STEMSTREAM_CATALOG_URL to a valid SQLAlchemy URL"
            ) from None
        self._sessions = sessionmaker(self._engine, expire_on_commit=False)

    def _add_new_columns(self) -> None:
        """Columns added since a catalogue was made (nullable ones only), so an older catalogue keeps working."""
        existing = inspect(self._engine)
        with self._engine.begin() as db:
            for table in Base.metadata.sorted_tables:
                have = {c["name"] for c in existing.get_columns(table.name)}
                for column in table.columns:
                    if column.name not in have and column.nullable:
                        kind = column.type.compile(dialect=self._engine.dialect)
                        db.execute(text(f'ALTER TABLE {table.name} ADD COLUMN "{column.name}" {kind}'))
                        logger.info("catalog %s: added column %s.%s", self.url, table.name, column.name)

    @contextmanager
    def _session(self) -> Iterator[Session]:
        with self._sessions() as db, db.begin():
            yield db

    def start_session(self, uid: str, machine: str, n_nodes: int, counting: CountingParams) -> int:
        """The session's row (made, or found again), marked running; its id."""
        with self._session() as db:
            row = db.scalar(select(SessionRow).where(SessionRow.uid == uid))
            if row is None:
                row = SessionRow(
                    uid=uid,
                    machine=machine,
                    n_nodes=n_nodes,
                    background_n_sigma=counting.background_n_sigma,
                    counting=counting.model_dump(mode="json"),
                )
                db.add(row)
            row.status = "running"
            db.flush()
            return row.id

    def end_session(self, uid: str, status: str = "ended") -> None:
        with self._session() as db:
            row = db.scalar(select(SessionRow).where(SessionRow.uid == uid))
            if row is not None:
                row.status = status
                row.ended = time.time()

    def session_id(self, uid: str) -> int | None:
        with self._session() as db:
            row = db.scalar(select(SessionRow).where(SessionRow.uid == uid))
            return row.id if row else None

    def upsert_scan(self, scan_number: int, **fields: Any) -> ScanRow:
        """Insert or update the scan's row; fields by column name (``metadata`` included)."""
        unknown = set(fields) - set(_SCAN_FIELDS)
        if unknown:
            raise CatalogError(f"unknown scan fields {sorted(unknown)}; known: {sorted(_SCAN_FIELDS)}")
        with self._session() as db:
            row = db.scalar(select(ScanRow).where(ScanRow.scan_number == scan_number))
            if row is None:
                row = ScanRow(scan_number=scan_number)
                db.add(row)
            for key, value in fields.items():
                setattr(row, _SCAN_FIELDS[key], value)
            db.flush()
            return row

    def note(self, scan_number: int, text: str, *, append: bool = True) -> ScanRow:
        """Add ``text`` to the scan's notes (a new line), or replace them (``append=False``)."""
        text = text.strip()
        if not text or len(text) > NOTES_MAX:
            raise CatalogError(f"a note is 1 to {NOTES_MAX} characters; got {len(text)}")
        with self._session() as db:
            row = db.scalar(select(ScanRow).where(ScanRow.scan_number == scan_number))
            if row is None:
                raise CatalogError(f"unknown scan {scan_number}; `stemstream catalog list` shows the known scans")
            notes = f"{row.notes}\n{text}" if append and row.notes else text
            if len(notes) > NOTES_MAX:
                raise CatalogError(f"scan {scan_number}'s notes would pass {NOTES_MAX} characters; replace them")
            row.notes = notes
            db.flush()
            return row

    def get_scan(self, scan_number: int) -> ScanRow:
        with self._session() as db:
            row = db.scalar(select(ScanRow).where(ScanRow.scan_number == scan_number))
        if row is None:
            raise CatalogError(f"unknown scan {scan_number}; `stemstream catalog list` shows the known scans")
        return row

    def list_scans(self, session_uid: str | None = None) -> list[ScanRow]:
        with self._session() as db:
            query = select(ScanRow).order_by(ScanRow.scan_number)
            if session_uid is not None:
                query = query.join(SessionRow, ScanRow.session_id == SessionRow.id).where(SessionRow.uid == session_uid)
            return list(db.scalars(query))

    def list_sessions(self) -> list[SessionRow]:
        with self._session() as db:
            return list(db.scalars(select(SessionRow).order_by(SessionRow.id)))

    def close(self) -> None:
        self._engine.dispose()

"""Vendors' `data_records` rows in MySQL/MariaDB, updated when their jobs succeed.

One multi-row `INSERT ... ON DUPLICATE KEY UPDATE` per chunk, each chunk kept
under the server's `max_allowed_packet` (the old system sent one statement
per bulk and broke on large ones). Every column is updated under one
condition: the incoming job is newer than the one the row shows, ordered by
(job creation time, job id). So applying the same job twice changes nothing,
and an older job that finishes late never overwrites a newer one's photo.
Transient errors (server gone, connection lost, deadlock) reconnect and retry;
what still fails is raised for the delivery loop to retry later.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from urllib.parse import unquote, urlsplit

import aiomysql
import pymysql
from pymysql.converters import escape_string

from services.common.errors import Unavailable

log = logging.getLogger(__name__)

TABLE = "data_records"
STATUS_COMPLETED = "completed"
# Bytes kept free in each packet for the protocol header and rounding.
PACKET_MARGIN = 1024
# MySQL error numbers worth a reconnect and another try.
TRANSIENT = frozenset({1040, 1205, 1213, 2002, 2003, 2006, 2013, 2014, 2055})

_COLUMNS = (
    "vendor_id",
    "project_id",
    "record_id",
    "photo_url",
    "processing_status",
    "processed_at",
    "job_id",
    "job_created_ms",
)
_NEWER = (
    "(job_created_ms IS NULL OR VALUES(job_created_ms) > job_created_ms"
    " OR (VALUES(job_created_ms) = job_created_ms AND VALUES(job_id) > job_id))"
)
# job_created_ms last: MySQL applies assignments left to right, and every one
# must see the row's old ordering columns.
_HEAD = f"INSERT INTO {TABLE} ({', '.join(_COLUMNS)}) VALUES "
_TAIL = " ON DUPLICATE KEY UPDATE " + ", ".join(
    f"{c} = IF({_NEWER}, VALUES({c}), {c})" for c in _COLUMNS[3:]
)


class RecordsUnavailable(Unavailable):
    """The database could not take the updates now; try again later."""


@dataclass(frozen=True)
class RecordUpdate:
    """A succeeded job's result, for the record it names."""

    vendor_id: str
    project_id: str
    record_id: str
    photo_url: str
    job_id: str
    job_created_ms: int
    processed_at: datetime


@dataclass(frozen=True)
class MysqlTarget:
    host: str
    port: int
    user: str
    password: str
    database: str

    @classmethod
    def from_url(cls, url: str) -> MysqlTarget:
        """mysql://user[:password]@host[:port]/database"""
        parts = urlsplit(url)
        database = parts.path.lstrip("/")
        if parts.scheme not in ("mysql", "mariadb") or not parts.hostname or not database:
            raise ValueError("a MySQL URL looks like mysql://USER[:PASSWORD]@HOST[:PORT]/DATABASE")
        return cls(
            host=parts.hostname,
            port=parts.port or 3306,
            user=unquote(parts.username or "root"),
            password=unquote(parts.password or ""),
            database=database,
        )

    def __repr__(self) -> str:  # never print the password
        return f"MysqlTarget({self.user}@{self.host}:{self.port}/{self.database})"

    async def connect(self, autocommit: bool, timeout_s: float) -> aiomysql.Connection:
        return await aiomysql.connect(
            host=self.host,
            port=self.port,
            user=self.user,
            password=self.password,
            db=self.database,
            autocommit=autocommit,
            connect_timeout=timeout_s,
            charset="utf8mb4",
        )


def _quote(value: str | int | datetime) -> str:
    if isinstance(value, int):
        return str(value)
    if isinstance(value, datetime):
        value = value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")
    return "'" + str(escape_string(value)) + "'"


def _row(u: RecordUpdate) -> str:
    values = (
        u.vendor_id,
        u.project_id,
        u.record_id,
        u.photo_url,
        STATUS_COMPLETED,
        u.processed_at,
        u.job_id,
        u.job_created_ms,
    )
    return "(" + ", ".join(_quote(v) for v in values) + ")"


def statements(updates: Sequence[RecordUpdate], max_packet: int) -> list[str]:
    """As few statements as fit, each at most max_packet - PACKET_MARGIN bytes."""
    limit = max_packet - PACKET_MARGIN
    fixed = len(_HEAD.encode()) + len(_TAIL.encode())
    out: list[str] = []
    rows: list[str] = []
    size = fixed
    for update in updates:
        row = _row(update)
        cost = len(row.encode()) + 2  # ", "
        if fixed + cost > limit:
            raise ValueError(f"one record update is larger than max_allowed_packet ({max_packet})")
        if rows and size + cost > limit:
            out.append(_HEAD + ", ".join(rows) + _TAIL)
            rows, size = [], fixed
        rows.append(row)
        size += cost
    if rows:
        out.append(_HEAD + ", ".join(rows) + _TAIL)
    return out


class RecordWriter:
    """Applies record updates over one connection, reconnecting as needed."""

    def __init__(
        self, target: MysqlTarget, attempts: int = 3, connect_timeout_s: float = 5.0
    ) -> None:
        self.target = target
        self.attempts = attempts
        self.connect_timeout_s = connect_timeout_s
        self._conn: aiomysql.Connection | None = None
        self._max_packet = 0
        self._lock = asyncio.Lock()

    async def _connect(self) -> aiomysql.Connection:
        if self._conn is None or self._conn.closed:
            self._conn = await self.target.connect(False, self.connect_timeout_s)
            async with self._conn.cursor() as cur:
                await cur.execute("SELECT @@max_allowed_packet")
                (self._max_packet,) = await cur.fetchone()
        return self._conn

    async def apply(self, updates: Sequence[RecordUpdate]) -> int:
        """Write every update; return how many rows changed (0 for repeats).

        Raises RecordsUnavailable when the database stays unreachable; as
        each chunk is idempotent, the caller simply tries the whole list again.
        """
        if not updates:
            return 0
        async with self._lock:
            for attempt in range(1, self.attempts + 1):
                try:
                    return await self._apply(updates)
                except (pymysql.err.OperationalError, pymysql.err.InterfaceError) as exc:
                    code = exc.args[0] if exc.args and isinstance(exc.args[0], int) else 0
                    await self._drop()
                    if code and code not in TRANSIENT and code < 2000:
                        raise RecordsUnavailable(f"{TABLE} update refused: {exc}") from exc
                    if attempt == self.attempts:
                        raise RecordsUnavailable(f"MySQL unavailable: {exc}") from exc
                    log.warning(
                        "record update failed; reconnecting",
                        extra={"error": str(exc), "attempt": attempt},
                    )
                    await asyncio.sleep(0.2 * 2**attempt)
                except pymysql.err.MySQLError as exc:
                    await self._drop()
                    raise RecordsUnavailable(f"{TABLE} update refused: {exc}") from exc
        raise AssertionError("unreachable")

    async def _apply(self, updates: Sequence[RecordUpdate]) -> int:
        conn = await self._connect()
        changed = 0
        async with conn.cursor() as cur:
            for sql in statements(updates, self._max_packet):
                changed += await cur.execute(sql)
                await conn.commit()
        return changed

    async def _drop(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    async def close(self) -> None:
        async with self._lock:
            await self._drop()

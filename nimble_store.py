"""nimble-edge's store: the records and the one SQLite file behind them.

The server (``nimble_edge.py``) keeps everything in one SQLite file in WAL
mode. This module holds the records it reads back (processes, cycles,
assignments), the migrations under ``migrations/``, every SQL statement the
server runs (:class:`Queries`), and :class:`Store`, which owns the write
connection behind one lock and a second connection for reads. It knows
nothing of HTTP; a write the disk refuses becomes a :class:`StorageError`
that the server answers with 507 or 503.

Sections, in order: records; store.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import sqlite3
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite

T = TypeVar("T")
# What a blob is written from: the body as received, or an encoded buffer.
BlobData = bytes | bytearray | memoryview

store_logger = logging.getLogger("nimble_edge.store")

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
INSTALLED_MIGRATIONS_DIR = Path(sys.prefix) / "share" / "nimble-edge" / "migrations"


class StorageError(Exception):
    """A write the disk or the file refused; nothing of it was stored.

    ``status`` and ``code`` are what the server answers with.
    """

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def process_gone() -> StorageError:
    """The error for a process deleted or reset while a request used it."""
    return StorageError(
        404,
        "process_not_found",
        "the process was deleted or reset while this request was handled; "
        "authenticate and request a cycle again",
    )


# ============================================================ records


@dataclass(frozen=True)
class Process:
    id: int
    name: str
    version: str
    client_config: dict[str, Any]
    server_config: dict[str, Any]
    completed_at: float | None

    @property
    def label(self) -> str:
        return f"{self.name}@{self.version}"

    @classmethod
    def from_row(cls, row: Any) -> Process:
        return cls(
            row["id"],
            row["name"],
            row["version"],
            json.loads(row["client_config"]),
            json.loads(row["server_config"]),
            row["completed_at"],
        )


@dataclass(frozen=True)
class Cycle:
    id: int
    process_id: int
    number: int
    checkpoint_number: int
    deadline_at: float
    closed_at: float | None

    @classmethod
    def from_row(cls, row: Any) -> Cycle:
        return cls(
            row["id"],
            row["process_id"],
            row["number"],
            row["checkpoint_number"],
            row["deadline_at"],
            row["closed_at"],
        )


@dataclass(frozen=True)
class Assignment:
    id: int
    worker_id: str
    request_key: str
    cycle: Cycle


@dataclass(frozen=True)
class WorkerAssignment:
    """What admission needs of a worker's assignment in the open cycle."""

    request_key: str
    has_reported: bool
    assigned_at: float


# ============================================================ store


def migration_files(directory: Path | None = None) -> list[tuple[int, str, Path]]:
    """Return ``(number, name, path)`` for each ``NNNN_name.sql``, in order."""
    if directory is None:
        directory = (
            MIGRATIONS_DIR if MIGRATIONS_DIR.is_dir() else INSTALLED_MIGRATIONS_DIR
        )
    found = []
    for path in sorted(directory.glob("[0-9][0-9][0-9][0-9]_*.sql")):
        found.append((int(path.name[:4]), path.stem[5:], path))
    return found


def split_sql(script: str) -> list[str]:
    """Split a script into statements, respecting strings and comments."""
    statements, buffer = [], ""
    for line in script.splitlines(keepends=True):
        buffer += line
        if sqlite3.complete_statement(buffer):
            if buffer.strip():
                statements.append(buffer.strip())
            buffer = ""
    if buffer.strip() and not all(
        part.strip().startswith("--") or not part.strip()
        for part in buffer.splitlines()
    ):
        raise ValueError(f"incomplete SQL statement at the end: {buffer.strip()[:80]}")
    return statements


class Queries:
    """Every statement the server runs, over one connection.

    :meth:`Store.transaction` hands these out on the write connection inside
    one transaction; :attr:`Store.read` runs them on the read connection.
    """

    def __init__(self, db: aiosqlite.Connection):
        self.db = db

    async def _one(self, sql: str, params: tuple[Any, ...] = ()) -> Any:
        # One call that runs the statement to its end: a cursor left open
        # across an await would hold the read connection's snapshot, and
        # every other request reading meanwhile would not see new commits.
        rows = await self.db.execute_fetchall(sql, params)
        return next(iter(rows), None)

    async def _all(self, sql: str, params: tuple[Any, ...] = ()) -> list[Any]:
        return list(await self.db.execute_fetchall(sql, params))

    async def _run(self, sql: str, params: tuple[Any, ...] = ()) -> int:
        async with self.db.execute(sql, params) as cursor:
            return cursor.lastrowid or 0

    async def _on_connection(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``work`` with the raw connection, in the connection's own thread.

        aiosqlite has no public way to reach ``blobopen``; its private
        ``_execute`` queues a call on the connection's thread like every
        statement (the pinned aiosqlite range in pyproject.toml keeps it).
        """
        db = self.db
        result: T = await db._execute(lambda: work(db._conn))
        return result

    async def _insert_blob(
        self, sql: str, params: tuple[Any, ...], table: str, column: str, data: BlobData
    ) -> int:
        """Insert a row whose last column is ``zeroblob(len(data))``, then fill it.

        The bytes go from ``data`` straight into the database's pages: the
        row is never built in memory with a copy of them.
        """

        def insert(connection: sqlite3.Connection) -> int:
            cursor = connection.execute(sql, (*params, len(data)))
            rowid = int(cursor.lastrowid or 0)
            if len(data):
                with connection.blobopen(table, column, rowid) as blob:
                    blob.write(data)
            return rowid

        return await self._on_connection(insert)

    async def _read_blob(
        self, sql: str, params: tuple[Any, ...], table: str, column: str
    ) -> tuple[Any, bytes] | None:
        """The first row of ``sql`` (its rowid first) with its blob read in place.

        One read transaction holds the row and its blob together, so a
        concurrent write cannot remove the row between the two.
        """

        def read(connection: sqlite3.Connection) -> tuple[Any, bytes] | None:
            in_transaction = connection.in_transaction
            if not in_transaction:
                connection.execute("BEGIN")
            try:
                row = connection.execute(sql, params).fetchone()
                if row is None:
                    return None
                with connection.blobopen(table, column, row[0], readonly=True) as blob:
                    return row, blob.read()
            finally:
                if not in_transaction:
                    connection.execute("COMMIT")

        return await self._on_connection(read)

    async def _next_id(self, table: str) -> int:
        """A new id for ``table``, never one that a deleted row had.

        SQLite gives a new row the largest id plus one, so deleting the
        newest process, cycle, assignment or checkpoint would hand its id to
        the next one, while requests in flight and caches still name the old
        row by it. A counter per table in ``settings`` (inside the caller's
        transaction) hands out each id once.
        """
        assert table in ("processes", "cycles", "assignments", "checkpoints")
        key = f"next_id:{table}"
        stored = await self.setting(key)
        if stored is None:
            row = await self._one(f"SELECT coalesce(max(id), 0) AS top FROM {table}")
            stored = str(int(row["top"]) + 1)
        await self.set_setting(key, str(int(stored) + 1))
        return int(stored)

    # ------------------------------------------------------------ settings

    async def setting(self, key: str) -> str | None:
        row = await self._one("SELECT value FROM settings WHERE key = ?", (key,))
        return None if row is None else str(row["value"])

    async def set_setting(self, key: str, value: str) -> None:
        await self._run(
            "INSERT OR REPLACE INTO settings (key, value) VALUES (?, ?)", (key, value)
        )

    # ------------------------------------------------------------ processes

    async def process(self, name: str, version: str | None) -> Process | None:
        """The process by name and version, or the newest of that name."""
        if version is None:
            row = await self._one(
                "SELECT * FROM processes WHERE name = ? ORDER BY id DESC LIMIT 1",
                (name,),
            )
        else:
            row = await self._one(
                "SELECT * FROM processes WHERE name = ? AND version = ?",
                (name, version),
            )
        return None if row is None else Process.from_row(row)

    async def process_by_id(self, process_id: int) -> Process:
        """The process by id.

        Raises:
            StorageError: 404 when it was deleted meanwhile.
        """
        row = await self._one("SELECT * FROM processes WHERE id = ?", (process_id,))
        if row is None:
            raise process_gone()
        return Process.from_row(row)

    async def insert_process(
        self,
        name: str,
        version: str,
        client_config: dict[str, Any],
        server_config: dict[str, Any],
        now: float,
    ) -> int:
        return await self._run(
            "INSERT INTO processes (id, name, version, client_config, server_config, "
            "created_at) VALUES (?, ?, ?, ?, ?, ?)",
            (
                await self._next_id("processes"),
                name,
                version,
                json.dumps(client_config),
                json.dumps(server_config),
                now,
            ),
        )

    async def complete_process(self, process_id: int, now: float) -> None:
        await self._run(
            "UPDATE processes SET completed_at = ? WHERE id = ?", (now, process_id)
        )

    async def insert_plan(self, process_id: int, name: str, value: bytes) -> None:
        await self._run(
            "INSERT INTO plans (process_id, name, value) VALUES (?, ?, ?)",
            (process_id, name, value),
        )

    async def insert_protocol(self, process_id: int, name: str, value: bytes) -> None:
        await self._run(
            "INSERT INTO protocols (process_id, name, value) VALUES (?, ?, ?)",
            (process_id, name, value),
        )

    async def plan_ids(self, process_id: int) -> dict[str, int]:
        """The portable plans' ids; mobile forms (``name:ts``) share them."""
        rows = await self._all(
            "SELECT id, name FROM plans WHERE process_id = ? AND instr(name, ':') = 0 "
            "ORDER BY id",
            (process_id,),
        )
        return {row["name"]: row["id"] for row in rows}

    async def protocol_ids(self, process_id: int) -> dict[str, int]:
        rows = await self._all(
            "SELECT id, name FROM protocols WHERE process_id = ? ORDER BY id",
            (process_id,),
        )
        return {row["name"]: row["id"] for row in rows}

    async def plan(
        self, plan_id: int, process_id: int, suffix: str = ""
    ) -> bytes | None:
        """A portable plan by id, or its form named ``<name><suffix>``."""
        row = await self._one(
            "SELECT f.value FROM plans p JOIN plans f "
            "ON f.process_id = p.process_id AND f.name = p.name || ? "
            "WHERE p.id = ? AND p.process_id = ? AND instr(p.name, ':') = 0",
            (suffix, plan_id, process_id),
        )
        return None if row is None else bytes(row["value"])

    async def set_averaging_plan(self, process_id: int, value: bytes) -> None:
        await self._run(
            "UPDATE processes SET averaging_plan = ? WHERE id = ?", (value, process_id)
        )

    async def averaging_plan(self, process_id: int) -> bytes | None:
        row = await self._one(
            "SELECT averaging_plan FROM processes WHERE id = ?", (process_id,)
        )
        value = None if row is None else row["averaging_plan"]
        return None if value is None else bytes(value)

    # ------------------------------------------------------------ checkpoints

    async def insert_checkpoint(
        self, process_id: int, number: int, value: BlobData, now: float
    ) -> int:
        return await self._insert_blob(
            "INSERT INTO checkpoints (id, process_id, number, created_at, value) "
            "VALUES (?, ?, ?, ?, zeroblob(?))",
            (await self._next_id("checkpoints"), process_id, number, now),
            "checkpoints",
            "value",
            value,
        )

    async def checkpoint(
        self, process_id: int, number: int | None
    ) -> tuple[int, bytes] | None:
        """``(id, value)`` of a checkpoint by number, or of the latest one."""
        if number is None:
            sql = (
                "SELECT id FROM checkpoints WHERE process_id = ? "
                "ORDER BY number DESC LIMIT 1"
            )
            params: tuple[Any, ...] = (process_id,)
        else:
            sql = "SELECT id FROM checkpoints WHERE process_id = ? AND number = ?"
            params = (process_id, number)
        found = await self._read_blob(sql, params, "checkpoints", "value")
        return None if found is None else (int(found[0][0]), found[1])

    async def checkpoint_id(self, process_id: int, number: int) -> int | None:
        """The id of a checkpoint, without reading its value."""
        row = await self._one(
            "SELECT id FROM checkpoints WHERE process_id = ? AND number = ?",
            (process_id, number),
        )
        return None if row is None else int(row["id"])

    async def largest_model_bytes(self) -> int:
        row = await self._one(
            "SELECT max(length(value)) AS size FROM checkpoints WHERE number = 1"
        )
        return int(row["size"] or 0)

    # ------------------------------------------------------------ cycles

    async def insert_cycle(
        self,
        process_id: int,
        number: int,
        checkpoint_number: int,
        now: float,
        deadline_at: float,
    ) -> None:
        await self._run(
            "INSERT INTO cycles (id, process_id, number, checkpoint_number, "
            "started_at, deadline_at) VALUES (?, ?, ?, ?, ?, ?)",
            (
                await self._next_id("cycles"),
                process_id,
                number,
                checkpoint_number,
                now,
                deadline_at,
            ),
        )

    async def open_cycle(self, process_id: int) -> Cycle | None:
        row = await self._one(
            "SELECT * FROM cycles WHERE process_id = ? AND closed_at IS NULL",
            (process_id,),
        )
        return None if row is None else Cycle.from_row(row)

    async def cycle(self, cycle_id: int) -> Cycle | None:
        row = await self._one("SELECT * FROM cycles WHERE id = ?", (cycle_id,))
        return None if row is None else Cycle.from_row(row)

    async def close_cycle(self, cycle_id: int, now: float, diffs: int) -> None:
        await self._run(
            "UPDATE cycles SET closed_at = ?, diffs_averaged = ? WHERE id = ?",
            (now, diffs, cycle_id),
        )

    async def set_averaging_error(self, cycle_id: int, error: str) -> None:
        await self._run(
            "UPDATE cycles SET averaging_error = ? WHERE id = ?", (error, cycle_id)
        )

    async def averaging_errors(self) -> dict[int, dict[str, Any]]:
        """``{process_id: {"cycle", "error"}}`` where the last closed cycle failed."""
        rows = await self._all(
            "SELECT c.process_id, c.number, c.averaging_error FROM cycles c "
            "WHERE c.averaging_error IS NOT NULL AND c.number = ("
            "SELECT max(number) FROM cycles l "
            "WHERE l.process_id = c.process_id AND l.closed_at IS NOT NULL)"
        )
        return {
            row["process_id"]: {"cycle": row["number"], "error": row["averaging_error"]}
            for row in rows
        }

    async def set_deadline(self, cycle_id: int, deadline_at: float) -> None:
        await self._run(
            "UPDATE cycles SET deadline_at = ? WHERE id = ? AND closed_at IS NULL",
            (deadline_at, cycle_id),
        )

    async def open_cycles(self) -> list[tuple[Cycle, Process, int]]:
        """Every open cycle with its process and its number of reports."""
        rows = await self._all(
            "SELECT c.*, (SELECT count(*) FROM reports r WHERE r.cycle_id = c.id) "
            "AS reports FROM cycles c WHERE c.closed_at IS NULL ORDER BY c.id"
        )
        # Read apart from the cycles, so a process deleted in between is
        # simply left out.
        processes = {
            row["id"]: Process.from_row(row)
            for row in await self._all("SELECT * FROM processes")
        }
        return [
            (Cycle.from_row(row), processes[row["process_id"]], row["reports"])
            for row in rows
            if row["process_id"] in processes
        ]

    # ------------------------------------------------------------ workers

    async def worker_process_id(self, worker_id: str) -> int | None:
        row = await self._one(
            "SELECT process_id FROM workers WHERE id = ?", (worker_id,)
        )
        return None if row is None else int(row["process_id"])

    async def worker_by_subject(self, process_id: int, subject: str) -> str | None:
        row = await self._one(
            "SELECT id FROM workers WHERE process_id = ? AND subject = ?",
            (process_id, subject),
        )
        return None if row is None else str(row["id"])

    async def insert_worker(
        self, worker_id: str, process_id: int, subject: str | None, now: float
    ) -> None:
        await self._run(
            "INSERT INTO workers (id, process_id, subject, created_at) "
            "VALUES (?, ?, ?, ?)",
            (worker_id, process_id, subject, now),
        )

    # ------------------------------------------------------------ assignments

    async def assignment_in(
        self, cycle_id: int, worker_id: str
    ) -> WorkerAssignment | None:
        """A worker's assignment in a cycle, if it has one."""
        row = await self._one(
            "SELECT a.request_key, a.assigned_at, "
            "r.assignment_id IS NOT NULL AS has_reported "
            "FROM assignments a LEFT JOIN reports r ON r.assignment_id = a.id "
            "WHERE a.cycle_id = ? AND a.worker_id = ?",
            (cycle_id, worker_id),
        )
        if row is None:
            return None
        return WorkerAssignment(
            row["request_key"], bool(row["has_reported"]), float(row["assigned_at"])
        )

    async def last_cycle_of(self, worker_id: str) -> int | None:
        """The number of the latest cycle in which a worker was assigned."""
        row = await self._one(
            "SELECT max(c.number) AS number FROM assignments a "
            "JOIN cycles c ON c.id = a.cycle_id WHERE a.worker_id = ?",
            (worker_id,),
        )
        return None if row["number"] is None else int(row["number"])

    async def process_count(self) -> int:
        row = await self._one("SELECT count(*) AS n FROM processes")
        return int(row["n"])

    async def worker_count(self, process_id: int) -> int:
        row = await self._one(
            "SELECT count(*) AS n FROM workers WHERE process_id = ?", (process_id,)
        )
        return int(row["n"])

    async def assignment_count(self, cycle_id: int, since: float | None = None) -> int:
        """Assignments that hold a slot in a cycle.

        With ``since``, an unreported assignment made before it has expired
        and no longer counts; a reported one always does.
        """
        row = await self._one(
            "SELECT count(*) AS n FROM assignments a WHERE a.cycle_id = ? AND "
            "(a.assigned_at >= ? OR EXISTS "
            "(SELECT 1 FROM reports r WHERE r.assignment_id = a.id))",
            (cycle_id, -math.inf if since is None else since),
        )
        return int(row["n"])

    async def renew_assignment(self, request_key: str, now: float) -> None:
        await self._run(
            "UPDATE assignments SET assigned_at = ? WHERE request_key = ?",
            (now, request_key),
        )

    async def insert_assignment(
        self, cycle_id: int, worker_id: str, request_key: str, now: float
    ) -> None:
        await self._run(
            "INSERT INTO assignments (id, cycle_id, worker_id, request_key, "
            "assigned_at) VALUES (?, ?, ?, ?, ?)",
            (await self._next_id("assignments"), cycle_id, worker_id, request_key, now),
        )

    async def assignment(self, request_key: str) -> Assignment | None:
        row = await self._one(
            "SELECT a.id AS assignment_id, a.worker_id, a.request_key, c.* "
            "FROM assignments a JOIN cycles c ON c.id = a.cycle_id "
            "WHERE a.request_key = ?",
            (request_key,),
        )
        if row is None:
            return None
        return Assignment(
            row["assignment_id"],
            row["worker_id"],
            row["request_key"],
            Cycle.from_row(row),
        )

    # ------------------------------------------------------------ reports

    async def report_of(self, assignment_id: int) -> tuple[bytes, int] | None:
        """``(digest, num_samples)`` of the report for an assignment."""
        row = await self._one(
            "SELECT digest, num_samples FROM reports WHERE assignment_id = ?",
            (assignment_id,),
        )
        return None if row is None else (bytes(row["digest"]), row["num_samples"])

    async def insert_report(
        self,
        assignment: Assignment,
        diff: BlobData,
        digest: bytes,
        num_samples: int,
        metrics: dict[str, float],
        now: float,
    ) -> None:
        await self._insert_blob(
            "INSERT INTO reports (assignment_id, cycle_id, digest, num_samples, "
            "metrics, reported_at, diff) VALUES (?, ?, ?, ?, ?, ?, zeroblob(?))",
            (
                assignment.id,
                assignment.cycle.id,
                digest,
                num_samples,
                json.dumps(metrics) if metrics else None,
                now,
            ),
            "reports",
            "diff",
            diff,
        )

    async def drop_diffs(self, cycle_id: int) -> None:
        """Empty the diff blobs of a closed cycle; digests stay for retries."""
        await self._run("UPDATE reports SET diff = x'' WHERE cycle_id = ?", (cycle_id,))

    async def report_count(self, cycle_id: int) -> int:
        row = await self._one(
            "SELECT count(*) AS n FROM reports WHERE cycle_id = ?", (cycle_id,)
        )
        return int(row["n"])

    async def report_ids(self, cycle_id: int) -> list[int]:
        """The assignment ids of a cycle's reports, in assignment order."""
        rows = await self._all(
            "SELECT assignment_id FROM reports WHERE cycle_id = ? ORDER BY rowid",
            (cycle_id,),
        )
        return [int(row["assignment_id"]) for row in rows]

    async def report_diff(self, assignment_id: int) -> tuple[bytes, int]:
        """``(diff, num_samples)`` of one report."""
        found = await self._read_blob(
            "SELECT assignment_id, num_samples FROM reports WHERE assignment_id = ?",
            (assignment_id,),
            "reports",
            "diff",
        )
        assert found is not None, f"no report for assignment {assignment_id}"
        row, diff = found
        return diff, int(row[1])

    async def reports(self, cycle_id: int) -> AsyncIterator[tuple[bytes, int]]:
        """``(diff, num_samples)`` of each report of a cycle, one at a time."""
        for assignment_id in await self.report_ids(cycle_id):
            yield await self.report_diff(assignment_id)

    async def delete_process(self, process_id: int) -> None:
        # Plans, checkpoints, cycles, workers, assignments and reports go with
        # it through ON DELETE CASCADE.
        await self._run("DELETE FROM processes WHERE id = ?", (process_id,))

    async def reset_process(self, process_id: int) -> None:
        """Back to checkpoint 1 with no cycles; workers keep their ids."""
        await self._run("DELETE FROM cycles WHERE process_id = ?", (process_id,))
        await self._run(
            "DELETE FROM checkpoints WHERE process_id = ? AND number > 1",
            (process_id,),
        )
        await self._run(
            "UPDATE processes SET completed_at = NULL WHERE id = ?", (process_id,)
        )

    # ------------------------------------------------------------ status

    async def status_rows(self) -> list[Any]:
        return await self._all(
            "SELECT p.id, p.name, p.version, p.server_config, p.completed_at, "
            "(SELECT max(number) FROM checkpoints k WHERE k.process_id = p.id) "
            "AS checkpoints, c.number AS cycle, c.deadline_at, "
            "(SELECT count(*) FROM reports r WHERE r.cycle_id = c.id) AS reports, "
            "(SELECT count(*) FROM assignments a WHERE a.cycle_id = c.id) "
            "AS assignments, "
            "(SELECT count(*) FROM workers w WHERE w.process_id = p.id) AS workers "
            "FROM processes p LEFT JOIN cycles c "
            "ON c.process_id = p.id AND c.closed_at IS NULL ORDER BY p.id"
        )


def storage_error(exc: sqlite3.Error, path: Path) -> Exception:
    """The API error for a failed write: the disk is full or the file is locked.

    Other SQLite errors are faults of the server and come back unchanged.
    """
    name = getattr(exc, "sqlite_errorname", "")
    if name == "SQLITE_CONSTRAINT_FOREIGNKEY":
        # A row for a process that a concurrent delete or reset removed.
        return process_gone()
    if name.startswith("SQLITE_FULL"):
        store_logger.warning("Writing %s failed: the disk is full (%s)", path, name)
        return StorageError(
            507,
            "storage_full",
            "the gateway's disk is full, so nothing was stored; retry after the "
            "operator frees space",
        )
    if name.startswith(("SQLITE_READONLY", "SQLITE_IOERR", "SQLITE_CANTOPEN")):
        store_logger.warning("Writing %s failed: %s", path, name)
        return StorageError(
            503,
            "storage_unavailable",
            "the database cannot be written (read-only or failing), so nothing was "
            "stored; retry later",
        )
    return exc


class Store:
    """The SQLite file: one write connection behind a lock, one for reads.

    Every write happens inside :meth:`transaction`, which holds the lock for
    the whole transaction, so statements of concurrent requests never mix
    and SQLite never answers "database is locked". Reads use their own
    connection and, in WAL mode, never wait for the writer.
    """

    def __init__(
        self,
        path: Path,
        *,
        checkpoint_idle_s: float = 0.05,
        max_wal_bytes: int = 512 * 2**20,
    ):
        self.path = path
        self._writer: aiosqlite.Connection | None = None
        self._reader: aiosqlite.Connection | None = None
        self._checkpointer: aiosqlite.Connection | None = None
        self._checkpoint_task: asyncio.Task[None] | None = None
        self._wal_written = asyncio.Event()
        self._checkpoint_idle_s = checkpoint_idle_s
        self._max_wal_bytes = max_wal_bytes
        self._page_bytes = 4096
        self._is_wal_over = False
        self._lock = asyncio.Lock()
        self.applied: list[str] = []

    async def open(self) -> None:
        store_logger.info("Opening store %s", self.path)
        try:
            # A plain connection first: aiosqlite's thread outlives a failed
            # connect and then crashes at exit, hiding this message.
            sqlite3.connect(self.path).close()
            self._writer = await self._connect()
        except sqlite3.Error as exc:
            raise RuntimeError(
                f"cannot open database {self.path}: {exc}; check that its folder "
                "exists and is writable"
            ) from exc
        try:
            # synchronous=FULL makes a commit durable in WAL mode even after
            # power loss: a report is acknowledged only after its commit.
            await self._writer.execute("PRAGMA journal_mode = WAL")
            await self._writer.execute("PRAGMA synchronous = FULL")
            # A commit only appends to the WAL and syncs it; copying the WAL
            # into the database file is the checkpointer's work, in its own
            # thread, so a report does not wait for a checkpoint to finish
            # (bench/durability.py measures both). The WAL file is cut back
            # to 64 MiB once it has been copied.
            await self._writer.execute("PRAGMA wal_autocheckpoint = 0")
            await self._writer.execute(f"PRAGMA journal_size_limit = {64 * 2**20}")
            # Builds with SECURE_DELETE (Debian's) zero every freed page, so
            # emptying a closed cycle's diffs rewrote them all inside the
            # close; FAST zeroes only what is written anyway.
            await self._writer.execute("PRAGMA secure_delete = FAST")
            async with self._writer.execute("PRAGMA page_size") as cursor:
                row = await cursor.fetchone()
                self._page_bytes = int(row[0]) if row else 4096
            await self.migrate()
            self._reader = await self._connect()
            self._checkpointer = await self._connect()
            await self._checkpointer.execute("PRAGMA synchronous = FULL")
            self._checkpoint_task = asyncio.create_task(
                self._checkpoint_loop(), name="wal-checkpointer"
            )
        except BaseException as exc:
            # aiosqlite's threads keep the interpreter alive until closed.
            await self.close()
            if isinstance(exc, (sqlite3.Error, StorageError)):
                raise RuntimeError(
                    f"cannot use database {self.path}: {exc}; check that the file "
                    "and its folder are writable and the disk has space"
                ) from exc
            raise
        store_logger.info("Store %s ready", self.path)

    async def _connect(self) -> aiosqlite.Connection:
        db = await aiosqlite.connect(self.path, isolation_level=None)
        db.row_factory = aiosqlite.Row
        await db.execute("PRAGMA foreign_keys = ON")
        await db.execute("PRAGMA busy_timeout = 10000")
        return db

    async def close(self) -> None:
        if self._checkpoint_task is not None:
            self._checkpoint_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._checkpoint_task
            self._checkpoint_task = None
        if self._writer is not None:
            # Leave one file behind when nothing else has the database open.
            with contextlib.suppress(sqlite3.Error):
                await self._writer.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        for db in (self._checkpointer, self._reader, self._writer):
            if db is not None:
                await db.close()
        self._checkpointer = self._reader = self._writer = None
        store_logger.info("Store %s closed", self.path)

    async def _checkpoint_loop(self) -> None:
        """Copy committed WAL frames into the database file, off the hot path.

        PASSIVE never waits for the writer or the readers; it copies what no
        reader still needs, and the writer starts the WAL afresh once all of
        it is copied. A failing checkpoint (a full disk) loses nothing: the
        frames stay in the WAL, which is durable, and the next try copies
        them.
        """
        assert self._checkpointer is not None
        delay = self._checkpoint_idle_s
        while True:
            await self._wal_written.wait()
            self._wal_written.clear()
            try:
                async with self._checkpointer.execute(
                    "PRAGMA wal_checkpoint(PASSIVE)"
                ) as cursor:
                    row = await cursor.fetchone()
            except sqlite3.Error as exc:
                store_logger.warning(
                    "Checkpointing the WAL of %s failed (%s); retrying in %.0f s",
                    self.path,
                    getattr(exc, "sqlite_errorname", exc),
                    delay,
                )
                self._wal_written.set()
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)
                continue
            delay = self._checkpoint_idle_s
            if row is not None and row[1] * self._page_bytes > self._max_wal_bytes:
                self._is_wal_over = True
            if row is not None and row[1] != row[2]:
                # A reader still needs some frames: come back for them.
                self._wal_written.set()
                await asyncio.sleep(self._checkpoint_idle_s)

    async def migrate(self) -> list[str]:
        """Apply the migrations not yet recorded, each in its own transaction."""
        assert self._writer is not None
        await self._writer.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations (\n"
            "    number INTEGER PRIMARY KEY,\n"
            "    name TEXT NOT NULL,\n"
            "    applied_at REAL NOT NULL\n"
            ")"
        )
        rows = await self._writer.execute_fetchall(
            "SELECT number FROM schema_migrations"
        )
        applied = {row[0] for row in rows}

        done = []
        for number, name, path in migration_files():
            if number in applied:
                continue
            try:
                async with self.transaction() as queries:
                    for statement in split_sql(path.read_text()):
                        await queries.db.execute(statement)
                    await queries.db.execute(
                        "INSERT INTO schema_migrations (number, name, applied_at) "
                        "VALUES (?, ?, ?)",
                        (number, name, time.time()),
                    )
            except (sqlite3.Error, StorageError) as exc:
                raise RuntimeError(
                    f"migration {number:04d}_{name} failed and was rolled back, "
                    f"leaving {self.path} as it was: {exc}"
                ) from exc
            store_logger.info("Migration %04d_%s applied", number, name)
            done.append(f"{number:04d}_{name}")
        self.applied.extend(done)
        return done

    @contextlib.asynccontextmanager
    async def transaction(self, *, is_synced: bool = True) -> AsyncIterator[Queries]:
        """Hold the write connection for one immediate transaction.

        Args:
            is_synced: sync the WAL at the commit (``synchronous = FULL``).
                False leaves the commit to be synced by the next synced one:
                it survives a crash of the process, and a power cut only
                once a later synced commit is done. For rows that a client
                can ask for again (workers, assignments), never for reports.

        Raises:
            StorageError: 507 when the disk is full, 503 when the file cannot be
                written; the transaction is rolled back, nothing is stored.
        """
        assert self._writer is not None, "store is not open"
        async with self._lock:
            if self._is_wal_over:
                await self._restart_wal()
            # Set for every transaction, so that no earlier one can leave it.
            level = "FULL" if is_synced else "NORMAL"
            await self._writer.execute(f"PRAGMA synchronous = {level}")
            try:
                await self._writer.execute("BEGIN IMMEDIATE")
                yield Queries(self._writer)
                await self._writer.execute("COMMIT")
                self._wal_written.set()
            except BaseException as exc:
                # A failed COMMIT may already have rolled back; a second
                # ROLLBACK then fails, and must not hide the first error.
                with contextlib.suppress(sqlite3.Error):
                    await self._writer.execute("ROLLBACK")
                if isinstance(exc, sqlite3.Error):
                    raise storage_error(exc, self.path) from exc
                raise

    async def _restart_wal(self) -> None:
        """Copy the whole WAL and start it afresh, holding off other writes.

        Under a steady stream of large reports the background checkpointer
        can trail the writer, and the WAL is only started afresh once it has
        caught up; past ``max_wal_bytes`` the writer waits for that once
        rather than letting the file grow with every report.
        """
        assert self._writer is not None
        self._is_wal_over = False
        started = time.perf_counter()
        try:
            await self._writer.execute("PRAGMA wal_checkpoint(RESTART)")
        except sqlite3.Error as exc:
            store_logger.warning(
                "Restarting the WAL of %s failed: %s",
                self.path,
                getattr(exc, "sqlite_errorname", exc),
            )
            return
        store_logger.info(
            "WAL of %s copied and restarted in %.2f s",
            self.path,
            time.perf_counter() - started,
        )

    @property
    def read(self) -> Queries:
        """Queries on the read connection, outside any write transaction."""
        assert self._reader is not None, "store is not open"
        return Queries(self._reader)

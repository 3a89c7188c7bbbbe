"""The SQLite store: migrations, pragmas, and the one-writer transaction."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

import nimble_store
from nimble_edge import Store, migration_files, split_sql


def run(coro):
    return asyncio.run(coro)


@contextlib.asynccontextmanager
async def opened(path: Path) -> AsyncIterator[Store]:
    # aiosqlite's threads keep pytest alive, so every store is closed even
    # when an assertion inside fails.
    store = Store(path)
    await store.open()
    try:
        yield store
    finally:
        await store.close()


async def rows(store: Store, sql: str) -> list[tuple]:
    return [tuple(row) for row in await store.read.db.execute_fetchall(sql)]


def test_migrations_are_applied_and_recorded(tmp_path):
    async def scenario():
        async with opened(tmp_path / "a.sqlite") as store:
            return await rows(store, "SELECT number, name FROM schema_migrations")

    applied = run(scenario())

    assert applied == [(n, name) for n, name, _ in migration_files()]
    assert applied[0] == (1, "initial")


def test_opening_again_applies_nothing_twice(tmp_path):
    async def scenario():
        async with opened(tmp_path / "a.sqlite"):
            pass
        async with opened(tmp_path / "a.sqlite") as store:
            return await store.migrate()

    assert run(scenario()) == []


def test_store_uses_wal_full_synchronous_and_foreign_keys(tmp_path):
    async def scenario():
        async with opened(tmp_path / "a.sqlite") as store:
            async with store.transaction() as queries:
                pragmas = []
                for name in ("journal_mode", "synchronous", "foreign_keys"):
                    cursor = await queries.db.execute(f"PRAGMA {name}")
                    pragmas.append((await cursor.fetchone())[0])
            return pragmas

    # synchronous 2 is FULL.
    assert run(scenario()) == ["wal", 2, 1]


def test_failed_migration_rolls_back(tmp_path, monkeypatch):
    migrations = tmp_path / "migrations"
    migrations.mkdir()
    (migrations / "0001_good.sql").write_text("CREATE TABLE a (\n    id INTEGER\n);\n")
    (migrations / "0002_bad.sql").write_text(
        "CREATE TABLE b (\n    id INTEGER\n);\nINSERT INTO missing VALUES (1);\n"
    )
    monkeypatch.setattr(nimble_store, "MIGRATIONS_DIR", migrations)

    with pytest.raises(RuntimeError, match=r"0002_bad failed.*no such table: missing"):
        run(Store(tmp_path / "db.sqlite").open())

    db = sqlite3.connect(tmp_path / "db.sqlite")
    tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master")}
    recorded = [row[0] for row in db.execute("SELECT number FROM schema_migrations")]
    assert "a" in tables and "b" not in tables
    assert recorded == [1]


def test_transaction_rolls_back_on_error(tmp_path):
    async def scenario():
        async with opened(tmp_path / "a.sqlite") as store:
            with pytest.raises(RuntimeError):
                async with store.transaction() as queries:
                    await queries.set_setting("k", "v")
                    raise RuntimeError("boom")
            return await rows(store, "SELECT key FROM settings")

    assert run(scenario()) == []


def test_concurrent_transactions_never_interleave(tmp_path):
    async def writer(store: Store, key: str) -> None:
        async with store.transaction() as queries:
            assert await queries.setting(key) is None
            await queries.set_setting(key, "0")
            await asyncio.sleep(0)
            assert await queries.setting(key) == "0"
            await queries.set_setting(key, "1")

    async def scenario():
        async with opened(tmp_path / "a.sqlite") as store:
            await asyncio.gather(*(writer(store, f"k{i}") for i in range(50)))
            return await rows(store, "SELECT value FROM settings")

    assert run(scenario()) == [("1",)] * 50


def test_split_sql_keeps_semicolons_inside_strings_and_comments():
    script = "-- a; comment\nINSERT INTO t VALUES ('a;b');\nSELECT 1;\n"

    assert split_sql(script) == [
        "-- a; comment\nINSERT INTO t VALUES ('a;b');",
        "SELECT 1;",
    ]


def test_reads_see_every_commit_made_before_them_while_other_reads_run(tmp_path):
    async def scenario() -> list[tuple[int, str | None]]:
        async with opened(tmp_path / "a.sqlite") as store:
            stale = []
            done = asyncio.Event()

            async def reader() -> None:
                while not done.is_set():
                    await store.read.setting("counter")

            readers = [asyncio.create_task(reader()) for _ in range(8)]
            for value in range(200):
                async with store.transaction() as queries:
                    await queries.set_setting("counter", str(value))
                seen = await store.read.setting("counter")
                if seen != str(value):
                    stale.append((value, seen))
            done.set()
            await asyncio.gather(*readers)
            return stale

    assert run(scenario()) == []


def test_moving_blobs_last_keeps_every_checkpoint_and_diff(tmp_path, monkeypatch):
    old = tmp_path / "migrations"
    old.mkdir()
    for _, _, path in migration_files():
        if path.name < "0004":
            (old / path.name).write_text(path.read_text())
    monkeypatch.setattr(nimble_store, "MIGRATIONS_DIR", old)

    async def migrate_to_0003():
        async with opened(tmp_path / "db.sqlite"):
            pass

    run(migrate_to_0003())
    db = sqlite3.connect(tmp_path / "db.sqlite")
    with db:
        db.executescript(
            "INSERT INTO processes VALUES (1, 'p', '1', '{}', '{}', NULL, 0, NULL);"
            "INSERT INTO checkpoints VALUES (1, 1, 1, x'0102', 0);"
            "INSERT INTO cycles VALUES (1, 1, 1, 1, 0, 9, NULL, NULL, NULL);"
            "INSERT INTO workers VALUES ('w', 1, NULL, 0);"
            "INSERT INTO assignments VALUES (7, 1, 'w', 'key', 0);"
            "INSERT INTO reports VALUES (7, 1, x'0304', x'aa', 5, NULL, 0);"
        )
    db.close()
    monkeypatch.undo()

    async def scenario():
        async with opened(tmp_path / "db.sqlite") as store:
            return (
                store.applied,
                await store.read.checkpoint(1, 1),
                await store.read.report_diff(7),
            )

    applied, checkpoint, report = run(scenario())

    assert applied == ["0004_blobs_last"]
    assert checkpoint == (1, b"\x01\x02")
    assert report == (b"\x03\x04", 5)

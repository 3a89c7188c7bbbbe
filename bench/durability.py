"""What durability costs: commit rates for report-sized blobs, option by option.

    python bench/durability.py [--blob-mb 4] [--commits 60] [--dir PATH]

Every option writes the same blobs, one durable commit each, as the report
route does, on the same disk in one run:

- WAL + synchronous=FULL with SQLite's automatic checkpoints: a commit that
  fills 1,000 pages of WAL also copies them into the database file, so the
  writer pays for every byte twice.
- The same with checkpoints moved off the hot path (what `serve` does): the
  writer only appends to the WAL and syncs it; a second connection in its
  own thread copies the WAL into the database file meanwhile.
- Both with 64 KiB pages instead of 4 KiB (fewer overflow pages per blob).
- WAL + NORMAL and OFF: faster, not durable after power loss (for scale).
- One file per blob with fsync of the file and its folder: the reference
  the disk allows, which would make the deployment many files.

Each durable option syncs before it counts a commit, so an acknowledged
report survives power loss. The time includes waiting for the background
checkpointer to finish, so no option hides work it has only postponed.

Then each SQLite option makes small commits (one row and two index entries,
as an assignment is), because the page size that suits large blobs writes
a whole page per changed page on every small commit: the rate and the WAL
bytes each small commit writes are printed beside the blob figures.
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

SMALL_COMMITS = 300

Result = tuple[float, float | None, float | None]


def sqlite_option(
    sync: str, *, background: bool, page_size: int = 4096
) -> Callable[[Path, bytes, int], Result]:
    def run(path: Path, blob: bytes, commits: int) -> Result:
        db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        db.execute(f"PRAGMA page_size = {page_size}")
        db.execute("PRAGMA journal_mode = WAL")
        db.execute(f"PRAGMA synchronous = {sync}")
        db.execute("CREATE TABLE reports (id INTEGER PRIMARY KEY, diff BLOB NOT NULL)")
        done = threading.Event()
        checkpointer = None
        if background:
            db.execute("PRAGMA wal_autocheckpoint = 0")
            checkpointer = threading.Thread(target=checkpoint_loop, args=(path, done))
            checkpointer.start()

        started = time.perf_counter()
        for _ in range(commits):
            db.execute("BEGIN IMMEDIATE")
            db.execute("INSERT INTO reports (diff) VALUES (?)", (blob,))
            db.execute("COMMIT")
        done.set()
        if checkpointer is not None:
            checkpointer.join()
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        seconds = time.perf_counter() - started

        small_s, wal_bytes = small_commits(db, path)
        db.close()
        return seconds, SMALL_COMMITS / small_s, wal_bytes / SMALL_COMMITS

    return run


def small_commits(db: sqlite3.Connection, path: Path) -> tuple[float, int]:
    """Time small commits into an indexed table; return seconds and WAL bytes."""
    db.execute(
        "CREATE TABLE assignments (id INTEGER PRIMARY KEY, cycle_id INTEGER, "
        "worker_id TEXT, request_key TEXT)"
    )
    db.execute("CREATE INDEX by_worker ON assignments (cycle_id, worker_id)")
    db.execute("CREATE UNIQUE INDEX by_key ON assignments (request_key)")
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    wal = Path(f"{path}-wal")
    before = wal.stat().st_size if wal.exists() else 0

    started = time.perf_counter()
    for index in range(SMALL_COMMITS):
        row = (index // 50, os.urandom(16).hex(), os.urandom(24).hex())
        db.execute("BEGIN IMMEDIATE")
        db.execute(
            "INSERT INTO assignments (cycle_id, worker_id, request_key) "
            "VALUES (?, ?, ?)",
            row,
        )
        db.execute("COMMIT")
    return time.perf_counter() - started, wal.stat().st_size - before


def checkpoint_loop(path: Path, done: threading.Event) -> None:
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA synchronous = FULL")
    while not done.is_set():
        _, frames, copied = db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        if frames == copied:
            time.sleep(0.005)
    db.close()


def files_option(path: Path, blob: bytes, commits: int) -> Result:
    folder = path.with_suffix("")
    folder.mkdir()
    started = time.perf_counter()
    for index in range(commits):
        with open(folder / f"{index}.bin", "wb") as file:
            file.write(blob)
            file.flush()
            os.fsync(file.fileno())
        handle = os.open(folder, os.O_RDONLY)
        os.fsync(handle)
        os.close(handle)
    return time.perf_counter() - started, None, None


OPTIONS: list[tuple[str, Callable[[Path, bytes, int], Result], str]] = [
    ("wal-full-auto", sqlite_option("FULL", background=False), "durable"),
    ("wal-full-background", sqlite_option("FULL", background=True), "durable (serve)"),
    (
        "wal-full-auto-64k",
        sqlite_option("FULL", background=False, page_size=65536),
        "durable",
    ),
    (
        "wal-full-background-64k",
        sqlite_option("FULL", background=True, page_size=65536),
        "durable",
    ),
    ("wal-normal-auto", sqlite_option("NORMAL", background=False), "not on power loss"),
    ("wal-off-auto", sqlite_option("OFF", background=False), "not durable"),
    ("file-per-blob-fsync", files_option, "durable, many files"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--blob-mb", type=float, default=4.0)
    parser.add_argument("--commits", type=int, default=60)
    parser.add_argument("--dir", default=None, help="folder on the disk to measure")
    args = parser.parse_args()

    blob = os.urandom(int(args.blob_mb * 1024 * 1024))
    with tempfile.TemporaryDirectory(dir=args.dir) as name:
        directory = Path(name)
        print(f"{args.commits} commits of {args.blob_mb:g} MB blobs in {directory}")
        print(
            f"{'option':<24} {'commits/s':>10} {'MB/s':>8} {'small/s':>8} "
            f"{'KB/small':>9}  durability"
        )
        for label, run, meaning in OPTIONS:
            seconds, small_rate, small_bytes = run(
                directory / f"{label}.sqlite", blob, args.commits
            )
            rate = args.commits / seconds
            small = "" if small_rate is None else f"{small_rate:>8.0f}"
            per = "" if small_bytes is None else f"{small_bytes / 1024:>9.1f}"
            print(
                f"{label:<24} {rate:>10.1f} {rate * args.blob_mb:>8.1f} "
                f"{small:>8} {per:>9}  {meaning}"
            )


if __name__ == "__main__":
    main()

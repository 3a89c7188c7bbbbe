"""What durability costs: SQLite commit rates for report-sized blobs.

    python bench/durability.py [--blob-mb 4] [--commits 40]

Each setting writes the same blobs, one transaction each, as the report route
does. WAL + synchronous=FULL (what `serve` uses) syncs the WAL on every
commit, so an acknowledged report survives power loss; NORMAL syncs only at
checkpoints (a crash of the process loses nothing, a power cut may lose the
last commits); OFF never syncs. Figures are printed side by side from one
run on the same disk.
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import tempfile
import time
from pathlib import Path

SETTINGS = [
    ("WAL", "FULL", "serve's choice: durable after power loss"),
    ("WAL", "NORMAL", "durable after a crash, not after power loss"),
    ("WAL", "OFF", "not durable"),
    ("DELETE", "FULL", "rollback journal, durable"),
]


def measure(
    directory: Path, journal: str, sync: str, blob: bytes, commits: int
) -> float:
    path = directory / f"{journal}-{sync}.sqlite"
    db = sqlite3.connect(path, isolation_level=None)
    db.execute(f"PRAGMA journal_mode = {journal}")
    db.execute(f"PRAGMA synchronous = {sync}")
    db.execute("CREATE TABLE reports (id INTEGER PRIMARY KEY, diff BLOB NOT NULL)")
    started = time.perf_counter()
    for _ in range(commits):
        db.execute("BEGIN IMMEDIATE")
        db.execute("INSERT INTO reports (diff) VALUES (?)", (blob,))
        db.execute("COMMIT")
    seconds = time.perf_counter() - started
    db.close()
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--blob-mb", type=float, default=4.0)
    parser.add_argument("--commits", type=int, default=40)
    parser.add_argument("--dir", default=None, help="folder on the disk to measure")
    args = parser.parse_args()

    blob = os.urandom(int(args.blob_mb * 1024 * 1024))
    with tempfile.TemporaryDirectory(dir=args.dir) as name:
        directory = Path(name)
        print(f"{args.commits} commits of {args.blob_mb:g} MB blobs in {directory}")
        print(f"{'journal':<8} {'sync':<7} {'commits/s':>10} {'MB/s':>8}  meaning")
        for journal, sync, meaning in SETTINGS:
            seconds = measure(directory, journal, sync, blob, args.commits)
            rate = args.commits / seconds
            print(
                f"{journal:<8} {sync:<7} {rate:>10.1f} "
                f"{rate * args.blob_mb:>8.1f}  {meaning}"
            )


if __name__ == "__main__":
    main()

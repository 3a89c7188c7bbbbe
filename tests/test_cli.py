"""The command line: help, usage errors, version and migrate."""

from __future__ import annotations

import os
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "nimble_edge.py"), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


def test_serve_help_shows_defaults_and_env_vars():
    result = cli("serve", "--help")

    assert result.returncode == 0
    assert "127.0.0.1" in result.stdout and "NIMBLE_EDGE_PORT" in result.stdout
    assert "0.0.0.0 exposes" in result.stdout


def test_usage_error_exits_2():
    result = cli("serve", "--port", "not-a-port")

    assert result.returncode == 2
    assert "invalid port_number value" in result.stderr


def test_version_prints_library_versions():
    result = cli("version")

    assert result.returncode == 0
    assert "nimble-edge: " in result.stdout and "torch: " in result.stdout
    assert "sqlite: " in result.stdout


def test_migrate_creates_the_schema(tmp_path):
    db = tmp_path / "x.sqlite"

    result = cli("migrate", "--db", str(db))

    assert result.returncode == 0, result.stderr
    tables = {
        r[0] for r in sqlite3.connect(db).execute("SELECT name FROM sqlite_master")
    }
    assert {
        "processes",
        "checkpoints",
        "cycles",
        "reports",
        "schema_migrations",
    } <= tables


def test_runtime_error_prints_error_and_exits_1(tmp_path):
    result = cli("migrate", "--db", str(tmp_path / "missing-dir" / "x.sqlite"))

    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: cannot open database ") and "missing-dir" in last


def test_admin_commands_without_the_token_say_so_in_one_line():
    env = {k: v for k, v in os.environ.items() if k != "NIMBLE_EDGE_ADMIN_TOKEN"}

    result = cli("list", "--address", "127.0.0.1:9", env=env)

    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "error: NIMBLE_EDGE_ADMIN_TOKEN is not set; export the server's admin "
        "token (serve printed it, or wrote it beside its database, on first start)"
    ]


def test_demo_with_no_workers_is_a_usage_error():
    result = cli("demo", "--workers", "0")

    assert result.returncode == 2 and "--workers" in result.stderr


def test_token_for_a_database_that_does_not_exist_creates_nothing(tmp_path):
    db = tmp_path / "typo.sqlite"

    result = cli("token", "--db", str(db), "--process", "p", "--sub", "d")

    assert result.returncode == 1 and "no database at" in result.stderr
    assert not db.exists()


def test_serve_on_a_port_in_use_says_so_in_one_line(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]

        result = cli("serve", "--db", str(tmp_path / "x.sqlite"), "--port", str(port))

    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: cannot listen on 127.0.0.1:{port}")

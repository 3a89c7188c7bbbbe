"""Limits, storage failures, timeouts and shutdown, against real servers."""

from __future__ import annotations

import base64
import gzip
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import cbor2
import httpx
import pytest
import torch

import nimble_edge
from plan_runtime import ModelCentricFLClient, ServerError, Worker
from plan_runtime.state import encode_state
from tests.conftest import ROOT, ServerProcess, read_answer


def start(tmp_path: Path, *flags: str, db: Path | None = None) -> ServerProcess:
    """A server of its own, started with extra ``serve`` flags."""
    handle = ServerProcess(db or tmp_path / "edge.sqlite", tmp_path / "serve.log")
    handle.port = nimble_edge.free_port()
    env = dict(os.environ, NIMBLE_EDGE_ADMIN_TOKEN=handle.token)
    with handle.log_path.open("ab") as log:
        handle.process = subprocess.Popen(
            [
                sys.executable,
                str(ROOT / "nimble_edge.py"),
                "serve",
                "--db",
                str(handle.db_path),
                "--port",
                str(handle.port),
                *flags,
            ],
            env=env,
            stdout=log,
            stderr=log,
        )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert handle.process.poll() is None, handle.log()
        try:
            if httpx.get(f"{handle.url}/health", timeout=1).status_code == 200:
                return handle
        except httpx.HTTPError:
            time.sleep(0.1)
    raise AssertionError("server did not start")


def host(server: ServerProcess, plan, model=None, **server_config) -> str:
    name = f"p-{uuid.uuid4().hex[:6]}"
    with ModelCentricFLClient(server.address, token=server.token) as admin:
        admin.host_federated_training(
            model=model or [torch.zeros(3, 4), torch.zeros(3)],
            client_plans={"training_plan": plan},
            client_config={"name": name, "version": "1"},
            server_config=server_config,
        )
    return name


def assigned(server: ServerProcess, name: str) -> tuple[Worker, dict]:
    worker = Worker(server.address)
    worker_id = worker.worker_id(name, None)
    answer = worker.connection.call(
        "POST",
        "/model-centric/cycle-request",
        body={"worker_id": worker_id, "model": name},
    )
    assert answer["status"] == "accepted", answer
    return worker, {"worker_id": worker_id, "request_key": answer["request_key"]}


def report_body(keys: dict, tensors: list[torch.Tensor]) -> bytes:
    return cbor2.dumps({**keys, "diff": encode_state(tensors)})


def raw_request(
    port: int, head: str, body_parts: list[bytes], pause_s: float = 0, before_rest=None
) -> bytes:
    """Send a request in parts over one socket; return the raw answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(head.encode())
        for index, part in enumerate(body_parts):
            if index and pause_s:
                time.sleep(pause_s)
            if index and before_rest is not None:
                before_rest()
            sock.sendall(part)
        return read_answer(sock)


def test_process_worker_and_assignment_limits(tmp_path, plan):
    server = start(
        tmp_path,
        "--max-processes",
        "2",
        "--max-workers-per-process",
        "3",
        "--max-open-assignments",
        "2",
    )
    try:
        name = host(server, plan)
        host(server, plan)
        with pytest.raises(ServerError) as hosted:
            host(server, plan)
        answers = []
        for _ in range(3):
            worker = Worker(server.address)
            answers.append(
                worker.connection.call(
                    "POST",
                    "/model-centric/cycle-request",
                    body={"worker_id": worker.worker_id(name, None), "model": name},
                )
            )
        with pytest.raises(ServerError) as authenticated:
            Worker(server.address).worker_id(name, None)
        with (
            pytest.raises(ServerError) as again,
            ModelCentricFLClient(server.address, token=server.token) as admin,
        ):
            admin.host_federated_training(
                model=[torch.zeros(3, 4), torch.zeros(3)],
                client_plans={"training_plan": plan},
                client_config={"name": name, "version": "1"},
                server_config={},
            )
    finally:
        server.stop()

    # At the limit, hosting what is already hosted still says what is wrong.
    assert again.value.status == 409 and again.value.code == "process_exists"
    assert hosted.value.status == 429 and hosted.value.code == "limit_reached"
    assert "--max-processes" in hosted.value.message
    assert [a["status"] for a in answers] == ["accepted", "accepted", "rejected"]
    assert answers[2]["reason"] == "full"
    assert authenticated.value.status == 429


def test_stalled_upload_times_out_with_408(tmp_path, plan):
    server = start(tmp_path, "--body-timeout-s", "1")
    try:
        answer = raw_request(
            server.port,
            "POST /model-centric/authenticate HTTP/1.1\r\nHost: x\r\n"
            "Content-Type: application/cbor\r\nContent-Length: 100\r\n\r\n",
            [b"\xa1"],
        )
        still_up = httpx.get(f"{server.url}/health").status_code
    finally:
        server.stop()

    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b'"request_timeout"' in answer or b"request_timeout" in answer
    assert still_up == 200


def test_compressed_bodies_are_refused_without_inflating(server):
    bomb = gzip.compress(b"\x00" * (50 * 1024 * 1024))

    response = httpx.post(
        f"{server.url}/model-centric/authenticate",
        content=bomb,
        headers={"Content-Type": "application/cbor", "Content-Encoding": "gzip"},
    )

    assert response.status_code == 415
    assert cbor2.loads(response.content)["code"] == "unsupported_media_type"


def test_messages_with_too_many_items_are_refused_before_decoding(server):
    # 20,000 small integers fit the 64 KiB message limit but not the budget.
    many = cbor2.dumps({"model_name": [1] * 20_000})

    response = httpx.post(
        f"{server.url}/model-centric/authenticate",
        content=many,
        headers={"Content-Type": "application/cbor"},
    )

    assert response.status_code == 400
    assert "more than 4096 CBOR items" in cbor2.loads(response.content)["error"]


def test_diff_claiming_many_tensors_is_refused_before_decoding(server, host):
    name, _ = host()
    _, keys = assigned(server, name)
    bomb = cbor2.dumps(
        {"format": "nimble-edge/state", "version": 1, "tensors": [0] * 20_000}
    )

    response = httpx.post(
        f"{server.url}/model-centric/report",
        content=cbor2.dumps({**keys, "diff": bomb}),
        headers={"Content-Type": "application/cbor"},
    )

    assert response.status_code == 400
    assert "CBOR items" in cbor2.loads(response.content)["error"]


def test_report_larger_than_the_model_allows_is_refused_as_it_arrives(server, host):
    name, _ = host()
    _, _keys = assigned(server, name)
    limit_ish = 50 * 1024 * 1024

    answer = raw_request(
        server.port,
        "POST /model-centric/report HTTP/1.1\r\nHost: x\r\n"
        f"Content-Type: application/cbor\r\nContent-Length: {limit_ish}\r\n\r\n",
        [b"\xa0"],
    )

    assert answer.startswith(b"HTTP/1.1 413")


def test_sigterm_lets_an_inflight_report_finish_then_exits_0(tmp_path, plan):
    server = start(tmp_path)
    model = [torch.zeros(1000, 1000), torch.zeros(1000)]
    name = host(server, plan, model=model, max_diffs=1)
    _, keys = assigned(server, name)
    body = report_body(keys, [torch.ones(1000, 1000), torch.ones(1000)])
    head = (
        "POST /model-centric/report HTTP/1.1\r\nHost: x\r\n"
        f"Content-Type: application/cbor\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    half = len(body) // 2

    answer = raw_request(
        server.port,
        head,
        [body[:half], body[half:]],
        pause_s=0.5,
        before_rest=lambda: server.process.send_signal(signal.SIGTERM),
    )
    code = server.process.wait(timeout=60)

    assert answer.startswith(b"HTTP/1.1 200"), answer[:300]
    assert code == 0
    rows = (
        sqlite3.connect(server.db_path)
        .execute("SELECT number FROM checkpoints ORDER BY number")
        .fetchall()
    )
    assert rows == [(1,), (2,)]


@pytest.fixture
def small_disk(tmp_path) -> Iterator[Path]:
    """A 24 MiB tmpfs of our own: a disk that can really fill up."""
    mount = tmp_path / "disk"
    mount.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def fill(directory: Path, leave_bytes: int) -> Path:
    """Fill a filesystem until about ``leave_bytes`` are free."""
    filler = directory / "filler"
    stats = os.statvfs(directory)
    free = stats.f_bavail * stats.f_frsize
    with filler.open("wb") as f:
        f.write(b"\x00" * max(0, free - leave_bytes))
    return filler


def truncate_wal(db_path: Path) -> None:
    """Copy the WAL into the database file and cut it to zero bytes."""
    db = sqlite3.connect(db_path)
    try:
        for _ in range(50):
            busy, _, _ = db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
            if not busy:
                break
            time.sleep(0.1)
    finally:
        db.close()
    assert Path(f"{db_path}-wal").stat().st_size == 0


def test_full_disk_refuses_the_report_with_507_and_stores_nothing(
    tmp_path, plan, small_disk
):
    server = start(tmp_path, db=small_disk / "edge.sqlite")
    try:
        model = [torch.zeros(500, 500), torch.zeros(500)]
        name = host(server, plan, model=model, max_diffs=2)
        _, keys = assigned(server, name)
        body = report_body(keys, [torch.ones(500, 500), torch.ones(500)])
        # The server reuses a copied WAL from its start, so a report fits in
        # the space the host upload left there; emptied, it must grow.
        truncate_wal(small_disk / "edge.sqlite")
        filler = fill(small_disk, leave_bytes=64 * 1024)

        full = httpx.post(
            f"{server.url}/model-centric/report",
            content=body,
            headers={"Content-Type": "application/cbor"},
        )
        healthy = httpx.get(f"{server.url}/health").status_code
        filler.unlink()
        retried = httpx.post(
            f"{server.url}/model-centric/report",
            content=body,
            headers={"Content-Type": "application/cbor"},
        )
    finally:
        server.stop()

    assert full.status_code == 507
    assert cbor2.loads(full.content)["code"] == "storage_full"
    assert healthy == 200
    assert retried.status_code == 200 and "duplicate" not in cbor2.loads(
        retried.content
    )
    db = sqlite3.connect(small_disk / "edge.sqlite")
    assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    assert db.execute("SELECT count(*) FROM reports").fetchone() == (1,)
    assert "disk is full" in server.log()


def immutable(paths: list[Path], on: bool) -> None:
    """Make files unwritable even for root, through open descriptors too."""
    for path in paths:
        if path.exists():
            result = subprocess.run(
                ["chattr", "+i" if on else "-i", str(path)],
                capture_output=True,
                text=True,
            )
            if result.returncode != 0:
                pytest.skip(f"chattr does not work here: {result.stderr.strip()}")


def test_read_only_database_gives_503_and_a_clear_start_up_error(tmp_path, plan):
    server = start(tmp_path)
    name = host(server, plan)
    files = [server.db_path, Path(f"{server.db_path}-wal")]
    immutable(files, on=True)
    try:
        refused = httpx.post(
            f"{server.url}/model-centric/authenticate", json={"model_name": name}
        )
        status = httpx.get(f"{server.url}/status").status_code
        server.stop()
        result = subprocess.run(
            [
                sys.executable,
                str(ROOT / "nimble_edge.py"),
                "serve",
                "--db",
                str(server.db_path),
                "--port",
                str(nimble_edge.free_port()),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        immutable(files, on=False)

    assert refused.status_code == 503
    assert refused.json()["code"] == "storage_unavailable"
    assert status == 200
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: cannot") and "edge.sqlite" in last
    db = sqlite3.connect(server.db_path)
    assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    assert db.execute("SELECT count(*) FROM workers").fetchone() == (0,)


def test_json_report_of_a_megabyte_model_fits_the_limit(server, plan):
    model = [torch.zeros(500, 500), torch.zeros(500)]
    name = host(server, plan, model=model, max_diffs=2)
    _, keys = assigned(server, name)
    diff = encode_state([torch.ones(500, 500), torch.ones(500)])

    response = httpx.post(
        f"{server.url}/model-centric/report",
        json={**keys, "diff": base64.b64encode(diff).decode(), "num_samples": 3},
    )

    assert response.status_code == 200, response.text
    assert response.json()["status"] == "success"


def test_client_that_drops_its_upload_is_no_server_error(tmp_path, plan):
    server = start(tmp_path)
    try:
        name = host(server, plan, model=[torch.zeros(500, 500)], max_diffs=2)
        _, keys = assigned(server, name)
        body = report_body(keys, [torch.ones(500, 500)])
        for _ in range(3):
            with socket.create_connection(("127.0.0.1", server.port)) as sock:
                sock.sendall(
                    b"POST /model-centric/report HTTP/1.1\r\nHost: x\r\n"
                    b"Content-Type: application/cbor\r\n"
                    + f"Content-Length: {len(body)}\r\n\r\n".encode()
                    + body[:1000]
                )
                time.sleep(0.2)
        time.sleep(0.5)
        healthy = httpx.get(f"{server.url}/health").status_code
    finally:
        server.stop()

    assert healthy == 200
    assert " ERROR " not in server.log() and "Traceback" not in server.log()

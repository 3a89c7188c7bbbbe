"""Admission and cycle rules, one test per rule, against a real server."""

from __future__ import annotations

import socket
import sqlite3
import time

import httpx
import pytest
import torch

from plan_runtime import ModelCentricFLClient, ServerError, Worker
from tests.conftest import ServerProcess, read_answer


def request_cycle(server, name, worker=None, **extra):
    """Authenticate (once per Worker) and send a raw cycle-request."""
    worker = worker or Worker(server.address)
    worker_id = worker.worker_id(name, None)
    body = {"worker_id": worker_id, "model": name, **extra}
    answer = worker.connection.call("POST", "/model-centric/cycle-request", body=body)
    return worker, answer


def report_ones(worker, answer, server):
    """Download the model and report a diff of ones under the assignment."""
    keys = {
        "worker_id": worker.worker_id(answer["model"], None),
        "request_key": answer["request_key"],
    }
    response = httpx.get(f"{server.url}/model-centric/get-model", params=keys)
    from plan_runtime.state import decode_state, encode_state

    model = decode_state(response.content)
    diff = encode_state({k: torch.ones_like(t) for k, t in model.items()})
    return worker.connection.call(
        "POST", "/model-centric/report", body={**keys, "diff": diff}
    )


def raw_post(port: int, path: str, declared_length: int) -> bytes:
    """POST that claims a body length it never sends; returns the raw answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(
            f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Content-Length: {declared_length}\r\n\r\nxx".encode()
        )
        return read_answer(sock)


def statuses(admin):
    return {p["name"]: p for p in admin.status()["processes"]}


def test_max_workers_makes_the_cycle_full(server, host):
    name, _ = host(max_workers=2, max_diffs=2)
    answers = [request_cycle(server, name)[1] for _ in range(3)]

    assert [a["status"] for a in answers] == ["accepted", "accepted", "rejected"]
    assert answers[2]["reason"] == "full"
    assert isinstance(answers[2]["timeout"], int) and answers[2]["timeout"] >= 1


def test_repeated_request_in_a_full_cycle_still_returns_the_assignment(server, host):
    name, _ = host(max_workers=1)
    worker, first = request_cycle(server, name)

    _, again = request_cycle(server, name, worker)

    assert again["status"] == "accepted"
    assert again["request_key"] == first["request_key"]


def test_worker_is_not_reused_until_the_configured_cycle(server, admin, host):
    name, _ = host(max_diffs=1, num_cycles=5, do_not_reuse_workers_until_cycle=2)
    worker, answer = request_cycle(server, name)
    report_ones(worker, answer, server)

    _, in_cycle_2 = request_cycle(server, name, worker)
    other, other_answer = request_cycle(server, name)
    report_ones(other, other_answer, server)
    _, in_cycle_3 = request_cycle(server, name, worker)

    assert in_cycle_2["status"] == "rejected" and in_cycle_2["reason"] == "not eligible"
    assert other_answer["cycle"] == 2
    assert in_cycle_3["status"] == "accepted" and in_cycle_3["cycle"] == 3


def test_random_pool_selection_draws_once_per_worker_and_cycle(server, host):
    name, _ = host(pool_selection="random", selection_probability=0.5)
    workers = [Worker(server.address) for _ in range(24)]

    first = [request_cycle(server, name, w)[1]["status"] for w in workers]
    second = [request_cycle(server, name, w)[1]["status"] for w in workers]

    assert first == second
    # 24 fair draws all landing on one side has probability 2 * 2**-24.
    assert set(first) == {"accepted", "rejected"}


def test_tiny_selection_probability_admits_nobody(server, host):
    name, _ = host(pool_selection="random", selection_probability=1e-12)

    answers = [request_cycle(server, name)[1] for _ in range(5)]

    assert {a["reason"] for a in answers} == {"not eligible"}


def test_worker_library_runs_the_speed_test_when_required(server, host):
    name, _ = host(minimum_download_speed=1, minimum_upload_speed=1)
    worker = Worker(server.address)
    worker.speed_test_bytes = 256 * 1024
    job = worker.new_job(name)

    admitted = job.start()

    assert admitted is True


def test_slow_worker_is_rejected_as_too_slow(server, host):
    name, _ = host(minimum_download_speed=10**9)

    _, answer = request_cycle(server, name, download=5.0, upload=5.0)

    assert answer["reason"] == "too slow" and answer["timeout"] >= 1


def test_speed_test_numbers_are_required_when_a_minimum_is_set(server, host):
    name, _ = host(minimum_upload_speed=1)

    with pytest.raises(ServerError) as caught:
        request_cycle(server, name)

    assert caught.value.status == 400 and "speed test" in caught.value.message


def test_speed_test_routes_are_bounded_and_need_a_worker(server, host):
    name, _ = host()
    worker, _ = request_cycle(server, name)
    worker_id = worker.worker_id(name, None)
    api = f"{server.url}/model-centric/speed-test"

    download = httpx.get(api, params={"worker_id": worker_id, "size_bytes": 100_000})
    too_big = httpx.get(api, params={"worker_id": worker_id, "size_bytes": 10**12})
    stranger = httpx.get(api, params={"worker_id": "nobody"})
    upload = httpx.post(api, params={"worker_id": worker_id}, content=b"x" * 50_000)
    flood = raw_post(
        server.port,
        f"/model-centric/speed-test?worker_id={worker_id}",
        declared_length=10**12,
    )

    assert download.status_code == 200 and len(download.content) == 100_000
    assert too_big.status_code == 400 and stranger.status_code == 401
    assert upload.status_code == 200
    assert upload.headers["content-type"].startswith("application/cbor")
    assert flood.startswith(b"HTTP/1.1 413")


def test_deadline_with_too_few_diffs_closes_without_a_checkpoint(server, admin, host):
    name, _ = host(cycle_length=1, min_diffs=2, max_diffs=None, on_deadline="close")
    worker, answer = request_cycle(server, name)
    report_ones(worker, answer, server)

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and statuses(admin)[name]["cycle"] == 1:
        time.sleep(0.1)

    assert statuses(admin)[name]["cycle"] == 2
    assert statuses(admin)[name]["checkpoints"] == 1


def test_get_plan_is_refused_after_the_cycle_closes(server, host):
    name, _ = host(max_diffs=1)
    worker, answer = request_cycle(server, name)
    report_ones(worker, answer, server)

    response = httpx.get(
        f"{server.url}/model-centric/get-plan",
        params={
            "worker_id": worker.worker_id(name, None),
            "request_key": answer["request_key"],
            "plan_id": answer["plans"]["training_plan"],
        },
    )

    assert response.status_code == 409


def test_processes_run_side_by_side_without_touching_each_other(server, admin, host):
    first, _ = host(max_diffs=1)
    second, _ = host(max_diffs=2)
    before = admin.retrieve_model(second, "1")

    for _ in range(2):
        worker, answer = request_cycle(server, first)
        report_ones(worker, answer, server)
    worker, answer = request_cycle(server, second)
    report_ones(worker, answer, server)

    assert statuses(admin)[first]["cycle"] == 3
    assert statuses(admin)[first]["checkpoints"] == 3
    assert statuses(admin)[second]["cycle"] == 1
    assert statuses(admin)[second]["diffs"] == 1
    after = admin.retrieve_model(second, "1")
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_worker_of_one_process_is_unknown_to_another(server, host):
    first, _ = host()
    second, _ = host()
    worker, _ = request_cycle(server, first)

    with pytest.raises(ServerError) as caught:
        worker.connection.call(
            "POST",
            "/model-centric/cycle-request",
            body={"worker_id": worker.worker_id(first, None), "model": second},
        )

    assert caught.value.code == "unknown_worker"


def test_cycle_over_when_the_deadline_has_passed_but_the_cycle_is_open(tmp_path, plan):
    # A server of its own: the shared one's clock wakes often for other
    # tests' short cycles and would extend this one before the request.
    server = ServerProcess(tmp_path / "edge.sqlite", tmp_path / "serve.log").start()
    admin = ModelCentricFLClient(server.address, token=server.token).connect()
    admin.host_federated_training(
        model=[torch.zeros(3, 4), torch.zeros(3)],
        client_plans={"training_plan": plan},
        client_config={"name": "late", "version": "1"},
        server_config={"cycle_length": 3600},
    )
    admin.close()
    db = sqlite3.connect(server.db_path)
    db.execute("UPDATE cycles SET deadline_at = 0")
    db.commit()

    _, answer = request_cycle(server, "late")
    server.stop()

    assert answer == {"status": "rejected", "reason": "cycle over", "timeout": 1}


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"max_workers": 0}, '"max_workers" must be a whole number from 1'),
        ({"assignment_timeout": "1h"}, '"assignment_timeout" must be a number'),
        ({"on_deadline": "panic"}, '"on_deadline" must be "extend" or "close"'),
        ({"pool_selection": "lottery"}, '"pool_selection" must be'),
        ({"selection_probability": 0}, '"selection_probability" must be'),
        ({"minimum_upload_speed": -1}, "megabits per second"),
        ({"do_not_reuse_workers_until_cycle": -1}, "whole number of cycles"),
        ({"cycle_lenght": 60}, "unknown key 'cycle_lenght'"),
    ],
)
def test_every_server_config_key_is_checked_at_host_time(admin, plan, config, message):
    with pytest.raises(ServerError, match=message) as caught:
        admin.host_federated_training(
            model=[torch.zeros(3, 4), torch.zeros(3)],
            client_plans={"training_plan": plan},
            client_config={"name": "checked", "version": "1"},
            server_config=config,
        )

    assert caught.value.status == 400 and caught.value.code == "invalid_config"


def test_deadline_survives_a_restart(tmp_path, plan):
    server = ServerProcess(tmp_path / "edge.sqlite", tmp_path / "serve.log").start()
    admin = ModelCentricFLClient(server.address, token=server.token).connect()
    admin.host_federated_training(
        model=[torch.zeros(3, 4), torch.zeros(3)],
        client_plans={"training_plan": plan},
        client_config={"name": "restart", "version": "1"},
        server_config={"cycle_length": 4, "max_diffs": None},
    )
    worker, answer = request_cycle(server, "restart")
    report_ones(worker, answer, server)
    admin.close()
    server.stop()

    server.start()
    deadline = time.monotonic() + 20
    rows = []
    while time.monotonic() < deadline and not rows:
        time.sleep(0.2)
        rows = (
            sqlite3.connect(server.db_path)
            .execute(
                "SELECT started_at, closed_at FROM cycles "
                "WHERE number = 1 AND closed_at IS NOT NULL"
            )
            .fetchall()
        )
    server.stop()

    assert rows, "cycle 1 did not close after the restart"
    started_at, closed_at = rows[0]
    # Closed at its original deadline (4 s after it started), not 4 s after
    # the restart; 3 s of slack covers a slow start of the second server.
    assert closed_at - started_at < 4 + 3


def test_expired_assignment_frees_its_slot_for_another_worker(server, host):
    name, _ = host(max_workers=1, max_diffs=2, assignment_timeout=1)
    first, held = request_cycle(server, name)
    _, refused = request_cycle(server, name)
    time.sleep(1.2)

    _, admitted = request_cycle(server, name)
    _, back = request_cycle(server, name, worker=first)

    assert held["status"] == "accepted"
    assert refused["status"] == "rejected" and refused["reason"] == "full"
    assert admitted["status"] == "accepted"
    assert back["status"] == "rejected" and back["reason"] == "full"


def test_worker_back_after_expiry_gets_its_own_assignment_when_a_slot_is_free(
    server, host
):
    name, _ = host(max_workers=2, max_diffs=2, assignment_timeout=1)
    worker, first = request_cycle(server, name)
    time.sleep(1.2)

    _, again = request_cycle(server, name, worker=worker)
    _, other = request_cycle(server, name)
    _, third = request_cycle(server, name)

    assert again["status"] == "accepted"
    assert again["request_key"] == first["request_key"]
    assert other["status"] == "accepted"
    assert third["status"] == "rejected" and third["reason"] == "full"


def test_retry_hint_is_capped_well_before_a_distant_deadline(server, host):
    name, _ = host(max_workers=1, max_diffs=1, cycle_length=86400)
    request_cycle(server, name)

    _, refused = request_cycle(server, name)

    assert refused["reason"] == "full"
    assert 1 <= refused["timeout"] <= 60

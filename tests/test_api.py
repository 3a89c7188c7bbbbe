"""The wire API against a real server on loopback, rule by rule."""

from __future__ import annotations

import base64
import time

import cbor2
import httpx
import jwt
import pytest
import torch

from plan_runtime import ServerError, Worker
from plan_runtime.plan import Plan
from plan_runtime.state import decode_state, encode_state


def join(server, name, version="1", token=None):
    """Authenticate and request a cycle; return (worker, job, answer)."""
    worker = Worker(server.address, auth_token=token)
    job = worker.new_job(name, version)
    seen = {}
    job.on_ready = lambda model, plans, config: seen.update(model=model, plans=plans)
    job.on_rejected = lambda timeout: seen.update(rejected=timeout)
    job.start()
    return worker, job, seen


def train_and_report(job, model, plans, shift=0.0, num_samples=8):
    xs = torch.randn(8, 4) + shift
    ys = torch.randint(0, 3, (8,))
    _, _, *params = plans["training_plan"](xs, ys, 8, 0.1, list(model.values()))
    return job.report(job.create_diff(params), num_samples=num_samples)


def test_cycle_closes_at_max_diffs_into_the_weighted_average(server, admin, host):
    name, version = host(max_diffs=2)
    base = admin.retrieve_model(name, version, checkpoint=1)
    diffs = []
    for weight in (1, 3):
        _, job, seen = join(server, name)
        diff = {
            key: torch.full_like(t, float(weight)) for key, t in seen["model"].items()
        }
        diffs.append((diff, weight))
        answer = job.report(diff, num_samples=weight)
        assert answer == {"status": "success", "cycle": 1}

    latest = admin.retrieve_model(name, version, checkpoint="latest")

    # (1*1 + 3*3) / 4 = 2.5 subtracted from every parameter.
    for key, tensor in latest.items():
        assert torch.allclose(tensor, base[key] - 2.5)
    assert admin.retrieve_model(name, version, checkpoint=2).keys() == base.keys()


def test_worker_runs_the_plan_and_checkpoint_advances(server, admin, host):
    name, version = host(max_diffs=1)
    _, job, seen = join(server, name)

    answer = train_and_report(job, seen["model"], seen["plans"])

    assert answer["cycle"] == 1
    assert isinstance(seen["plans"]["training_plan"], Plan)
    assert set(admin.retrieve_model(name, version)) == {"fc.weight", "fc.bias"}
    status = {p["name"]: p for p in admin.status()["processes"]}
    assert status[name]["checkpoints"] == 2 and status[name]["cycle"] == 2


def test_repeated_cycle_request_returns_the_same_assignment(server, host):
    name, _ = host()
    worker, job, _ = join(server, name)
    first = job.request_key

    job.start()

    assert job.request_key == first
    assert len(worker._worker_ids) == 1


def test_worker_that_reported_is_told_to_wait_for_the_next_cycle(server, host):
    name, _ = host(max_diffs=2)
    _, job, seen = join(server, name)
    train_and_report(job, seen["model"], seen["plans"])

    job.start()

    assert job.rejection["reason"] == "already assigned"
    assert isinstance(job.rejection["timeout"], int) and job.rejection["timeout"] >= 0


def test_retried_report_counts_once(server, admin, host):
    name, _version = host(max_diffs=2)
    _, job, seen = join(server, name)
    diff = {key: torch.ones_like(t) for key, t in seen["model"].items()}

    first = job.report(diff, num_samples=2)
    second = job.report(diff, num_samples=2)

    assert first["cycle"] == second["cycle"] == 1
    assert second.get("duplicate") is True
    status = {p["name"]: p for p in admin.status()["processes"]}
    assert status[name]["diffs"] == 1 and status[name]["checkpoints"] == 1


def test_different_report_under_the_same_key_is_refused(server, host):
    name, _ = host(max_diffs=2)
    _, job, seen = join(server, name)
    job.report({k: torch.ones_like(t) for k, t in seen["model"].items()})

    with pytest.raises(ServerError) as caught:
        job.report({k: torch.zeros_like(t) for k, t in seen["model"].items()})

    assert caught.value.status == 409 and caught.value.code == "report_conflict"


def test_report_after_the_cycle_closed_is_refused_and_not_counted(server, admin, host):
    name, version = host(max_diffs=1)
    _, late, late_seen = join(server, name)
    _, early, early_seen = join(server, name)
    train_and_report(early, early_seen["model"], early_seen["plans"])
    after_close = admin.retrieve_model(name, version)

    with pytest.raises(ServerError) as caught:
        train_and_report(late, late_seen["model"], late_seen["plans"])

    assert caught.value.code == "cycle_closed"
    latest = admin.retrieve_model(name, version)
    assert all(torch.equal(latest[k], after_close[k]) for k in latest)


def test_downloads_are_refused_after_the_cycle_closes(server, host):
    name, _ = host(max_diffs=1)
    _, job, seen = join(server, name)
    train_and_report(job, seen["model"], seen["plans"])

    response = httpx.get(
        f"{server.url}/model-centric/get-model",
        params={"worker_id": job.worker_id, "request_key": job.request_key},
    )

    assert response.status_code == 409
    assert cbor2.loads(response.content)["code"] == "cycle_closed"


def test_training_complete_is_said_without_a_retry_time(server, host):
    name, _ = host(num_cycles=1, max_diffs=1)
    _, job, seen = join(server, name)
    train_and_report(job, seen["model"], seen["plans"])

    job.start()

    assert job.rejection == {"status": "rejected", "reason": "training complete"}


def test_cycle_closes_at_its_deadline_without_further_reports(server, admin, host):
    name, _version = host(cycle_length=1, max_diffs=None)
    _, job, seen = join(server, name)
    train_and_report(job, seen["model"], seen["plans"])

    deadline = time.monotonic() + 15
    checkpoints = 1
    while time.monotonic() < deadline and checkpoints < 2:
        time.sleep(0.2)
        status = {p["name"]: p for p in admin.status()["processes"]}
        checkpoints = status[name]["checkpoints"]

    assert checkpoints == 2
    assert status[name]["cycle"] == 2


def test_cycle_without_reports_is_extended_at_its_deadline(server, admin, host):
    name, _ = host(cycle_length=1, max_diffs=None)
    time.sleep(2.5)

    status = {p["name"]: p for p in admin.status()["processes"]}

    assert status[name]["cycle"] == 1 and status[name]["checkpoints"] == 1
    # The deadline moved on: a cycle still 1 s long is never 2.5 s overdue.
    assert 0 <= status[name]["seconds_left"] <= 1
    admin.delete_process(name, "1")


def test_request_without_version_gets_the_newest_version(server, admin, plan):
    name = f"versions-{time.time_ns()}"
    for version in ("1", "2"):
        admin.host_federated_training(
            model=[torch.zeros(3, 4), torch.zeros(3)],
            client_plans={"training_plan": plan},
            client_config={"name": name, "version": version},
            server_config={"max_diffs": 1},
        )
    worker = Worker(server.address)
    job = worker.new_job(name)

    job.start()

    assert job.version == "2"


def test_hosting_the_same_name_and_version_again_is_refused(admin, host, plan):
    name, version = host()

    with pytest.raises(ServerError) as caught:
        admin.host_federated_training(
            model=[torch.zeros(3, 4), torch.zeros(3)],
            client_plans={"training_plan": plan},
            client_config={"name": name, "version": version},
            server_config={},
        )

    assert caught.value.status == 409 and caught.value.code == "process_exists"
    assert "new version" in caught.value.message


def test_admin_routes_need_the_admin_token(server, host):
    name, _ = host()
    url = f"{server.url}/model-centric/retrieve-model"

    missing = httpx.get(url, params={"name": name})
    wrong = httpx.get(
        url, params={"name": name}, headers={"Authorization": "Bearer not-the-token"}
    )
    right = httpx.get(
        url, params={"name": name}, headers={"Authorization": f"Bearer {server.token}"}
    )

    assert missing.status_code == wrong.status_code == 401
    assert right.status_code == 200
    assert "not-the-token" not in server.log()


def test_json_clients_can_do_the_whole_worker_protocol(server, admin, host):
    name, version = host(max_diffs=1)
    api = f"{server.url}/model-centric"

    auth = httpx.post(f"{api}/authenticate", json={"model_name": name}).json()
    cycle = httpx.post(
        f"{api}/cycle-request", json={"worker_id": auth["worker_id"], "model": name}
    ).json()
    keys = {"worker_id": auth["worker_id"], "request_key": cycle["request_key"]}
    model = decode_state(httpx.get(f"{api}/get-model", params=keys).content)
    diff = encode_state({k: torch.ones_like(t) for k, t in model.items()})
    answer = httpx.post(
        f"{api}/report",
        json={**keys, "diff": base64.b64encode(diff).decode(), "num_samples": 4},
    )

    assert cycle["status"] == "accepted" and isinstance(cycle["timeout"], int)
    assert answer.headers["content-type"].startswith("application/json")
    assert answer.json() == {"status": "success", "cycle": 1}
    assert admin.retrieve_model(name, version, checkpoint=2)


def test_plan_download_is_the_portable_plan(server, host, plan):
    name, _ = host()
    _, _job, seen = join(server, name)

    downloaded = seen["plans"]["training_plan"]

    assert downloaded.op_names == plan.op_names


def test_unknown_checkpoint_number_is_not_found(admin, host):
    name, version = host()

    with pytest.raises(ServerError) as caught:
        admin.retrieve_model(name, version, checkpoint=99)

    assert caught.value.status == 404 and caught.value.code == "checkpoint_not_found"


SECRET = "a-shared-hmac-secret-for-the-tests-0123456789"


def test_jwt_process_admits_only_valid_tokens_with_stable_identity(server, host):
    name, _ = host(
        authentication={
            "type": "jwt",
            "secret": SECRET,
            "algorithms": ["HS256"],
            "require_exp": True,
        }
    )
    good = jwt.encode(
        {"sub": "device-7", "exp": int(time.time()) + 60}, SECRET, algorithm="HS256"
    )
    forged = jwt.encode(
        {"sub": "device-7", "exp": int(time.time()) + 60}, "x" * 40, algorithm="HS256"
    )
    expired = jwt.encode(
        {"sub": "device-7", "exp": int(time.time()) - 60}, SECRET, algorithm="HS256"
    )
    unsigned = jwt.encode({"sub": "device-7"}, None, algorithm="none")
    api = f"{server.url}/model-centric/authenticate"

    refused = [
        httpx.post(api, json={"model_name": name, "auth_token": token})
        for token in (None, forged, expired, unsigned)
    ]
    first = httpx.post(api, json={"model_name": name, "auth_token": good}).json()
    again = httpx.post(api, json={"model_name": name, "auth_token": good}).json()

    assert [r.status_code for r in refused] == [401, 401, 401, 401]
    assert first["worker_id"] == again["worker_id"]
    assert SECRET not in server.log() and good not in server.log()


def test_unauthenticated_process_is_logged_once(server, host):
    name, _ = host()
    join(server, name)
    join(server, name)

    assert server.log().count(f"Process {name}@1 has no worker authentication") == 1

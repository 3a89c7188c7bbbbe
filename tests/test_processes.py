"""Managing processes: status, list, delete and reset, from the client and CLI."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys

import httpx
import pytest
import torch

from plan_runtime import ServerError, Worker
from plan_runtime.state import decode_state
from tests.conftest import ROOT


def cli(server, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(
        os.environ,
        NIMBLE_EDGE_ADMIN_TOKEN=server.token,
        NIMBLE_EDGE_ADDRESS=server.address,
    )
    return subprocess.run(
        [sys.executable, str(ROOT / "nimble_edge.py"), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


def train_one_cycle(server, name):
    worker = Worker(server.address)
    job = worker.new_job(name)
    job.on_ready = lambda model, plans, config: job.report(
        {k: torch.ones_like(t) for k, t in model.items()}
    )
    assert job.start()


def by_name(processes):
    return {p["name"]: p for p in processes}


def test_public_status_is_a_summary_and_the_admin_sees_details(server, host):
    name, _ = host(authentication={"type": "jwt", "secret": "s" * 40, "audience": "a"})

    public = httpx.get(f"{server.url}/status").json()
    detailed = httpx.get(
        f"{server.url}/status",
        headers={
            "Authorization": f"Bearer {server.token}",
            "Accept": "application/json",
        },
    ).json()
    wrong = httpx.get(f"{server.url}/status", headers={"Authorization": "Bearer x"})

    summary = by_name(public["processes"])[name]
    assert set(summary) == {"name", "version", "is_complete", "cycle", "checkpoints"}
    details = by_name(detailed["processes"])[name]
    assert details["server_config"]["authentication"] == {
        "type": "jwt",
        "audience": "a",
        "algorithms": ["HS256"],
        "require_exp": False,
    }
    assert "s" * 40 not in str(detailed)
    assert wrong.status_code == 401


def test_list_shows_every_process_with_its_state(admin, server, host):
    name, _ = host(max_diffs=1)
    train_one_cycle(server, name)

    entry = by_name(admin.list_processes())[name]

    assert entry["cycle"] == 2 and entry["checkpoints"] == 2
    assert entry["workers"] == 1 and entry["diffs"] == 0


def test_delete_removes_the_process_and_frees_its_name(admin, server, host, plan):
    name, version = host(max_diffs=1)
    train_one_cycle(server, name)

    admin.delete_process(name, version)

    assert name not in by_name(admin.list_processes())
    with pytest.raises(ServerError) as caught:
        admin.retrieve_model(name, version)
    assert caught.value.code == "process_not_found"
    admin.host_federated_training(
        model=[torch.zeros(3, 4), torch.zeros(3)],
        client_plans={"training_plan": plan},
        client_config={"name": name, "version": version},
        server_config={},
    )
    assert by_name(admin.list_processes())[name]["checkpoints"] == 1


def test_reset_goes_back_to_checkpoint_1_and_cycle_1(admin, server, host):
    name, version = host(max_diffs=1, num_cycles=1)
    first = admin.retrieve_model(name, version, 1)
    train_one_cycle(server, name)
    assert by_name(admin.list_processes())[name]["is_complete"]

    admin.reset_process(name, version)

    entry = by_name(admin.list_processes())[name]
    assert entry["cycle"] == 1 and entry["checkpoints"] == 1
    assert not entry["is_complete"]
    latest = admin.retrieve_model(name, version)
    assert all(torch.equal(latest[k], first[k]) for k in first)
    train_one_cycle(server, name)
    assert by_name(admin.list_processes())[name]["checkpoints"] == 2


def test_management_routes_need_the_admin_token(server, host):
    name, version = host()

    for route in ("delete-process", "reset-process"):
        response = httpx.post(
            f"{server.url}/model-centric/{route}",
            json={"name": name, "version": version},
        )
        assert response.status_code == 401

    assert httpx.get(f"{server.url}/status").status_code == 200


def test_deleting_an_unknown_process_says_so(admin):
    with pytest.raises(ServerError) as caught:
        admin.delete_process("never-hosted", "1")

    assert caught.value.status == 404


def test_cli_lists_retrieves_resets_and_deletes(server, host, tmp_path):
    name, version = host(max_diffs=1)
    train_one_cycle(server, name)
    out = tmp_path / "latest.cbor"

    listed = cli(server, "list")
    as_json = cli(server, "list", "--json")
    retrieved = cli(server, "retrieve", name, version, "--out", str(out))
    reset = cli(server, "reset", name, version)
    after_reset = cli(server, "list", "--json")
    deleted = cli(server, "delete", name, version)
    missing = cli(server, "delete", name, version)

    assert listed.returncode == 0 and f"{name}@{version}" in listed.stdout
    assert retrieved.returncode == 0 and set(decode_state(out.read_bytes())) == {
        "fc.weight",
        "fc.bias",
    }
    assert reset.returncode == 0 and deleted.returncode == 0
    import json

    assert by_name(json.loads(as_json.stdout))[name]["checkpoints"] == 2
    assert by_name(json.loads(after_reset.stdout))[name]["checkpoints"] == 1
    assert missing.returncode == 1 and "process_not_found" in missing.stderr


def test_cli_without_a_server_prints_an_error(tmp_path):
    env = dict(
        os.environ, NIMBLE_EDGE_ADDRESS="127.0.0.1:9", NIMBLE_EDGE_ADMIN_TOKEN="t"
    )

    result = subprocess.run(
        [sys.executable, str(ROOT / "nimble_edge.py"), "list"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )

    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("error: cannot reach")


def test_worker_authenticates_again_after_its_process_is_hosted_anew(
    server, admin, host
):
    name, version = host(max_diffs=1)
    worker = Worker(server.address)
    errors = []
    job = worker.new_job(name)
    job.on_ready = lambda model, plans, config: job.report(
        {k: torch.ones_like(t) for k, t in model.items()}
    )
    job.on_error = errors.append
    assert job.start() and job.start()
    admin.delete_process(name, version)
    admin.host_federated_training(
        model=[torch.zeros(3, 4), torch.zeros(3)],
        client_plans={},
        client_config={"name": name, "version": version},
        server_config={"max_diffs": 1},
    )

    refused = job.start()
    admitted = job.start()

    assert refused is False
    assert [e.code for e in errors] == ["unknown_worker"]
    assert admitted is True


def test_ids_are_never_given_again_after_a_delete_or_a_reset(server, admin, host):
    name, version = host(max_diffs=1)
    db = sqlite3.connect(server.db_path)

    def ids(table: str) -> set[int]:
        return {row[0] for row in db.execute(f"SELECT id FROM {table}")}

    train_one_cycle(server, name)
    (first,) = db.execute("SELECT id FROM processes WHERE name = ?", (name,)).fetchone()
    cycles_before = ids("cycles")
    admin.reset_process(name, version)
    cycles_after_reset = ids("cycles") - cycles_before
    admin.delete_process(name, version)
    answer = admin.host_federated_training(
        model=[torch.zeros(3, 4), torch.zeros(3)],
        client_plans={},
        client_config={"name": name, "version": version},
        server_config={},
    )
    db.close()

    assert answer["process_id"] > first
    assert cycles_after_reset and min(cycles_after_reset) > max(cycles_before)

"""Averaging plans and mobile forms through a real server on loopback."""

from __future__ import annotations

import importlib.util
import io
import uuid

import cbor2
import httpx
import pytest
import torch

from plan_runtime import ServerError, Worker
from plan_runtime.aggregation import iterative_mean_plan, median_plan
from plan_runtime.state import encode_state
from plan_runtime.trace import make_plan
from tests.conftest import ServerProcess, TinyModel

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")

CBOR = {"Content-Type": "application/cbor"}


def new_name() -> str:
    return f"hosted-{uuid.uuid4().hex[:8]}"


def model_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {k: v.detach() for k, v in TinyModel().state_dict().items()}


def host(admin, plan, name, averaging=None, mobile_forms=(), **server_config):
    admin.host_federated_training(
        model=model_state(),
        client_plans={"training_plan": plan},
        server_averaging_plan=averaging,
        client_config={"name": name, "version": "1"},
        server_config={"num_cycles": 3, "max_diffs": 3, **server_config},
        mobile_forms=mobile_forms,
    )


def report_constant_diffs(server, name, values):
    """One worker per value; each reports a diff filled with that value."""
    for value in values:
        job = Worker(server.address).new_job(name, "1")
        seen = {}
        job.on_ready = lambda model, plans, config, seen=seen: seen.update(model=model)
        job.start()
        job.report({k: torch.full_like(t, value) for k, t in seen["model"].items()})
    return job


def status_of(admin, name):
    return next(p for p in admin.status()["processes"] if p["name"] == name)


def host_raw(server, name, averaging_plan, plan, **fields):
    body = {
        "model": encode_state(model_state()),
        "plans": {"training_plan": plan.to_bytes()},
        "averaging_plan": averaging_plan,
        "client_config": {"name": name, "version": "1"},
        "server_config": {"max_diffs": 2},
        **fields,
    }
    headers = {"Authorization": f"Bearer {server.token}", **CBOR}
    return httpx.post(
        f"{server.url}/model-centric/host-training",
        content=cbor2.dumps(body),
        headers=headers,
    )


def test_hosted_median_plan_averages_a_cycle_into_base_minus_the_median(
    server, admin, plan
):
    name = new_name()
    host(admin, plan, name, averaging=median_plan(4, chunk=5))

    report_constant_diffs(server, name, [1.0, 2.0, 1000.0])

    latest = admin.retrieve_model(name, "1")
    for key, tensor in model_state().items():
        assert torch.allclose(latest[key], tensor - 2.0)
    assert status_of(admin, name)["averaging_error"] is None


def test_hosted_iterative_plan_runs_once_per_diff(server, admin, plan):
    name = new_name()
    host(admin, plan, name, averaging=iterative_mean_plan(model_state()))

    report_constant_diffs(server, name, [1.0, 2.0, 6.0])

    latest = admin.retrieve_model(name, "1")
    for key, tensor in model_state().items():
        assert torch.allclose(latest[key], tensor - 3.0)


def test_failing_averaging_plan_closes_the_cycle_without_a_checkpoint(
    server, admin, plan
):
    @make_plan
    def blows_up(diffs=torch.zeros(2, 4)):
        return torch.nanmedian(diffs, 0).values / 0.0

    name = new_name()
    # The admin client would refuse this plan; a raw upload gets it hosted.
    response = host_raw(server, name, blows_up.to_bytes(), plan)
    assert response.status_code == 200, response.content

    job = report_constant_diffs(server, name, [1.0, 2.0])
    after = status_of(admin, name)
    job.start()

    assert after["checkpoints"] == 1 and after["cycle"] == 2
    assert after["averaging_error"]["cycle"] == 1
    assert "NaN or infinity" in after["averaging_error"]["error"]
    assert f"Cycle 1 of {name}@1 closed without a new checkpoint" in server.log()
    assert job.cycle == 2
    assert torch.equal(
        admin.retrieve_model(name, "1")["fc.bias"], model_state()["fc.bias"]
    )


def test_cycle_plan_needs_max_diffs_within_its_rows(admin, plan):
    for max_diffs in (None, 5):
        with pytest.raises(ServerError) as caught:
            host(admin, plan, new_name(), averaging=median_plan(4), max_diffs=max_diffs)

        assert caught.value.code == "invalid_config"
        assert '"max_diffs" must be at most 4' in caught.value.message


def test_torchscript_form_is_served_by_receive_operations_as(server, admin, plan):
    name = new_name()
    host(admin, plan, name, mobile_forms=("ts",))
    job = Worker(server.address).new_job(name, "1")
    seen = {}
    job.on_ready = lambda model, plans, config: seen.update(plans=plans)
    job.start()
    keys = {"worker_id": job.worker_id, "request_key": job.request_key}
    plan_id = str(
        httpx.post(
            f"{server.url}/model-centric/cycle-request",
            json={"worker_id": job.worker_id, "model": name},
        ).json()["plans"]["training_plan"]
    )

    def get(form):
        return httpx.get(
            f"{server.url}/model-centric/get-plan",
            params={**keys, "plan_id": plan_id, "receive_operations_as": form},
        )

    scripted = torch.jit.load(io.BytesIO(get("torchscript").content))
    missing = get("pte")

    assert list(seen["plans"]) == ["training_plan"]
    args = [torch.randn(8, 4), torch.randint(0, 3, (8,)), torch.tensor(8)]
    args += [torch.tensor(0.1), torch.randn(3, 4), torch.randn(3)]
    for got, expected in zip(scripted(*args), plan(*args)):
        assert torch.allclose(got, expected, atol=1e-6)
    assert missing.status_code == 404
    assert cbor2.loads(missing.content)["code"] == "plan_not_found"


@pytest.mark.parametrize(
    ("plans", "message"),
    [
        ({"training_plan:zip": b"PK\x03\x04"}, "mobile forms are named"),
        ({"other:ts": b"PK\x03\x04"}, "which is not in this upload"),
        ({"training_plan:pte": b"not an executorch file"}, "is not a pte file"),
    ],
)
def test_mobile_form_uploads_are_refused_by_name_or_kind(server, plan, plans, message):
    response = host_raw(
        server,
        new_name(),
        None,
        plan,
        plans={"training_plan": plan.to_bytes(), **plans},
    )

    assert response.status_code == 400
    body = cbor2.loads(response.content)
    assert body["code"] == "invalid_plan" and message in body["error"]


def test_server_plan_memory_limit_comes_from_its_env_var(tmp_path, monkeypatch, plan):
    @make_plan
    def chain(x=torch.zeros(1000)):
        return (x * 2) + 1

    monkeypatch.setenv("NIMBLE_EDGE_MAX_PLAN_MEMORY_MB", "0.01")
    small = ServerProcess(tmp_path / "small.sqlite", tmp_path / "small.log").start()
    try:
        accepted = host_raw(small, new_name(), None, plan)
        refused = host_raw(small, new_name(), None, chain)
    finally:
        small.stop()

    assert accepted.status_code == 200
    body = cbor2.loads(refused.content)
    assert refused.status_code == 400 and body["code"] == "invalid_plan"
    assert (
        "(aten::add.Tensor)" in body["error"]
        and "the limit is 10485 bytes" in (body["error"])
    )


def test_worker_refuses_a_plan_over_its_memory_limit_before_training(server, admin):
    @make_plan
    def chain(x=torch.zeros(1000)):
        return (x * 2) + 1

    name = new_name()
    host(admin, chain, name)
    worker = Worker(server.address, max_plan_memory_bytes=10_000)
    errors, ready = [], []
    job = worker.new_job(name, "1", on_ready=lambda *args: ready.append(args))
    job.on_error = errors.append

    job.start()

    assert ready == []
    assert "(aten::add.Tensor)" in str(errors[0]) and "the limit is 10000" in str(
        errors[0]
    )


@pytest.mark.skipif(
    importlib.util.find_spec("executorch") is None, reason="needs the [mobile] extra"
)
def test_executorch_form_is_served_by_receive_operations_as(server, admin, plan):
    from executorch.runtime import Runtime

    name = new_name()
    host(admin, plan, name, mobile_forms=("pte",))
    job = Worker(server.address).new_job(name, "1")
    job.start()
    answer = httpx.post(
        f"{server.url}/model-centric/cycle-request",
        json={"worker_id": job.worker_id, "model": name},
    ).json()

    response = httpx.get(
        f"{server.url}/model-centric/get-plan",
        params={
            "worker_id": job.worker_id,
            "request_key": answer["request_key"],
            "plan_id": str(answer["plans"]["training_plan"]),
            "receive_operations_as": "pte",
        },
    )
    method = Runtime.get().load_program(response.content).load_method("forward")

    args = [torch.randn(8, 4), torch.randint(0, 3, (8,)), torch.tensor(8)]
    args += [torch.tensor(0.1), torch.randn(3, 4), torch.randn(3)]
    for got, expected in zip(method.execute(args), plan(*args)):
        assert torch.allclose(got, expected, atol=1e-5)

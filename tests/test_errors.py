"""One error envelope on every error path: {"error": message, "code": code}."""

from __future__ import annotations

import json

import cbor2
import httpx
import pytest
import torch

from plan_runtime.state import encode_state

CBOR = {"Content-Type": "application/cbor"}


def envelope(response: httpx.Response) -> dict:
    if response.headers["content-type"].startswith("application/json"):
        return response.json()
    assert response.headers["content-type"].startswith("application/cbor")
    return cbor2.loads(response.content)


def assert_envelope(response: httpx.Response, status: int, code: str) -> str:
    body = envelope(response)

    assert response.status_code == status, body
    assert set(body) == {"error", "code"}
    assert body["code"] == code
    assert isinstance(body["error"], str) and body["error"]
    assert "Traceback" not in response.text
    return body["error"]


@pytest.fixture
def assigned(server, host):
    """A worker admitted to a fresh process: (name, keys)."""
    name, _ = host(max_diffs=2)
    api = f"{server.url}/model-centric"
    worker_id = httpx.post(f"{api}/authenticate", json={"model_name": name}).json()[
        "worker_id"
    ]
    cycle = httpx.post(
        f"{api}/cycle-request", json={"worker_id": worker_id, "model": name}
    ).json()
    return name, {"worker_id": worker_id, "request_key": cycle["request_key"]}


def test_unknown_route_and_method(server):
    assert_envelope(httpx.get(f"{server.url}/nope"), 404, "route_not_found")
    assert_envelope(
        httpx.get(f"{server.url}/model-centric/report"), 405, "method_not_allowed"
    )


def test_malformed_bodies(server):
    api = f"{server.url}/model-centric/authenticate"

    assert_envelope(
        httpx.post(api, content=b"\xff\x00", headers=CBOR), 400, "invalid_body"
    )
    assert_envelope(
        httpx.post(api, content=b"{", headers={"Content-Type": "application/json"}),
        400,
        "invalid_body",
    )
    assert_envelope(
        httpx.post(api, content=b"a", headers={"Content-Type": "text/plain"}),
        415,
        "unsupported_media_type",
    )
    assert_envelope(
        httpx.post(api, content=cbor2.dumps([1]), headers=CBOR), 400, "invalid_body"
    )
    assert_envelope(
        httpx.post(api, content=cbor2.dumps({"model_name": 5}), headers=CBOR),
        400,
        "invalid_field",
    )
    assert_envelope(
        httpx.post(api, content=cbor2.dumps({}), headers=CBOR), 400, "missing_field"
    )


def test_json_requests_get_json_errors(server):
    response = httpx.post(
        f"{server.url}/model-centric/authenticate",
        json={"model_name": "no-such-process"},
    )

    assert response.headers["content-type"].startswith("application/json")
    message = assert_envelope(response, 404, "process_not_found")
    assert "no-such-process" in message


def test_worker_errors(server, assigned):
    name, keys = assigned
    api = f"{server.url}/model-centric"

    assert_envelope(
        httpx.post(f"{api}/cycle-request", json={"worker_id": "forged", "model": name}),
        401,
        "unknown_worker",
    )
    assert_envelope(
        httpx.get(f"{api}/get-model", params={**keys, "request_key": "forged"}),
        403,
        "unknown_assignment",
    )
    assert_envelope(
        httpx.get(f"{api}/get-model", params={**keys, "model_id": "999999"}),
        404,
        "model_not_found",
    )
    assert_envelope(
        httpx.get(f"{api}/get-plan", params={**keys, "plan_id": "x"}),
        400,
        "invalid_field",
    )
    assert_envelope(
        httpx.get(f"{api}/get-plan", params={**keys, "plan_id": "999999"}),
        404,
        "plan_not_found",
    )
    assert_envelope(
        httpx.get(
            f"{api}/get-plan",
            params={**keys, "plan_id": "1", "receive_operations_as": "torchscript"},
        ),
        404,
        "plan_not_found",
    )


def test_report_errors(server, assigned):
    _, keys = assigned
    api = f"{server.url}/model-centric/report"
    good = encode_state({"fc.weight": torch.zeros(3, 4), "fc.bias": torch.zeros(3)})
    wrong = encode_state({"fc.weight": torch.zeros(4, 3), "fc.bias": torch.zeros(3)})

    def post(body):
        return httpx.post(api, content=cbor2.dumps(body), headers=CBOR)

    assert_envelope(post({**keys, "diff": b"junk"}), 400, "invalid_diff")
    assert_envelope(post({**keys, "diff": wrong}), 400, "invalid_diff")
    assert_envelope(
        post({**keys, "diff": good, "num_samples": 0}), 400, "invalid_field"
    )
    assert_envelope(
        post({**keys, "diff": good, "num_samples": "3"}), 400, "invalid_field"
    )
    assert_envelope(
        post({**keys, "diff": good, "metrics": {"loss": "x"}}), 400, "invalid_field"
    )
    assert_envelope(post({**keys, "diff": "not base64!"}), 400, "invalid_field")
    assert_envelope(post({**keys}), 400, "missing_field")
    assert_envelope(
        httpx.post(api, content=b"\x00" * (10 * 1024 * 1024), headers=CBOR),
        413,
        "payload_too_large",
    )


def test_admin_errors(server, plan):
    api = f"{server.url}/model-centric"
    admin = {"Authorization": f"Bearer {server.token}", **CBOR}
    model = encode_state([torch.zeros(3, 4), torch.zeros(3)])

    def host(**fields):
        body = {
            "model": model,
            "plans": {"training_plan": plan.to_bytes()},
            "client_config": {"name": "err", "version": "1"},
            "server_config": {},
            **fields,
        }
        return httpx.post(
            f"{api}/host-training", content=cbor2.dumps(body), headers=admin
        )

    assert_envelope(
        httpx.post(f"{api}/host-training", content=b""), 401, "unauthorized"
    )
    assert_envelope(host(server_config={"cycle_length": -5}), 400, "invalid_config")
    assert_envelope(host(model=b"junk"), 400, "invalid_model")
    assert_envelope(host(plans={"training_plan": b"junk"}), 400, "invalid_plan")
    assert_envelope(host(averaging_plan=plan.to_bytes()), 400, "invalid_plan")
    assert_envelope(host(client_config={"name": "err"}), 400, "missing_field")
    assert_envelope(
        httpx.get(f"{api}/retrieve-model", params={"name": "nope"}, headers=admin),
        404,
        "process_not_found",
    )
    assert_envelope(
        httpx.get(
            f"{api}/retrieve-model",
            params={"name": "nope", "checkpoint": "x"},
            headers=admin,
        ),
        404,
        "process_not_found",
    )


def test_bad_secret_is_refused_without_echoing_it(server, plan):
    admin = {"Authorization": f"Bearer {server.token}", **CBOR}
    body = {
        "model": encode_state([torch.zeros(1)]),
        "plans": {},
        "client_config": {"name": "short-secret", "version": "1"},
        "server_config": {"authentication": {"type": "jwt", "secret": "hunter2"}},
    }

    response = httpx.post(
        f"{server.url}/model-centric/host-training",
        content=cbor2.dumps(body),
        headers=admin,
    )

    message = assert_envelope(response, 400, "invalid_config")
    assert "hunter2" not in message and "hunter2" not in json.dumps(envelope(response))


def test_speed_test_errors(server, assigned):
    _, keys = assigned
    api = f"{server.url}/model-centric/speed-test"

    assert_envelope(
        httpx.get(api, params={"worker_id": "nobody"}), 401, "unknown_worker"
    )
    assert_envelope(
        httpx.post(api, params={"worker_id": "nobody"}, content=b"x"),
        401,
        "unknown_worker",
    )
    assert_envelope(
        httpx.get(api, params={"worker_id": keys["worker_id"], "size_bytes": "-1"}),
        400,
        "invalid_field",
    )
    assert_envelope(
        httpx.post(
            api,
            params={"worker_id": keys["worker_id"]},
            content=b"x" * (33 * 1024 * 1024),
        ),
        413,
        "payload_too_large",
    )


def test_management_errors(server):
    api = f"{server.url}/model-centric"
    admin = {"Authorization": f"Bearer {server.token}"}

    assert_envelope(
        httpx.post(f"{api}/delete-process", json={"name": "x", "version": "1"}),
        401,
        "unauthorized",
    )
    assert_envelope(
        httpx.post(
            f"{api}/reset-process", json={"name": "x", "version": "1"}, headers=admin
        ),
        404,
        "process_not_found",
    )
    assert_envelope(
        httpx.post(f"{api}/delete-process", json={"name": "x"}, headers=admin),
        400,
        "missing_field",
    )
    assert_envelope(
        httpx.get(f"{server.url}/status", headers={"Authorization": "Bearer wrong"}),
        401,
        "unauthorized",
    )


def test_cycle_request_errors(server, assigned):
    name, keys = assigned
    api = f"{server.url}/model-centric/cycle-request"

    assert_envelope(
        httpx.post(api, json={"worker_id": keys["worker_id"], "model": "missing"}),
        404,
        "process_not_found",
    )
    assert_envelope(
        httpx.post(
            api, json={"worker_id": keys["worker_id"], "model": name, "version": 3}
        ),
        400,
        "invalid_field",
    )
    assert_envelope(httpx.post(api, json={"model": name}), 400, "missing_field")


def test_bodies_that_are_not_maps_are_refused(server):
    for route in ("report", "authenticate", "cycle-request"):
        for body in ([], None, 5, "x", b"\x00"):
            response = httpx.post(
                f"{server.url}/model-centric/{route}",
                content=cbor2.dumps(body),
                headers=CBOR,
            )
            assert_envelope(response, 400, "invalid_body")


def test_trailing_bytes_after_the_document_are_refused(server):
    body = cbor2.dumps({"model_name": "x"}) + b"\xff\xff"

    response = httpx.post(
        f"{server.url}/model-centric/authenticate", content=body, headers=CBOR
    )

    message = assert_envelope(response, 400, "invalid_body")
    assert "follow the CBOR document" in message


def test_odd_ids_and_numbers_are_refused_not_crashed_on(server, assigned):
    name, keys = assigned
    api = f"{server.url}/model-centric"
    admin = {"Authorization": f"Bearer {server.token}"}

    assert_envelope(
        httpx.get(f"{api}/get-model", params={**keys, "worker_id": "é"}),
        403,
        "unknown_assignment",
    )
    for plan_id in ("²", "1" * 24, "-1", "1e3"):
        assert_envelope(
            httpx.get(f"{api}/get-plan", params={**keys, "plan_id": plan_id}),
            400,
            "invalid_field",
        )
    assert_envelope(
        httpx.get(
            f"{api}/retrieve-model",
            params={"name": name, "checkpoint": "9" * 30},
            headers=admin,
        ),
        400,
        "invalid_field",
    )
    huge = (
        '{"worker_id": "%s", "request_key": "%s", "diff": "", "metrics": {"loss": %s}}'
    )
    response = httpx.post(
        f"{api}/report",
        content=huge % (keys["worker_id"], keys["request_key"], "1" * 400),
        headers={"Content-Type": "application/json"},
    )
    assert_envelope(response, 400, "invalid_field")


def test_shapes_that_overflow_are_refused(server, assigned):
    _, keys = assigned
    value = cbor2.CBORTag(40, [[0, 2**63], cbor2.CBORTag(85, b"")])
    diff = cbor2.dumps(
        {
            "format": "nimble-edge/state",
            "version": 1,
            "tensors": [{"name": "fc.weight", "value": value}],
        }
    )

    response = httpx.post(
        f"{server.url}/model-centric/report",
        content=cbor2.dumps({**keys, "diff": diff}),
        headers=CBOR,
    )

    assert_envelope(response, 400, "invalid_diff")


@pytest.mark.parametrize(
    ("fields", "code"),
    [
        ({"plans": {1: b"x"}}, "invalid_field"),
        ({"protocols": {b"p": b"x"}}, "invalid_field"),
        (
            {"client_config": {"name": "e", "version": "1", "x": b"bytes"}},
            "invalid_config",
        ),
        (
            {"client_config": {"name": "e", "version": "1", "x": float("nan")}},
            "invalid_config",
        ),
        (
            {"client_config": {"name": "e", "version": "1", 1: "int key"}},
            "invalid_config",
        ),
        (
            {
                "server_config": {
                    "authentication": {
                        "type": "jwt",
                        "secret": "s" * 40,
                        "algorithms": [["HS256"]],
                    }
                }
            },
            "invalid_config",
        ),
        (
            {
                "server_config": {
                    "authentication": {"type": "jwt", "secret": "s" * 40, "audience": 5}
                }
            },
            "invalid_config",
        ),
        ({"server_config": {"minimum_upload_speed": False}}, "invalid_config"),
        ({"server_config": {"cycle_length": 1e300}}, "invalid_config"),
        ({"server_config": {"cycle_length": 0.001}}, "invalid_config"),
        ({"model": encode_state([torch.tensor([float("nan")])])}, "invalid_model"),
        ({"model": encode_state({"": torch.zeros(1)})}, "invalid_model"),
    ],
)
def test_hosting_refuses_configs_that_could_never_work(server, plan, fields, code):
    admin = {"Authorization": f"Bearer {server.token}", **CBOR}
    body = {
        "model": encode_state([torch.zeros(3, 4), torch.zeros(3)]),
        "plans": {"training_plan": plan.to_bytes()},
        "client_config": {"name": "never", "version": "1"},
        "server_config": {},
        **fields,
    }

    response = httpx.post(
        f"{server.url}/model-centric/host-training",
        content=cbor2.dumps(body),
        headers=admin,
    )

    assert_envelope(response, 400, code)


@pytest.mark.parametrize(
    ("route", "field"),
    [
        ("authenticate", "model_name"),
        ("cycle-request", "model"),
        ("report", "request_key"),
        ("delete-process", "name"),
    ],
)
def test_lone_surrogates_in_json_strings_are_refused(server, route, field):
    body = {"worker_id": "w", "name": "n", "version": "1", field: "\ud800"}
    text = json.dumps(body)  # ASCII, with the lone surrogate as an escape
    headers = {
        "Content-Type": "application/json",
        "Authorization": f"Bearer {server.token}",
    }

    response = httpx.post(
        f"{server.url}/model-centric/{route}", content=text.encode(), headers=headers
    )

    assert "surrogate" in assert_envelope(response, 400, "invalid_body")


def test_speed_test_size_in_non_ascii_digits_is_refused(server, assigned):
    _, keys = assigned

    response = httpx.get(
        f"{server.url}/model-centric/speed-test",
        params={"worker_id": keys["worker_id"], "size_bytes": "\u00b2"},
    )

    assert_envelope(response, 400, "invalid_field")


def test_speed_numbers_too_large_for_a_float_are_refused(server, host):
    name, _ = host(minimum_download_speed=1, minimum_upload_speed=1)
    api = f"{server.url}/model-centric"
    worker_id = httpx.post(f"{api}/authenticate", json={"model_name": name}).json()[
        "worker_id"
    ]
    huge = "1" + "0" * 400
    text = json.dumps({"worker_id": worker_id, "model": name, "upload": 5})
    text = text[:-1] + f', "download": {huge}}}'

    response = httpx.post(
        f"{api}/cycle-request",
        content=text.encode(),
        headers={"Content-Type": "application/json"},
    )

    assert_envelope(response, 400, "invalid_field")


def test_media_types_are_matched_without_regard_to_case(server, host):
    name, _ = host()

    response = httpx.post(
        f"{server.url}/model-centric/authenticate",
        content=json.dumps({"model_name": name}).encode(),
        headers={"Content-Type": "Application/JSON"},
    )

    assert response.status_code == 200 and "worker_id" in response.json()


def test_retrieve_without_a_name_says_the_name_is_missing(server):
    response = httpx.get(
        f"{server.url}/model-centric/retrieve-model",
        headers={"Authorization": f"Bearer {server.token}"},
    )

    assert_envelope(response, 400, "missing_field")


def test_compressed_speed_test_upload_is_refused(server, assigned):
    _, keys = assigned

    response = httpx.post(
        f"{server.url}/model-centric/speed-test",
        params={"worker_id": keys["worker_id"]},
        content=b"x" * 100,
        headers={"Content-Encoding": "gzip"},
    )

    assert_envelope(response, 415, "unsupported_media_type")


def test_json_with_more_items_than_a_message_holds_is_refused(server):
    text = "[" + ",".join(["[]"] * 5000) + "]"

    response = httpx.post(
        f"{server.url}/model-centric/report",
        content=text.encode(),
        headers={"Content-Type": "application/json"},
    )

    assert "at most 4096" in assert_envelope(response, 400, "invalid_body")

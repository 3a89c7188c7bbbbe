"""Fuzz every route: any input gets a success or a 4xx envelope, never a 500.

A sentinel process is hosted before the fuzzing; afterwards its checkpoints
must be unchanged and it must have counted exactly the reports the server
acknowledged.
"""

from __future__ import annotations

import json
import sqlite3
import time
import uuid
from collections.abc import Iterator

import cbor2
import httpx
import jwt
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from plan_runtime import ModelCentricFLClient
from plan_runtime.state import encode_state
from tests.strategies import cbor_values, json_values, messages

POST_ROUTES = [
    "authenticate",
    "cycle-request",
    "report",
    "host-training",
    "delete-process",
    "reset-process",
    "speed-test",
]
GET_ROUTES = [
    "/model-centric/get-model",
    "/model-centric/get-plan",
    "/model-centric/retrieve-model",
    "/model-centric/speed-test",
    "/status",
    "/health",
]
FUZZ = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
SECRET = "fuzzing-secret-of-at-least-32-bytes!"


class Sentinel:
    def __init__(self, server):
        self.server = server
        self.name = "sentinel"
        self.acknowledged = 0
        self.client = httpx.Client(base_url=server.url, timeout=30)

    def check(self, response: httpx.Response, route: str = "") -> None:
        assert response.status_code < 500, (
            route,
            response.status_code,
            response.content[:300],
        )
        assert b"Traceback" not in response.content
        if response.status_code >= 400:
            kind = response.headers.get("content-type", "")
            body = (
                response.json()
                if kind.startswith("application/json")
                else cbor2.loads(response.content)
            )
            assert set(body) == {"error", "code"}, body
        elif route == "report":
            self.acknowledged += 1


@pytest.fixture(scope="module")
def sentinel(server) -> Iterator[Sentinel]:
    with ModelCentricFLClient(server.address, token=server.token) as admin:
        admin.host_federated_training(
            model=[torch.zeros(3, 4), torch.zeros(3)],
            client_plans={},
            client_config={"name": "sentinel", "version": "1"},
            server_config={
                "max_diffs": 10_000,
                "authentication": {"type": "jwt", "secret": SECRET},
            },
        )
        before = admin.retrieve_model("sentinel", "1")
    handle = Sentinel(server)
    yield handle

    with ModelCentricFLClient(server.address, token=server.token) as admin:
        after = admin.retrieve_model("sentinel", "1")
        entry = next(p for p in admin.list_processes() if p["name"] == "sentinel")
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert entry["checkpoints"] == 1
    db = sqlite3.connect(server.db_path)
    counted = db.execute(
        "SELECT count(*) FROM reports r JOIN cycles c ON c.id = r.cycle_id "
        "JOIN processes p ON p.id = c.process_id WHERE p.name = 'sentinel'"
    ).fetchone()[0]
    assert counted == handle.acknowledged


@FUZZ
@given(
    route=st.sampled_from(POST_ROUTES),
    value=cbor_values | messages,
    as_admin=st.booleans(),
)
def test_any_cbor_body_on_any_post_route(sentinel, route, value, as_admin):
    headers = {"Content-Type": "application/cbor"}
    if as_admin:
        headers["Authorization"] = f"Bearer {sentinel.server.token}"

    response = sentinel.client.post(
        f"/model-centric/{route}", content=cbor2.dumps(value), headers=headers
    )

    sentinel.check(response, route)


@FUZZ
@given(route=st.sampled_from(POST_ROUTES), value=json_values)
def test_any_json_body_on_any_post_route(sentinel, route, value):
    response = sentinel.client.post(
        f"/model-centric/{route}",
        content=json.dumps(value),
        headers={"Content-Type": "application/json"},
    )

    sentinel.check(response, route)


@FUZZ
@given(
    route=st.sampled_from(POST_ROUTES),
    data=st.binary(max_size=300),
    content_type=st.sampled_from(
        [
            "application/cbor",
            "application/json",
            "",
            "text/plain",
            "application/cbor; x=1",
        ]
    ),
)
def test_random_bytes_on_any_post_route(sentinel, route, data, content_type):
    headers = {"Content-Type": content_type} if content_type else {}

    response = sentinel.client.post(
        f"/model-centric/{route}", content=data, headers=headers
    )

    sentinel.check(response, route)


@FUZZ
@given(
    path=st.sampled_from(GET_ROUTES),
    params=st.dictionaries(
        st.sampled_from(
            [
                "worker_id",
                "request_key",
                "model_id",
                "plan_id",
                "receive_operations_as",
                "name",
                "version",
                "checkpoint",
                "size_bytes",
            ]
        ),
        st.text(max_size=40),
        max_size=5,
    ),
    as_admin=st.booleans(),
)
def test_any_query_on_any_get_route(sentinel, path, params, as_admin):
    headers = {"Authorization": f"Bearer {sentinel.server.token}"} if as_admin else {}

    response = sentinel.client.get(path, params=params, headers=headers)

    sentinel.check(response, path)


def assignment(sentinel) -> dict:
    token = jwt.encode(
        {"sub": uuid.uuid4().hex, "exp": int(time.time()) + 600},
        SECRET,
        algorithm="HS256",
    )
    worker_id = sentinel.client.post(
        "/model-centric/authenticate",
        json={"model_name": "sentinel", "auth_token": token},
    ).json()["worker_id"]
    answer = sentinel.client.post(
        "/model-centric/cycle-request",
        json={"worker_id": worker_id, "model": "sentinel"},
    ).json()
    return {"worker_id": worker_id, "request_key": answer["request_key"]}


@FUZZ
@given(
    cut=st.integers(min_value=0, max_value=2000),
    flips=st.lists(st.tuples(st.integers(0, 2000), st.integers(0, 255)), max_size=4),
)
def test_truncated_and_corrupted_reports(sentinel, cut, flips):
    # A fresh worker each time: a report that survives corruption is a real
    # report, and counts once.
    keys = assignment(sentinel)
    body = bytearray(
        cbor2.dumps({**keys, "diff": encode_state([torch.ones(3, 4), torch.ones(3)])})
    )
    for position, value in flips:
        body[position % len(body)] = value
    data = bytes(body[: max(1, len(body) - cut)])

    response = sentinel.client.post(
        "/model-centric/report",
        content=data,
        headers={"Content-Type": "application/cbor"},
    )

    sentinel.check(response, "report")


@FUZZ
@given(
    tensors=st.lists(
        st.sampled_from(
            [
                torch.ones(3, 4),
                torch.ones(4, 3),
                torch.ones(3),
                torch.ones(3, dtype=torch.int64),
                torch.ones(3, 4, dtype=torch.float64),
                torch.full((3,), float("inf")),
                torch.zeros(0),
                torch.tensor(1.0),
            ]
        ),
        max_size=3,
    ),
    names=st.lists(
        st.sampled_from(["fc.weight", "fc.bias", "0", "1", "x"]), max_size=3
    ),
)
def test_wrong_tensors_in_reports(sentinel, tensors, names):
    keys = assignment(sentinel)
    state = dict(zip(names, tensors)) if names else tensors

    response = sentinel.client.post(
        "/model-centric/report",
        content=cbor2.dumps({**keys, "diff": encode_state(state)}),
        headers={"Content-Type": "application/cbor"},
    )

    sentinel.check(response, "report")
    if response.status_code == 200:
        assert [tuple(t.shape) for t in tensors] == [(3, 4), (3,)]


@pytest.mark.filterwarnings("ignore::jwt.warnings.InsecureKeyLengthWarning")
@FUZZ
@given(
    claims=st.dictionaries(
        st.sampled_from(["sub", "exp", "aud", "iss", "nbf", "iat"]),
        json_values,
        max_size=5,
    ),
    key=st.sampled_from([SECRET, "another-secret-that-is-long-enough!!"]),
    algorithm=st.sampled_from(["HS256", "HS384", "HS512"]),
)
def test_forged_and_odd_tokens(sentinel, claims, key, algorithm):
    try:
        token = jwt.encode(claims, key, algorithm=algorithm)
    except (TypeError, ValueError):
        return

    response = sentinel.client.post(
        "/model-centric/authenticate",
        json={"model_name": "sentinel", "auth_token": token},
    )

    sentinel.check(response, "authenticate")
    if key != SECRET or algorithm != "HS256":
        assert response.status_code == 401

"""200 workers at once: exact cycles, one assignment each, no 500, no lock errors."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections import Counter, defaultdict

import cbor2
import httpx
import torch

from plan_runtime import ModelCentricFLClient
from plan_runtime.state import decode_state, encode_state
from tests.conftest import ServerProcess

WORKERS = 200
MAX_DIFFS = 50
CYCLES = 3
TIME_BUDGET_S = 180
SHAPES = [(3, 4), (3,)]


def diff_of(index: int) -> list[torch.Tensor]:
    return [torch.full(shape, float(index % 7 + 1)) for shape in SHAPES]


async def worker(
    client: httpx.AsyncClient,
    index: int,
    name: str,
    statuses: Counter,
    accepted: dict,
    deadline: float,
) -> None:
    """Authenticate, then join cycles until training completes or time runs out."""
    headers = {"Content-Type": "application/cbor", "Accept": "application/cbor"}

    async def call(path: str, body: dict) -> dict:
        response = await client.post(path, content=cbor2.dumps(body), headers=headers)
        statuses[response.status_code] += 1
        return cbor2.loads(response.content)

    worker_id = (await call("/model-centric/authenticate", {"model_name": name}))[
        "worker_id"
    ]
    for _ in range(40):
        if time.monotonic() > deadline:
            return
        answer = await call(
            "/model-centric/cycle-request", {"worker_id": worker_id, "model": name}
        )
        if answer.get("status") != "accepted":
            if answer.get("reason") == "training complete":
                return
            await asyncio.sleep(0.05 + (index % 10) / 100)
            continue
        keys = {"worker_id": worker_id, "request_key": answer["request_key"]}
        model = await client.get("/model-centric/get-model", params=keys)
        statuses[model.status_code] += 1
        if model.status_code != 200:
            continue
        decode_state(model.content)
        answer = await call(
            "/model-centric/report",
            {**keys, "diff": encode_state(diff_of(index)), "num_samples": index + 1},
        )
        if answer.get("status") == "success":
            accepted[answer["cycle"]].append(index)


def test_200_concurrent_workers_give_exactly_max_diffs_per_cycle(tmp_path):
    server = ServerProcess(tmp_path / "edge.sqlite", tmp_path / "serve.log").start()
    with ModelCentricFLClient(server.address, token=server.token) as admin:
        admin.host_federated_training(
            model=[torch.zeros(shape) for shape in SHAPES],
            client_plans={},
            client_config={"name": "crowd", "version": "1"},
            server_config={
                "num_cycles": CYCLES,
                "max_diffs": MAX_DIFFS,
                "cycle_length": 3600,
            },
        )
    statuses: Counter = Counter()
    accepted: dict[int, list[int]] = defaultdict(list)

    async def crowd() -> None:
        limits = httpx.Limits(max_connections=WORKERS + 10)
        async with httpx.AsyncClient(
            base_url=server.url, limits=limits, timeout=60
        ) as client:
            deadline = time.monotonic() + TIME_BUDGET_S
            await asyncio.gather(
                *(
                    worker(client, i, "crowd", statuses, accepted, deadline)
                    for i in range(WORKERS)
                )
            )

    try:
        asyncio.run(crowd())
        with ModelCentricFLClient(server.address, token=server.token) as admin:
            final = admin.retrieve_model("crowd", "1")
    finally:
        server.stop()

    assert not [code for code in statuses if code >= 500], statuses
    # A worker's own fresh request_key is never unknown to the server.
    assert statuses[403] == 0, statuses
    assert "database is locked" not in server.log()
    db = sqlite3.connect(server.db_path)
    averaged = [
        n for (n,) in db.execute("SELECT diffs_averaged FROM cycles ORDER BY number")
    ]
    doubles = db.execute(
        "SELECT count(*) FROM (SELECT cycle_id, worker_id FROM assignments "
        "GROUP BY cycle_id, worker_id HAVING count(*) > 1)"
    ).fetchone()[0]
    assert averaged == [MAX_DIFFS] * CYCLES
    assert doubles == 0
    assert sorted(accepted) == list(range(1, CYCLES + 1))
    assert all(len(indices) == MAX_DIFFS for indices in accepted.values())

    expected = [torch.zeros(shape, dtype=torch.float64) for shape in SHAPES]
    for indices in accepted.values():
        weights = sum(i + 1 for i in indices)
        for k in range(len(SHAPES)):
            expected[k] -= (
                sum(diff_of(i)[k].double() * (i + 1) for i in indices) / weights
            )
    for got, want in zip(final.values(), expected):
        assert torch.allclose(got.double(), want, atol=1e-5)


RACE_WORKERS = 30
RACE_S = 12
CHURN_S = 0.05


def test_deleting_and_resetting_under_load_answers_4xx_never_500(tmp_path):
    server = ServerProcess(tmp_path / "edge.sqlite", tmp_path / "serve.log").start()
    admin = ModelCentricFLClient(server.address, token=server.token).connect()

    def host() -> None:
        admin.host_federated_training(
            model=[torch.zeros(shape) for shape in SHAPES],
            client_plans={},
            client_config={"name": "churn", "version": "1"},
            server_config={"max_diffs": 5, "cycle_length": 3600},
        )

    host()
    statuses: Counter = Counter()
    accepted: dict[int, list[int]] = defaultdict(list)

    async def churn(deadline: float) -> None:
        # Over and over, the process is reset or deleted and hosted again,
        # while the workers are between any two of their requests.
        for round_index in range(int(RACE_S / CHURN_S)):
            if time.monotonic() > deadline:
                return
            await asyncio.sleep(CHURN_S)
            if round_index % 2:
                await asyncio.to_thread(admin.reset_process, "churn", "1")
            else:
                await asyncio.to_thread(admin.delete_process, "churn", "1")
                await asyncio.to_thread(host)

    async def crowd() -> None:
        deadline = time.monotonic() + RACE_S
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:

            async def keep_joining(index: int) -> None:
                while time.monotonic() < deadline:
                    try:
                        await worker(
                            client, index, "churn", statuses, accepted, deadline
                        )
                    except KeyError:
                        # authenticate was refused: the process was gone.
                        await asyncio.sleep(0.05)

            await asyncio.gather(
                churn(deadline), *(keep_joining(i) for i in range(RACE_WORKERS))
            )

    try:
        asyncio.run(crowd())
    finally:
        admin.close()
        server.stop()

    assert statuses[200] > 0
    assert not [code for code in statuses if code >= 500], statuses
    assert "Traceback" not in server.log()
    db = sqlite3.connect(server.db_path)
    assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)

"""SIGKILL at many moments: nothing acknowledged is lost, nothing counts twice.

One server process is killed 24 times while three workers report through
eight cycles: between reports, in the middle of receiving a report, and
while the report that fills a cycle is being averaged into a checkpoint.
After every restart the database must be intact and consistent, and at the
end the last checkpoint must equal the one an uninterrupted run computes
from the same diffs.
"""

from __future__ import annotations

import random
import signal
import socket
import sqlite3
import threading
import time

import cbor2
import httpx
import torch

from plan_runtime import ModelCentricFLClient, Worker
from plan_runtime.state import encode_state
from tests.conftest import ServerProcess

CYCLES = 8
WORKERS = 3
SHAPES = [(512, 512), (512,)]
# Float32 diffs summed in float32 and stored once per cycle: the roundings of
# three adds and a division per cycle, over eight cycles, stay far below this.
TOLERANCE = 1e-5


def diff_for(cycle: int, worker: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(cycle * 100 + worker)
    return [torch.randn(shape, generator=generator) for shape in SHAPES]


def expected_final() -> list[torch.Tensor]:
    state = [torch.zeros(shape, dtype=torch.float64) for shape in SHAPES]
    for cycle in range(1, CYCLES + 1):
        weights = [worker + 1 for worker in range(WORKERS)]
        for index in range(len(SHAPES)):
            total = sum(
                diff_for(cycle, w)[index].double() * weights[w] for w in range(WORKERS)
            )
            state[index] -= total / sum(weights)
    return [t.float() for t in state]


class Driver:
    """Workers that remember their ids and assignments across server restarts."""

    def __init__(self, server: ServerProcess):
        self.server = server
        self.workers = [Worker(server.address) for _ in range(WORKERS)]
        self.ids = [w.worker_id("crash", "1") for w in self.workers]
        self.acknowledged: set[tuple[int, int]] = set()

    def reconnect(self) -> None:
        for worker in self.workers:
            worker.close()
        self.workers = [Worker(self.server.address) for _ in range(WORKERS)]

    def body(self, cycle: int, worker: int) -> bytes:
        answer = self.workers[worker].connection.call(
            "POST",
            "/model-centric/cycle-request",
            body={"worker_id": self.ids[worker], "model": "crash"},
        )
        assert answer["status"] == "accepted", answer
        assert answer["cycle"] == cycle, (answer, cycle)
        return cbor2.dumps(
            {
                "worker_id": self.ids[worker],
                "request_key": answer["request_key"],
                "diff": encode_state(diff_for(cycle, worker)),
                "num_samples": worker + 1,
            }
        )

    def report(self, cycle: int, worker: int, body: bytes) -> None:
        response = httpx.post(
            f"{self.server.url}/model-centric/report",
            content=body,
            headers={"Content-Type": "application/cbor"},
            timeout=60,
        )
        assert response.status_code == 200, response.content
        assert cbor2.loads(response.content)["cycle"] == cycle
        self.acknowledged.add((cycle, worker))

    def kill_and_restart(self) -> None:
        deadlines = open_deadlines(self.server)
        self.server.process.send_signal(signal.SIGKILL)
        self.server.process.wait()
        check_store(self.server, self)
        self.server.start()
        self.reconnect()
        after = open_deadlines(self.server)
        for number, deadline in deadlines.items():
            if number in after:
                assert after[number] == deadline, "a restart moved a deadline"


def open_deadlines(server: ServerProcess) -> dict[int, float]:
    db = sqlite3.connect(server.db_path)
    rows = db.execute(
        "SELECT number, deadline_at FROM cycles WHERE closed_at IS NULL"
    ).fetchall()
    db.close()
    return dict(rows)


def check_store(server: ServerProcess, driver: Driver) -> None:
    db = sqlite3.connect(server.db_path)
    assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    numbers = [
        n for (n,) in db.execute("SELECT number FROM checkpoints ORDER BY number")
    ]
    assert numbers == list(range(1, len(numbers) + 1)), numbers
    counted = db.execute(
        "SELECT c.number, a.worker_id FROM reports r "
        "JOIN assignments a ON a.id = r.assignment_id "
        "JOIN cycles c ON c.id = r.cycle_id"
    ).fetchall()
    db.close()
    assert len(counted) == len(set(counted)), "a diff was counted twice"
    for cycle, worker in driver.acknowledged:
        assert (cycle, driver.ids[worker]) in counted, "an acknowledged diff was lost"


def send_half_then_kill(driver: Driver, body: bytes) -> None:
    """Start a report, stop half-way through the body, and kill the server."""
    with socket.create_connection(("127.0.0.1", driver.server.port), timeout=10) as s:
        s.sendall(
            b"POST /model-centric/report HTTP/1.1\r\nHost: x\r\n"
            b"Content-Type: application/cbor\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body[: len(body) // 2]
        )
        time.sleep(0.2)
        driver.kill_and_restart()


def kill_while_closing(
    driver: Driver, cycle: int, worker: int, body: bytes, delay_s: float
) -> None:
    """Send the report that fills the cycle and kill during its averaging."""
    outcome: list[object] = []

    def send() -> None:
        try:
            outcome.append(
                httpx.post(
                    f"{driver.server.url}/model-centric/report",
                    content=body,
                    headers={"Content-Type": "application/cbor"},
                    timeout=30,
                )
            )
        except httpx.HTTPError as exc:
            outcome.append(exc)

    sender = threading.Thread(target=send)
    sender.start()
    time.sleep(delay_s)
    driver.kill_and_restart()
    sender.join(timeout=30)
    answer = outcome[0] if outcome else None
    if isinstance(answer, httpx.Response) and answer.status_code == 200:
        driver.acknowledged.add((cycle, worker))


def test_acknowledged_reports_survive_24_kills_and_the_result_is_exact(tmp_path):
    server = ServerProcess(tmp_path / "edge.sqlite", tmp_path / "serve.log").start()
    with ModelCentricFLClient(server.address, token=server.token) as admin:
        admin.host_federated_training(
            model=[torch.zeros(shape) for shape in SHAPES],
            client_plans={},
            client_config={"name": "crash", "version": "1"},
            server_config={
                "num_cycles": CYCLES,
                "max_diffs": WORKERS,
                "cycle_length": 3600,
            },
        )
    driver = Driver(server)
    rng = random.Random(7)
    kills = 0
    try:
        for cycle in range(1, CYCLES + 1):
            for worker in range(WORKERS):
                body = driver.body(cycle, worker)
                kind = ("between", "mid-upload", "closing")[(cycle + worker) % 3]
                if kind == "mid-upload":
                    send_half_then_kill(driver, body)
                elif kind == "closing" and worker == WORKERS - 1:
                    kill_while_closing(
                        driver, cycle, worker, body, rng.uniform(0.0, 0.08)
                    )
                else:
                    driver.report(cycle, worker, body)
                    driver.kill_and_restart()
                kills += 1
                # Whatever the kill interrupted, the worker retries the same
                # report: it counts now, or is recognised as a duplicate.
                driver.report(cycle, worker, body)
            check_store(server, driver)

        with ModelCentricFLClient(server.address, token=server.token) as admin:
            final = admin.retrieve_model("crash", "1")
            status = admin.status()["processes"][0]
    finally:
        server.stop()

    assert kills >= 20
    assert status["is_complete"] and status["checkpoints"] == CYCLES + 1
    for got, want in zip(final.values(), expected_final()):
        assert torch.allclose(got, want, atol=TOLERANCE, rtol=0)

"""Shared fixtures: a real server on loopback, clients, and a tiny process."""

from __future__ import annotations

import secrets
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

import nimble_edge
from plan_runtime import ModelCentricFLClient, make_plan
from plan_runtime.plan import Plan

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples" / "digits"))


@dataclass
class ServerProcess:
    """``python nimble_edge.py serve`` in its own process, on a loopback port."""

    db_path: Path
    log_path: Path
    token: str = field(default_factory=lambda: secrets.token_urlsafe(16))
    port: int = 0
    process: Any = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    def start(self) -> ServerProcess:
        self.port = nimble_edge.free_port()
        log = self.log_path.open("ab")
        self.process = nimble_edge.start_server(
            self.db_path, self.port, self.token, log_level="info", log_file=log
        )
        log.close()
        return self

    def stop(self) -> None:
        if self.process is not None:
            nimble_edge.stop_server(self.process)
            self.process = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def read_answer(sock: Any) -> bytes:
    """Read one HTTP answer from a socket: the head, then its whole body.

    The body may arrive in a later packet than the head, so reading stops
    at Content-Length bytes of body (or when the server closes), not at
    the end of the head.
    """
    answer = b""
    while b"\r\n\r\n" not in answer:
        data = sock.recv(65536)
        if not data:
            return answer
        answer += data
    head, _, body = answer.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    while len(body) < length:
        data = sock.recv(65536)
        if not data:
            break
        body += data
    return head + b"\r\n\r\n" + body


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    directory = tmp_path_factory.mktemp("server")
    handle = ServerProcess(directory / "edge.sqlite", directory / "serve.log").start()
    yield handle
    handle.stop()


@pytest.fixture
def admin(server: ServerProcess) -> Iterator[ModelCentricFLClient]:
    client = ModelCentricFLClient(server.address, secure=False, token=server.token)
    yield client.connect()
    client.close()


class TinyModel(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(4, 3)

    def forward(self, xs: torch.Tensor) -> torch.Tensor:
        return self.fc(xs)


def tiny_plan(batch_size: int = 8) -> Plan:
    """One SGD step of a 4 -> 3 linear classifier."""

    @make_plan
    def training_plan(
        xs: torch.Tensor = torch.zeros(batch_size, 4),
        ys: torch.Tensor = torch.zeros(batch_size, dtype=torch.long),
        batch_size: torch.Tensor = torch.tensor(batch_size),
        lr: torch.Tensor = torch.tensor(0.1),
        params: list[torch.Tensor] = [torch.zeros(3, 4), torch.zeros(3)],
    ) -> tuple[torch.Tensor, ...]:
        weight, bias = (p.requires_grad_() for p in params)
        logits = xs @ weight.t() + bias
        loss = F.cross_entropy(logits, ys)
        grad_w, grad_b = torch.autograd.grad(loss, [weight, bias])
        accuracy = (logits.argmax(1) == ys).float().mean()
        return loss, accuracy, weight - lr * grad_w, bias - lr * grad_b

    plan: Plan = training_plan
    return plan


@pytest.fixture(scope="session")
def plan() -> Plan:
    return tiny_plan()


@pytest.fixture
def host(admin: ModelCentricFLClient, plan: Plan) -> Any:
    """Host a tiny process under a fresh name; returns ``(name, version)``."""

    def host_process(**server_config: Any) -> tuple[str, str]:
        name = f"tiny-{uuid.uuid4().hex[:8]}"
        torch.manual_seed(0)
        admin.host_federated_training(
            model=TinyModel(),
            client_plans={"training_plan": plan},
            client_protocols={},
            server_averaging_plan=None,
            client_config={
                "name": name,
                "version": "1",
                "batch_size": 8,
                "lr": 0.1,
                "max_updates": 2,
            },
            server_config={
                "num_cycles": 3,
                "cycle_length": 3600,
                "max_diffs": 2,
                **server_config,
            },
        )
        return name, "1"

    return host_process

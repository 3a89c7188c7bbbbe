"""The digits task shared by the host script, the device script and the demo.

scikit-learn's handwritten digits (8x8 images, 10 classes, 1,797 samples)
ship inside the package, so nothing is downloaded. The split is fixed: 80%
for training, shared out to workers with label skew, and 20% held out to
test each checkpoint.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch.func import functional_call

from plan_runtime import Worker, make_plan
from plan_runtime.plan import Plan

NAME = "digits"
VERSION = "1.0"
BATCH_SIZE = 32
CLIENT_CONFIG: dict[str, Any] = {
    "name": NAME,
    "version": VERSION,
    "batch_size": BATCH_SIZE,
    "lr": 0.1,
    "max_updates": 25,
}


class DigitsMLP(torch.nn.Module):
    """64 pixels -> 128 hidden units -> 10 classes."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden = torch.nn.Linear(64, 128)
        self.out = torch.nn.Linear(128, 10)

    def forward(self, xs: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.hidden(xs)))


def build_model(seed: int = 0) -> DigitsMLP:
    torch.manual_seed(seed)
    return DigitsMLP()


def load_split(
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fixed 80/20 split as ``(train_x, train_y, test_x, test_y)``."""
    digits = load_digits()
    xs = digits.data.astype(np.float32) / 16.0
    train_x, test_x, train_y, test_y = train_test_split(
        xs, digits.target, test_size=0.2, random_state=seed, stratify=digits.target
    )
    return (
        torch.from_numpy(train_x),
        torch.from_numpy(train_y.astype(np.int64)),
        torch.from_numpy(test_x),
        torch.from_numpy(test_y.astype(np.int64)),
    )


def shard_indices(
    labels: torch.Tensor, workers: int, alpha: float = 0.5, seed: int = 0
) -> list[np.ndarray]:
    """Split sample indices among workers with Dirichlet(alpha) label skew.

    Each class is divided among the workers in proportions drawn from a
    Dirichlet distribution, so every worker sees a few classes often and
    others rarely or never: the non-IID data that devices really hold.
    """
    rng = np.random.default_rng(seed)
    labels_np = labels.numpy()
    shards: list[list[int]] = [[] for _ in range(workers)]
    for label in np.unique(labels_np):
        members = rng.permutation(np.flatnonzero(labels_np == label))
        proportions = rng.dirichlet(np.full(workers, alpha))
        cuts = (np.cumsum(proportions)[:-1] * len(members)).astype(int)
        for worker, part in enumerate(np.split(members, cuts)):
            shards[worker].extend(part.tolist())
    return [np.array(sorted(shard), dtype=np.int64) for shard in shards]


def make_training_plan(model: torch.nn.Module, batch_size: int = BATCH_SIZE) -> Plan:
    """Trace one SGD step of ``model`` on a batch into a portable plan."""
    names = [name for name, _ in model.named_parameters()]
    params = [p.detach().clone() for p in model.parameters()]

    @make_plan
    def training_plan(
        xs: torch.Tensor = torch.zeros(batch_size, 64),
        ys: torch.Tensor = torch.zeros(batch_size, dtype=torch.long),
        batch_size: torch.Tensor = torch.tensor(batch_size),
        lr: torch.Tensor = torch.tensor(0.1),
        params: list[torch.Tensor] = params,
    ) -> tuple[torch.Tensor, ...]:
        params = [p.requires_grad_() for p in params]
        logits = functional_call(model, dict(zip(names, params)), (xs,))
        loss = F.cross_entropy(logits, ys)
        grads = torch.autograd.grad(loss, params)
        accuracy = (logits.argmax(dim=1) == ys).float().mean()
        updated = [p - lr * g for p, g in zip(params, grads)]
        return (loss, accuracy, *updated)

    plan: Plan = training_plan
    return plan


def train_locally(
    plan: Plan,
    model: dict[str, torch.Tensor],
    client_config: dict[str, Any],
    xs: torch.Tensor,
    ys: torch.Tensor,
    generator: torch.Generator,
) -> tuple[list[torch.Tensor], float]:
    """Run ``max_updates`` plan steps on random batches; return params and loss."""
    batch_size = int(client_config["batch_size"])
    lr = float(client_config["lr"])
    params = list(model.values())
    losses = []
    for _ in range(int(client_config["max_updates"])):
        # Sampling with replacement keeps the plan's fixed batch shape even
        # for a worker that holds fewer samples than one batch.
        batch = torch.randint(0, len(xs), (batch_size,), generator=generator)
        loss, _accuracy, *params = plan(xs[batch], ys[batch], batch_size, lr, params)
        losses.append(float(loss))
    return params, sum(losses) / len(losses)


def test_accuracy(
    state: dict[str, torch.Tensor], xs: torch.Tensor, ys: torch.Tensor
) -> float:
    """Accuracy of a checkpoint on held-out data."""
    model = DigitsMLP()
    model.load_state_dict(state)
    with torch.no_grad():
        predictions = model(xs).argmax(dim=1)
    return float((predictions == ys).float().mean())


def take_part(
    worker: Worker, xs: torch.Tensor, ys: torch.Tensor, generator: torch.Generator
) -> tuple[float, int]:
    """Join the open cycle once, train on ``xs, ys`` and report the diff.

    Returns:
        The mean local loss, and the cycle the server counted the diff in.

    Raises:
        RuntimeError: the worker was not admitted to the cycle.
    """
    job = worker.new_job(NAME, VERSION)
    outcome: dict[str, Any] = {}

    def on_ready(
        model: dict[str, torch.Tensor],
        plans: dict[str, Plan],
        client_config: dict[str, Any],
    ) -> None:
        params, loss = train_locally(
            plans["training_plan"], model, client_config, xs, ys, generator
        )
        answer = job.report(
            job.create_diff(params), num_samples=len(xs), metrics={"loss": loss}
        )
        outcome.update(loss=loss, cycle=answer["cycle"])

    def on_rejected(timeout_s: float | None) -> None:
        raise RuntimeError(f"not admitted: {job.rejection}")

    job.on_ready, job.on_rejected = on_ready, on_rejected
    job.start()
    return outcome["loss"], outcome["cycle"]

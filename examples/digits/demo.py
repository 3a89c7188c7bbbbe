"""The main job: host the digits MLP and train it with workers over HTTP.

``python nimble_edge.py demo`` starts a server and calls :func:`run`; the
workers here use the same worker library as ``device.py``, one per shard.
"""

from __future__ import annotations

import time

import digits
import torch

from plan_runtime import ModelCentricFLClient, Worker


def run(
    address: str, token: str, *, cycles: int = 20, workers: int = 10, seed: int = 0
) -> float:
    """Train for ``cycles`` cycles of ``workers`` diffs; return the final accuracy."""
    started = time.perf_counter()
    train_x, train_y, test_x, test_y = digits.load_split(seed)
    shards = digits.shard_indices(train_y, workers, alpha=0.5, seed=seed)
    model = digits.build_model(seed)
    plan = digits.make_training_plan(model)

    admin = ModelCentricFLClient(address=address, secure=False, token=token).connect()
    admin.host_federated_training(
        model=model,
        client_plans={"training_plan": plan},
        client_protocols={},
        server_averaging_plan=None,
        client_config=digits.CLIENT_CONFIG,
        server_config={
            "num_cycles": cycles,
            "cycle_length": 3600,
            "max_diffs": workers,
            "minimum_upload_speed": 0,
            "minimum_download_speed": 0,
        },
    )
    sizes = ", ".join(str(len(shard)) for shard in shards)
    print(
        f"hosted {digits.NAME}@{digits.VERSION}; {workers} workers hold {sizes} samples"
    )

    devices = [Worker(address) for _ in range(workers)]
    generators = [
        torch.Generator().manual_seed(seed * 1000 + i) for i in range(workers)
    ]
    accuracy = 0.0
    for cycle in range(1, cycles + 1):
        losses, counted = [], 0
        for device, shard, generator in zip(devices, shards, generators):
            loss, counted_in = digits.take_part(
                device, train_x[shard], train_y[shard], generator
            )
            losses.append(loss)
            counted += counted_in == cycle

        checkpoint = admin.retrieve_model(
            digits.NAME, digits.VERSION, checkpoint="latest"
        )
        accuracy = digits.test_accuracy(checkpoint, test_x, test_y)
        mean_loss = sum(losses) / len(losses)
        print(
            f"cycle {cycle:2d}: {counted} diffs averaged, mean worker loss "
            f"{mean_loss:.4f}, test accuracy {accuracy:.3f}",
            flush=True,
        )

    for device in devices:
        device.close()
    status = admin.status()
    admin.close()
    process = next(p for p in status["processes"] if p["name"] == digits.NAME)
    print(
        f"{process['checkpoints']} checkpoints stored; wall time "
        f"{time.perf_counter() - started:.1f} s"
    )
    print(f"final test accuracy: {accuracy:.3f}")
    return accuracy

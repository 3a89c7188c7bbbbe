"""The main job, small: serve as a subprocess, host digits, train, restart."""

from __future__ import annotations

import sqlite3

import digits
import torch

from plan_runtime import ModelCentricFLClient, Worker
from tests.conftest import ServerProcess

CYCLES = 4
WORKERS = 3
# Measured: about 0.9 after 4 cycles of 3 workers; 0.8 leaves room for noise
# while a broken average or a wrong diff sign stays near 0.1-0.3.
ACCURACY_THRESHOLD = 0.8


def test_digits_trains_over_http_and_checkpoints_survive_a_restart(tmp_path):
    server = ServerProcess(tmp_path / "edge.sqlite", tmp_path / "serve.log").start()
    train_x, train_y, test_x, test_y = digits.load_split()
    shards = digits.shard_indices(train_y, WORKERS)
    model = digits.build_model()
    admin = ModelCentricFLClient(server.address, secure=False, token=server.token)
    admin.connect()
    admin.host_federated_training(
        model=model,
        client_plans={"training_plan": digits.make_training_plan(model)},
        client_protocols={},
        server_averaging_plan=None,
        client_config=digits.CLIENT_CONFIG,
        server_config={
            "num_cycles": CYCLES,
            "cycle_length": 3600,
            "max_diffs": WORKERS,
            "minimum_upload_speed": 0,
            "minimum_download_speed": 0,
        },
    )
    initial = digits.test_accuracy(
        admin.retrieve_model(digits.NAME, digits.VERSION, 1), test_x, test_y
    )

    workers = [Worker(server.address) for _ in range(WORKERS)]
    for cycle in range(1, CYCLES + 1):
        for index, worker in enumerate(workers):
            shard = shards[index]
            _, counted_in = digits.take_part(
                worker, train_x[shard], train_y[shard], torch.Generator()
            )
            assert counted_in == cycle
    final = digits.test_accuracy(
        admin.retrieve_model(digits.NAME, digits.VERSION), test_x, test_y
    )
    before = [
        admin.retrieve_model(digits.NAME, digits.VERSION, n)
        for n in range(1, CYCLES + 2)
    ]
    done = Worker(server.address).new_job(digits.NAME, digits.VERSION)
    done.start()
    admin.close()
    server.stop()

    assert final >= ACCURACY_THRESHOLD > initial
    assert done.rejection == {"status": "rejected", "reason": "training complete"}
    rows = (
        sqlite3.connect(server.db_path)
        .execute("SELECT number FROM checkpoints ORDER BY number")
        .fetchall()
    )
    assert [n for (n,) in rows] == list(range(1, CYCLES + 2))

    server.start()
    admin = ModelCentricFLClient(server.address, secure=False, token=server.token)
    after = [
        admin.connect().retrieve_model(digits.NAME, digits.VERSION, n)
        for n in range(1, CYCLES + 2)
    ]
    admin.close()
    server.stop()
    for old, new in zip(before, after):
        assert all(torch.equal(old[k], new[k]) for k in old)

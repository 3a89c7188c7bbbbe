"""A device: train the hosted digits classifier on one shard of the data.

    python examples/digits/device.py --address 127.0.0.1:7000 --shard 3

The device joins cycles until the server says training is complete. Its
data never leaves it: only the diff of its updated parameters is sent.
"""

from __future__ import annotations

import argparse
import time

import digits
import torch

from plan_runtime import Worker


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--address", default="127.0.0.1:7000")
    parser.add_argument(
        "--shard", type=int, default=0, help="which of --shards to hold"
    )
    parser.add_argument("--shards", type=int, default=10)
    parser.add_argument(
        "--auth-token", default=None, help="a JWT, if the process needs one"
    )
    parser.add_argument(
        "--max-wait",
        type=float,
        default=5.0,
        help="longest pause between cycle requests, in seconds",
    )
    args = parser.parse_args()

    train_x, train_y, _, _ = digits.load_split()
    shard = digits.shard_indices(train_y, args.shards)[args.shard]
    xs, ys = train_x[shard], train_y[shard]
    generator = torch.Generator().manual_seed(args.shard)
    print(f"shard {args.shard}: {len(xs)} samples, labels {sorted(set(ys.tolist()))}")

    worker = Worker(args.address, auth_token=args.auth_token)
    job = worker.new_job(digits.NAME, digits.VERSION)
    state = {"wait_s": 0.0, "done": False}

    def on_ready(model, plans, client_config):
        params, loss = digits.train_locally(
            plans["training_plan"], model, client_config, xs, ys, generator
        )
        diff = job.create_diff(params)
        answer = job.report(diff, num_samples=len(xs), metrics={"loss": loss})
        print(f"cycle {answer['cycle']}: reported, local loss {loss:.4f}")
        state["wait_s"] = 0.0

    def on_rejected(timeout_s):
        if timeout_s is None:
            print("training complete")
            state["done"] = True
        else:
            state["wait_s"] = min(float(timeout_s), args.max_wait)

    def on_error(exc):
        print(f"request failed: {exc}; retrying")
        state["wait_s"] = 5.0

    job.on_ready, job.on_rejected, job.on_error = on_ready, on_rejected, on_error
    while not state["done"]:
        job.start()
        time.sleep(state["wait_s"])
    worker.close()


if __name__ == "__main__":
    main()

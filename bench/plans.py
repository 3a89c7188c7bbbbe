"""What a plan costs next to eager torch: size, load time, time per step.

    python bench/plans.py [--steps 200] [--threads 0]

Two training steps in the classic form (loss, accuracy and SGD-updated
parameters from xs, ys, batch_size, lr, params): a 784-392-10 MLP at batch
64, and a small CNN (two 3x3 convolutions with max-pooling, 28x28 inputs,
batch 64). For each it prints the plan document's size, the time to load it
(decoding and the memory dry run), and the median time per step of the plan
and of the same function run eagerly with autograd, measured alternately in
one run so that both see the same machine. The plan's target is at most
1.3x eager.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from plan_runtime import Plan
from plan_runtime.trace import sgd_step, trace


def mlp() -> tuple[torch.nn.Module, tuple[int, ...]]:
    layers = [torch.nn.Linear(784, 392), torch.nn.ReLU(), torch.nn.Linear(392, 10)]
    return torch.nn.Sequential(*layers), (64, 784)


def cnn() -> tuple[torch.nn.Module, tuple[int, ...]]:
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(8, 16, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(2),
        torch.nn.Flatten(),
        torch.nn.Linear(16 * 7 * 7, 10),
    )
    return model, (64, 1, 28, 28)


def median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1000


def measure(
    name: str, model: torch.nn.Module, shape: tuple[int, ...], steps: int
) -> str:
    torch.manual_seed(0)
    step = sgd_step(model)
    params = [p.detach().clone() for p in model.parameters()]
    xs, ys = torch.randn(shape), torch.randint(0, 10, (shape[0],))
    args = (xs, ys, torch.tensor(shape[0]), torch.tensor(0.1), params)
    plan = trace(step, name=name, example_args=args)
    data = plan.to_bytes()

    loads = []
    for _ in range(5):
        started = time.perf_counter()
        loaded = Plan.from_bytes(data)
        loads.append(time.perf_counter() - started)

    plan_times, eager_times = [], []
    for index in range(steps + 10):
        started = time.perf_counter()
        loaded(*args)
        plan_time = time.perf_counter() - started
        started = time.perf_counter()
        step(xs, ys, args[2], args[3], [p.clone() for p in params])
        eager_time = time.perf_counter() - started
        # The first runs warm up allocators and kernels; they are not counted.
        if index >= 10:
            plan_times.append(plan_time)
            eager_times.append(eager_time)

    plan_ms, eager_ms = median_ms(plan_times), median_ms(eager_times)
    return (
        f"{name:<18} {len(loaded.ops):>4} {len(data):>10,} {median_ms(loads):>9.1f} "
        f"{plan_ms:>9.3f} {eager_ms:>9.3f} {plan_ms / eager_ms:>6.2f}x"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200, help="timed steps of each")
    parser.add_argument(
        "--threads", type=int, default=0, help="torch threads; 0 keeps torch's default"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{args.steps} steps each"
    )
    print(
        f"{'model':<18} {'ops':>4} {'plan bytes':>10} {'load ms':>9} "
        f"{'plan ms':>9} {'eager ms':>9} {'ratio':>7}"
    )
    for name, build in (("mlp 784-392-10", mlp), ("cnn 2 conv 28x28", cnn)):
        model, shape = build()
        print(measure(name, model, shape, args.steps))


if __name__ == "__main__":
    main()

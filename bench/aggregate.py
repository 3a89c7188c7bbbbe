"""Averaging 100 diffs of 10M parameters: nimble-edge beside Flower and numpy.

    python bench/aggregate.py [--diffs 100] [--repeat 3] [--flower-python PATH]

Flower pins older Starlette and uvicorn, so it is never installed beside
the project; give the interpreter of a separate environment instead:

    python3 -m venv /tmp/flower-venv && /tmp/flower-venv/bin/pip install flwr
    python bench/aggregate.py --flower-python /tmp/flower-venv/bin/python

Without it, the Flower rows are skipped. Every contender runs in a fresh
child process, one after the other in this run, on the same model (five
float32 tensors, 10,002,500 parameters) and the same diffs: a pool of four
distinct diffs, used in turn, so that the inputs themselves take the same
small memory for everyone. Each child reports its best time over
``--repeat`` passes and its peak memory above what it held once its inputs
were built (the kernel's high-water mark, reset before the first pass).

Part 1 adds tensors that are already in memory: the bandwidth floor is a
plain ``a += b`` of 10M float32 (three arrays of memory traffic), and every
row is compared with 100 of those. Part 2 starts from the bytes on the
wire: nimble-edge's CBOR state documents, decoded as views of the received
buffer; Flower's ``Parameters`` (``np.save`` bytes), as its FedAvg gets
them. Targets: nimble-edge's adds within 1.5x of the floor, decode plus add
at most 20 ms per diff, at least 5x faster than Flower's fastest, and peak
memory that does not grow with the number of diffs (compare ``--diffs 25``).
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import gc
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SHAPES = [(3000, 2000), (2000,), (2000, 1500), (1500,), (1500, 667)]
POOL = 4


# ---------------------------------------------------------------- children


def rss_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def reset_peak() -> None:
    # Writing 5 to clear_refs resets VmHWM to the current RSS (Linux 4.0+).
    Path("/proc/self/clear_refs").write_text("5")


def numpy_pool(seed: int) -> list[list[Any]]:
    import numpy as np

    rng = np.random.default_rng(seed)
    return [
        [rng.standard_normal(shape, dtype=np.float32) * 0.01 for shape in SHAPES]
        for _ in range(POOL)
    ]


def timed(work: Callable[[], Any], repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        work()
        best = min(best, time.perf_counter() - started)
    return best


# Each child builds its inputs, then hands back the work to time: the peak
# is measured from there, so inputs (and imported libraries) never count.


def child_floor(diffs: int) -> Callable[[], Any]:
    pool = numpy_pool(1)
    total = [layer.copy() for layer in pool[0]]

    def work() -> None:
        for index in range(diffs):
            for layer, diff in zip(total, pool[index % POOL]):
                layer += diff

    return work


def child_numpy(diffs: int) -> Callable[[], Any]:
    import numpy as np

    pool = numpy_pool(1)

    def work() -> None:
        total = [np.zeros_like(layer) for layer in pool[0]]
        for index in range(diffs):
            for layer, diff in zip(total, pool[index % POOL]):
                layer += diff * (index + 1)

    return work


def child_flower(kind: str, diffs: int) -> Callable[[], Any]:
    import numpy as np
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
    from flwr.common import parameters_to_ndarrays as to_arrays
    from flwr.server.strategy.aggregate import aggregate, aggregate_inplace

    pool = numpy_pool(1)
    weights = [index + 1 for index in range(diffs)]
    if kind == "aggregate":
        results = [(pool[i % POOL], weights[i]) for i in range(diffs)]
        return lambda: aggregate(results)

    ok = Status(code=Code.OK, message="")
    encoded = [ndarrays_to_parameters(arrays) for arrays in pool]
    del pool
    fits = [(None, FitRes(ok, encoded[i % POOL], weights[i], {})) for i in range(diffs)]
    if kind == "aggregate_inplace":
        # What FedAvg runs by default (inplace=True).
        return lambda: aggregate_inplace(fits)  # type: ignore[arg-type]
    # FedAvg with inplace=False: every result decoded, then averaged.
    assert kind == "decode+aggregate"
    np.seterr(all="ignore")
    return lambda: aggregate(
        [(to_arrays(fit.parameters), fit.num_examples) for _, fit in fits]
    )


def child_ours(kind: str, diffs: int, tuned: bool) -> Callable[[], Any]:
    import torch

    sys.path.insert(0, str(ROOT))
    from nimble_edge import MIB, tune_runtime
    from plan_runtime.aggregation import Accumulator
    from plan_runtime.state import decode_state, encode_state, layout_state

    if tuned:
        tune_runtime(1, 256 * MIB)
    else:
        torch.set_num_threads(2)
    names = [f"layer{i}" for i in range(len(SHAPES))]
    pool = [
        {name: torch.from_numpy(a) for name, a in zip(names, diff)}
        for diff in numpy_pool(1)
    ]
    base = {name: torch.zeros(shape) for name, shape in zip(names, SHAPES)}
    spec = [(name, torch.float32, shape) for name, shape in zip(names, SHAPES)]
    # As the report route holds them: each body in one writable buffer, as
    # received, whose tensors are decoded as views.
    documents = [bytearray(encode_state(diff)) for diff in pool]
    if kind == "encoded":
        del pool

    def work() -> None:
        accumulator = Accumulator(base)
        for index in range(diffs):
            if kind == "encoded":
                diff = decode_state(documents[index % POOL], copy=False)
            else:
                diff = pool[index % POOL]
            accumulator.add(diff, index + 1)
        _, views = layout_state(spec)
        accumulator.result(out=views)

    return work


def run_child(args: argparse.Namespace) -> None:
    name, diffs = args.child, args.diffs
    if name == "floor":
        work = child_floor(diffs)
    elif name == "numpy":
        work = child_numpy(diffs)
    elif name.startswith("flower:"):
        work = child_flower(name.split(":", 1)[1], diffs)
    else:
        kind = "encoded" if name == "ours-encoded" else "memory"
        work = child_ours(kind, diffs, tuned=name != "ours-untuned")

    # Freed input-building memory goes back to the system first, so that
    # the peak above the baseline is what the work itself holds.
    gc.collect()
    ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim(0)
    baseline = rss_bytes("VmRSS")
    reset_peak()
    seconds = timed(work, args.repeat)
    peak = rss_bytes("VmHWM")
    print(json.dumps({"seconds": seconds, "peak": peak, "baseline": baseline}))


# ---------------------------------------------------------------- parent


def measure(python: str, name: str, diffs: int, repeat: int) -> dict[str, Any]:
    command = [
        python,
        __file__,
        "--child",
        name,
        "--diffs",
        str(diffs),
        "--repeat",
        str(repeat),
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1" if "untuned" not in name else "2")
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{done.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--diffs", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--flower-python", default=os.environ.get("FLOWER_PYTHON"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        run_child(args)
        return

    model_bytes = sum(math.prod(shape) for shape in SHAPES) * 4
    diffs = args.diffs
    flower = args.flower_python
    if flower:
        version = subprocess.run(
            [flower, "-c", "import flwr; print(flwr.__version__)"],
            capture_output=True,
            text=True,
        ).stdout.strip()
        print(f"Flower {version} from {flower}")
    else:
        print("Flower rows skipped: pass --flower-python (see --help)")
    print(
        f"{diffs} diffs of {model_bytes // 4:,} float32 parameters "
        f"({model_bytes / 1e6:.0f} MB each), best of {args.repeat}, "
        f"2 cores, {os.cpu_count()} CPUs seen"
    )

    floor = measure(sys.executable, "floor", diffs, args.repeat)["seconds"]
    traffic = 3 * model_bytes * diffs
    print(
        f"bandwidth floor: {diffs} x `a += b` in {floor:.3f} s, "
        f"{traffic / floor / 1e9:.1f} GB/s of memory traffic"
    )

    rows = [
        ("Part 1: diffs in memory", None),
        ("nimble-edge Accumulator (serve's settings)", (sys.executable, "ours")),
        ("nimble-edge, 2 threads, default malloc", (sys.executable, "ours-untuned")),
        ("numpy running sum, total += diff * w", (sys.executable, "numpy")),
        ("Flower aggregate", (flower, "flower:aggregate")),
        ("Part 2: from the bytes on the wire, decode included", None),
        ("nimble-edge CBOR views + Accumulator", (sys.executable, "ours-encoded")),
        ("Flower aggregate_inplace (Parameters)", (flower, "flower:aggregate_inplace")),
        ("Flower decode all + aggregate", (flower, "flower:decode+aggregate")),
    ]
    header = f"{'':<52} {'s':>7} {'ms/diff':>8} {'vs floor':>8} {'peak MB':>8}"
    for label, target in rows:
        if target is None:
            print(f"\n{label}\n{header}")
            continue
        python, name = target
        if python is None:
            print(f"{label:<52} {'skipped':>7}")
            continue
        result = measure(python, name, diffs, args.repeat)
        seconds = result["seconds"]
        extra = result["peak"] - result["baseline"]
        print(
            f"{label:<52} {seconds:>7.3f} {seconds / diffs * 1e3:>8.1f} "
            f"{seconds / floor:>7.2f}x {extra / 1e6:>8.0f}"
        )


if __name__ == "__main__":
    main()

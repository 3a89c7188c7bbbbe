"""Peak server memory while a cycle's diffs are reported and the cycle closes.

    python bench/memory.py [--small-params 1000000] [--small-diffs 1000]
                           [--large-params 10000000] [--large-diffs 100]
                           [--few-diffs 25] [--senders 1 2] [--dir /tmp]
                           [--malloc-cache-mb MB]

Each case starts its own ``nimble_edge.py serve`` process (default flags) on
a new SQLite file on the real disk, hosts a process whose ``max_diffs`` is
the case's number of diffs, and sends that many reports in one cycle, so
the last report closes it (the close is measured). The cases: 1,000 diffs
of a 1M-parameter model, 100 diffs of a 10M-parameter model, the same with
25 diffs (peak memory should not depend on the number of diffs), and the
100-diff case again with each further ``--senders`` count (concurrent
connections, each a thread of this process with its own ``httpx.Client``).

Before measuring, every device has authenticated and holds its assignment,
and one device has downloaded the checkpoint, so "idle" includes the
server's cached copy of it. Then the kernel's high-water mark of the
server process is reset (``5`` into ``/proc/<pid>/clear_refs``) and
``VmHWM`` is read from ``/proc/<pid>/status`` twice: after all reports but
the last, and after the last one, whose answer comes once the close is
written. Only the server process is measured; the diffs sent are a pool of
three distinct pre-encoded documents used in turn (the server compares
reports only per ``request_key``; every one must be accepted).

Each report body in flight is held by the server once, so N concurrent
senders should add about N model copies on top of the rest.

``serve`` keeps up to ``--malloc-cache-mb`` (256 by default) of freed memory
for reuse, so "idle" already holds what hosting the model left behind and
later reports reuse it: the peak above idle is then smaller than the memory
a report needs. ``--malloc-cache-mb 0`` starts the servers with glibc's
defaults (``NIMBLE_EDGE_MALLOC_CACHE_MB``), which shows the latter.

Target: the peak above the idle server stays under 3x the model's size,
whatever the number of diffs.
"""

from __future__ import annotations

import argparse
import os
import re
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from report import (
    Server,
    WorkerClient,
    diff_pool,
    filesystem_of,
    host,
    model_shapes,
    parameter_count,
    post_report,
    process_status,
    running_server,
    runtime_line,
    sqlite_line,
    training_plan,
)

MB = 1e6
POOL = 3
NAME = "bench-memory"


def memory_bytes(pid: int) -> dict[str, int]:
    """The ``Vm*`` and ``Rss*`` lines of ``/proc/<pid>/status``, in bytes."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key.startswith(("Vm", "Rss")) and rest.strip().endswith("kB"):
            values[key] = int(rest.split()[0]) * 1024
    return values


def reset_peak(pid: int) -> None:
    # "5" resets VmHWM to the current RSS (Linux 4.0+, needs the process's
    # owner or root).
    Path(f"/proc/{pid}/clear_refs").write_text("5")


@dataclass
class Case:
    params: int
    diffs: int
    senders: int


@dataclass
class Measured:
    case: Case
    model_bytes: int
    idle: int
    reports_peak: int
    close_peak: int
    after: int
    report_s: float
    close_s: float
    accepted: int
    checkpoints: int
    wal_bytes: int


def send_all(
    server: Server, jobs: Sequence[tuple[str, str]], pool: Sequence[bytes], senders: int
) -> int:
    """Report for each ``(worker_id, request_key)`` from ``senders`` threads."""
    accepted = [0] * senders
    errors: list[BaseException] = []

    def run(index: int) -> None:
        client = WorkerClient(server.url, NAME)
        try:
            for number in range(index, len(jobs), senders):
                worker_id, request_key = jobs[number]
                diff = pool[number % len(pool)]
                body = client.report_body(worker_id, request_key, diff)
                accepted[index] += post_report(client, body)[0]
        except BaseException as exc:
            errors.append(exc)
        finally:
            client.close()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(senders)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=600)
    if errors:
        raise RuntimeError(f"a sender failed: {errors[0]!r}") from errors[0]
    return sum(accepted)


def measure(case: Case, directory: str | None, *, describe: bool) -> Measured:
    shapes = model_shapes(case.params)
    model_bytes = parameter_count(shapes) * 4
    pool = diff_pool(shapes, POOL)
    server_config = {
        "num_cycles": 0,
        "cycle_length": 3600,
        "max_diffs": case.diffs,
        "minimum_upload_speed": 0,
        "minimum_download_speed": 0,
    }

    with running_server(directory) as server:
        host(server, NAME, shapes, training_plan(shapes["bias"][0]), server_config)
        if describe:
            print(
                f"server: {runtime_line(server)}, {sqlite_line()}, db on "
                f"{filesystem_of(server.db_path)} under {server.directory.parent}"
            )
        client = WorkerClient(server.url, NAME)
        try:
            jobs = []
            for _ in range(case.diffs):
                worker_id = client.authenticate()
                answer = client.cycle_request(worker_id)
                if answer["status"] != "accepted":
                    raise RuntimeError(f"cycle-request rejected: {answer}")
                jobs.append((worker_id, answer["request_key"]))
            client.get_model(*jobs[0])
        finally:
            client.close()
        time.sleep(1.0)

        idle = memory_bytes(server.pid)["VmRSS"]
        reset_peak(server.pid)
        started = time.perf_counter()
        accepted = send_all(server, jobs[:-1], pool, case.senders)
        report_s = time.perf_counter() - started
        reports_peak = memory_bytes(server.pid)["VmHWM"]
        started = time.perf_counter()
        accepted += send_all(server, jobs[-1:], pool, 1)
        close_s = time.perf_counter() - started
        final = memory_bytes(server.pid)
        checkpoints = int(process_status(server, NAME)["checkpoints"])
        wal_bytes = server.db_path.with_name(server.db_path.name + "-wal").stat()
        for line in server.log().splitlines():
            if " WARNING " in line and "no worker authentication" in line:
                continue
            if " WARNING " in line or " ERROR " in line or "WAL of" in line:
                print(f"  server log: {line}")
        logged = re.findall(r"averaged into checkpoint \d+ in ([\d.]+) s", server.log())

    if logged:
        close_s = float(logged[-1])
    return Measured(
        case=case,
        model_bytes=model_bytes,
        idle=idle,
        reports_peak=reports_peak - idle,
        close_peak=final["VmHWM"] - idle,
        after=final["VmRSS"] - idle,
        report_s=report_s,
        close_s=close_s,
        accepted=accepted,
        checkpoints=checkpoints,
        wal_bytes=wal_bytes.st_size,
    )


def print_row(result: Measured) -> None:
    case, size = result.case, result.model_bytes
    print(
        f"{case.params / 1e6:>5.0f}M {size / MB:>6.1f} {case.diffs:>5} "
        f"{case.senders:>7} {result.idle / MB:>6.0f} "
        f"{result.reports_peak / MB:>7.0f} {result.reports_peak / size:>5.2f} "
        f"{result.close_peak / MB:>7.0f} {result.close_peak / size:>5.2f} "
        f"{result.after / MB:>7.0f} {result.report_s:>7.1f} {result.close_s:>6.2f} "
        f"{result.accepted:>5}/{case.diffs:<5} {result.checkpoints:>3} "
        f"{result.wal_bytes / MB:>6.0f}",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--small-params", type=int, default=1_000_000)
    parser.add_argument("--small-diffs", type=int, default=1000)
    parser.add_argument("--large-params", type=int, default=10_000_000)
    parser.add_argument("--large-diffs", type=int, default=100)
    parser.add_argument("--few-diffs", type=int, default=25)
    parser.add_argument(
        "--senders",
        type=int,
        nargs="+",
        default=[1, 2],
        help="the first is used for every case; each other one reruns the "
        "large-model case with that many concurrent senders",
    )
    parser.add_argument("--dir", default="/tmp", help="folder on the disk to use")
    parser.add_argument(
        "--malloc-cache-mb",
        type=int,
        default=None,
        help="serve's --malloc-cache-mb for every server (default: serve's own)",
    )
    args = parser.parse_args()
    if args.malloc_cache_mb is not None:
        # start_server hands this process's environment to serve.
        os.environ["NIMBLE_EDGE_MALLOC_CACHE_MB"] = str(args.malloc_cache_mb)

    first, *others = args.senders
    cases = [
        Case(args.small_params, args.small_diffs, first),
        Case(args.large_params, args.large_diffs, first),
        Case(args.large_params, args.few_diffs, first),
        *(Case(args.large_params, args.large_diffs, count) for count in others),
    ]
    print(
        "peak = VmHWM of the server process above its idle VmRSS (MB = 1e6 "
        "bytes); 'x' = that over the model's float32 size"
    )
    print(
        "reports: all but the last report; +close: with the last report, "
        "which closes the cycle; after: VmRSS above idle at the end"
    )
    results = []
    for index, case in enumerate(cases):
        result = measure(case, args.dir, describe=index == 0)
        if index == 0:
            print(
                f"{'model':>6} {'MB':>6} {'diffs':>5} {'senders':>7} {'idle':>6} "
                f"{'reports':>7} {'x':>5} {'+close':>7} {'x':>5} {'after':>7} "
                f"{'send s':>7} {'close s':>6} {'accepted':>11} {'ckp':>3} "
                f"{'WAL MB':>6}"
            )
        results.append(result)
        print_row(result)

    worst = max(result.close_peak / result.model_bytes for result in results)
    print(
        f"largest peak above idle: {worst:.2f}x the model (target: under 3x); "
        "close s: the close as the server logged it; ckp: checkpoints after; "
        "WAL MB: the -wal file's size just after the close"
    )
    print(
        f"byte-identical diffs under different request_keys ({POOL} distinct "
        "diffs reused): every report accepted, and each cycle closed into "
        "checkpoint 2: "
        + (
            "yes"
            if all(r.accepted == r.case.diffs and r.checkpoints == 2 for r in results)
            else "NO"
        )
    )


if __name__ == "__main__":
    main()

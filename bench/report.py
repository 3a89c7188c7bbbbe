"""Durable reports per second: the whole report path over loopback HTTP.

    python bench/report.py [--params 1000000] [--reports 300] [--max-diffs 50]
                           [--workers 1 8] [--dir /tmp]

Starts ``nimble_edge.py serve`` as its own process, as users do, on a new
SQLite file on the real disk (``--dir``, not a tmpfs), hosts one process per
concurrency (one float32 weight of ``sqrt(params)`` squared plus its bias,
and a one-step training plan of those shapes), and sends pre-encoded diffs
to ``/model-centric/report`` as CBOR. Every acknowledged report went through
the server's whole path: read into one buffer, decoded, checked against the
checkpoint, committed with ``synchronous=FULL`` and added into the cycle's
running sum. ``max_diffs`` makes cycles close several times during the run,
and the closes are inside the timing.

A worker may report once per cycle, so each sender thread (its own
``httpx.Client``) plays ``max_diffs + 1`` devices in turn, authenticated
before the timing starts. The timed loop of a sender is: encode the report
envelope around a pre-encoded diff, POST it, then ``cycle-request`` the next
assignment for its next device. Reports/s and MB/s count the whole loop
(report plus cycle-request); the POST alone is shown as latencies (median,
95th percentile, worst), beside a POST of the same bytes to the speed-test
route, which reads and discards them (the HTTP floor). A report refused
because its cycle closed while it was in flight (``cycle_closed``) is
counted apart, not as a report, and its time stays in.

At the end ``/status`` (admin token) must account for every acknowledged
report: ``(checkpoints - 1) * max_diffs`` plus the open cycle's diffs.

Targets (1M parameters, 4 MB diffs): at least 50 durable reports per second,
stretch 100.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import re
import secrets
import sqlite3
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cbor2
import httpx
import torch
import torch.nn.functional as F

import nimble_edge
from plan_runtime import ModelCentricFLClient, make_plan
from plan_runtime.plan import Plan
from plan_runtime.state import encode_state

CBOR = "application/cbor"
PREFIX = "/model-centric"
# A sender gives up on one assignment after this many rejections in a row;
# "cycle over" only lasts while a close is being written.
MAX_REJECTIONS = 2000
REJECTION_PAUSE_S = 0.01
# How often a report answered unknown_assignment is sent again, and after
# what pause (see post_report).
MAX_RESENDS = 20
RESEND_PAUSE_S = 0.05

# ---------------------------------------------------------------- the server


def filesystem_of(path: Path) -> str:
    """The type of the filesystem holding ``path`` (ext4, tmpfs, ...)."""
    best, kind = "", "unknown"
    for line in Path("/proc/mounts").read_text().splitlines():
        _, mount, fstype, *_ = line.split()
        is_parent = str(path).startswith(mount.rstrip("/") + "/") or mount == "/"
        if is_parent and len(mount) >= len(best):
            best, kind = mount, fstype
    return kind


@dataclass
class Server:
    """A ``serve`` process on a loopback port, with its database and log."""

    directory: Path
    token: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    port: int = 0
    process: Any = None

    @property
    def db_path(self) -> Path:
        return self.directory / "edge.sqlite"

    @property
    def log_path(self) -> Path:
        return self.directory / "serve.log"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    @property
    def pid(self) -> int:
        return int(self.process.pid)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def status(self) -> dict[str, Any]:
        headers = {"Authorization": f"Bearer {self.token}"}
        answer = httpx.get(f"{self.url}/status", headers=headers, timeout=60)
        answer.raise_for_status()
        result: dict[str, Any] = answer.json()
        return result


@contextlib.contextmanager
def running_server(directory: str | None) -> Iterator[Server]:
    """Start ``serve`` on a new database under ``directory``; always stop it."""
    with tempfile.TemporaryDirectory(prefix="nimble-bench-", dir=directory) as name:
        server = Server(Path(name))
        server.port = nimble_edge.free_port()
        with server.log_path.open("ab") as log:
            server.process = nimble_edge.start_server(
                server.db_path,
                server.port,
                server.token,
                log_level="info",
                log_file=log,
            )
        try:
            yield server
        finally:
            nimble_edge.stop_server(server.process)


def runtime_line(server: Server) -> str:
    """What ``serve`` logged about its torch threads and malloc settings."""
    found = re.search(r"Runtime: (.*)", server.log())
    return found.group(1) if found else "not logged"


# ---------------------------------------------------------------- the process


def model_shapes(params: int) -> dict[str, tuple[int, ...]]:
    """One square weight and its bias, about ``params`` parameters in all."""
    width = max(2, round(math.sqrt(params)))
    return {"weight": (width, width), "bias": (width,)}


def parameter_count(shapes: dict[str, tuple[int, ...]]) -> int:
    return sum(math.prod(shape) for shape in shapes.values())


def training_plan(width: int, batch_size: int = 8) -> Plan:
    """One SGD step of a linear classifier with ``width`` inputs and classes."""

    @make_plan
    def plan(
        xs: torch.Tensor = torch.zeros(batch_size, width),
        ys: torch.Tensor = torch.zeros(batch_size, dtype=torch.long),
        batch_size: torch.Tensor = torch.tensor(batch_size),
        lr: torch.Tensor = torch.tensor(0.1),
        params: list[torch.Tensor] = [torch.zeros(width, width), torch.zeros(width)],
    ) -> tuple[torch.Tensor, ...]:
        weight, bias = (p.requires_grad_() for p in params)
        logits = xs @ weight.t() + bias
        loss = F.cross_entropy(logits, ys)
        grad_w, grad_b = torch.autograd.grad(loss, [weight, bias])
        accuracy = (logits.argmax(1) == ys).float().mean()
        return loss, accuracy, weight - lr * grad_w, bias - lr * grad_b

    traced: Plan = plan
    return traced


def host(
    server: Server,
    name: str,
    shapes: dict[str, tuple[int, ...]],
    plan: Plan,
    server_config: dict[str, Any],
) -> None:
    """Host process ``name``@1 through the admin client."""
    generator = torch.Generator().manual_seed(0)
    model = {
        key: torch.randn(shape, generator=generator) * 0.01
        for key, shape in shapes.items()
    }
    admin = ModelCentricFLClient(server.address, secure=False, token=server.token)
    try:
        admin.connect()
        admin.host_federated_training(
            model=model,
            client_plans={"training_plan": plan},
            client_protocols={},
            server_averaging_plan=None,
            client_config={"name": name, "version": "1"},
            server_config=server_config,
        )
    finally:
        admin.close()


def diff_pool(shapes: dict[str, tuple[int, ...]], size: int) -> list[bytes]:
    """``size`` distinct state documents of small random diffs."""
    generator = torch.Generator().manual_seed(1)
    return [
        encode_state(
            {
                key: torch.randn(shape, generator=generator) * 1e-3
                for key, shape in shapes.items()
            }
        )
        for _ in range(size)
    ]


# ---------------------------------------------------------------- a device


class Refused(Exception):
    """The server answered with an error envelope."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code


class WorkerClient:
    """The worker routes over one keep-alive connection, in CBOR."""

    def __init__(self, url: str, process: str):
        self.process = process
        self.http = httpx.Client(
            base_url=url,
            headers={"Content-Type": CBOR, "Accept": CBOR},
            timeout=120,
        )

    def close(self) -> None:
        self.http.close()

    def post(self, route: str, body: bytes) -> dict[str, Any]:
        answer = self.http.post(f"{PREFIX}/{route}", content=body)
        decoded: dict[str, Any] = cbor2.loads(answer.content)
        if answer.status_code >= 400:
            raise Refused(answer.status_code, decoded["code"], decoded["error"])
        return decoded

    def authenticate(self) -> str:
        body = cbor2.dumps({"model_name": self.process, "model_version": "1"})
        worker_id: str = self.post("authenticate", body)["worker_id"]
        return worker_id

    def cycle_request(self, worker_id: str) -> dict[str, Any]:
        body = {"worker_id": worker_id, "model": self.process, "version": "1"}
        return self.post("cycle-request", cbor2.dumps(body))

    def get_model(self, worker_id: str, request_key: str) -> int:
        params = {"worker_id": worker_id, "request_key": request_key}
        answer = self.http.get(f"{PREFIX}/get-model", params=params)
        answer.raise_for_status()
        return len(answer.content)

    @staticmethod
    def report_body(worker_id: str, request_key: str, diff: bytes) -> bytes:
        body = {
            "worker_id": worker_id,
            "request_key": request_key,
            "diff": diff,
            "num_samples": 8,
        }
        return cbor2.dumps(body)

    def report(self, body: bytes) -> dict[str, Any]:
        return self.post("report", body)


def post_report(client: WorkerClient, body: bytes) -> tuple[bool, int]:
    """POST one report: ``(acknowledged, times resent)``.

    Not acknowledged means ``cycle_closed``: its cycle filled while it was in
    flight. The server has answered ``unknown_assignment`` to reports sent
    right after their accepted cycle-request, and accepted the same report
    sent again later, so such a report is resent and counted.
    """
    for resends in range(MAX_RESENDS):
        try:
            client.report(body)
            return True, resends
        except Refused as exc:
            if exc.code == "cycle_closed":
                return False, resends
            if exc.code != "unknown_assignment":
                raise
            time.sleep(RESEND_PAUSE_S)
    raise RuntimeError(f"unknown_assignment {MAX_RESENDS} times in a row")


def sqlite_line() -> str:
    """The SQLite the server links (the same module as this script's)."""
    db = sqlite3.connect(":memory:")
    try:
        (secure_delete,) = db.execute("PRAGMA secure_delete").fetchone()
    finally:
        db.close()
    built = "on" if secure_delete else "off"
    return (
        f"SQLite {sqlite3.sqlite_version} (secure_delete {built} as built; serve "
        "sets FAST)"
    )


# ---------------------------------------------------------------- a sender


@dataclass
class Sender:
    """One concurrent client: its devices, its connection, its counts."""

    client: WorkerClient
    devices: list[str]
    pool: Sequence[bytes]
    quota: int
    next_device: int = 0
    worker_id: str = ""
    request_key: str = ""
    acknowledged: int = 0
    closed_refusals: int = 0
    unknown_refusals: int = 0
    cycle_over: int = 0
    post_s: list[float] = field(default_factory=list)
    request_s: list[float] = field(default_factory=list)
    error: BaseException | None = None

    def assign(self) -> None:
        """Get an assignment for the next device that may join the open cycle."""
        for _ in range(MAX_REJECTIONS):
            worker_id = self.devices[self.next_device % len(self.devices)]
            self.next_device += 1
            answer = self.client.cycle_request(worker_id)
            if answer["status"] == "accepted":
                self.worker_id, self.request_key = worker_id, answer["request_key"]
                return
            if answer["reason"] == "cycle over":
                # The server says retry in 1 s; one sender stands for many
                # devices, so it retries soon instead of idling that long.
                self.cycle_over += 1
                time.sleep(REJECTION_PAUSE_S)
            elif answer["reason"] != "already assigned":
                raise RuntimeError(f"cycle-request rejected: {answer}")
        raise RuntimeError(f"no assignment after {MAX_REJECTIONS} cycle-requests")

    def send(self, body: bytes) -> bool:
        """POST one report; True when acknowledged, False when its cycle closed."""
        is_acknowledged, resends = post_report(self.client, body)
        self.unknown_refusals += resends
        return is_acknowledged

    def run(self, start: threading.Barrier, deadline: float) -> None:
        try:
            start.wait()
            attempts = 0
            while self.acknowledged < self.quota and time.monotonic() < deadline:
                attempts += 1
                if attempts > 3 * self.quota + 10:
                    raise RuntimeError("too many refused reports")
                diff = self.pool[attempts % len(self.pool)]
                body = self.client.report_body(self.worker_id, self.request_key, diff)
                started = time.perf_counter()
                if self.send(body):
                    self.acknowledged += 1
                else:
                    self.closed_refusals += 1
                posted = time.perf_counter()
                self.assign()
                self.post_s.append(posted - started)
                self.request_s.append(time.perf_counter() - posted)
        except BaseException as exc:
            self.error = exc


def quantile(values: Sequence[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


@dataclass
class Result:
    workers: int
    acknowledged: int
    closed_refusals: int
    unknown_refusals: int
    cycle_over: int
    seconds: float
    post_s: list[float]
    request_s: list[float]
    closes: int


def run_concurrency(
    server: Server,
    name: str,
    workers: int,
    reports: int,
    max_diffs: int,
    pool: Sequence[bytes],
    max_seconds: float,
) -> Result:
    """Send ``reports`` reports from ``workers`` threads; time the loop."""
    clients = [WorkerClient(server.url, name) for _ in range(workers)]
    try:
        senders = []
        for index, client in enumerate(clients):
            devices = [client.authenticate() for _ in range(max_diffs + 1)]
            quota = reports // workers + (index < reports % workers)
            sender = Sender(client, devices, pool, quota)
            sender.assign()
            senders.append(sender)
        before = checkpoints_of(server, name)

        start = threading.Barrier(workers + 1, timeout=60)
        threads = [
            threading.Thread(
                target=sender.run, args=(start, time.monotonic() + max_seconds)
            )
            for sender in senders
        ]
        for thread in threads:
            thread.start()
        start.wait()
        started = time.perf_counter()
        for thread in threads:
            thread.join(timeout=max_seconds + 120)
        seconds = time.perf_counter() - started
    finally:
        for client in clients:
            client.close()

    for sender in senders:
        if sender.error is not None:
            raise RuntimeError(f"a sender failed: {sender.error!r}") from sender.error
    return Result(
        workers=workers,
        acknowledged=sum(sender.acknowledged for sender in senders),
        closed_refusals=sum(sender.closed_refusals for sender in senders),
        unknown_refusals=sum(sender.unknown_refusals for sender in senders),
        cycle_over=sum(sender.cycle_over for sender in senders),
        seconds=seconds,
        post_s=[value for sender in senders for value in sender.post_s],
        request_s=[value for sender in senders for value in sender.request_s],
        closes=checkpoints_of(server, name) - before,
    )


def process_status(server: Server, name: str) -> dict[str, Any]:
    for entry in server.status()["processes"]:
        if entry["name"] == name:
            return dict(entry)
    raise RuntimeError(f"process {name} is not in /status")


def checkpoints_of(server: Server, name: str) -> int:
    return int(process_status(server, name)["checkpoints"])


def http_floor(server: Server, name: str, diff: bytes, posts: int) -> float:
    """Median seconds to POST ``diff`` to the speed test, which discards it."""
    client = WorkerClient(server.url, name)
    try:
        params = {"worker_id": client.authenticate()}
        times = []
        for _ in range(posts):
            started = time.perf_counter()
            answer = client.http.post(
                f"{PREFIX}/speed-test", params=params, content=diff
            )
            answer.raise_for_status()
            times.append(time.perf_counter() - started)
    finally:
        client.close()
    return quantile(times, 0.5)


def print_result(result: Result, diff_bytes: int) -> None:
    rate = result.acknowledged / result.seconds
    post_ms = [1000 * value for value in result.post_s]
    request_ms = 1000 * quantile(result.request_s, 0.5)
    # The report path alone: each sender's time inside its report POSTs.
    report_rate = result.workers * len(result.post_s) / sum(result.post_s)
    print(
        f"{result.workers:>7} {result.acknowledged:>7} {result.closed_refusals:>7} "
        f"{result.closes:>6} {result.seconds:>7.2f} {rate:>9.1f} "
        f"{rate * diff_bytes / 1e6:>6.1f} {report_rate:>9.1f} "
        f"{quantile(post_ms, 0.5):>7.1f} "
        f"{quantile(post_ms, 0.95):>7.1f} {max(post_ms):>7.1f} {request_ms:>7.1f}"
    )


def check_counts(server: Server, name: str, result: Result, max_diffs: int) -> None:
    """Print whether ``/status`` counts every acknowledged report."""
    entry = process_status(server, name)
    counted = (entry["checkpoints"] - 1) * max_diffs + entry["diffs"]
    verdict = "ok" if counted == result.acknowledged else "MISMATCH"
    print(
        f"/status {name}: {entry['checkpoints']} checkpoints, {entry['diffs']} "
        f"diffs in open cycle {entry['cycle']} -> {counted} reports counted, "
        f"{result.acknowledged} acknowledged: {verdict}"
    )


def print_log_summary(server: Server) -> None:
    log = server.log()
    closes = re.findall(r"averaged into checkpoint \d+ in ([\d.]+) s", log)
    if closes:
        times = sorted(float(value) for value in closes)
        print(
            f"cycle closes logged: {len(times)}, median {quantile(times, 0.5):.2f} s, "
            f"max {times[-1]:.2f} s (the write lock is held meanwhile)"
        )
    for line in log.splitlines():
        if " WARNING " in line or " ERROR " in line or "WAL of" in line:
            print(f"server log: {line}")


# ---------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--params", type=int, default=1_000_000)
    parser.add_argument("--reports", type=int, default=300, help="per concurrency")
    parser.add_argument("--max-diffs", type=int, default=50)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--pool", type=int, default=4, help="distinct diffs")
    parser.add_argument("--max-seconds", type=float, default=90.0)
    parser.add_argument("--dir", default="/tmp", help="folder on the disk to use")
    args = parser.parse_args()

    shapes = model_shapes(args.params)
    plan = training_plan(shapes["bias"][0])
    pool = diff_pool(shapes, args.pool)
    diff_bytes = len(pool[0])
    server_config = {
        "num_cycles": 0,
        "cycle_length": 3600,
        "max_diffs": args.max_diffs,
        "minimum_upload_speed": 0,
        "minimum_download_speed": 0,
    }
    layout = ", ".join(f"{key} {list(shape)}" for key, shape in shapes.items())
    print(
        f"model: {parameter_count(shapes):,} float32 parameters ({layout}); "
        f"diff document {diff_bytes / 1e6:.2f} MB; {args.pool} distinct diffs"
    )

    with running_server(args.dir) as server:
        names = {workers: f"bench-report-{workers}" for workers in args.workers}
        for name in names.values():
            host(server, name, shapes, plan, server_config)
        print(
            f"server: pid {server.pid}, default serve flags ({runtime_line(server)}), "
            f"WAL with synchronous=FULL, {sqlite_line()}, db on "
            f"{filesystem_of(server.db_path)} at {server.db_path}"
        )
        print(f"server_config: {server_config}, max_workers unset")
        floor_ms = 1000 * http_floor(server, names[args.workers[0]], pool[0], 50)
        print(
            f"HTTP floor: POST of one diff to /model-centric/speed-test "
            f"(read and discarded) takes {floor_ms:.1f} ms (median of 50)"
        )
        print(
            "timed: each sender's loop of report POST + the next cycle-request; "
            "path/s: the report path alone (senders x POSTs / time inside them); "
            "POST columns are the report alone, in ms"
        )
        print(
            f"{'workers':>7} {'reports':>7} {'refused':>7} {'closes':>6} "
            f"{'seconds':>7} {'reports/s':>9} {'MB/s':>6} {'path/s':>9} "
            f"{'POST50':>7} {'POST95':>7} {'POSTmax':>7} {'CR50':>7}"
        )
        results = {}
        for workers, name in names.items():
            results[workers] = run_concurrency(
                server,
                name,
                workers,
                args.reports,
                args.max_diffs,
                pool,
                args.max_seconds,
            )
            print_result(results[workers], diff_bytes)

        print(
            "refused: reports answered cycle_closed (their cycle filled while "
            "they were in flight), not counted; CR50: median cycle-request ms"
        )
        for workers, result in results.items():
            print(
                f"{workers} workers: {result.cycle_over} cycle-requests answered "
                f"'cycle over'; {result.unknown_refusals} reports answered "
                "unknown_assignment right after their accepted cycle-request, "
                "then accepted when sent again"
            )
        for workers, name in names.items():
            check_counts(server, name, results[workers], args.max_diffs)
        print_log_summary(server)


if __name__ == "__main__":
    main()

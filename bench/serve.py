"""Serving a 40 MB checkpoint to 100 concurrent downloads, beside nginx.

    python bench/serve.py [--downloads 100] [--repeat 5] [--client discard]
                          [--reference auto|nginx|python]

nimble-edge runs as users run it (``nimble_edge.py serve`` in its own
process, on a free loopback port) and hosts a process whose model has
10,004,000 float32 parameters. As many workers as there are downloads
authenticate and are admitted to its cycle before anything is timed; one
warm-up download fills the server's checkpoint cache. Each timed run is
that many concurrent ``GET /model-centric/get-model`` requests, one
connection each, with ``Connection: close``.

The reference is a static file server holding the same bytes at the same
path, so both get byte-identical request lines: nginx (``/usr/sbin/nginx``,
``apt-get install nginx``) run here as one process with a generated config
(``master_process off``, ``sendfile on``), else Python's ``http.server``.
The client is its own process and treats both servers alike: asyncio on
raw non-blocking sockets, one shared receive buffer. By default
(``--client discard``) the body is received with ``MSG_TRUNC``, which on
TCP drops the bytes in the kernel without copying them, and counted.
Measured here per run of 4 GB, that client spent 0.4-1.1 CPU seconds;
``--client copy`` (``recv_into`` the buffer) spent 1.2-1.4 s, and
``--client curl`` (one ``curl -s -o /dev/null`` per download) 1.8-2.1 s
and tripled nginx's own CPU with its smaller reads. The client's and the
server's CPU seconds are printed beside every run, so a starved side shows.
On loopback the kernel's TCP work is charged to whichever process sets it
off: nginx's sendfile fills the socket once and the client's ACKs push the
rest, so nginx runs cost the client more; compare the sums.

Runs alternate between the two servers (the machine is shared and noisy);
every run is printed, and the summary compares the best of each. Memory is
the server process's resident set before a run and its high-water mark
during it (``VmHWM``, reset by writing 5 to ``/proc/<pid>/clear_refs``,
which needs root or the same user). Targets: at least 80% of the
reference's throughput, and under 50 MB of extra server memory.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import importlib.metadata
import importlib.util
import json
import math
import os
import resource
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from subprocess import PIPE
from typing import Any
from urllib.parse import urlencode

ROOT = Path(__file__).resolve().parent.parent
NGINX = Path("/usr/sbin/nginx")
HOST = "127.0.0.1"
SHAPES = [(3000, 2000), (2000,), (2000, 1500), (1500,), (1500, 667)]
NAME, VERSION = "serve-bench", "1"
MODEL_PATH = "/model-centric/get-model"
RECEIVE_BYTES = 1 << 20
HEAD_LIMIT_BYTES = 1 << 16
RUN_TIMEOUT_S = 120.0
START_TIMEOUT_S = 15.0
MB = 1e6
CLIENTS = {
    "discard": "asyncio on raw sockets, bodies dropped by recv(MSG_TRUNC)",
    "copy": "asyncio on raw sockets, bodies copied by recv_into",
    "curl": "one curl -s -o /dev/null per download",
}

NGINX_CONF = """\
daemon off;
master_process off;
worker_processes 1;
pid {directory}/nginx.pid;
error_log {directory}/nginx-error.log warn;
events {{
    worker_connections 1024;
}}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    default_type application/cbor;
    client_body_temp_path {directory}/nginx-body;
    proxy_temp_path {directory}/nginx-proxy;
    fastcgi_temp_path {directory}/nginx-fastcgi;
    uwsgi_temp_path {directory}/nginx-uwsgi;
    scgi_temp_path {directory}/nginx-scgi;
    server {{
        listen {host}:{port};
        root {root};
    }}
}}
"""


# ---------------------------------------------------------------- client


class Download:
    """One GET on its own non-blocking socket; the body is counted, not kept."""

    def __init__(self, sock: socket.socket, buffer: memoryview, flags: int) -> None:
        self.sock = sock
        self.buffer = buffer
        self.flags = flags
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.head = bytearray()
        self.status = 0
        self.length = -1
        self.body_bytes = 0
        self.finished_at = 0.0

    def readable(self) -> None:
        # Every socket receives into the same buffer: nothing is read from it.
        flags = self.flags if self.status else 0
        try:
            received = self.sock.recv_into(self.buffer, 0, flags)
        except BlockingIOError:
            return
        except OSError as exc:
            self.finish(exc)
            return
        if received == 0:
            self.finish(None)
        elif self.status:
            self.body_bytes += received
        else:
            self.parse_head(received)

    def parse_head(self, received: int) -> None:
        self.head += self.buffer[:received]
        end = self.head.find(b"\r\n\r\n")
        if end < 0:
            if len(self.head) > HEAD_LIMIT_BYTES:
                self.finish(ValueError("no end of headers in the first 64 KiB"))
            return
        lines = bytes(self.head[:end]).decode("latin-1").split("\r\n")
        self.status = int(lines[0].split()[1])
        for line in lines[1:]:
            key, _, value = line.partition(":")
            if key.strip().lower() == "content-length":
                self.length = int(value)
        self.body_bytes = len(self.head) - end - 4
        self.head.clear()

    def finish(self, exc: Exception | None) -> None:
        self.finished_at = time.perf_counter()
        if self.done.done():
            return
        if exc is None:
            self.done.set_result(None)
        else:
            self.done.set_exception(exc)


async def fetch_asyncio(
    port: int, targets: list[str], flags: int
) -> tuple[float, list[Any]]:
    loop = asyncio.get_running_loop()
    buffer = memoryview(bytearray(RECEIVE_BYTES))

    async def one(target: str) -> Download:
        request = (
            f"GET {target} HTTP/1.1\r\nHost: {HOST}:{port}\r\nConnection: close\r\n\r\n"
        ).encode()
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.setblocking(False)
            await loop.sock_connect(sock, (HOST, port))
            await loop.sock_sendall(sock, request)
            download = Download(sock, buffer, flags)
            loop.add_reader(sock.fileno(), download.readable)
            try:
                await download.done
            finally:
                loop.remove_reader(sock.fileno())
        return download

    started = time.perf_counter()
    downloads = await asyncio.wait_for(
        asyncio.gather(*(one(target) for target in targets)), RUN_TIMEOUT_S
    )
    seconds = max(d.finished_at for d in downloads) - started
    results = [(d.status, d.body_bytes, d.length) for d in downloads]
    return seconds, results


def fetch_curl(port: int, targets: list[str]) -> tuple[float, list[Any]]:
    deadline = time.monotonic() + RUN_TIMEOUT_S
    curl = ["curl", "-s", "-o", "/dev/null", "-H", "Connection: close"]
    curl += ["-w", "%{http_code} %{size_download}"]
    started = time.perf_counter()
    children = [
        subprocess.Popen([*curl, f"http://{HOST}:{port}{target}"], stdout=PIPE)
        for target in targets
    ]
    results = []
    try:
        for child in children:
            out, _ = child.communicate(timeout=max(0.1, deadline - time.monotonic()))
            status, size = out.decode().split()
            results.append((int(status), int(size), int(size)))
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()
    return time.perf_counter() - started, results


def run_client(args: argparse.Namespace) -> None:
    """The child: one timed run against one server; prints a JSON line."""
    targets = json.loads(Path(args.targets).read_text())
    if args.client == "curl":
        seconds, results = fetch_curl(args.port, targets)
    else:
        # MSG_TRUNC on a TCP socket drops the bytes in the kernel, uncopied.
        flags = socket.MSG_TRUNC if args.client == "discard" else 0
        seconds, results = asyncio.run(fetch_asyncio(args.port, targets, flags))
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_s = sum(u.ru_utime + u.ru_stime for u in (own, children))
    complete = sum(
        status == 200 and size == args.expect_bytes == length
        for status, size, length in results
    )
    statuses = Counter(str(status) for status, _, _ in results)
    answer = {
        "seconds": seconds,
        "bytes": sum(size for _, size, _ in results),
        "complete": complete,
        "statuses": dict(statuses),
        "client_cpu_s": cpu_s,
    }
    print(json.dumps(answer))


# ---------------------------------------------------------------- servers


def proc_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/{pid}/status has no {field} line")


def cpu_seconds(pid: int) -> tuple[float, float]:
    """User and system CPU seconds of every thread of ``pid`` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    # utime and stime are fields 14 and 15 of stat(5); the command name,
    # which may hold spaces, ends at the last parenthesis.
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def wait_listening(process: subprocess.Popen[bytes], port: int) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the reference exited with status {process.returncode}")
        try:
            with socket.create_connection((HOST, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"the reference did not listen on port {port} in time")


def stop_process(process: subprocess.Popen[bytes]) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def start_reference(
    kind: str, directory: Path, root: Path, port: int
) -> subprocess.Popen[bytes]:
    log = (directory / "reference.log").open("ab")
    if kind == "nginx":
        conf = directory / "nginx.conf"
        conf.write_text(
            NGINX_CONF.format(directory=directory, host=HOST, port=port, root=root)
        )
        command = [str(NGINX), "-p", str(directory), "-c", str(conf)]
        command += ["-e", str(directory / "nginx-error.log")]
    else:
        command = [sys.executable, "-m", "http.server", str(port), "--bind", HOST]
        command += ["--directory", str(root)]
    process = subprocess.Popen(command, stdout=log, stderr=log)
    log.close()
    try:
        wait_listening(process, port)
    except BaseException:
        stop_process(process)
        raise
    return process


def reference_label(kind: str) -> str:
    if kind == "python":
        return f"Python {sys.version.split()[0]} http.server (ThreadingHTTPServer)"
    found = subprocess.run([str(NGINX), "-v"], capture_output=True, text=True)
    version = found.stderr.strip().rpartition("/")[2]
    return f"nginx {version} ({NGINX}, master_process off, sendfile on)"


def host_model(address: str, token: str) -> None:
    """Host a process with a 10M-parameter model and no plans (none is run)."""
    import torch

    from plan_runtime import ModelCentricFLClient

    generator = torch.Generator().manual_seed(0)
    model = {
        f"layer{index}": torch.randn(shape, generator=generator) * 0.01
        for index, shape in enumerate(SHAPES)
    }
    client = ModelCentricFLClient(address, secure=False, token=token)
    client.connect()
    try:
        client.host_federated_training(
            model=model,
            client_plans={},
            client_protocols={},
            server_averaging_plan=None,
            client_config={"name": NAME, "version": VERSION, "batch_size": 8},
            server_config={
                "num_cycles": 1,
                "cycle_length": 86400,
                "minimum_upload_speed": 0,
                "minimum_download_speed": 0,
            },
        )
    finally:
        client.close()


def admit_workers(url: str, count: int) -> list[str]:
    """Authenticate ``count`` workers and admit each; their get-model targets."""
    import httpx

    targets = []
    headers = {"Accept": "application/json"}
    with httpx.Client(base_url=url, headers=headers, timeout=30) as client:
        for _ in range(count):
            body = {"model_name": NAME, "model_version": VERSION}
            answer = client.post("/model-centric/authenticate", json=body).json()
            worker_id = answer["worker_id"]
            body = {"worker_id": worker_id, "model": NAME, "version": VERSION}
            answer = client.post("/model-centric/cycle-request", json=body).json()
            if answer.get("status") != "accepted":
                raise RuntimeError(f"cycle-request was not accepted: {answer}")
            query = urlencode(
                {
                    "worker_id": worker_id,
                    "request_key": answer["request_key"],
                    "model_id": answer["model_id"],
                }
            )
            targets.append(f"{MODEL_PATH}?{query}")
    return targets


def server_stack(pid: int) -> str:
    """The event loop and HTTP parser uvicorn picked, as the server shows it."""
    maps = Path(f"/proc/{pid}/maps").read_text()
    parts = []
    for module, fallback in (("uvloop", "asyncio"), ("httptools", "h11")):
        if importlib.util.find_spec(module) is None:
            parts.append(f"{fallback} ({module} is not installed)")
            continue
        loaded = f"/{module}/" in maps
        version = importlib.metadata.version(module)
        where = "loaded in the server" if loaded else "NOT loaded in the server"
        parts.append(f"{module} {version} ({where})")
    uvicorn = importlib.metadata.version("uvicorn")
    return f"uvicorn {uvicorn}, loop: {parts[0]}, HTTP parser: {parts[1]}"


# ---------------------------------------------------------------- parent


@dataclass
class Run:
    server: str
    seconds: float
    bytes: int
    complete: int
    statuses: dict[str, int]
    client_cpu_s: float
    server_user_s: float
    server_sys_s: float
    rss_bytes: int
    peak_bytes: int

    @property
    def mb_per_s(self) -> float:
        return self.bytes / self.seconds / MB

    @property
    def extra_bytes(self) -> int:
        return self.peak_bytes - self.rss_bytes


def measure(
    name: str, pid: int, port: int, client: str, targets: Path, size: int
) -> Run:
    # Writing 5 resets VmHWM to the current resident set (Linux 4.0+).
    Path(f"/proc/{pid}/clear_refs").write_text("5")
    rss = proc_kib(pid, "VmRSS")
    user, system = cpu_seconds(pid)
    command = [sys.executable, __file__, "--run-client", "--client", client]
    command += ["--port", str(port), "--targets", str(targets)]
    command += ["--expect-bytes", str(size)]
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=RUN_TIMEOUT_S + 30
    )
    if done.returncode != 0:
        raise RuntimeError(f"the client failed on {name}:\n{done.stderr[-2000:]}")
    answer = json.loads(done.stdout.strip().splitlines()[-1])
    user_after, system_after = cpu_seconds(pid)
    return Run(
        server=name,
        server_user_s=user_after - user,
        server_sys_s=system_after - system,
        rss_bytes=rss,
        peak_bytes=proc_kib(pid, "VmHWM"),
        **answer,
    )


def print_run(number: int, run: Run, count: int) -> None:
    print(
        f"{number:>3}  {run.server:<12} {run.seconds:>7.2f} {run.mb_per_s:>8.0f} "
        f"{run.complete:>4}/{count:<4} {run.client_cpu_s:>7.2f} "
        f"{run.server_user_s:>7.2f} {run.server_sys_s:>7.2f} "
        f"{run.rss_bytes / MB:>7.0f} "
        f"{run.peak_bytes / MB:>8.0f} {run.extra_bytes / MB:>8.1f}",
        flush=True,
    )


def check_headers(url: str, target: str) -> bytes:
    """Print get-model's headers and the conditional answer; return the body."""
    import httpx

    started = time.perf_counter()
    response = httpx.get(url + target, timeout=60)
    seconds = time.perf_counter() - started
    response.raise_for_status()
    body = response.content
    etag = response.headers.get("etag")
    print(
        f"warm-up: one download filled the server's checkpoint cache "
        f"({seconds:.2f} s); status {response.status_code}, "
        f"Content-Length {response.headers.get('content-length')} "
        f"(body {len(body):,} bytes), ETag {etag}, "
        f"Content-Type {response.headers.get('content-type')}, "
        f"Cache-Control {response.headers.get('cache-control')}"
    )
    if etag is None:
        print("If-None-Match: not checked, the response has no ETag")
        return body
    again = httpx.get(url + target, headers={"If-None-Match": etag}, timeout=60)
    verdict = "ok" if again.status_code == 304 and not again.content else "WRONG"
    print(
        f"If-None-Match {etag}: status {again.status_code}, "
        f"{len(again.content)} body bytes, ETag {again.headers.get('etag')} "
        f"({verdict})"
    )
    return body


def publish(directory: Path, body: bytes) -> Path:
    """Write ``body`` where a static server rooted at the result serves it."""
    root = directory / "www"
    served = root / MODEL_PATH.lstrip("/")
    served.parent.mkdir(parents=True)
    served.write_bytes(body)
    # A non-root nginx worker must reach the file through the temp dir.
    for path in (directory, root, served.parent):
        path.chmod(0o755)
    served.chmod(0o644)
    return root


def compare(
    sides: list[tuple[str, int, int]],
    client: str,
    targets: Path,
    size: int,
    count: int,
    repeat: int,
) -> dict[str, list[Run]]:
    """Alternate the sides ``repeat`` times, printing every run."""
    print(
        "\nCPU in seconds: the client's (user+sys, curls included), the "
        "server's user and sys; memory in MB: the server's RSS before the "
        "run, its peak during it, and the difference"
    )
    print(
        f"{'run':>3}  {'server':<12} {'s':>7} {'MB/s':>8} {'complete':>9} "
        f"{'client':>7} {'srv usr':>7} {'srv sys':>7} {'RSS':>7} {'peak':>8} "
        f"{'extra':>8}"
    )
    runs: dict[str, list[Run]] = {name: [] for name, _, _ in sides}
    for number in range(1, repeat + 1):
        for name, pid, port in sides:
            run = measure(name, pid, port, client, targets, size)
            runs[name].append(run)
            print_run(number, run, count)
    return runs


def benchmark(args: argparse.Namespace, reference: str, directory: Path) -> None:
    import httpx

    import nimble_edge

    token = secrets.token_urlsafe(16)
    port = nimble_edge.free_port()
    url = f"http://{HOST}:{port}"
    log_path = directory / "serve.log"
    with log_path.open("ab") as log:
        server = nimble_edge.start_server(
            directory / "edge.sqlite", port, token, log_level="info", log_file=log
        )
    ref_process = None
    try:
        print(f"nimble-edge {nimble_edge.__version__}: {server_stack(server.pid)}")
        started = time.perf_counter()
        host_model(f"{HOST}:{port}", token)
        hosted_s = time.perf_counter() - started
        targets = admit_workers(url, args.downloads)
        admitted_s = time.perf_counter() - started - hosted_s
        print(
            f"hosted {NAME}@{VERSION} ({sum(map(math.prod, SHAPES)):,} float32 "
            f"parameters) in {hosted_s:.1f} s; {len(targets)} workers "
            f"authenticated and admitted in {admitted_s:.1f} s"
        )

        body = check_headers(url, targets[0])
        size, digest = len(body), hashlib.sha256(body).hexdigest()
        root = publish(directory, body)
        del body
        ref_port = nimble_edge.free_port()
        ref_process = start_reference(reference, directory, root, ref_port)
        ref_url = f"http://{HOST}:{ref_port}{targets[0]}"
        ref_digest = hashlib.sha256(httpx.get(ref_url, timeout=60).content)
        same = ref_digest.hexdigest() == digest
        print(
            f"reference: {reference_label(reference)}, "
            f"same bytes at the same path: {'yes' if same else 'NO'}"
        )
        if not same:
            raise RuntimeError("the reference does not serve the same bytes")

        targets_file = directory / "targets.json"
        targets_file.write_text(json.dumps(targets))
        print(
            f"client: {CLIENTS[args.client]}, in its own process; "
            f"{len(targets)} concurrent GETs of {size:,} bytes, Connection: "
            f"close; runs alternate, {args.repeat} each"
        )
        label = "nginx" if reference == "nginx" else "http.server"
        sides = [("nimble-edge", server.pid, port), (label, ref_process.pid, ref_port)]
        runs = compare(
            sides, args.client, targets_file, size, len(targets), args.repeat
        )
        summarize(runs, label, len(targets))
    finally:
        if ref_process is not None:
            stop_process(ref_process)
        nimble_edge.stop_server(server)

    faults = [line for line in log_path.read_text().splitlines() if " ERROR " in line]
    print(f"server log: {len(faults)} ERROR lines", *faults[:5], sep="\n  ")


def summarize(runs: dict[str, list[Run]], reference: str, count: int) -> None:
    ours, theirs = runs["nimble-edge"], runs[reference]
    best_ours = max(run.mb_per_s for run in ours)
    best_theirs = max(run.mb_per_s for run in theirs)
    median_ours = statistics.median(run.mb_per_s for run in ours)
    median_theirs = statistics.median(run.mb_per_s for run in theirs)
    ratio = best_ours / best_theirs
    extra_ours = max(run.extra_bytes for run in ours) / MB
    extra_theirs = max(run.extra_bytes for run in theirs) / MB
    incomplete = sum(count - run.complete for run in ours + theirs)

    print(
        f"\nthroughput, best of {len(ours)}: nimble-edge {best_ours:.0f} MB/s, "
        f"{reference} {best_theirs:.0f} MB/s, ratio {ratio:.2f} "
        f"(median {median_ours:.0f} vs {median_theirs:.0f} MB/s, "
        f"ratio {median_ours / median_theirs:.2f})"
    )
    print(
        f"extra server memory, highest of {len(ours)}: nimble-edge "
        f"{extra_ours:.1f} MB, {reference} {extra_theirs:.1f} MB"
    )
    print(
        f"target: throughput >= 80% of {reference}: "
        f"{'met' if ratio >= 0.8 else 'MISSED'} ({ratio:.0%}); "
        f"extra memory < 50 MB: {'met' if extra_ours < 50 else 'MISSED'} "
        f"({extra_ours:.1f} MB)"
    )
    if incomplete:
        print(f"WARNING: {incomplete} downloads were incomplete or not 200")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--downloads", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument(
        "--client", choices=("discard", "copy", "curl"), default="discard"
    )
    parser.add_argument(
        "--reference", choices=("auto", "nginx", "python"), default="auto"
    )
    parser.add_argument("--run-client", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--targets", help=argparse.SUPPRESS)
    parser.add_argument("--expect-bytes", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run_client:
        run_client(args)
        return

    if not 1 <= args.downloads <= 1000 or not 1 <= args.repeat <= 20:
        parser.error("--downloads must be 1 to 1000 and --repeat 1 to 20")
    if args.client == "curl" and shutil.which("curl") is None:
        parser.error("--client curl needs curl on PATH")
    reference = args.reference
    if reference == "auto":
        reference = "nginx" if NGINX.is_file() else "python"
    elif reference == "nginx" and not NGINX.is_file():
        parser.error(f"--reference nginx needs {NGINX} (apt-get install nginx)")
    sys.path.insert(0, str(ROOT))
    with tempfile.TemporaryDirectory(prefix="nimble-serve-bench-") as directory:
        benchmark(args, reference, Path(directory))


if __name__ == "__main__":
    main()

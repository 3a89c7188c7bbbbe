"""The worker library: what a device runs to take part in training.

A device creates one :class:`Worker` for a server, then one job per hosted
process, and starts the job once per cycle it wants to join::

    worker = Worker("127.0.0.1:7000", auth_token=None)
    job = worker.new_job("digits", "1.0")

    def on_ready(model, plans, client_config):
        params = list(model.values())
        for _ in range(client_config["max_updates"]):
            loss, acc, *params = plans["training_plan"](xs, ys, 64, 0.01, params)
        job.report(job.create_diff(params), num_samples=len(xs))

    job.on_ready = on_ready
    job.start()
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from plan_runtime.http import Connection, ServerError
from plan_runtime.plan import DEFAULT_MAX_MEMORY_BYTES, Plan
from plan_runtime.state import decode_state, encode_state

__all__ = ["Job", "ServerError", "Worker"]

logger = logging.getLogger(__name__)

ReadyCallback = Callable[
    [dict[str, torch.Tensor], dict[str, Plan], dict[str, Any]], Any
]
RejectedCallback = Callable[[float | None], Any]
ErrorCallback = Callable[[Exception], Any]


class Worker:
    """A device's link to one server.

    Args:
        address: ``"host:port"`` or a full ``http(s)://`` URL.
        auth_token: the JWT the process's authentication expects, if any.
        secure: use HTTPS when ``address`` has no scheme.
        timeout_s: per-request timeout in seconds.
        max_plan_memory_bytes: refuse a downloaded plan whose dry run holds
            more than this at once (1 GiB by default); the job's ``on_error``
            then gets the :class:`~plan_runtime.plan.PlanError`.
    """

    def __init__(
        self,
        address: str,
        auth_token: str | None = None,
        *,
        secure: bool = False,
        timeout_s: float = 60.0,
        max_plan_memory_bytes: int = DEFAULT_MAX_MEMORY_BYTES,
    ):
        self.auth_token = auth_token
        self.max_plan_memory_bytes = max_plan_memory_bytes
        self.connection = Connection(address, secure=secure, timeout_s=timeout_s)
        self.speed_test_bytes = 1024 * 1024
        self._worker_ids: dict[tuple[str, str | None], str] = {}
        self._needs_speed_test: dict[str, bool] = {}

    def __enter__(self) -> Worker:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self.connection.close()

    def new_job(
        self,
        name: str,
        version: str | None = None,
        *,
        on_ready: ReadyCallback | None = None,
        on_rejected: RejectedCallback | None = None,
        on_error: ErrorCallback | None = None,
    ) -> Job:
        """A job for the process ``name`` (newest version when none is given)."""
        return Job(self, name, version, on_ready, on_rejected, on_error)

    def worker_id(self, name: str, version: str | None) -> str:
        """Authenticate once per process and remember the id the server gave."""
        key = (name, version)
        if key not in self._worker_ids:
            body: dict[str, Any] = {"model_name": name, "model_version": version}
            if self.auth_token is not None:
                body["auth_token"] = self.auth_token
            answer = self.connection.call(
                "POST", "/model-centric/authenticate", body=body
            )
            self._worker_ids[key] = answer["worker_id"]
            self._needs_speed_test[answer["worker_id"]] = bool(
                answer.get("requires_speed_test")
            )
        return self._worker_ids[key]

    def forget(self, worker_id: str) -> None:
        """Drop a worker id the server no longer knows; the next job authenticates.

        The server forgets workers when their process is deleted, or hosted
        again under the same name.
        """
        for key in [k for k, v in self._worker_ids.items() if v == worker_id]:
            del self._worker_ids[key]
        self._needs_speed_test.pop(worker_id, None)

    def speed_test(self, worker_id: str) -> dict[str, float]:
        """Measure ping (ms) and download and upload speed (Mbit/s).

        Moves :attr:`speed_test_bytes` each way through the server's
        speed-test routes; the result goes into cycle requests of processes
        that set a minimum speed.
        """
        params = {"worker_id": worker_id}
        started = time.perf_counter()
        self.connection.request("GET", "/health")
        ping_s = time.perf_counter() - started

        started = time.perf_counter()
        response = self.connection.request(
            "GET",
            "/model-centric/speed-test",
            params={**params, "size_bytes": self.speed_test_bytes},
        )
        download_s = max(time.perf_counter() - started - ping_s, 1e-6)
        received = len(response.content)

        payload = bytes(self.speed_test_bytes)
        started = time.perf_counter()
        self.connection.request(
            "POST", "/model-centric/speed-test", params=params, content=payload
        )
        upload_s = max(time.perf_counter() - started - ping_s, 1e-6)
        return {
            "ping": ping_s * 1000,
            "download": received * 8 / download_s / 1e6,
            "upload": len(payload) * 8 / upload_s / 1e6,
        }

    def needs_speed_test(self, worker_id: str) -> bool:
        return self._needs_speed_test.get(worker_id, False)


class Job:
    """Joining one cycle of one process: request, download, train, report.

    Set the callbacks as attributes or through :meth:`Worker.new_job`:

    - ``on_ready(model, plans, client_config)``: the worker was admitted;
      ``model`` is the checkpoint as ``{name: tensor}``, ``plans`` maps plan
      names to callable :class:`~plan_runtime.plan.Plan` objects.
    - ``on_rejected(timeout_s)``: not admitted; ask again after
      ``timeout_s`` seconds, or never when it is None (training is over).
    - ``on_error(exc)``: a request failed; without this callback the
      exception propagates from :meth:`start`.
    """

    def __init__(
        self,
        worker: Worker,
        name: str,
        version: str | None,
        on_ready: ReadyCallback | None = None,
        on_rejected: RejectedCallback | None = None,
        on_error: ErrorCallback | None = None,
    ):
        self.worker = worker
        self.name = name
        self.version = version
        self.on_ready = on_ready
        self.on_rejected = on_rejected
        self.on_error = on_error
        self.worker_id: str | None = None
        self.request_key: str | None = None
        self.cycle: int | None = None
        self.client_config: dict[str, Any] = {}
        self.rejection: dict[str, Any] | None = None
        self._checkpoint: dict[str, torch.Tensor] = {}

    def start(self) -> bool:
        """Ask to join the open cycle and run the matching callback.

        Returns:
            True when the worker was admitted and ``on_ready`` ran.
        """
        try:
            return self._start()
        except Exception as exc:
            is_unknown = isinstance(exc, ServerError) and exc.code == "unknown_worker"
            if is_unknown and self.worker_id is not None:
                # Authenticate afresh on the next start, as the error says.
                self.worker.forget(self.worker_id)
            if self.on_error is None:
                raise
            self.on_error(exc)
            return False

    def _start(self) -> bool:
        connection = self.worker.connection
        self.worker_id = self.worker.worker_id(self.name, self.version)
        request: dict[str, Any] = {
            "worker_id": self.worker_id,
            "model": self.name,
            "version": self.version,
        }
        if self.worker.needs_speed_test(self.worker_id):
            request.update(self.worker.speed_test(self.worker_id))
        answer = connection.call("POST", "/model-centric/cycle-request", body=request)
        if answer.get("status") != "accepted":
            self.rejection = answer
            timeout = answer.get("timeout")
            logger.debug("Job %s rejected: %s", self.name, answer.get("reason"))
            if self.on_rejected is not None:
                self.on_rejected(None if timeout is None else float(timeout))
            return False

        self.rejection = None
        self.request_key = answer["request_key"]
        self.cycle = answer.get("cycle")
        self.version = answer.get("version", self.version)
        self.client_config = answer.get("client_config") or {}
        keys = {"worker_id": self.worker_id, "request_key": self.request_key}
        model = connection.request(
            "GET",
            "/model-centric/get-model",
            params={**keys, "model_id": answer["model_id"]},
        )
        self._checkpoint = decode_state(model.content)
        plans = {}
        for plan_name, plan_id in answer.get("plans", {}).items():
            response = connection.request(
                "GET",
                "/model-centric/get-plan",
                params={**keys, "plan_id": plan_id, "receive_operations_as": "list"},
            )
            plans[plan_name] = Plan.from_bytes(
                response.content, max_memory_bytes=self.worker.max_plan_memory_bytes
            )

        if self.on_ready is not None:
            model_copy = {name: t.clone() for name, t in self._checkpoint.items()}
            self.on_ready(model_copy, plans, self.client_config)
        return True

    def create_diff(
        self, updated: Sequence[torch.Tensor] | Mapping[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Return ``checkpoint - updated``, tensor by tensor, in checkpoint order.

        Raises:
            ValueError: ``updated`` does not match the checkpoint's tensors.
        """
        if not self._checkpoint:
            raise ValueError("create_diff needs a checkpoint: call start() first")
        names = list(self._checkpoint)
        if isinstance(updated, Mapping):
            missing = [n for n in names if n not in updated]
            if missing:
                raise ValueError(f"updated params lack {missing[0]!r}")
            values = [updated[n] for n in names]
        else:
            values = list(updated)
            if len(values) != len(names):
                raise ValueError(
                    f"got {len(values)} updated tensors; the checkpoint has "
                    f"{len(names)}"
                )
        diff = {}
        for name, value in zip(names, values):
            base = self._checkpoint[name]
            if tuple(value.shape) != tuple(base.shape):
                raise ValueError(
                    f"{name!r} has shape {list(value.shape)}; the checkpoint has "
                    f"{list(base.shape)}"
                )
            diff[name] = (base - value.detach().to(base.dtype)).contiguous()
        return diff

    def report(
        self,
        diff: Mapping[str, torch.Tensor] | Sequence[torch.Tensor],
        num_samples: int | None = None,
        metrics: Mapping[str, float] | None = None,
    ) -> dict[str, Any]:
        """Send the diff; the answer says which cycle it counted in.

        Sending the same report again (after a lost answer) is safe: the
        server counts it once.

        Raises:
            ServerError: the server refused the report (see ``code``).
        """
        if self.request_key is None:
            raise ValueError("report needs an assignment: call start() first")
        body: dict[str, Any] = {
            "worker_id": self.worker_id,
            "request_key": self.request_key,
            "diff": encode_state(diff),
        }
        if num_samples is not None:
            body["num_samples"] = int(num_samples)
        if metrics:
            body["metrics"] = {key: float(value) for key, value in metrics.items()}
        answer: dict[str, Any] = self.worker.connection.call(
            "POST", "/model-centric/report", body=body
        )
        return answer

"""The admin client: host a process and fetch its checkpoints."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from plan_runtime.http import Connection
from plan_runtime.plan import Plan
from plan_runtime.state import decode_state, encode_state

__all__ = ["ModelCentricFLClient"]

ModelLike = torch.nn.Module | Mapping[str, torch.Tensor] | Sequence[torch.Tensor]


def _model_state(
    model: ModelLike,
) -> Mapping[str, torch.Tensor] | Sequence[torch.Tensor]:
    if isinstance(model, torch.nn.Module):
        return {name: t.detach() for name, t in model.state_dict().items()}
    return model


def _plan_bytes(name: str, plan: Plan | bytes) -> bytes:
    if isinstance(plan, Plan):
        return plan.to_bytes()
    if isinstance(plan, (bytes, bytearray)):
        return bytes(plan)
    raise TypeError(f"plan {name!r} must be a Plan or bytes; got {type(plan).__name__}")


class ModelCentricFLClient:
    """Talks to the admin routes of a nimble-edge server.

    Args:
        address: ``"host:port"`` or a full ``http(s)://`` URL.
        secure: use HTTPS when ``address`` has no scheme.
        token: the admin token; ``NIMBLE_EDGE_ADMIN_TOKEN`` when not given.
        timeout_s: per-request timeout in seconds.
    """

    def __init__(
        self,
        address: str,
        secure: bool = False,
        token: str | None = None,
        *,
        timeout_s: float = 120.0,
    ):
        self.address = address
        self.secure = secure
        self.token = token or os.environ.get("NIMBLE_EDGE_ADMIN_TOKEN")
        self.timeout_s = timeout_s
        self._connection: Connection | None = None

    def connect(self) -> ModelCentricFLClient:
        """Open the connection and check that the server answers."""
        if self._connection is None:
            self._connection = Connection(
                self.address,
                secure=self.secure,
                token=self.token,
                timeout_s=self.timeout_s,
            )
        self._connection.call("GET", "/health")
        return self

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    def __enter__(self) -> ModelCentricFLClient:
        return self.connect()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def connection(self) -> Connection:
        if self._connection is None:
            self.connect()
        assert self._connection is not None
        return self._connection

    def host_federated_training(
        self,
        model: ModelLike,
        client_plans: Mapping[str, Plan | bytes],
        client_protocols: Mapping[str, bytes] | None = None,
        client_config: Mapping[str, Any] | None = None,
        server_averaging_plan: Plan | bytes | None = None,
        server_config: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Host a process: its model, plans and configs; opens cycle 1.

        The parameters keep the order of the PySyft-era client.
        ``client_config`` must hold the process's ``name`` and ``version``;
        it is handed to every admitted worker as is.

        Raises:
            TypeError: ``client_config`` or ``server_config`` is missing.
            ServerError: the server refused the process (see ``code``).
        """
        if client_config is None or server_config is None:
            raise TypeError("client_config and server_config are required")
        body = {
            "model": encode_state(_model_state(model)),
            "plans": {name: _plan_bytes(name, p) for name, p in client_plans.items()},
            "protocols": dict(client_protocols or {}),
            "averaging_plan": None
            if server_averaging_plan is None
            else _plan_bytes("averaging_plan", server_averaging_plan),
            "client_config": dict(client_config),
            "server_config": dict(server_config),
        }
        answer: dict[str, Any] = self.connection.call(
            "POST", "/model-centric/host-training", body=body
        )
        return answer

    def retrieve_model(
        self, name: str, version: str | None = None, checkpoint: int | str = "latest"
    ) -> dict[str, torch.Tensor]:
        """A checkpoint as ``{name: tensor}``: by number, or ``"latest"``."""
        params = {"name": name, "checkpoint": str(checkpoint)}
        if version is not None:
            params["version"] = version
        response = self.connection.request(
            "GET", "/model-centric/retrieve-model", params=params
        )
        return decode_state(response.content)

    def status(self) -> dict[str, Any]:
        """What the server hosts and how far each process has got, in detail."""
        answer: dict[str, Any] = self.connection.call("GET", "/status")
        return answer

    def list_processes(self) -> list[dict[str, Any]]:
        """Every hosted process with its cycle, counts and config (no secrets)."""
        processes: list[dict[str, Any]] = self.status()["processes"]
        return processes

    def delete_process(self, name: str, version: str) -> None:
        """Remove a process with its checkpoints, cycles and workers.

        Raises:
            ServerError: ``process_not_found`` when nothing is hosted under
                that name and version.
        """
        self.connection.call(
            "POST",
            "/model-centric/delete-process",
            body={"name": name, "version": version},
        )

    def reset_process(self, name: str, version: str) -> None:
        """Start a process again from checkpoint 1, with a new cycle 1."""
        self.connection.call(
            "POST",
            "/model-centric/reset-process",
            body={"name": name, "version": version},
        )

"""The admin client: host a process and fetch its checkpoints."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from plan_runtime.check import check
from plan_runtime.http import Connection
from plan_runtime.mobile import MOBILE_FORMS, to_executorch, to_torchscript
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


def _checked(name: str, plan: Plan | bytes) -> Plan:
    """The plan, loaded if need be, after it passed :func:`check`."""
    if not isinstance(plan, (Plan, bytes, bytearray)):
        raise TypeError(
            f"plan {name!r} must be a Plan or bytes; got {type(plan).__name__}"
        )
    report = check(plan, steps=0)
    report.raise_for_failure()
    return report.plan


def prepare_plans(
    client_plans: Mapping[str, Plan | bytes], mobile_forms: Sequence[str] = ()
) -> dict[str, bytes]:
    """Check every plan and add its mobile forms: what host-training uploads.

    Plans named ``name:form`` are taken as given (a form made elsewhere).

    Raises:
        PlanError: a plan failed :func:`~plan_runtime.check.check`.
        MobileFormError: a mobile form cannot be made here.
        ValueError: ``mobile_forms`` names a form other than ``ts``, ``pte``.
    """
    unknown = sorted(set(mobile_forms) - set(MOBILE_FORMS))
    if unknown:
        raise ValueError(
            f"mobile form {unknown[0]!r} is not known; expected one of "
            f"{', '.join(MOBILE_FORMS)}"
        )
    converters = {"ts": to_torchscript, "pte": to_executorch}
    blobs: dict[str, bytes] = {}
    for name, plan in client_plans.items():
        if ":" in name:
            blobs[name] = _plan_bytes(name, plan)
            continue
        checked = _checked(name, plan)
        blobs[name] = checked.to_bytes()
        for form in mobile_forms:
            blobs[f"{name}:{form}"] = converters[form](checked)
    return blobs


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
        *,
        mobile_forms: Sequence[str] = (),
    ) -> dict[str, Any]:
        """Host a process: its model, plans and configs; opens cycle 1.

        The parameters keep the order of the PySyft-era client.
        ``client_config`` must hold the process's ``name`` and ``version``;
        it is handed to every admitted worker as is. Every plan, the
        averaging plan included, must pass :func:`plan_runtime.check` here
        before anything is sent. ``mobile_forms=("ts", "pte")`` also uploads
        each client plan as TorchScript (``name:ts``) and ExecuTorch
        (``name:pte``), served to workers that ask for
        ``receive_operations_as=torchscript`` or ``pte``.

        Raises:
            TypeError: ``client_config`` or ``server_config`` is missing.
            PlanError: a plan failed its check; nothing was sent.
            MobileFormError: a mobile form cannot be made here.
            ServerError: the server refused the process (see ``code``).
        """
        if client_config is None or server_config is None:
            raise TypeError("client_config and server_config are required")
        averaging = None
        if server_averaging_plan is not None:
            averaging = _checked("averaging_plan", server_averaging_plan).to_bytes()
        body = {
            "model": encode_state(_model_state(model)),
            "plans": prepare_plans(client_plans, mobile_forms),
            "protocols": dict(client_protocols or {}),
            "averaging_plan": averaging,
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

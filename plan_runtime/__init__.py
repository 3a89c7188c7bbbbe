"""What runs on devices: plans, the tensor state codec, the worker library.

Importable without the server's dependencies: a device needs torch, cbor2
and httpx. Nothing here imports ``nimble_edge``.
"""

from __future__ import annotations

from plan_runtime.admin import ModelCentricFLClient
from plan_runtime.check import CheckReport, check
from plan_runtime.http import ServerError
from plan_runtime.plan import Plan, PlanError
from plan_runtime.state import StateError, decode_state, encode_state
from plan_runtime.trace import make_plan
from plan_runtime.worker import Job, Worker

__all__ = [
    "CheckReport",
    "Job",
    "ModelCentricFLClient",
    "Plan",
    "PlanError",
    "ServerError",
    "StateError",
    "Worker",
    "check",
    "decode_state",
    "encode_state",
    "make_plan",
]

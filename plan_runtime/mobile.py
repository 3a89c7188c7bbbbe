"""Mobile forms of a plan: TorchScript and ExecuTorch programs.

Phones do not run Python, so a host can ship the same step in the formats
that mobile runtimes load, next to the portable plan:

- ``to_torchscript(plan)``: a TorchScript archive (``name:ts``), as the
  older PyTorch Mobile clients expect. ``torch.jit`` is deprecated in
  recent PyTorch releases but still shipped; when the installed torch lacks
  it, :class:`MobileFormError` says so.
- ``to_executorch(plan)``: an ExecuTorch program (``name:pte``), the
  runtime PyTorch now points phone users to. It needs the optional
  ``executorch`` package (``pip install 'nimble-edge[mobile]'``).

Both are converted here, on the host's machine, from the portable plan;
the server stores them as opaque bytes and never loads them. Unlike the
portable plan, these formats are programs that their runtimes execute
without an allow-list, so a device that loads them trusts the admin who
hosted the process.

Each form takes the plan's flat inputs in order and returns its outputs as
a tuple. In the TorchScript form a plan's random ops draw from a generator
seeded from its seed input, as in the portable plan; TorchScript keeps that
generator as one object per module, reseeded by each call, so calls of one
module that draw random numbers must not overlap.
"""

from __future__ import annotations

import io
import itertools
import linecache
import math
import warnings
from typing import Any

import torch

from plan_runtime.ops import ALLOWED_OPS
from plan_runtime.plan import Plan, _Ref, _Rng

__all__ = ["MOBILE_FORMS", "MobileFormError", "to_executorch", "to_torchscript"]

# The suffix of a plan name for each form, and the form's converter.
MOBILE_FORMS = ("ts", "pte")

_TYPES = {
    "int": "int",
    "SymInt": "int",
    "float": "float",
    "bool": "bool",
    "Tensor": "Tensor",
    "Tensor?": "Optional[Tensor]",
}
_sources = itertools.count()


class MobileFormError(RuntimeError):
    """A plan cannot be converted to a mobile form here; the message says why."""


# ---------------------------------------------------------------- TorchScript


def to_torchscript(plan: Plan) -> bytes:
    """Return the plan as a TorchScript archive (what ``torch.jit.load`` reads).

    Raises:
        MobileFormError: the installed torch has no ``torch.jit``, or
            TorchScript cannot compile one of the plan's operations.
    """
    jit = getattr(torch, "jit", None)
    if jit is None or not hasattr(jit, "script"):
        raise MobileFormError(
            f"torch {torch.__version__} has no torch.jit; the TorchScript form "
            "needs a torch that still ships it (torch.jit is deprecated)"
        )
    module = _module(plan)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", FutureWarning)
            scripted = jit.script(module)
            buffer = io.BytesIO()
            jit.save(scripted, buffer)
    except RuntimeError as exc:
        raise MobileFormError(
            f"TorchScript cannot compile plan {plan.name!r}: {exc}"
        ) from exc
    return buffer.getvalue()


def _module(plan: Plan) -> torch.nn.Module:
    source = _source(plan)
    filename = f"<nimble-edge plan {plan.name} {next(_sources)}>"
    # TorchScript reads a class's source through linecache, as torch.fx does
    # for the code it generates.
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    namespace: dict[str, Any] = {}
    exec(compile(source, filename, "exec"), namespace)
    module: torch.nn.Module = namespace["PlanModule"]()
    for index, (_, tensor) in enumerate(plan.constants):
        module.register_buffer(f"c{index}", tensor.clone())
    return module


def _source(plan: Plan) -> str:
    names = [f"v{i}" for i in range(len(plan.inputs))]
    names += [f"self.c{i}" for i in range(len(plan.constants))]
    parameters = ", ".join(f"v{i}: Tensor" for i in range(len(plan.inputs)))
    lines = [
        "import torch",
        "from torch import Tensor",
        "from typing import List, Optional, Tuple",
        "",
        "",
        "class PlanModule(torch.nn.Module):",
        f"    def forward(self, {parameters}) -> Tuple[{_tuple(plan)}]:",
    ]
    for index in plan.seed_inputs:
        lines.append(f"        g{index} = torch.Generator()")
        lines.append(f"        g{index}.manual_seed(int(v{index}))")

    for position, op in enumerate(plan.ops):
        schema = ALLOWED_OPS[op.name]._schema
        packet = op.name.removeprefix("aten::").split(".")[0]
        arguments = [
            _literal(arg, names, _arg_type(schema, index))
            for index, arg in enumerate(op.args)
        ]
        arguments += [
            f"{key}={_literal(arg, names, _kwarg_type(schema, key))}"
            for key, arg in op.kwargs.items()
        ]
        call = f"torch.ops.aten.{packet}({', '.join(arguments)})"
        start = len(names)
        if op.n == 1 and not op.has_list_output:
            lines.append(f"        v{start} = {call}")
        else:
            lines.append(f"        r{position} = {call}")
            lines += [f"        v{start + i} = r{position}[{i}]" for i in range(op.n)]
        names += [f"v{start + i}" for i in range(op.n)]
    outputs = ", ".join(names[i] for i in plan.outputs)
    lines.append(f"        return ({outputs},)")
    return "\n".join(lines) + "\n"


def _tuple(plan: Plan) -> str:
    return ", ".join("Tensor" for _ in plan.outputs)


def _arg_type(schema: Any, index: int) -> str:
    arguments = [a for a in schema.arguments if not a.kwarg_only]
    return str(arguments[index].type) if index < len(arguments) else ""


def _kwarg_type(schema: Any, key: str) -> str:
    return next((str(a.type) for a in schema.arguments if a.name == key), "")


def _literal(value: Any, names: list[str], kind: str) -> str:
    if isinstance(value, _Ref):
        return names[value.index]
    if isinstance(value, _Rng):
        return f"g{value.index}"
    if isinstance(value, list):
        items = ", ".join(_literal(item, names, _element(kind)) for item in value)
        element = _TYPES.get(_element(kind))
        if element is None:
            return f"[{items}]"
        return f"torch.jit.annotate(List[{element}], [{items}])"
    if isinstance(value, float) and not math.isfinite(value):
        return f'float("{value}")'
    if isinstance(value, torch.dtype):
        return str(value)
    if isinstance(value, torch.device):
        return f'torch.device("{value.type}")'
    if isinstance(value, (torch.layout, torch.memory_format)):
        return str(value)
    return repr(value)


def _element(kind: str) -> str:
    kind = kind.removesuffix("?")
    if "[" in kind:
        return kind[: kind.index("[")]
    if kind.startswith("List[") and kind.endswith("]"):
        return kind[5:-1]
    return kind


# ---------------------------------------------------------------- ExecuTorch


def _max_pool2d_backward(
    grad_output: torch.Tensor,
    self: torch.Tensor,
    kernel_size: list[int],
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    ceil_mode: bool,
    indices: torch.Tensor,
) -> torch.Tensor:
    # ExecuTorch 1.5's portable kernel for this op leaves stale values in
    # the parts of its output that no index points at; a scatter-add into
    # zeros computes the same gradient with kernels that are right.
    batch, channels = self.shape[0], self.shape[1]
    plane = self.shape[2] * self.shape[3]
    zeros = torch.zeros(batch, channels, plane, dtype=grad_output.dtype)
    scattered = zeros.scatter_add(
        2,
        indices.reshape(batch, channels, -1),
        grad_output.reshape(batch, channels, -1),
    )
    return scattered.reshape(self.shape)


def _var_mean(
    self: torch.Tensor,
    dim: list[int] | None = None,
    *,
    correction: float | None = None,
    keepdim: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    # Outside the core ATen set that ExecuTorch lowers; both halves are in it.
    aten = torch.ops.aten
    variance = aten.var.correction(self, dim, correction=correction, keepdim=keepdim)
    return variance, aten.mean.dim(self, dim, keepdim)


_EXECUTORCH_DECOMPOSITIONS: dict[Any, Any] = {
    torch.ops.aten.max_pool2d_with_indices_backward.default: _max_pool2d_backward,
    torch.ops.aten.var_mean.correction: _var_mean,
}


class _Runner(torch.nn.Module):
    def __init__(self, plan: Plan):
        super().__init__()
        self.plan = plan

    def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.plan(*args)


def to_executorch(plan: Plan) -> bytes:
    """Return the plan as an ExecuTorch program (a ``.pte`` file's bytes).

    Raises:
        MobileFormError: the ``executorch`` package is not installed, or
            it cannot lower one of the plan's operations (random ops among
            them: ExecuTorch programs have no seeded generator).
    """
    try:
        from executorch.exir import to_edge
    except ImportError as exc:
        raise MobileFormError(
            "the ExecuTorch form needs the executorch package: pip install "
            "'nimble-edge[mobile]'"
        ) from exc
    if plan.seed_inputs:
        raise MobileFormError(
            f"plan {plan.name!r} draws random numbers, which the ExecuTorch form "
            "cannot seed from an input; host it without the pte form"
        )
    example = tuple(plan.zeros())
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            exported = torch.export.export(_Runner(plan), example, strict=False)
            table = torch.export.default_decompositions()
            for op, decomposition in _EXECUTORCH_DECOMPOSITIONS.items():
                table[op] = decomposition
            exported = exported.run_decompositions(table)
            program = to_edge(exported).to_executorch()
    except Exception as exc:
        raise MobileFormError(
            f"ExecuTorch cannot lower plan {plan.name!r}: {_first_line(exc)}"
        ) from exc
    data: bytes = program.buffer
    return data


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__

"""Tracing: a plain torch function becomes a :class:`~plan_runtime.plan.Plan`.

``make_plan`` runs the function once on its default arguments under
``make_fx``, which records every ATen operation that runs, autograd's
backward included (``loss.backward()``, ``torch.autograd.grad``,
``torch.func.grad``), then functionalises the graph so that no operation
mutates its inputs. A few ops are rewritten on the way so that the plan
stays pure and deterministic:

- BatchNorm's fused kernel, which updates its running statistics in place,
  is decomposed into plain maths; the updated statistics are ordinary
  outputs when the function returns its buffers.
- Random ops (dropout, ``rand_like``, ...) draw from the plan's own
  generator, seeded from the input named ``seed``; a function that draws
  random numbers without a seed input is refused.
- ``F.one_hot`` becomes a comparison with ``arange`` (it needs
  ``num_classes``: a plan's shapes cannot depend on data).
"""

from __future__ import annotations

import functools
import inspect
import logging
import operator
import traceback
from collections.abc import Callable, Sequence
from typing import Any, overload

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from plan_runtime.ops import (
    ALLOWED_OPS,
    IDENTITY_OPS,
    IMPLEMENTATIONS,
    RANDOM_OPS,
    RANDOM_OVERLOADS,
)
from plan_runtime.plan import (
    DEFAULT_MAX_MEMORY_BYTES,
    InputSpec,
    OpError,
    Plan,
    PlanError,
    _Op,
    _Ref,
    _Rng,
)
from plan_runtime.state import DTYPE_NAMES

__all__ = ["make_plan", "sgd_step", "trace"]

logger = logging.getLogger(__name__)

aten = torch.ops.aten


@overload
def make_plan(
    fn: Callable[..., Any],
    *,
    name: str | None = None,
    seed: str = "seed",
    max_memory_bytes: int = DEFAULT_MAX_MEMORY_BYTES,
) -> Plan: ...


@overload
def make_plan(
    fn: None = None,
    *,
    name: str | None = None,
    seed: str = "seed",
    max_memory_bytes: int = DEFAULT_MAX_MEMORY_BYTES,
) -> Callable[[Callable[..., Any]], Plan]: ...


def make_plan(
    fn: Callable[..., Any] | None = None,
    *,
    name: str | None = None,
    seed: str = "seed",
    max_memory_bytes: int = DEFAULT_MAX_MEMORY_BYTES,
) -> Plan | Callable[[Callable[..., Any]], Plan]:
    """Trace a torch function into a :class:`Plan`, once, at decoration time.

    Every parameter of ``fn`` needs a default that fixes its dtype and shape:
    a tensor, a list or tuple of tensors, or a Python number (which becomes
    a 0-d tensor). The function must return a tensor or a tuple/list of
    tensors (nested lists are flattened). Autograd inside the function
    (``loss.backward()``, ``torch.autograd.grad``, ``torch.func.grad``) is
    recorded as explicit backward operations.

    Usable as ``@make_plan`` or ``@make_plan(name="training_plan")``.

    Args:
        fn: the function to trace.
        name: the plan's name; the function's name by default.
        seed: the parameter (a 0-d integer) that seeds the plan's random
            ops, such as dropout; needed only when the function draws
            random numbers.
        max_memory_bytes: refuse a plan whose dry run holds more than this.

    Raises:
        PlanError: a parameter lacks a usable default, the function depends
            on tensor values for control flow, uses an operation that is
            not on the allow-list, draws random numbers without a seed
            parameter, or needs more memory than ``max_memory_bytes``; the
            message names the op or the line.
    """
    if fn is None:

        def decorate(function: Callable[..., Any]) -> Plan:
            return make_plan(
                function, name=name, seed=seed, max_memory_bytes=max_memory_bytes
            )

        return decorate
    return trace(
        fn, name=name or fn.__name__, seed=seed, max_memory_bytes=max_memory_bytes
    )


def sgd_step(
    model: torch.nn.Module,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
) -> Callable[..., Any]:
    """One SGD step of a classifier in the classic form, ready to trace.

    The function takes ``(xs, ys, batch_size, lr, params)`` with ``params``
    in ``model.parameters()`` order, and returns ``(loss, accuracy,
    updated_params)``; accuracy compares the argmax of the model's output
    with ``ys``. Trace it with :func:`trace` and example arguments.
    """
    names = [name for name, _ in model.named_parameters()]

    def step(
        xs: torch.Tensor,
        ys: torch.Tensor,
        batch_size: torch.Tensor,
        lr: torch.Tensor,
        params: list[torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        params = [p.requires_grad_() for p in params]
        logits = torch.func.functional_call(model, dict(zip(names, params)), (xs,))
        loss = loss_fn(logits, ys)
        grads = torch.autograd.grad(loss, params)
        accuracy = (logits.argmax(1) == ys).float().mean()
        return loss, accuracy, [p - lr * g for p, g in zip(params, grads)]

    return step


def _defaults(fn: Callable[..., Any]) -> list[tuple[str, Any]]:
    parameters = inspect.signature(fn).parameters.values()
    defaults = []
    for parameter in parameters:
        if parameter.default is inspect.Parameter.empty:
            raise PlanError(
                f"parameter {parameter.name!r} of {fn.__name__} needs a default "
                "(a tensor, a list of tensors or a number) that fixes its shape"
            )
        defaults.append((parameter.name, parameter.default))
    return defaults


def _as_tensor(name: str, value: Any) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, (bool, int, float)):
        return torch.tensor(value)
    raise PlanError(
        f"default of {name!r} must be a tensor, a list of tensors or a number; "
        f"got {type(value).__name__}"
    )


def trace(
    fn: Callable[..., Any],
    *,
    name: str,
    example_args: Sequence[Any] | None = None,
    seed: str = "seed",
    max_memory_bytes: int = DEFAULT_MAX_MEMORY_BYTES,
) -> Plan:
    """Trace ``fn`` on ``example_args`` (or its defaults) into a plan.

    Raises:
        PlanError: as for :func:`make_plan`.
    """
    from torch.func import functionalize
    from torch.fx.experimental.proxy_tensor import make_fx

    if example_args is None:
        named = _defaults(fn)
    else:
        names = list(inspect.signature(fn).parameters)
        named = list(zip(names, example_args))
    signature: list[tuple[str, int | None]] = []
    inputs: list[InputSpec] = []
    dummy: list[torch.Tensor] = []
    for arg_name, value in named:
        if isinstance(value, (list, tuple)):
            signature.append((arg_name, len(value)))
            items = [(f"{arg_name}.{i}", v) for i, v in enumerate(value)]
        else:
            signature.append((arg_name, None))
            items = [(arg_name, value)]
        for item_name, item in items:
            tensor = _as_tensor(item_name, item)
            if tensor.dtype not in DTYPE_NAMES:
                raise PlanError(f"{item_name!r} has unsupported dtype {tensor.dtype}")
            inputs.append(InputSpec(item_name, tensor.dtype, tuple(tensor.shape)))
            dummy.append(tensor)

    def flat_fn(*flat: torch.Tensor) -> list[torch.Tensor]:
        with _Rewrites():
            return flatten_outputs(fn(*regroup(signature, flat)))

    try:
        # The random state is restored so that tracing leaves none behind.
        with torch.random.fork_rng(devices=[]):
            graph = make_fx(flat_fn, decomposition_table=_decompositions())(
                *[t.clone() for t in dummy]
            )
            # A second pass turns in-place updates (p.sub_(...), .grad
            # accumulation) into pure operations; writes back into the
            # inputs are then dropped, because a plan returns new values.
            graph = make_fx(functionalize(graph, remove="mutations"))(
                *[t.clone() for t in dummy]
            )
    except PlanError:
        raise
    except Exception as exc:
        raise PlanError(
            f"cannot trace {fn.__name__}{_user_line(exc, fn)}: {_first_line(exc)}"
        ) from exc

    context = _Context(fn, inputs, signature, dummy, seed)
    plan = _from_graph(name, graph, context, max_memory_bytes)
    plan.function = fn
    plan.example_args = tuple(regroup(signature, dummy))
    return plan


def regroup(signature: list[tuple[str, int | None]], flat: Sequence[Any]) -> list[Any]:
    """Flat inputs grouped as the signature says: lists where it has sizes."""
    args: list[Any] = []
    position = 0
    for _, size in signature:
        if size is None:
            args.append(flat[position])
            position += 1
        else:
            args.append(list(flat[position : position + size]))
            position += size
    return args


def flatten_outputs(result: Any) -> list[torch.Tensor]:
    if isinstance(result, torch.Tensor):
        return [result]
    if isinstance(result, (list, tuple)):
        flat: list[torch.Tensor] = []
        for item in result:
            flat.extend(flatten_outputs(item))
        return flat
    raise PlanError(
        f"a plan must return tensors (or lists of them); got {type(result).__name__}"
    )


# ---------------------------------------------------------------- rewrites


def _native_dropout(
    input: torch.Tensor, p: float, train: bool | None
) -> tuple[torch.Tensor, torch.Tensor]:
    # The same draws as eager dropout on the CPU (bernoulli on an empty
    # tensor, then a division), so a plan and its function agree exactly
    # under the same seed.
    if train is False or p == 0:
        return aten.clone.default(input), aten.ones_like.default(
            input, dtype=torch.bool
        )
    keep = 1.0 - p
    if keep == 0:
        zeros = aten.zeros_like.default(input)
        return zeros, aten.zeros_like.default(input, dtype=torch.bool)
    noise = aten.bernoulli.p(aten.empty_like.default(input), keep)
    output = aten.mul.Tensor(input, aten.div.Scalar(noise, keep))
    return output, aten.ne.Scalar(noise, 0)


def _one_hot(self: torch.Tensor, num_classes: int = -1) -> torch.Tensor:
    if num_classes < 0:
        raise PlanError(
            "F.one_hot needs num_classes in a plan: a plan's shapes cannot "
            "depend on the values of its inputs"
        )
    classes = aten.arange.default(num_classes, dtype=self.dtype, device=self.device)
    matches = aten.eq.Tensor(aten.unsqueeze.default(self, -1), classes)
    result: torch.Tensor = aten._to_copy.default(matches, dtype=torch.int64)
    return result


@functools.cache
def _decompositions() -> dict[Any, Any]:
    from torch._decomp import get_decompositions

    table: dict[Any, Any] = get_decompositions([aten.native_batch_norm.default])
    table[aten.native_dropout.default] = _native_dropout
    return table


class _Rewrites(TorchFunctionMode):
    """Rewrites at the level of torch functions, before they decompose.

    ``F.one_hot`` checks its input's values in C++ before any decomposition
    could replace it, so it is replaced here.
    """

    def __torch_function__(
        self, func: Any, types: Any, args: Any = (), kwargs: Any = None
    ) -> Any:
        if func is F.one_hot:
            return _one_hot(*args, **(kwargs or {}))
        return func(*args, **(kwargs or {}))


# ---------------------------------------------------------------- the graph


class _Context:
    """What turning one traced graph into a plan needs to know."""

    def __init__(
        self,
        fn: Callable[..., Any],
        inputs: list[InputSpec],
        signature: list[tuple[str, int | None]],
        dummy: list[torch.Tensor],
        seed: str,
    ):
        self.fn = fn
        self.inputs = inputs
        self.signature = signature
        self.dummy = dummy
        self.seed = seed
        self.seed_index: int | None = None
        position = 0
        for arg_name, size in signature:
            if arg_name == seed and size is None:
                self.seed_index = position
            position += 1 if size is None else size

    def refuse(self, op_name: str, problem: str) -> PlanError:
        """A PlanError from ``problem``, a template of ``{fn}``, ``{op}``, ``{at}``.

        ``{op}`` is the op's name followed by the user's line that runs it,
        ``{at}`` the line alone.
        """
        args = regroup(self.signature, [t.clone() for t in self.dummy])
        at = _find_origin(self.fn, args, op_name)
        return PlanError(problem.format(fn=self.fn.__name__, op=op_name + at, at=at))

    def generator(self, op_name: str) -> _Rng:
        if self.seed_index is None:
            raise self.refuse(
                op_name,
                "{fn} draws random numbers ({op}) but has no seed parameter; add "
                f"a parameter {self.seed}=torch.tensor(0) and pass a new seed "
                "for each call",
            )
        spec = self.inputs[self.seed_index]
        if spec.dtype != torch.int64 or spec.shape != ():
            raise PlanError(
                f"the seed parameter {self.seed!r} of {self.fn.__name__} must be "
                f"a 0-d int64 tensor or an int; got {DTYPE_NAMES[spec.dtype]} of "
                f"shape {list(spec.shape)}"
            )
        return _Rng(self.seed_index)


# Stands for a torch.Generator that the function passed to a random op: the
# plan's own generator replaces it.
_USER_GENERATOR = object()


def _from_graph(
    name: str, graph: Any, context: _Context, max_memory_bytes: int
) -> Plan:
    _drop_input_writes(graph, context.fn)

    values: dict[Any, Any] = {}
    constants: list[tuple[str, torch.Tensor]] = []
    ops: list[_Op] = []
    placeholders = [n for n in graph.graph.nodes if n.op == "placeholder"]
    for index, node in enumerate(placeholders):
        values[node] = index
    for node in [n for n in graph.graph.nodes if n.op == "get_attr"]:
        value = getattr(graph, node.target)
        if isinstance(value, torch.Generator):
            values[node] = _USER_GENERATOR
            continue
        values[node] = len(context.inputs) + len(constants)
        constants.append((f"c{len(constants)}", value.detach().clone()))
    defined = len(context.inputs) + len(constants)

    outputs: list[int] = []
    for node in graph.graph.nodes:
        if node.op == "call_function":
            defined = _add_op(node, values, ops, defined, context)
        elif node.op == "output":
            for item in _flatten_nodes(node.args[0]):
                ref = _encode_arg(item, values)
                if not isinstance(ref, _Ref):
                    raise PlanError(
                        f"output {item!r} of {context.fn.__name__} is not a tensor"
                    )
                outputs.append(ref.index)
    try:
        return Plan(
            name,
            context.inputs,
            context.signature,
            constants,
            ops,
            outputs,
            max_memory_bytes=max_memory_bytes,
        )
    except OpError as exc:
        text = str(exc).replace("{", "{{").replace("}", "}}")
        raise context.refuse(exc.op_name, "{fn}: " + text + "{at}") from exc


def _drop_input_writes(graph: Any, fn: Callable[..., Any]) -> None:
    output = next(n for n in graph.graph.nodes if n.op == "output")
    returned = set(_flatten_nodes(output.args[0]))
    for node in list(graph.graph.nodes):
        is_write = node.op == "call_function" and node.target in (aten.copy_.default,)
        if is_write and node.args[0].op == "placeholder" and not node.users:
            if node.args[1] not in returned:
                logger.warning(
                    "Plan of %s: an input is updated in place but not returned; "
                    "the update is lost (return the tensor to keep it)",
                    fn.__name__,
                )
            graph.graph.erase_node(node)
    graph.graph.eliminate_dead_code()


def _flatten_nodes(value: Any) -> list[Any]:
    if isinstance(value, (list, tuple)):
        return [leaf for item in value for leaf in _flatten_nodes(item)]
    return [value]


def _add_op(
    node: Any, values: dict[Any, Any], ops: list[_Op], defined: int, context: _Context
) -> int:
    target = node.target
    if target is operator.getitem:
        source, index = node.args
        values[node] = values[source][index]
        return defined

    op_name = target.name() if hasattr(target, "name") else repr(target)
    if op_name in IDENTITY_OPS:
        values[node] = values[node.args[0]]
        return defined
    op_name = RANDOM_OVERLOADS.get(op_name, op_name)
    if op_name not in ALLOWED_OPS:
        raise context.refuse(
            op_name,
            "{fn} uses {op}, which is not an allowed plan operation; express it "
            "with allowed tensor maths",
        )

    example = node.meta.get("val")
    returns = ALLOWED_OPS[op_name]._schema.returns
    has_list_output = len(returns) == 1 and str(returns[0].type) == "List[Tensor]"
    if has_list_output or len(returns) > 1:
        count = len(example) if example is not None else len(returns)
        values[node] = list(range(defined, defined + count))
    else:
        count = len(returns)
        values[node] = defined

    kwargs = {key: _encode_arg(arg, values) for key, arg in node.kwargs.items()}
    if op_name in RANDOM_OPS:
        kwargs["generator"] = context.generator(op_name)
    ops.append(
        _Op(
            op_name,
            IMPLEMENTATIONS[op_name],
            [_encode_arg(arg, values) for arg in node.args],
            kwargs,
            count,
            has_list_output,
        )
    )
    return defined + count


def _encode_arg(arg: Any, values: dict[Any, Any]) -> Any:
    if hasattr(arg, "op") and hasattr(arg, "users"):
        index = values[arg]
        if index is _USER_GENERATOR:
            raise PlanError("a torch.Generator can only be passed to a random op")
        if isinstance(index, list):
            return [_Ref(i) for i in index]
        return _Ref(index)
    if isinstance(arg, (list, tuple)):
        return [_encode_arg(item, values) for item in arg]
    if isinstance(arg, (torch.dtype, torch.device, torch.layout, torch.memory_format)):
        if isinstance(arg, torch.device) and arg.type != "cpu":
            raise PlanError(f"plans run on the CPU; the function used device {arg}")
        return arg
    if arg is None or isinstance(arg, (bool, int, float, str)):
        return arg
    raise PlanError(f"cannot record argument {arg!r:.60} of type {type(arg).__name__}")


# ---------------------------------------------------------------- messages


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _user_frame(exc: BaseException, fn: Callable[..., Any]) -> Any:
    filename = getattr(getattr(fn, "__code__", None), "co_filename", None)
    for frame in reversed(traceback.extract_tb(exc.__traceback__)):
        if frame.filename == filename:
            return frame
    return None


def _user_line(exc: BaseException, fn: Callable[..., Any]) -> str:
    frame = _user_frame(exc, fn)
    if frame is None:
        return ""
    return f" (line {frame.lineno}: {(frame.line or '').strip()})"


class _Found(Exception):
    pass


class _Watch(TorchDispatchMode):  # type: ignore[no-untyped-call]
    """Raise at the first op of a given name (in-place twins included)."""

    def __init__(self, packet: str):
        super().__init__()  # type: ignore[no-untyped-call]
        self.packet = packet

    def __torch_dispatch__(
        self,
        func: Any,
        types: Any,
        args: Any = (),
        kwargs: Any = None,
    ) -> Any:
        if _packet(func.name()) == self.packet:
            raise _Found
        return func(*args, **(kwargs or {}))


def _packet(op_name: str) -> str:
    return op_name.removeprefix("aten::").split(".")[0].rstrip("_")


def _find_origin(fn: Callable[..., Any], args: list[Any], op: str) -> str:
    """`` at line N: source`` where ``fn`` runs ``op``, found by running it.

    Traced graphs do not keep the user's source lines, so the function is
    run once more, eagerly, and stopped at the first op of that name.
    """
    try:
        with torch.random.fork_rng(devices=[]), _Watch(_packet(op)):
            fn(*args)
    except _Found as exc:
        frame = _user_frame(exc, fn)
        if frame is not None:
            return f" at line {frame.lineno}: {(frame.line or '').strip()}"
    except Exception:
        # The function already failed once under tracing in another way;
        # the message then goes without a line.
        return ""
    return ""

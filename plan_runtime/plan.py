"""Plans: a torch function traced once into a portable, safe CBOR document.

``@make_plan`` runs the decorated function on its default arguments under
``make_fx``, which records every ATen operation that runs, autograd's
backward included, then functionalises the graph so that no operation
mutates its inputs. The result is a :class:`Plan`: inputs with fixed dtypes
and shapes, constants, and an ordered list of operations from the allow-list
in :mod:`plan_runtime.ops`, each reading earlier values.

The document (version 1)::

    {"format": "nimble-edge/plan", "version": 1, "name": "training_plan",
     "inputs": [{"name": "xs", "dtype": "float32", "shape": [64, 64]}, ...],
     "signature": [{"name": "xs"}, ..., {"name": "params", "size": 4}],
     "constants": [{"name": "c0", "value": <RFC 8746 tensor>}],
     "ops": [{"op": "aten::addmm", "args": [{"ref": 5}, {"ref": 0}, ...],
              "kwargs": {}, "n": 1}, ...],
     "outputs": [{"ref": 17}, ...]}

Values are numbered in order of definition: inputs first, then constants,
then the ``n`` results of each operation. An argument is a literal (null,
bool, integer, float, string, or a list of arguments) or a one-key map:
``{"ref": i}`` for value ``i``, ``{"dtype": "float32"}``, ``{"device":
"cpu"}``, ``{"layout": "strided"}`` or ``{"memory_format": ...}``.

Loading a plan never unpickles, evaluates or imports anything: operation
names are looked up in a fixed table, and every reference is checked to
point at a value already defined.
"""

from __future__ import annotations

import functools
import inspect
import logging
import operator
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import cbor2
import torch

from plan_runtime.ops import ALLOWED_OPS, IDENTITY_OPS
from plan_runtime.state import (
    _STATE_DECODERS,
    DTYPE_NAMES,
    DTYPES_BY_NAME,
    StateError,
    _loads,
    decode_tensor,
    encode_tensor,
)

__all__ = ["PLAN_FORMAT", "PLAN_VERSION", "Plan", "PlanError", "make_plan"]

logger = logging.getLogger(__name__)

PLAN_FORMAT = "nimble-edge/plan"
PLAN_VERSION = 1
MAX_PLAN_BYTES = 256 * 1024 * 1024
MAX_OPS = 100_000
MAX_OUTPUTS_PER_OP = 1024
# Argument lists nest only a few levels (a list of references, or a list of
# lists of sizes); the limit keeps a hostile document from recursing deeply.
MAX_DEPTH = 32

_DEVICES = {"cpu": torch.device("cpu")}
_LAYOUTS = {"strided": torch.strided}
_MEMORY_FORMATS = {
    "contiguous_format": torch.contiguous_format,
    "preserve_format": torch.preserve_format,
    "channels_last": torch.channels_last,
}
_ENUM_NAMES: dict[Any, tuple[str, str]] = {
    **{v: ("layout", k) for k, v in _LAYOUTS.items()},
    **{v: ("memory_format", k) for k, v in _MEMORY_FORMATS.items()},
}


class PlanError(ValueError):
    """A plan cannot be traced, loaded or run; the message says why."""


@dataclass(frozen=True)
class InputSpec:
    """One flat input of a plan: its name, dtype and fixed shape."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]


@dataclass(frozen=True)
class _Ref:
    index: int


@dataclass
class _Op:
    name: str
    fn: Any
    args: list[Any]
    kwargs: dict[str, Any]
    n: int
    has_list_output: bool = field(default=False)


# ---------------------------------------------------------------- the plan


class Plan:
    """A traced computation: call it like the function it was made from.

    ``plan(xs, ys, batch_size, lr, params)`` and the flat form
    ``plan(xs, ys, batch_size, lr, *params)`` are the same call. Python
    numbers are accepted where the plan has a 0-d input. The result is a
    tuple of tensors.
    """

    def __init__(
        self,
        name: str,
        inputs: list[InputSpec],
        signature: list[tuple[str, int | None]],
        constants: list[tuple[str, torch.Tensor]],
        ops: list[_Op],
        outputs: list[int],
    ):
        self.name = name
        self.inputs = inputs
        self.signature = signature
        self.constants = constants
        self.ops = ops
        self.outputs = outputs

    def __repr__(self) -> str:
        return (
            f"<Plan {self.name!r}: {len(self.inputs)} inputs, "
            f"{len(self.ops)} ops, {len(self.outputs)} outputs>"
        )

    @property
    def op_names(self) -> list[str]:
        """The operation names in execution order."""
        return [op.name for op in self.ops]

    def __call__(self, *args: Any) -> tuple[torch.Tensor, ...]:
        values = self._bind(args)
        values.extend(tensor for _, tensor in self.constants)

        with torch.no_grad():
            for position, op in enumerate(self.ops):
                resolved = _resolve(op.args, values)
                kwargs = _resolve(op.kwargs, values) if op.kwargs else {}
                try:
                    result = op.fn(*resolved, **kwargs)
                except (RuntimeError, TypeError, ValueError, IndexError) as exc:
                    raise PlanError(
                        f"op {position} ({op.name}) of plan {self.name!r} failed: {exc}"
                    ) from exc
                if op.n == 1 and not op.has_list_output:
                    values.append(result)
                    continue
                if len(result) != op.n:
                    raise PlanError(
                        f"op {position} ({op.name}) returned {len(result)} values; "
                        f"the plan expects {op.n}"
                    )
                values.extend(result)
        return tuple(values[i] for i in self.outputs)

    def _bind(self, args: Sequence[Any]) -> list[Any]:
        flat: list[Any] = []
        for arg in args:
            if isinstance(arg, (list, tuple)):
                flat.extend(arg)
            else:
                flat.append(arg)
        if len(flat) != len(self.inputs):
            raise PlanError(
                f"plan {self.name!r} takes {len(self.inputs)} tensors "
                f"({self._signature_text()}); got {len(flat)}"
            )

        bound: list[Any] = []
        for spec, value in zip(self.inputs, flat):
            if isinstance(value, (bool, int, float)) and not spec.shape:
                value = torch.tensor(value, dtype=spec.dtype)
            if not isinstance(value, torch.Tensor):
                raise PlanError(
                    f"input {spec.name!r} must be a tensor; got {type(value).__name__}"
                )
            if value.dtype != spec.dtype or tuple(value.shape) != spec.shape:
                raise PlanError(
                    f"input {spec.name!r} must be {DTYPE_NAMES[spec.dtype]} of "
                    f"shape {list(spec.shape)}; got {_describe(value)}"
                )
            bound.append(value.detach())
        return bound

    def _signature_text(self) -> str:
        parts = [
            name if size is None else f"{name}: {size} tensors"
            for name, size in self.signature
        ]
        return ", ".join(parts)

    # ------------------------------------------------------------ encoding

    def to_document(self) -> dict[str, Any]:
        """Return the plan as a CBOR-ready document (see the module docstring)."""
        return {
            "format": PLAN_FORMAT,
            "version": PLAN_VERSION,
            "name": self.name,
            "inputs": [
                {
                    "name": spec.name,
                    "dtype": DTYPE_NAMES[spec.dtype],
                    "shape": list(spec.shape),
                }
                for spec in self.inputs
            ],
            "signature": [
                {"name": name} if size is None else {"name": name, "size": size}
                for name, size in self.signature
            ],
            "constants": [
                {"name": name, "value": encode_tensor(tensor)}
                for name, tensor in self.constants
            ],
            "ops": [
                {
                    "op": op.name,
                    "args": _encode_literal(op.args),
                    "kwargs": _encode_literal(op.kwargs),
                    "n": op.n,
                }
                for op in self.ops
            ],
            "outputs": [{"ref": i} for i in self.outputs],
        }

    def to_bytes(self) -> bytes:
        """Serialize the plan as one CBOR document."""
        return cbor2.dumps(self.to_document())

    @classmethod
    def from_bytes(cls, data: bytes, *, max_bytes: int = MAX_PLAN_BYTES) -> Plan:
        """Load and check a plan document from untrusted bytes.

        Raises:
            PlanError: the document is malformed, names an operation that is
                not on the allow-list, or refers to a value before it exists.
        """
        if len(data) > max_bytes:
            raise PlanError(
                f"plan document is {len(data)} bytes; the limit is {max_bytes}"
            )
        try:
            document = _loads(data, _STATE_DECODERS, MAX_DEPTH)
        except StateError as exc:
            raise PlanError(f"plan document is not valid CBOR: {exc}") from exc
        return _load_document(document)


def _describe(value: torch.Tensor) -> str:
    dtype = DTYPE_NAMES.get(value.dtype, str(value.dtype))
    return f"{dtype} of shape {list(value.shape)}"


def _resolve(template: Any, values: list[Any]) -> Any:
    if isinstance(template, _Ref):
        return values[template.index]
    if isinstance(template, list):
        return [_resolve(item, values) for item in template]
    if isinstance(template, dict):
        return {key: _resolve(item, values) for key, item in template.items()}
    return template


def _encode_literal(value: Any) -> Any:
    if isinstance(value, _Ref):
        return {"ref": value.index}
    if isinstance(value, list):
        return [_encode_literal(item) for item in value]
    if isinstance(value, dict):
        return {key: _encode_literal(item) for key, item in value.items()}
    if isinstance(value, torch.dtype):
        return {"dtype": DTYPE_NAMES[value]}
    if isinstance(value, torch.device):
        return {"device": value.type}
    if isinstance(value, (torch.layout, torch.memory_format)):
        kind, name = _ENUM_NAMES[value]
        return {kind: name}
    return value


# ---------------------------------------------------------------- loading


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise PlanError(message)


def _load_document(document: Any) -> Plan:
    _require(isinstance(document, dict), "a plan document must be a map")
    _require(
        document.get("format") == PLAN_FORMAT,
        f'"format" must be {PLAN_FORMAT!r}; got {document.get("format")!r:.60}',
    )
    _require(
        document.get("version") == PLAN_VERSION,
        f'plan "version" {document.get("version")!r:.20} is not supported; '
        f"this runtime reads version {PLAN_VERSION}",
    )
    name = document.get("name")
    _require(isinstance(name, str), 'plan "name" must be a string')

    inputs = _load_inputs(document.get("inputs"))
    signature = _load_signature(document.get("signature"), len(inputs))
    constants = _load_constants(document.get("constants"))
    defined = len(inputs) + len(constants)

    raw_ops = document.get("ops")
    _require(
        isinstance(raw_ops, list) and len(raw_ops) <= MAX_OPS,
        f'"ops" must be a list of at most {MAX_OPS} operations',
    )
    ops = []
    for position, raw in enumerate(raw_ops):
        op = _load_op(raw, position, defined)
        ops.append(op)
        defined += op.n

    raw_outputs = document.get("outputs")
    _require(isinstance(raw_outputs, list), '"outputs" must be a list of references')
    outputs = []
    for raw in raw_outputs:
        ref = _load_arg(raw, defined, "outputs", depth=0)
        _require(isinstance(ref, _Ref), f"outputs must be references; got {raw!r:.60}")
        outputs.append(ref.index)
    return Plan(name, inputs, signature, constants, ops, outputs)


def _load_inputs(raw: Any) -> list[InputSpec]:
    _require(isinstance(raw, list), '"inputs" must be a list')
    inputs = []
    for index, entry in enumerate(raw):
        _require(isinstance(entry, dict), f"input {index} must be a map")
        dtype = DTYPES_BY_NAME.get(entry.get("dtype"))
        _require(
            dtype is not None,
            f"input {index} has dtype {entry.get('dtype')!r:.40}; expected one of "
            f"{', '.join(sorted(DTYPES_BY_NAME))}",
        )
        shape = entry.get("shape")
        _require(
            isinstance(shape, list)
            and len(shape) <= 32
            and all(type(d) is int and d >= 0 for d in shape),
            f"input {index} shape must be a list of non-negative integers",
        )
        name = entry.get("name")
        _require(isinstance(name, str), f"input {index} name must be a string")
        assert dtype is not None
        inputs.append(InputSpec(name, dtype, tuple(shape)))
    return inputs


def _load_signature(raw: Any, count: int) -> list[tuple[str, int | None]]:
    _require(isinstance(raw, list), '"signature" must be a list')
    signature: list[tuple[str, int | None]] = []
    total = 0
    for entry in raw:
        _require(
            isinstance(entry, dict) and isinstance(entry.get("name"), str),
            "signature entries must be maps with a string name",
        )
        size = entry.get("size")
        _require(
            size is None or (type(size) is int and size >= 0),
            "a signature size must be a non-negative integer",
        )
        signature.append((entry["name"], size))
        total += 1 if size is None else size
    _require(
        total == count,
        f"the signature covers {total} tensors but the plan has {count} inputs",
    )
    return signature


def _load_constants(raw: Any) -> list[tuple[str, torch.Tensor]]:
    _require(isinstance(raw, list), '"constants" must be a list')
    constants = []
    for index, entry in enumerate(raw):
        _require(
            isinstance(entry, dict) and isinstance(entry.get("name"), str),
            f"constant {index} must be a map with a string name",
        )
        try:
            tensor = decode_tensor(entry.get("value"), where=f"constant {index}")
        except StateError as exc:
            raise PlanError(str(exc)) from exc
        constants.append((entry["name"], tensor))
    return constants


def _load_op(raw: Any, position: int, defined: int) -> _Op:
    where = f"op {position}"
    _require(isinstance(raw, dict), f"{where} must be a map")
    name = raw.get("op")
    _require(isinstance(name, str), f'{where} needs a string "op"')
    fn = ALLOWED_OPS.get(name)
    if fn is None:
        raise PlanError(
            f"{where} names {name!r:.80}, which is not an allowed operation"
        )

    n = raw.get("n", 1)
    _require(
        type(n) is int and 0 <= n <= MAX_OUTPUTS_PER_OP,
        f'{where} ({name}): "n" must be an integer from 0 to {MAX_OUTPUTS_PER_OP}',
    )
    returns = fn._schema.returns
    has_list_output = len(returns) == 1 and str(returns[0].type) == "List[Tensor]"
    if not has_list_output:
        _require(
            n == len(returns),
            f"{where} ({name}) returns {len(returns)} values; the plan says {n}",
        )

    args = raw.get("args", [])
    kwargs = raw.get("kwargs", {})
    _require(isinstance(args, list), f"{where} ({name}): args must be a list")
    _require(
        isinstance(kwargs, dict) and all(isinstance(k, str) for k in kwargs),
        f"{where} ({name}): kwargs must be a map with string keys",
    )
    known = {argument.name for argument in fn._schema.arguments}
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise PlanError(f"{where} ({name}) has no argument {unknown[0]!r:.40}")
    _require(
        len(args) <= len(fn._schema.arguments),
        f"{where} ({name}) takes at most {len(fn._schema.arguments)} arguments",
    )
    return _Op(
        name,
        fn,
        [_load_arg(arg, defined, where, depth=1) for arg in args],
        {key: _load_arg(arg, defined, where, depth=1) for key, arg in kwargs.items()},
        n,
        has_list_output,
    )


def _load_arg(raw: Any, defined: int, where: str, depth: int) -> Any:
    _require(depth <= MAX_DEPTH, f"{where}: arguments nest too deeply")
    if raw is None or isinstance(raw, (bool, int, float, str)):
        return raw
    if isinstance(raw, list):
        return [_load_arg(item, defined, where, depth + 1) for item in raw]
    _require(
        isinstance(raw, dict) and len(raw) == 1,
        f"{where}: an argument must be a literal, a list or a one-key map; "
        f"got {type(raw).__name__}",
    )
    ((kind, value),) = raw.items()
    if kind == "ref":
        _require(
            type(value) is int and 0 <= value < defined,
            f"{where} refers to value {value!r:.20}, which is not defined yet "
            f"(values 0 to {defined - 1} are)",
        )
        return _Ref(value)
    tables: dict[str, dict[str, Any]] = {
        "dtype": DTYPES_BY_NAME,
        "device": _DEVICES,
        "layout": _LAYOUTS,
        "memory_format": _MEMORY_FORMATS,
    }
    table = tables.get(kind)
    _require(table is not None, f"{where}: unknown argument kind {kind!r:.40}")
    assert table is not None
    _require(
        isinstance(value, str) and value in table,
        f"{where}: {kind} {value!r:.40} is not supported; expected one of "
        f"{', '.join(sorted(table))}",
    )
    return table[value]


# ---------------------------------------------------------------- tracing


def make_plan(fn: Callable[..., Any] | None = None, *, name: str | None = None) -> Any:
    """Trace a torch function into a :class:`Plan`, once, at decoration time.

    Every parameter of ``fn`` needs a default that fixes its dtype and shape:
    a tensor, a list or tuple of tensors, or a Python number (which becomes
    a 0-d tensor). The function must return a tensor or a tuple/list of
    tensors (nested lists are flattened). Autograd inside the function
    (``loss.backward()``, ``torch.autograd.grad``) is recorded as explicit
    backward operations.

    Usable as ``@make_plan`` or ``@make_plan(name="training_plan")``.

    Raises:
        PlanError: a parameter lacks a usable default, the function depends
            on tensor values for control flow, or it uses an operation that
            is not on the allow-list; the message names the op or the line.
    """
    if fn is None:
        return functools.partial(make_plan, name=name)
    return trace(fn, name=name or fn.__name__)


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
) -> Plan:
    """Trace ``fn`` on ``example_args`` (or its defaults) into a plan."""
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
        args: list[Any] = []
        position = 0
        for _, size in signature:
            if size is None:
                args.append(flat[position])
                position += 1
            else:
                args.append(list(flat[position : position + size]))
                position += size
        return _flatten_outputs(fn(*args))

    try:
        graph = make_fx(flat_fn)(*[t.clone() for t in dummy])
        # A second pass turns in-place updates (p.sub_(...), .grad
        # accumulation) into pure operations; writes back into the inputs
        # are then dropped, because a plan returns new values instead.
        graph = make_fx(functionalize(graph, remove="mutations"))(
            *[t.clone() for t in dummy]
        )
    except PlanError:
        raise
    except Exception as exc:
        raise PlanError(
            f"cannot trace {fn.__name__}{_user_line(exc, fn)}: {_first_line(exc)}"
        ) from exc
    return _from_graph(name, graph, inputs, signature, fn)


def _flatten_outputs(result: Any) -> list[torch.Tensor]:
    if isinstance(result, torch.Tensor):
        return [result]
    if isinstance(result, (list, tuple)):
        flat: list[torch.Tensor] = []
        for item in result:
            flat.extend(_flatten_outputs(item))
        return flat
    raise PlanError(
        f"a plan must return tensors (or lists of them); got {type(result).__name__}"
    )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _user_line(exc: BaseException, fn: Callable[..., Any]) -> str:
    filename = getattr(getattr(fn, "__code__", None), "co_filename", None)
    for frame in reversed(traceback.extract_tb(exc.__traceback__)):
        if frame.filename == filename:
            return f" (line {frame.lineno}: {(frame.line or '').strip()})"
    return ""


def _node_origin(node: Any, fn: Callable[..., Any]) -> str:
    trace_text = node.meta.get("stack_trace") or ""
    filename = getattr(getattr(fn, "__code__", None), "co_filename", None)
    lines = trace_text.strip().splitlines()
    for i, line in enumerate(lines):
        if filename and filename in line and i + 1 < len(lines):
            return f" (at {line.strip()}: {lines[i + 1].strip()})"
    return ""


def _from_graph(
    name: str,
    graph: Any,
    inputs: list[InputSpec],
    signature: list[tuple[str, int | None]],
    fn: Callable[..., Any],
) -> Plan:
    _drop_input_writes(graph)

    values: dict[Any, Any] = {}
    constants: list[tuple[str, torch.Tensor]] = []
    ops: list[_Op] = []
    placeholders = [n for n in graph.graph.nodes if n.op == "placeholder"]
    for index, node in enumerate(placeholders):
        values[node] = index
    attributes = [n for n in graph.graph.nodes if n.op == "get_attr"]
    for node in attributes:
        tensor = getattr(graph, node.target)
        values[node] = len(inputs) + len(constants)
        constants.append((f"c{len(constants)}", tensor.detach().clone()))
    defined = len(inputs) + len(constants)

    outputs: list[int] = []
    for node in graph.graph.nodes:
        if node.op == "call_function":
            defined = _add_op(node, values, ops, defined, fn)
        elif node.op == "output":
            for item in _flatten_nodes(node.args[0]):
                ref = _encode_arg(item, values)
                if not isinstance(ref, _Ref):
                    raise PlanError(f"output {item!r} of {fn.__name__} is not a tensor")
                outputs.append(ref.index)
    return Plan(name, inputs, signature, constants, ops, outputs)


def _drop_input_writes(graph: Any) -> None:
    for node in list(graph.graph.nodes):
        is_write = node.op == "call_function" and node.target in (
            torch.ops.aten.copy_.default,
        )
        if is_write and node.args[0].op == "placeholder" and not node.users:
            graph.graph.erase_node(node)
    graph.graph.eliminate_dead_code()


def _flatten_nodes(value: Any) -> list[Any]:
    if isinstance(value, (list, tuple)):
        return [leaf for item in value for leaf in _flatten_nodes(item)]
    return [value]


def _add_op(
    node: Any, values: dict[Any, Any], ops: list[_Op], defined: int, fn: Any
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
    if op_name not in ALLOWED_OPS:
        raise PlanError(
            f"{fn.__name__} uses {op_name}{_node_origin(node, fn)}, which is not "
            "an allowed plan operation; express it with allowed tensor maths"
        )

    example = node.meta.get("val")
    returns = target._schema.returns
    has_list_output = len(returns) == 1 and str(returns[0].type) == "List[Tensor]"
    if has_list_output or len(returns) > 1:
        count = len(example) if example is not None else len(returns)
        values[node] = list(range(defined, defined + count))
    else:
        count = len(returns)
        values[node] = defined

    ops.append(
        _Op(
            op_name,
            ALLOWED_OPS[op_name],
            [_encode_arg(arg, values) for arg in node.args],
            {key: _encode_arg(arg, values) for key, arg in node.kwargs.items()},
            count,
            has_list_output,
        )
    )
    return defined + count


def _encode_arg(arg: Any, values: dict[Any, Any]) -> Any:
    if hasattr(arg, "op") and hasattr(arg, "users"):
        index = values[arg]
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

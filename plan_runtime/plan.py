"""Plans: a traced torch computation as a portable, safe CBOR document.

A :class:`Plan` holds inputs with fixed dtypes and shapes, constants, and an
ordered list of operations from the allow-list in :mod:`plan_runtime.ops`,
each reading earlier values. :func:`plan_runtime.trace.make_plan` makes one
from a torch function; :meth:`Plan.from_bytes` loads one from untrusted
bytes. The document format is specified in ``docs/plan-format.md``; in
short (version 1)::

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
"cpu"}``, ``{"layout": "strided"}``, ``{"memory_format": ...}``, or
``{"rng": i}`` for the plan's random generator seeded from input ``i``.

Loading a plan never unpickles, evaluates or imports anything: operation
names are looked up in a fixed table, every reference is checked to point
at a value already defined, and a dry run on shape-only (meta) tensors
sizes every intermediate before any real memory is spent on the plan.

Random operations never touch torch's global generator. Each call creates
one ``torch.Generator`` per seed input, seeded with ``manual_seed(seed)``,
and every random operation that names that input draws from it in the
order of the operation list, so a plan's outputs are a function of its
inputs alone, and concurrent calls do not share random state.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import cbor2
import torch

from plan_runtime.ops import ALLOWED_OPS, IMPLEMENTATIONS, RANDOM_OPS
from plan_runtime.state import (
    _STATE_DECODERS,
    DTYPE_NAMES,
    DTYPES_BY_NAME,
    MAX_DIMS,
    MAX_ELEMENTS,
    StateError,
    _loads,
    decode_tensor,
    encode_tensor,
)

__all__ = [
    "DEFAULT_MAX_MEMORY_BYTES",
    "PLAN_FORMAT",
    "PLAN_VERSION",
    "InputSpec",
    "MemoryProfile",
    "OpError",
    "Plan",
    "PlanError",
    "make_plan",
]

PLAN_FORMAT = "nimble-edge/plan"
PLAN_VERSION = 1
MAX_PLAN_BYTES = 256 * 1024 * 1024
MAX_OPS = 100_000
MAX_OUTPUTS_PER_OP = 1024
# Argument lists nest only a few levels (a list of references, or a list of
# lists of sizes); the limit keeps a hostile document from recursing deeply.
MAX_DEPTH = 32
# What a device lets one plan hold at once, inputs included, unless the
# caller says otherwise: enough for a small CNN at a large batch, well under
# the memory of a phone or a Raspberry Pi.
DEFAULT_MAX_MEMORY_BYTES = 1024 * 1024 * 1024

_DEVICES = {"cpu": torch.device("cpu")}
_META = torch.device("meta")
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


class OpError(PlanError):
    """One op of a plan cannot run or needs too much memory.

    Attributes:
        op_name: the op's allow-list name, such as ``aten::mm``.
    """

    def __init__(self, message: str, op_name: str):
        super().__init__(message)
        self.op_name = op_name


@dataclass(frozen=True)
class InputSpec:
    """One flat input of a plan: its name, dtype and fixed shape."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]


@dataclass(frozen=True)
class _Ref:
    index: int


@dataclass(frozen=True)
class _Rng:
    """The plan's generator seeded from input ``index``."""

    index: int


@dataclass
class _Op:
    name: str
    fn: Any
    args: list[Any]
    kwargs: dict[str, Any]
    n: int
    has_list_output: bool = field(default=False)
    # Filled in when the plan is built: the values whose last reader is
    # this op, and whether arguments can be resolved by the fast path.
    release: tuple[int, ...] = field(default=())
    is_flat: bool = field(default=False)


@dataclass(frozen=True)
class OpMemory:
    """What one op allocates in the dry run."""

    outputs: tuple[tuple[str, tuple[int, ...]], ...]
    new_bytes: int
    live_bytes: int


@dataclass(frozen=True)
class MemoryProfile:
    """The dry run's account of a plan's memory, in bytes.

    Attributes:
        resident_bytes: inputs and constants, held for the whole call.
        peak_bytes: the most that is held at once, resident bytes included.
        peak_op: the op at which the peak is reached (None: before any op).
        ops: per op, its outputs' dtypes and shapes, the bytes of new
            storage it allocates, and the bytes held right after it.
        outputs: the dtype name and shape of each of the plan's outputs.
    """

    resident_bytes: int
    peak_bytes: int
    peak_op: int | None
    ops: tuple[OpMemory, ...]
    outputs: tuple[tuple[str, tuple[int, ...]], ...]


# ---------------------------------------------------------------- the plan


class Plan:
    """A traced computation: call it like the function it was made from.

    ``plan(xs, ys, batch_size, lr, params)`` and the flat form
    ``plan(xs, ys, batch_size, lr, *params)`` are the same call. Python
    numbers are accepted where the plan has a 0-d input. The result is a
    tuple of tensors.

    Building a plan runs the dry run: a plan whose peak memory would pass
    ``max_memory_bytes`` is refused with a :class:`PlanError` that names the
    op, before any real tensor is made.

    Attributes:
        function: the torch function the plan was traced from, when it was
            traced in this process (never stored in the document).
        example_args: the arguments it was traced with, likewise.
        memory: the dry run's :class:`MemoryProfile`.
    """

    def __init__(
        self,
        name: str,
        inputs: list[InputSpec],
        signature: list[tuple[str, int | None]],
        constants: list[tuple[str, torch.Tensor]],
        ops: list[_Op],
        outputs: list[int],
        *,
        max_memory_bytes: int = DEFAULT_MAX_MEMORY_BYTES,
    ):
        self.name = name
        self.inputs = inputs
        self.signature = signature
        self.constants = constants
        self.ops = ops
        self.outputs = outputs
        self.function: Callable[..., Any] | None = None
        self.example_args: tuple[Any, ...] | None = None
        self.seed_inputs = sorted(
            {op.kwargs["generator"].index for op in ops if op.name in RANDOM_OPS}
        )
        _plan_releases(self)
        self.memory = _dry_run(self, max_memory_bytes)

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
        generators = {
            index: torch.Generator().manual_seed(int(values[index]))
            for index in self.seed_inputs
        }

        with torch.no_grad():
            for position, op in enumerate(self.ops):
                if op.is_flat:
                    resolved = [
                        values[a.index] if type(a) is _Ref else a for a in op.args
                    ]
                    kwargs = op.kwargs
                else:
                    resolved = _resolve(op.args, values, generators)
                    kwargs = _resolve(op.kwargs, values, generators)
                try:
                    result = op.fn(*resolved, **kwargs)
                except (RuntimeError, TypeError, ValueError, IndexError) as exc:
                    raise PlanError(
                        f"op {position} ({op.name}) of plan {self.name!r} failed: {exc}"
                    ) from exc
                if op.n == 1 and not op.has_list_output:
                    values.append(result)
                else:
                    values.extend(_check_count(result, op, position))
                # Dropping each value after its last reader keeps the peak
                # where the dry run measured it.
                for index in op.release:
                    values[index] = None
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
                f"({self.signature_text()}); got {len(flat)}"
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
                    f"shape {list(spec.shape)}; got {describe(value)}"
                )
            bound.append(value.detach())
        return bound

    def signature_text(self) -> str:
        """The plan's parameters as text: ``xs, ys, params: 4 tensors``."""
        parts = [
            name if size is None else f"{name}: {size} tensors"
            for name, size in self.signature
        ]
        return ", ".join(parts)

    def zeros(self) -> list[torch.Tensor]:
        """One zero tensor per input, in order: arguments the plan accepts."""
        return [torch.zeros(spec.shape, dtype=spec.dtype) for spec in self.inputs]

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
    def from_bytes(
        cls,
        data: bytes,
        *,
        max_bytes: int = MAX_PLAN_BYTES,
        max_memory_bytes: int = DEFAULT_MAX_MEMORY_BYTES,
    ) -> Plan:
        """Load and check a plan document from untrusted bytes.

        Args:
            data: the document.
            max_bytes: refuse a longer document before decoding it.
            max_memory_bytes: refuse a plan whose dry run holds more than
                this at once, inputs and constants included.

        Raises:
            PlanError: the document is malformed, names an operation that is
                not on the allow-list, refers to a value before it exists,
                cannot run on the shapes it declares, or needs more memory
                than ``max_memory_bytes``.
        """
        if len(data) > max_bytes:
            raise PlanError(
                f"plan document is {len(data)} bytes; the limit is {max_bytes}"
            )
        try:
            document = _loads(data, _STATE_DECODERS, MAX_DEPTH)
        except StateError as exc:
            raise PlanError(f"plan document is not valid CBOR: {exc}") from exc
        return _load_document(document, max_memory_bytes)


def describe(value: torch.Tensor) -> str:
    """``float32 of shape [3, 4]``: a tensor's dtype and shape for messages."""
    dtype = DTYPE_NAMES.get(value.dtype, str(value.dtype))
    return f"{dtype} of shape {list(value.shape)}"


def _check_count(result: Any, op: _Op, position: int) -> Any:
    if len(result) != op.n:
        raise PlanError(
            f"op {position} ({op.name}) returned {len(result)} values; "
            f"the plan expects {op.n}"
        )
    return result


def _resolve(template: Any, values: list[Any], generators: dict[int, Any]) -> Any:
    if isinstance(template, _Ref):
        return values[template.index]
    if isinstance(template, _Rng):
        return generators.get(template.index)
    if isinstance(template, list):
        return [_resolve(item, values, generators) for item in template]
    if isinstance(template, dict):
        return {k: _resolve(item, values, generators) for k, item in template.items()}
    return template


def _has_refs(template: Any) -> bool:
    if isinstance(template, (_Ref, _Rng)):
        return True
    if isinstance(template, list):
        return any(_has_refs(item) for item in template)
    if isinstance(template, dict):
        return any(_has_refs(item) for item in template.values())
    return False


def _refs_in(template: Any) -> list[int]:
    if isinstance(template, _Ref):
        return [template.index]
    if isinstance(template, list):
        return [i for item in template for i in _refs_in(item)]
    if isinstance(template, dict):
        return [i for item in template.values() for i in _refs_in(item)]
    return []


def _encode_literal(value: Any) -> Any:
    if isinstance(value, _Ref):
        return {"ref": value.index}
    if isinstance(value, _Rng):
        return {"rng": value.index}
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


def _plan_releases(plan: Plan) -> None:
    last_use: dict[int, int] = {}
    for position, op in enumerate(plan.ops):
        for index in _refs_in(op.args) + _refs_in(op.kwargs):
            last_use[index] = position
        flat_args = all(
            type(a) is _Ref or not isinstance(a, (list, dict, _Rng)) for a in op.args
        )
        op.is_flat = flat_args and not _has_refs(op.kwargs)
    # Inputs belong to the caller and constants to the plan: dropping them
    # would free nothing.
    held = len(plan.inputs) + len(plan.constants)
    kept = set(plan.outputs)
    releases: dict[int, list[int]] = {}
    for index, position in last_use.items():
        if index >= held and index not in kept:
            releases.setdefault(position, []).append(index)
    for position, op in enumerate(plan.ops):
        op.release = tuple(sorted(releases.get(position, ())))


# ---------------------------------------------------------------- limits


def _dry_run(plan: Plan, limit: int) -> MemoryProfile:
    """Run every op on meta tensors, counting the bytes of live storage.

    Views share their base's storage and are not counted again; a storage
    is freed when the last value that reads it has had its last reader,
    which is what the interpreter does.
    """
    values: list[Any] = [
        torch.empty(spec.shape, dtype=spec.dtype, device=_META) for spec in plan.inputs
    ]
    values += [torch.empty_like(t, device=_META) for _, t in plan.constants]
    owners: dict[int, int] = {}
    sizes: dict[int, int] = {}

    def hold(tensor: torch.Tensor | None) -> int:
        if tensor is None:
            return 0
        storage = tensor.untyped_storage()
        key = storage._cdata
        owners[key] = owners.get(key, 0) + 1
        if owners[key] > 1:
            return 0
        sizes[key] = storage.nbytes()
        return sizes[key]

    def drop(tensor: torch.Tensor | None) -> int:
        if tensor is None:
            return 0
        key = tensor.untyped_storage()._cdata
        owners[key] -= 1
        if owners[key]:
            return 0
        del owners[key]
        return sizes.pop(key)

    live = sum(hold(t) for t in values)
    resident = live
    specs: list[Any] = [_spec(t) for t in values]
    if live > limit:
        raise PlanError(
            f"plan {plan.name!r} needs {_size(live)} for its inputs and "
            f"constants alone; the limit is {_size(limit)}"
        )
    peak, peak_op = live, None
    profile: list[OpMemory] = []
    for position, op in enumerate(plan.ops):
        outputs = _meta_call(plan, op, position, values)
        new_bytes = sum(hold(t) for t in outputs)
        live += new_bytes
        if live > limit:
            shapes = ", ".join(describe(t) for t in outputs if t is not None)
            raise OpError(
                f"op {position} ({op.name}) of plan {plan.name!r} would hold "
                f"{_size(live)} at once (it makes {shapes}); the limit is "
                f"{_size(limit)}",
                op.name,
            )
        if live > peak:
            peak, peak_op = live, position
        profile.append(
            OpMemory(
                tuple(_spec(t) for t in outputs if t is not None),
                new_bytes,
                live,
            )
        )
        values.extend(outputs)
        specs.extend(None if t is None else _spec(t) for t in outputs)
        for index in op.release:
            live -= drop(values[index])
            values[index] = None
    outputs_spec = tuple(specs[i] for i in plan.outputs)
    if any(spec is None for spec in outputs_spec):
        raise PlanError(f"plan {plan.name!r} returns a value that is not a tensor")
    return MemoryProfile(resident, peak, peak_op, tuple(profile), outputs_spec)


def _meta_call(
    plan: Plan, op: _Op, position: int, values: list[Any]
) -> list[torch.Tensor | None]:
    args = _resolve(op.args, values, {})
    kwargs = _resolve(op.kwargs, values, {})
    # Factory ops would otherwise allocate on the CPU for real.
    if any(a.name == "device" for a in ALLOWED_OPS[op.name]._schema.arguments):
        kwargs["device"] = _META
    try:
        result = ALLOWED_OPS[op.name](*args, **kwargs)
    except Exception as exc:
        # Any failure here is the document's: the op cannot run on the
        # shapes and arguments the plan gives it.
        raise OpError(
            f"op {position} ({op.name}) of plan {plan.name!r} cannot run on "
            f"the values it is given: {_first_line(exc)}",
            op.name,
        ) from exc
    outputs = [result] if op.n == 1 and not op.has_list_output else list(result)
    _check_count(outputs, op, position)
    for tensor in outputs:
        # An op may leave an optional output undefined (a gradient that
        # was not asked for); it is None when the plan runs, too.
        is_meta = isinstance(tensor, torch.Tensor) and tensor.device == _META
        if tensor is not None and not is_meta:
            raise PlanError(
                f"op {position} ({op.name}) of plan {plan.name!r} does not "
                "return tensors"
            )
    return outputs


def _spec(tensor: torch.Tensor) -> tuple[str, tuple[int, ...]]:
    return DTYPE_NAMES.get(tensor.dtype, str(tensor.dtype)), tuple(tensor.shape)


def _size(nbytes: int) -> str:
    return f"{nbytes} bytes ({nbytes / 2**20:.1f} MiB)"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


# ---------------------------------------------------------------- loading


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise PlanError(message)


def _load_document(document: Any, max_memory_bytes: int) -> Plan:
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
        op = _load_op(raw, position, defined, inputs)
        ops.append(op)
        defined += op.n

    raw_outputs = document.get("outputs")
    _require(isinstance(raw_outputs, list), '"outputs" must be a list of references')
    outputs = []
    for raw in raw_outputs:
        ref = _load_arg(raw, defined, "outputs", depth=0)
        _require(isinstance(ref, _Ref), f"outputs must be references; got {raw!r:.60}")
        outputs.append(ref.index)
    return Plan(
        name,
        inputs,
        signature,
        constants,
        ops,
        outputs,
        max_memory_bytes=max_memory_bytes,
    )


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
            and len(shape) <= MAX_DIMS
            and all(type(d) is int and 0 <= d <= MAX_ELEMENTS for d in shape),
            f"input {index} shape must be a list of at most {MAX_DIMS} integers "
            f"from 0 to {MAX_ELEMENTS}",
        )
        # Also when a 0 makes it empty: the strides of the other dimensions
        # would still overflow.
        _require(
            math.prod(d for d in shape if d) <= MAX_ELEMENTS,
            f"input {index} shape {shape} holds more than {MAX_ELEMENTS} elements",
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


def _load_op(raw: Any, position: int, defined: int, inputs: list[InputSpec]) -> _Op:
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
    op = _Op(
        name,
        IMPLEMENTATIONS[name],
        [_load_arg(arg, defined, where, depth=1) for arg in args],
        {key: _load_arg(arg, defined, where, depth=1) for key, arg in kwargs.items()},
        n,
        has_list_output,
    )
    _check_rng(op, where, inputs)
    return op


def _check_rng(op: _Op, where: str, inputs: list[InputSpec]) -> None:
    """Random ops must draw from the plan's generator; no other op may name it."""
    generator = op.kwargs.get("generator")
    if op.name not in RANDOM_OPS:
        _require(
            not any(isinstance(a, _Rng) for a in _flatten(op.args, op.kwargs)),
            f"{where} ({op.name}) draws no random numbers but is given a generator",
        )
        return
    _require(
        isinstance(generator, _Rng),
        f'{where} ({op.name}) draws random numbers: its "generator" argument '
        'must be {"rng": <index of the seed input>}',
    )
    assert isinstance(generator, _Rng)
    seed = inputs[generator.index] if generator.index < len(inputs) else None
    _require(
        seed is not None and seed.dtype == torch.int64 and seed.shape == (),
        f"{where} ({op.name}): a generator must be seeded from a 0-d int64 "
        f"input; value {generator.index} is not one",
    )
    _require(
        not any(isinstance(a, _Rng) for a in _flatten(op.args, {})),
        f'{where} ({op.name}): a generator may only be the "generator" argument',
    )


def _flatten(args: list[Any], kwargs: dict[str, Any]) -> list[Any]:
    flat: list[Any] = []
    for item in [*args, *kwargs.values()]:
        flat.extend(_flatten(item, {}) if isinstance(item, list) else [item])
    return flat


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
    if kind in ("ref", "rng"):
        _require(
            type(value) is int and 0 <= value < defined,
            f"{where} refers to value {value!r:.20}, which is not defined yet "
            f"(values 0 to {defined - 1} are)",
        )
        return _Ref(value) if kind == "ref" else _Rng(value)
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


def make_plan(fn: Callable[..., Any] | None = None, **options: Any) -> Any:
    """Trace a torch function into a :class:`Plan`; see :mod:`plan_runtime.trace`."""
    from plan_runtime.trace import make_plan as make

    return make(fn, **options)

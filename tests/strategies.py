"""Hypothesis strategies shared by the test modules."""

from __future__ import annotations

import torch
from hypothesis import strategies as st

# Every dtype the wire format carries: the RFC 8746 ones and the named forms.
WIRE_DTYPES = [
    torch.bool,
    torch.uint8,
    torch.int8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.float16,
    torch.bfloat16,
    torch.float32,
    torch.float64,
]

# Up to 4 dimensions of up to 5 elements; 0 is included so that empty
# tensors are exercised, and () gives the 0-d case.
shapes = st.lists(st.integers(min_value=0, max_value=5), min_size=0, max_size=4).map(
    tuple
)


@st.composite
def tensors(draw: st.DrawFn, dtype: torch.dtype | None = None) -> torch.Tensor:
    dtype = dtype or draw(st.sampled_from(WIRE_DTYPES))
    shape = draw(shapes)
    seed = draw(st.integers(min_value=0, max_value=2**31 - 1))
    generator = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=generator).bool()
    if dtype.is_floating_point:
        # Scaled normals cover signs and magnitudes; NaN and inf are not
        # excluded by the codec, but they break == comparison, so they have
        # their own test.
        return (torch.randn(shape, generator=generator) * 100).to(dtype)
    info = torch.iinfo(dtype)
    return torch.randint(info.min, info.max, shape, generator=generator, dtype=dtype)


names = st.text(min_size=1, max_size=20)


@st.composite
def states(draw: st.DrawFn) -> dict[str, torch.Tensor]:
    keys = draw(st.lists(names, min_size=0, max_size=5, unique=True))
    return {key: draw(tensors()) for key in keys}


# Any value cbor2 can encode, for fuzzing: huge and negative integers, NaN
# and infinities, byte and text strings, nested lists and maps with keys of
# mixed types (which JSON cannot carry, so JSON fuzzing uses json_values).
cbor_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**64), max_value=2**64)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=30)
    | st.binary(max_size=60),
    lambda children: (
        st.lists(children, max_size=6)
        | st.dictionaries(st.text(max_size=12) | st.integers(), children, max_size=6)
    ),
    max_leaves=25,
)

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**30), max_value=10**30)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=30),
    lambda children: (
        st.lists(children, max_size=6)
        | st.dictionaries(st.text(max_size=12), children, max_size=6)
    ),
    max_leaves=25,
)

# Field names the routes read, so that fuzzed maps often reach the checks
# past "missing field".
route_fields = st.sampled_from(
    [
        "model_name",
        "model_version",
        "auth_token",
        "worker_id",
        "model",
        "version",
        "request_key",
        "diff",
        "num_samples",
        "metrics",
        "download",
        "upload",
        "client_config",
        "server_config",
        "plans",
        "protocols",
        "averaging_plan",
        "name",
        "checkpoint",
    ]
)

messages = st.dictionaries(route_fields, cbor_values, max_size=8)


# Model shapes for the plan-versus-eager tests: small enough that tracing an
# example takes a fraction of a second, and reaching the 1-sized dimensions
# where broadcasting and squeezing go wrong.
mlp_shapes = st.fixed_dictionaries(
    {
        "inputs": st.integers(1, 12),
        "hidden": st.integers(1, 16),
        "classes": st.integers(2, 6),
        "batch": st.integers(1, 9),
        "seed": st.integers(0, 1000),
    }
)

# Even image sizes only: a 2x2 max-pool then halves them exactly, which the
# linear layer's input size assumes.
cnn_shapes = st.fixed_dictionaries(
    {
        "channels": st.integers(1, 4),
        "size": st.sampled_from([4, 6, 8]),
        "batch": st.integers(1, 4),
        "seed": st.integers(0, 1000),
    }
)


# Non-empty tensors only: a model tensor with no elements has no coordinates
# to average (empty tensors have their own codec test).
shapes_nonempty = st.lists(st.integers(1, 4), min_size=0, max_size=3).map(tuple)


@st.composite
def cycles(draw: st.DrawFn) -> dict[str, object]:
    """A model, the diffs of one cycle, and how a cycle plan reads them.

    ``rows`` is at least the number of diffs, as the server requires of a
    cycle plan; ``stack_bytes`` goes down to one block, so that the diffs
    are read in many passes.
    """
    shapes = draw(st.lists(shapes_nonempty, min_size=1, max_size=3))
    count = draw(st.integers(1, 5))
    seed = draw(st.integers(0, 2**31 - 1))
    generator = torch.Generator().manual_seed(seed)
    base = {f"t{i}": torch.randn(s, generator=generator) for i, s in enumerate(shapes)}
    diffs = [
        {name: torch.randn(t.shape, generator=generator) for name, t in base.items()}
        for _ in range(count)
    ]
    rows = draw(st.integers(count, count + 2))
    chunk = draw(st.integers(1, 6))
    blocks = draw(st.integers(1, 4))
    return {
        "base": base,
        "diffs": diffs,
        "rows": rows,
        "chunk": chunk,
        "stack_bytes": blocks * rows * chunk * 4,
    }

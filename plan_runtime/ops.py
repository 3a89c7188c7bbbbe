"""The allow-list: the only operations a plan may name.

Each entry is an ATen operator overload written as its schema name
(``aten::mm``, ``aten::add.Tensor``). They are pure tensor maths: none reads
or writes files, sockets or Python objects, and none mutates its inputs.
The table is built once, from this fixed list, by attribute lookups on
``torch.ops.aten``; nothing that a plan document names is ever looked up
anywhere else. Entries that an older torch lacks are left out.

Two groups behave differently from plain ATen:

- Ops that return uninitialised memory (``aten::empty...``, ``new_empty``)
  run as their zero-filled twins, so that a plan can never read memory it
  did not write: on the server that memory may have held another process's
  diffs.
- Random ops are allowed only in the overload that takes a generator, and
  the loader insists that the generator is the plan's own, seeded from an
  input (see :mod:`plan_runtime.plan`), so that no plan touches torch's
  global random state.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

__all__ = [
    "ALLOWED_OPS",
    "IDENTITY_OPS",
    "IMPLEMENTATIONS",
    "RANDOM_OPS",
    "RANDOM_OVERLOADS",
    "allowed_op",
]

_ELEMENTWISE = """
abs neg exp exp2 log log2 log10 log1p expm1 sqrt rsqrt reciprocal sign sgn
sin cos tan asin acos atan sinh cosh tanh asinh acosh atanh sigmoid erf erfc
floor ceil round trunc frac relu gelu silu mish hardsigmoid hardswish
logical_not bitwise_not isnan isinf isfinite isneginf isposinf signbit
nan_to_num square logit
""".split()

_OVERLOADED = """
add.Tensor add.Scalar sub.Tensor sub.Scalar rsub.Tensor rsub.Scalar
mul.Tensor mul.Scalar div.Tensor div.Scalar div.Tensor_mode div.Scalar_mode
true_divide.Tensor floor_divide.default remainder.Tensor remainder.Scalar
fmod.Tensor fmod.Scalar pow.Tensor_Scalar pow.Tensor_Tensor pow.Scalar
eq.Tensor eq.Scalar ne.Tensor ne.Scalar lt.Tensor lt.Scalar le.Tensor
le.Scalar gt.Tensor gt.Scalar ge.Tensor ge.Scalar
maximum.default minimum.default atan2.default hypot.default logaddexp.default
logical_and.default logical_or.default logical_xor.default
bitwise_and.Tensor bitwise_or.Tensor bitwise_xor.Tensor
clamp.default clamp.Tensor clamp_min.default clamp_max.default
where.self where.ScalarSelf where.ScalarOther where.Scalar
masked_fill.Scalar masked_fill.Tensor lerp.Scalar lerp.Tensor
leaky_relu.default elu.default hardtanh.default softplus.default
threshold.default celu.default selu.default prelu.default
round.decimals addcmul.default addcdiv.default
sum.default sum.dim_IntList mean.default mean.dim prod.default prod.dim_int
nansum.default nanmean.default
amax.default amin.default max.default min.default max.dim min.dim
argmax.default argmin.default var.correction std.correction
var_mean.correction logsumexp.default cumsum.default cumprod.default
linalg_vector_norm.default norm.Scalar norm.ScalarOpt_dim all.default any.default
all.dim any.dim count_nonzero.default topk.default sort.default sort.stable
median.default median.dim nanmedian.default nanmedian.dim kthvalue.default
mm.default addmm.default bmm.default baddbmm.default matmul.default
dot.default mv.default addmv.default outer.default
t.default transpose.int permute.default view.default _unsafe_view.default
reshape.default expand.default squeeze.default squeeze.dim squeeze.dims
unsqueeze.default flatten.using_ints unflatten.int slice.Tensor select.int
narrow.default index_select.default gather.default scatter.src scatter.value
scatter_add.default scatter_reduce.two index.Tensor index_put.default
index_add.default cat.default stack.default split.Tensor split_with_sizes.default
unbind.int chunk.default repeat.default tile.default flip.default roll.default
diagonal.default
clone.default contiguous.default _to_copy.default alias.default detach.default
lift_fresh_copy.default copy.default fill.Scalar fill.Tensor
zeros_like.default ones_like.default full_like.default empty_like.default
zeros.default ones.default full.default
empty.memory_format scalar_tensor.default arange.default arange.start
arange.start_step new_zeros.default new_ones.default new_full.default
new_empty.default eye.default tril.default triu.default diag.default
constant_pad_nd.default pad.default
embedding.default embedding_dense_backward.default one_hot.default
_log_softmax.default _log_softmax_backward_data.default _softmax.default
_softmax_backward_data.default log_softmax.int softmax.int
nll_loss_forward.default nll_loss_backward.default nll_loss2d_forward.default
nll_loss2d_backward.default mse_loss.default mse_loss_backward.default
binary_cross_entropy.default binary_cross_entropy_backward.default
binary_cross_entropy_with_logits.default smooth_l1_loss.default
smooth_l1_loss_backward.default huber_loss.default huber_loss_backward.default
l1_loss.default
convolution.default convolution_backward.default
max_pool2d_with_indices.default max_pool2d_with_indices_backward.default
max_pool1d_with_indices.default
avg_pool2d.default avg_pool2d_backward.default avg_pool1d.default
_adaptive_avg_pool2d.default _adaptive_avg_pool2d_backward.default
native_batch_norm_backward.default
_native_batch_norm_legit_functional.default
_native_batch_norm_legit.no_stats _native_batch_norm_legit_no_training.default
native_layer_norm.default native_layer_norm_backward.default
native_group_norm.default native_group_norm_backward.default
threshold_backward.default gelu_backward.default sigmoid_backward.default
tanh_backward.default silu_backward.default hardtanh_backward.default
leaky_relu_backward.default elu_backward.default softplus_backward.default
native_dropout_backward.default
bernoulli.default bernoulli.p bernoulli.Tensor uniform.default
normal_functional.default rand.generator randn.generator
rand_like.generator randn_like.generator randint_like.generator
randint_like.low_generator_dtype
""".split()
# Left out on purpose: aten::native_batch_norm and aten::_native_batch_norm_legit
# update their running-stat arguments in place (the first without saying so
# in its schema); tracing turns them into the functional form above. Random
# ops without a generator argument (native_dropout, rand_like, ...) would draw
# from torch's global generator; tracing rewrites them (RANDOM_OVERLOADS).

# Ops that only rename a value once a plan runs without autograd and without
# mutation: tracing replaces them by their input.
IDENTITY_OPS = frozenset({"aten::detach", "aten::alias", "aten::lift_fresh_copy"})

# Random ops that take no generator, and the overload that does.
RANDOM_OVERLOADS = {
    "aten::rand": "aten::rand.generator",
    "aten::randn": "aten::randn.generator",
    "aten::rand_like": "aten::rand_like.generator",
    "aten::randn_like": "aten::randn_like.generator",
    "aten::randint_like": "aten::randint_like.generator",
    "aten::randint_like.low_dtype": "aten::randint_like.low_generator_dtype",
}

_UNINITIALISED = frozenset(
    {"aten::empty.memory_format", "aten::empty_like", "aten::new_empty"}
)


def _schema_name(packet: str, overload: str) -> str:
    return f"aten::{packet}" if overload == "default" else f"aten::{packet}.{overload}"


def _build() -> dict[str, Any]:
    table: dict[str, Any] = {}
    entries = [f"{name}.default" for name in _ELEMENTWISE] + _OVERLOADED
    for entry in entries:
        packet, overload = entry.split(".", 1)
        op = getattr(getattr(torch.ops.aten, packet, None), overload, None)
        if op is not None:
            table[_schema_name(packet, overload)] = op
    return table


def _takes_generator(op: Any) -> bool:
    return any("Generator" in str(a.type) for a in op._schema.arguments)


def _zero_filled(op: Any) -> Callable[..., torch.Tensor]:
    def run(*args: Any, **kwargs: Any) -> torch.Tensor:
        result: torch.Tensor = op(*args, **kwargs)
        return result.zero_()

    return run


ALLOWED_OPS: dict[str, Any] = _build()

# What the interpreter calls for each name: the op itself, except for the
# ops that would hand out uninitialised memory.
IMPLEMENTATIONS: dict[str, Callable[..., Any]] = {
    name: _zero_filled(op) if name in _UNINITIALISED else op
    for name, op in ALLOWED_OPS.items()
}

RANDOM_OPS = frozenset(name for name, op in ALLOWED_OPS.items() if _takes_generator(op))


def allowed_op(name: str) -> Any:
    """Return the ATen overload for ``name``, or None when it is not allowed."""
    return ALLOWED_OPS.get(name)

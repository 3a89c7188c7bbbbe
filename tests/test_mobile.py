"""Mobile forms compute what the portable plan computes."""

from __future__ import annotations

import importlib.util
import io

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from plan_runtime.mobile import MobileFormError, to_executorch, to_torchscript
from plan_runtime.plan import Plan
from plan_runtime.trace import make_plan

HAS_EXECUTORCH = importlib.util.find_spec("executorch") is not None

# torch.jit.load warns that it is deprecated; that is the point of the form.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")


def cnn_plan(*, batchnorm: bool = False, dropout: bool = False) -> Plan:
    torch.manual_seed(0)
    layers: list[torch.nn.Module] = [torch.nn.Conv2d(1, 2, 3, padding=1)]
    if batchnorm:
        layers.append(torch.nn.BatchNorm2d(2))
    layers += [torch.nn.ReLU(), torch.nn.MaxPool2d(2), torch.nn.Flatten()]
    if dropout:
        layers.append(torch.nn.Dropout(0.3))
    layers.append(torch.nn.Linear(2 * 4 * 4, 3))
    model = torch.nn.Sequential(*layers)
    names = [n for n, _ in model.named_parameters()]
    buffer_names = [n for n, _ in model.named_buffers()]

    @make_plan
    def training_plan(
        xs=torch.zeros(4, 1, 8, 8),
        ys=torch.zeros(4, dtype=torch.long),
        batch_size=4,
        lr=0.1,
        params=[p.detach() for p in model.parameters()],
        buffers=[b.detach() for b in model.buffers()],
        seed=0,
    ):
        params = [p.requires_grad_() for p in params]
        state = {**dict(zip(names, params)), **dict(zip(buffer_names, buffers))}
        logits = functional_call(model, state, (xs,))
        loss = F.cross_entropy(logits, ys)
        grads = torch.autograd.grad(loss, params)
        accuracy = (logits.argmax(1) == ys).float().mean()
        return loss, accuracy, [p - lr * g for p, g in zip(params, grads)], buffers

    return training_plan


def random_args(plan: Plan, seed: int = 1) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    args = []
    for spec in plan.inputs:
        if spec.dtype.is_floating_point:
            args.append(torch.randn(spec.shape, generator=generator).abs() + 0.1)
        else:
            args.append(torch.randint(0, 3, spec.shape, generator=generator))
    return args


def assert_same_outputs(got, expected):
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        assert a.shape == b.shape and a.dtype == b.dtype
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)


def test_torchscript_form_matches_the_plan_with_batchnorm_and_dropout():
    plan = cnn_plan(batchnorm=True, dropout=True)
    args = random_args(plan)

    module = torch.jit.load(io.BytesIO(to_torchscript(plan)))

    assert_same_outputs(module(*args), plan(*args))
    args[-1] = torch.tensor(99)
    assert_same_outputs(module(*args), plan(*args))


def test_torchscript_form_of_the_tiny_plan_matches_it(plan):
    args = random_args(plan)

    module = torch.jit.load(io.BytesIO(to_torchscript(plan)))

    assert_same_outputs(module(*args), plan(*args))


def test_torchscript_form_says_so_when_torch_has_no_jit(monkeypatch, plan):
    monkeypatch.delattr(torch, "jit")

    with pytest.raises(MobileFormError, match=r"has no torch\.jit"):
        to_torchscript(plan)


@pytest.mark.skipif(HAS_EXECUTORCH, reason="executorch is installed")
def test_executorch_form_names_the_extra_it_needs(plan):
    with pytest.raises(MobileFormError, match=r"nimble-edge\[mobile\]"):
        to_executorch(plan)


@pytest.mark.skipif(not HAS_EXECUTORCH, reason="needs the [mobile] extra")
@pytest.mark.parametrize("which", ["tiny", "cnn", "cnn-batchnorm"])
def test_executorch_form_matches_the_plan(which, plan):
    from executorch.runtime import Runtime

    chosen = {
        "tiny": plan,
        "cnn": cnn_plan(),
        "cnn-batchnorm": cnn_plan(batchnorm=True),
    }[which]
    args = random_args(chosen)

    program = Runtime.get().load_program(to_executorch(chosen))
    got = program.load_method("forward").execute(args)

    assert_same_outputs(tuple(got), chosen(*args))


@pytest.mark.skipif(not HAS_EXECUTORCH, reason="needs the [mobile] extra")
def test_executorch_form_refuses_a_plan_that_draws_random_numbers():
    with pytest.raises(MobileFormError, match="draws random numbers"):
        to_executorch(cnn_plan(dropout=True))

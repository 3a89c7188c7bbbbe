"""Tracing: autograd, common layers, optimisers, randomness, and refusals."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from plan_runtime import check
from plan_runtime.plan import Plan, PlanError
from plan_runtime.trace import make_plan, trace


def training_step(model, loss_fn=F.cross_entropy, buffers=False):
    """A step in the classic form; with ``buffers`` they are inputs and outputs."""
    names = [name for name, _ in model.named_parameters()]
    buffer_names = [name for name, _ in model.named_buffers()]

    def step(xs, ys, batch_size, lr, params, state, seed):
        params = [p.requires_grad_() for p in params]
        tensors = {**dict(zip(names, params)), **dict(zip(buffer_names, state))}
        out = functional_call(model, tensors, (xs,))
        loss = loss_fn(out, ys)
        grads = torch.autograd.grad(loss, params)
        return loss, [p - lr * g for p, g in zip(params, grads)], state

    def without_buffers(xs, ys, batch_size, lr, params, seed):
        return step(xs, ys, batch_size, lr, params, [], seed)[:2]

    return step if buffers else without_buffers


def example(model, xs, ys, buffers=False):
    params = [p.detach().clone() for p in model.parameters()]
    args = [xs, ys, torch.tensor(len(xs)), torch.tensor(0.1), params]
    if buffers:
        args.append([b.detach().clone() for b in model.buffers()])
    return [*args, torch.tensor(0)]


def classifier(*layers):
    torch.manual_seed(0)
    return torch.nn.Sequential(*layers)


def conv_classifier(pool):
    return classifier(
        torch.nn.Conv2d(1, 2, 3, padding=1),
        torch.nn.ReLU(),
        pool,
        torch.nn.Flatten(),
        torch.nn.Linear(2 * 3 * 3, 3),
    )


LAYERS = {
    "linear-relu": (
        lambda: classifier(
            torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3)
        ),
        (4, 6),
    ),
    "gelu-sigmoid-tanh": (
        lambda: classifier(
            torch.nn.Linear(6, 5),
            torch.nn.GELU(),
            torch.nn.Linear(5, 5),
            torch.nn.Sigmoid(),
            torch.nn.Linear(5, 4),
            torch.nn.Tanh(),
            torch.nn.Linear(4, 3),
        ),
        (4, 6),
    ),
    "conv-maxpool": (lambda: conv_classifier(torch.nn.MaxPool2d(2)), (2, 1, 6, 6)),
    "conv-avgpool": (lambda: conv_classifier(torch.nn.AvgPool2d(2)), (2, 1, 6, 6)),
    "layernorm": (
        lambda: classifier(
            torch.nn.Linear(6, 5), torch.nn.LayerNorm(5), torch.nn.Linear(5, 3)
        ),
        (4, 6),
    ),
}


@pytest.mark.parametrize("layers", sorted(LAYERS))
def test_common_layers_trace_and_match_eager_torch(layers):
    build, shape = LAYERS[layers]
    model = build()
    xs, ys = torch.randn(shape), torch.tensor([0, 2, 1, 2][: shape[0]])
    step = training_step(model)

    plan = trace(step, name=layers, example_args=example(model, xs, ys))
    report = check(plan, steps=0)

    assert report.is_ok, report.format(ops=False)
    assert any(f.name.startswith("eager") for f in report.findings)


def test_embedding_with_mse_loss_traces_and_matches_eager_torch():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(7, 4), torch.nn.Flatten())
    step = training_step(model, loss_fn=F.mse_loss)
    # The largest dummy index keeps the checker's random indices in range.
    xs, ys = torch.tensor([[0, 6], [3, 1]]), torch.randn(2, 8)

    plan = trace(step, name="embedding", example_args=example(model, xs, ys))
    report = check(plan, steps=0)

    assert report.is_ok, report.format(ops=False)
    assert "aten::embedding_dense_backward" in plan.op_names


def test_batchnorm_in_training_mode_returns_its_running_stats():
    model = classifier(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    xs, ys = torch.randn(5, 3), torch.tensor([0, 1, 2, 3, 0])
    step = training_step(model, buffers=True)
    args = example(model, xs, ys, buffers=True)
    buffers_before = [b.clone() for b in args[5]]

    plan = trace(step, name="bn", example_args=args)
    _, *rest = plan(*args)
    model(xs)  # eager training mode updates the module's own buffers

    running_mean, running_var, batches = rest[-3:]
    assert torch.allclose(running_mean, model[1].running_mean, atol=1e-6)
    assert torch.allclose(running_var, model[1].running_var, atol=1e-6)
    assert int(batches) == 1
    assert all(torch.equal(a, b) for a, b in zip(args[5], buffers_before))
    assert check(plan, steps=0).is_ok


def test_backward_autograd_grad_and_func_grad_trace_to_the_same_step():
    w0, x, y = torch.randn(3, 2), torch.randn(4, 3), torch.randn(4, 2)

    def by_backward(w=w0, x=x, y=y):
        w = w.clone().requires_grad_()
        F.mse_loss(x @ w, y).backward()
        return w - 0.1 * w.grad

    def by_autograd_grad(w=w0, x=x, y=y):
        w = w.requires_grad_()
        (grad,) = torch.autograd.grad(F.mse_loss(x @ w, y), [w])
        return w - 0.1 * grad

    def by_func_grad(w=w0, x=x, y=y):
        grad = torch.func.grad(lambda w: F.mse_loss(x @ w, y))(w)
        return w - 0.1 * grad

    results = [make_plan(fn)(w0, x, y)[0] for fn in (by_backward, by_autograd_grad)]
    results.append(make_plan(by_func_grad)(w0, x, y)[0])

    expected = w0 - 0.1 * (2 / 8) * x.t() @ (x @ w0 - y)
    for result in results:
        assert torch.allclose(result, expected, atol=1e-6)


def test_sgd_with_momentum_and_adam_as_tensor_maths_match_eager_over_steps():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    names = [name for name, _ in model.named_parameters()]
    xs, ys = torch.randn(8, 4), torch.randn(8, 2)

    def step(xs=xs, ys=ys, params=list(model.parameters()), momentum=None, m=None,
             v=None, t=torch.tensor(0.0)):  # fmt: skip
        params = [p.detach().requires_grad_() for p in params]
        loss = F.mse_loss(functional_call(model, dict(zip(names, params)), (xs,)), ys)
        grads = torch.autograd.grad(loss, params)
        momentum = [0.9 * b + g for b, g in zip(momentum, grads)]
        t = t + 1
        m = [0.9 * a + 0.1 * g for a, g in zip(m, grads)]
        v = [0.999 * a + 0.001 * g * g for a, g in zip(v, grads)]
        sgd = [p - 0.1 * b for p, b in zip(params, momentum)]
        adam = [
            p - 0.01 * (a / (1 - 0.9**t)) / ((s / (1 - 0.999**t)).sqrt() + 1e-8)
            for p, a, s in zip(params, m, v)
        ]
        return loss, sgd, adam, momentum, m, v, t

    zeros = [torch.zeros_like(p) for p in model.parameters()]
    start = [[p.detach().clone() for p in model.parameters()], zeros, zeros, zeros]
    plan = trace(step, name="optimisers", example_args=[xs, ys, *start, 0.0])
    state_plan = state_eager = (*start, torch.tensor(0.0))
    for _ in range(3):
        out = plan(xs, ys, *state_plan)
        eager = step(xs, ys, *state_eager)
        flat = [eager[0], *eager[1], *eager[2], *eager[3], *eager[4], *eager[5]]
        for got, want in zip(out, [*flat, eager[6]]):
            assert torch.allclose(got, want.detach(), atol=1e-6)
        state_plan = (list(out[1:3]), list(out[5:7]), list(out[7:9]),
                      list(out[9:11]), out[11])  # fmt: skip
        state_eager = (eager[1], eager[3], eager[4], eager[5], eager[6])


# ---------------------------------------------------------------- randomness


def dropout_plan():
    @make_plan
    def step(x=torch.ones(6, 5), w=torch.ones(5), seed=torch.tensor(0)):
        w = w.requires_grad_()
        y = F.dropout(x * w, 0.5, training=True)
        (grad,) = torch.autograd.grad(y.sum(), [w])
        return y, grad

    return step


def test_dropout_is_a_function_of_its_seed():
    plan = dropout_plan()
    x, w = torch.ones(6, 5), torch.ones(5)

    first, again, other = plan(x, w, 7), plan(x, w, 7), plan(x, w, 8)

    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[0], other[0])
    assert set(first[0].unique().tolist()) <= {0.0, 2.0}


def test_dropout_plan_draws_what_eager_dropout_draws_under_the_same_seed():
    plan = dropout_plan()
    x, w = torch.randn(6, 5), torch.randn(5)

    got = plan(x, w, 11)
    torch.manual_seed(11)
    w_eager = w.clone().requires_grad_()
    y = F.dropout(x * w_eager, 0.5, training=True)
    y.sum().backward()

    assert torch.equal(got[0], y.detach())
    assert torch.allclose(got[1], w_eager.grad)


def test_plan_leaves_torch_global_random_state_alone():
    plan = dropout_plan()
    torch.manual_seed(5)
    expected = torch.rand(3)

    torch.manual_seed(5)
    plan(torch.ones(6, 5), torch.ones(5), 1)
    after = torch.rand(3)

    assert torch.equal(after, expected)


def test_random_op_without_a_seed_parameter_fails_naming_op_and_line():
    def noisy(x=torch.ones(3)):
        return x + torch.randn_like(x)

    with pytest.raises(PlanError, match=r"randn_like.* at line \d+: return x \+ torch"):
        make_plan(noisy)


def test_seed_parameter_must_be_an_integer():
    def noisy(x=torch.ones(3), seed=torch.tensor(0.5)):
        return F.dropout(x, 0.5)

    with pytest.raises(PlanError, match=r"seed parameter 'seed' .* 0-d int64"):
        make_plan(noisy)


# ---------------------------------------------------------------- refusals


def test_op_outside_the_allow_list_fails_naming_op_and_line():
    def determinant(x=torch.eye(3)):
        y = x * 2
        return torch.linalg.det(y)

    with pytest.raises(
        PlanError, match=r"aten::_linalg_det at line \d+: return torch.linalg.det"
    ):
        make_plan(determinant)


def test_shape_that_depends_on_data_is_refused_naming_the_op():
    def positives(x=torch.ones(4)):
        return x[x > 0]

    with pytest.raises(
        PlanError,
        match=r"aten::index.Tensor.*cannot run.* at line \d+: return x\[x > 0\]",
    ):
        make_plan(positives)


def test_one_hot_needs_num_classes_and_works_with_it():
    def with_classes(ys=torch.tensor([0, 2, 1])):
        return F.one_hot(ys, num_classes=4)

    def without(ys=torch.tensor([0, 2, 1])):
        return F.one_hot(ys)

    plan = make_plan(with_classes)

    assert torch.equal(
        plan(torch.tensor([3, 0, 1]))[0], F.one_hot(torch.tensor([3, 0, 1]), 4)
    )
    with pytest.raises(PlanError, match="needs num_classes"):
        make_plan(without)


def test_input_updated_in_place_but_not_returned_is_logged(caplog):
    def forgetful(w=torch.ones(2)):
        w.add_(1.0)
        return w * 2

    with caplog.at_level(logging.WARNING, logger="plan_runtime.trace"):
        plan = make_plan(forgetful)

    assert "updated in place but not returned" in caplog.text
    assert isinstance(plan, Plan)

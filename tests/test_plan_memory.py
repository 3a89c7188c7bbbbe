"""The dry run: every intermediate sized on meta tensors before a plan runs."""

from __future__ import annotations

import time

import cbor2
import pytest
import torch

from plan_runtime.plan import Plan, PlanError
from plan_runtime.trace import make_plan


def chain() -> Plan:
    @make_plan
    def twice_plus_one(x=torch.zeros(1000)):
        y = x * 2
        return y + 1

    return twice_plus_one


def test_peak_counts_inputs_and_every_live_intermediate():
    plan = chain()

    memory = plan.memory

    # x (4000 bytes) is the caller's; y and the result are alive together at
    # the add, after which y is dropped.
    assert memory.resident_bytes == 4000
    assert memory.peak_bytes == 12000 and memory.peak_op == 1
    assert [op.new_bytes for op in memory.ops] == [4000, 4000]
    assert memory.outputs == (("float32", (1000,)),)


def test_views_share_their_base_and_are_not_counted_again():
    @make_plan
    def views(x=torch.zeros(1, 1000)):
        return x.expand(1000, 1000).sum(0), x.view(1000, 1).t()

    memory = views.memory

    assert [op.new_bytes for op in memory.ops] == [0, 4000, 0, 0]
    assert memory.peak_bytes == 8000


def test_make_plan_refuses_a_plan_over_its_limit_naming_the_op_and_line():
    def big(x=torch.zeros(1000)):
        y = x * 2
        return y + 1

    with pytest.raises(
        PlanError,
        match=r"op 1 \(aten::add.Tensor\) .* would hold 12000 bytes .* the limit "
        r"is 10000 bytes.* at line \d+: return y \+ 1",
    ):
        make_plan(big, max_memory_bytes=10_000)


def huge_ones_document(count: int) -> bytes:
    @make_plan
    def scaled_ones(x=torch.zeros(3)):
        return torch.ones(3) * x.sum()

    document = cbor2.loads(scaled_ones.to_bytes())
    ones = next(op for op in document["ops"] if op["op"] == "aten::ones")
    ones["args"] = [[count]]
    return cbor2.dumps(document)


def test_loader_refuses_an_allowed_op_asking_for_a_huge_tensor_without_allocating():
    data = huge_ones_document(10**12)
    started = time.perf_counter()

    with pytest.raises(PlanError, match=r"op 0 \(aten::ones\) .* limit is"):
        Plan.from_bytes(data)

    # Filling 4 TB would take hours, if it did not fail first.
    assert time.perf_counter() - started < 5


def test_loader_limit_is_a_parameter():
    data = huge_ones_document(1_000_000)

    loaded = Plan.from_bytes(data, max_memory_bytes=16 * 2**20)

    assert loaded.memory.peak_bytes >= 4_000_000
    with pytest.raises(PlanError, match="aten::ones"):
        Plan.from_bytes(data, max_memory_bytes=2 * 2**20)


def test_inputs_alone_over_the_limit_are_refused():
    plan = chain()

    with pytest.raises(PlanError, match=r"needs 4000 bytes .* inputs and constants"):
        Plan.from_bytes(plan.to_bytes(), max_memory_bytes=1000)


def test_shape_overflow_is_refused_as_a_plan_error():
    data = huge_ones_document(2**62)

    with pytest.raises(PlanError, match=r"op 0 \(aten::ones\)"):
        Plan.from_bytes(data)


def test_interpreter_frees_intermediates_after_their_last_reader():
    plan = chain()

    releases = [op.release for op in plan.ops]

    # y (value 1) is dropped after the add; x is the caller's and the
    # result is returned, so neither is dropped.
    assert releases == [(), (1,)]
    assert torch.equal(plan(torch.ones(1000))[0], torch.full((1000,), 3.0))

"""Averaging plans without HTTP: their forms, their results, their failures."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import nimble_edge
from plan_runtime import aggregation
from plan_runtime.aggregation import (
    AggregationError,
    iterative_mean_plan,
    load_averaging_plan,
    make_aggregator,
    median_plan,
    trimmed_mean_plan,
)
from plan_runtime.plan import PlanError
from plan_runtime.state import encode_state, state_spec
from plan_runtime.trace import make_plan
from tests.strategies import cycles

BASE = {"w": torch.tensor([[1.0, 2.0], [3.0, 4.0]]), "b": torch.tensor([0.5, -0.5])}


def run(base, plan, diffs, weights=None, stack_bytes=aggregation.STACK_BYTES):
    averaging = load_averaging_plan(plan.to_bytes(), state_spec(base))
    aggregator = make_aggregator(base, averaging, stack_bytes=stack_bytes)
    encoded = [encode_state(diff) for diff in diffs]
    for index in range(aggregator.passes):
        aggregator.begin_pass(index)
        for position, data in enumerate(encoded):
            aggregator.add_encoded(data, weights[position] if weights else 1)
        aggregator.end_pass()
    return aggregator, aggregator.result()


def test_accumulator_is_the_same_class_from_the_server_module():
    assert nimble_edge.Accumulator is aggregation.Accumulator


def test_forms_are_told_apart_by_signature():
    spec = state_spec(BASE)

    iterative = load_averaging_plan(iterative_mean_plan(BASE).to_bytes(), spec)
    cycle = load_averaging_plan(median_plan(5, chunk=8).to_bytes(), spec)

    assert (iterative.form, iterative.max_diffs) == ("iterative", None)
    assert (cycle.form, cycle.max_diffs) == ("cycle", 5)


def test_plan_of_neither_form_is_refused_showing_what_it_takes(plan):
    with pytest.raises(PlanError, match=r"either \(avg, item, num\).*this plan takes"):
        load_averaging_plan(plan.to_bytes(), state_spec(BASE))


def test_iterative_plan_for_another_model_is_refused():
    other = iterative_mean_plan({"w": torch.zeros(3)})

    with pytest.raises(PlanError, match="the model has 2 tensors"):
        load_averaging_plan(other.to_bytes(), state_spec(BASE))


def test_cycle_plan_must_return_one_column_per_block_column():
    @make_plan
    def wrong(diffs=torch.zeros(4, 8)):
        return diffs.sum(1)

    with pytest.raises(PlanError, match=r"must return \(float32 \[8\]\)"):
        load_averaging_plan(wrong.to_bytes(), state_spec(BASE))


def test_iterative_mean_plan_gives_base_minus_the_mean():
    diffs = [
        {k: torch.full_like(t, float(i)) for k, t in BASE.items()} for i in (1, 2, 6)
    ]

    aggregator, result = run(BASE, iterative_mean_plan(BASE), diffs)

    assert aggregator.count == 3
    for name, tensor in BASE.items():
        assert torch.allclose(result[name], tensor - 3.0)


def test_median_plan_ignores_an_outlier_that_moves_the_mean():
    values = (1.0, 2.0, 1000.0)
    diffs = [{k: torch.full_like(t, v) for k, t in BASE.items()} for v in values]

    _, result = run(BASE, median_plan(4, chunk=3), diffs)

    for name, tensor in BASE.items():
        assert torch.allclose(result[name], tensor - 2.0)


@settings(max_examples=25, deadline=None)
@given(cycle=cycles())
def test_cycle_plans_read_in_windows_match_torch_over_all_diffs(cycle):
    base, diffs = cycle["base"], cycle["diffs"]
    rows, chunk = cycle["rows"], cycle["chunk"]
    stacked = {k: torch.stack([d[k] for d in diffs]) for k in base}

    _, median = run(
        base, median_plan(rows, chunk), diffs, stack_bytes=cycle["stack_bytes"]
    )
    _, trimmed = run(
        base,
        trimmed_mean_plan(rows, 0.25, chunk),
        diffs,
        stack_bytes=cycle["stack_bytes"],
    )

    cut = len(diffs) // 4
    for name, tensor in base.items():
        ordered = stacked[name].sort(0).values
        expected_trimmed = ordered[cut : len(diffs) - cut].mean(0)
        expected_median = stacked[name].median(0).values
        assert torch.allclose(median[name], tensor - expected_median, atol=1e-6)
        assert torch.allclose(trimmed[name], tensor - expected_trimmed, atol=1e-6)


def test_large_model_is_read_in_several_passes():
    base = {"w": torch.zeros(100)}
    averaging = load_averaging_plan(
        median_plan(3, chunk=10).to_bytes(), state_spec(base)
    )

    aggregator = make_aggregator(base, averaging, stack_bytes=3 * 10 * 4 * 2)

    assert aggregator.passes == 5


def test_weights_reach_a_cycle_plan_that_takes_them():
    @make_plan
    def weighted_mean(diffs=torch.zeros(3, 4), weights=torch.zeros(3)):
        present = diffs.nan_to_num() * weights.unsqueeze(1)
        return present.sum(0) / weights.sum()

    diffs = [{k: torch.full_like(t, v) for k, t in BASE.items()} for v in (1.0, 4.0)]

    _, result = run(BASE, weighted_mean, diffs, weights=[3, 1])

    # (3 * 1 + 1 * 4) / 4 = 1.75
    for name, tensor in BASE.items():
        assert torch.allclose(result[name], tensor - 1.75)


def test_more_diffs_than_the_plan_has_rows_is_an_aggregation_error():
    diffs = [{k: torch.ones_like(t) for k, t in BASE.items()} for _ in range(3)]

    with pytest.raises(AggregationError, match="more than 2 diffs"):
        run(BASE, median_plan(2, chunk=4), diffs)


def test_plan_that_yields_infinity_is_an_aggregation_error():
    @make_plan
    def blows_up(diffs=torch.zeros(2, 4)):
        return torch.nanmedian(diffs, 0).values / 0.0

    diffs = [{k: torch.ones_like(t) for k, t in BASE.items()}]

    with pytest.raises(AggregationError, match="NaN or infinity for tensor 'w'"):
        run(BASE, blows_up, diffs)


def test_trim_outside_its_range_is_refused():
    with pytest.raises(ValueError, match=r"trim must be in \[0, 0.5\); got 0.5"):
        trimmed_mean_plan(4, trim=0.5)


@given(
    st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64]),
    st.integers(0, 3 * aggregation.FINITE_CHUNK),
    st.sampled_from([float("nan"), float("inf"), float("-inf")]),
)
@settings(max_examples=40, deadline=None)
def test_is_finite_finds_one_bad_value_anywhere(dtype, index, bad):
    tensor = torch.full((3 * aggregation.FINITE_CHUNK + 1,), 1e4, dtype=dtype)
    tensor[index] = bad

    assert not aggregation.is_finite(tensor)
    assert aggregation.is_finite(tensor.nan_to_num(0.0, 0.0, 0.0))


def test_is_finite_does_not_mistake_large_float64_values_for_overflow():
    tensor = torch.full((10,), 1.7e308, dtype=torch.float64)

    assert aggregation.is_finite(tensor)


@pytest.mark.parametrize(
    ("dtype", "base", "diff"),
    [
        (torch.uint8, [0, 255], [1, -1]),
        (torch.int8, [-128, 127], [1, -1]),
        (torch.int32, [-(2**31), 2**31 - 1], [1, -1]),
    ],
)
def test_integer_tensors_that_would_wrap_are_refused(dtype, base, diff):
    accumulator = aggregation.Accumulator({"count": torch.tensor(base, dtype=dtype)})
    accumulator.add({"count": torch.tensor(diff).to(dtype)}, 1)

    with pytest.raises(AggregationError, match="would leave the range"):
        accumulator.result()


def test_integer_tensors_within_range_are_averaged_and_rounded():
    accumulator = aggregation.Accumulator({"steps": torch.tensor([10, 20])})
    accumulator.add({"steps": torch.tensor([-4, 2])}, 1)
    accumulator.add({"steps": torch.tensor([-5, 3])}, 1)

    assert accumulator.result()["steps"].tolist() == [14, 18]


def test_a_float32_step_that_overflows_is_refused():
    big = torch.finfo(torch.float32).max
    accumulator = aggregation.Accumulator({"w": torch.tensor([big])})
    accumulator.add({"w": torch.tensor([-big])}, 1)

    with pytest.raises(AggregationError, match="overflows float32"):
        accumulator.result()


def test_int64_tensors_keep_every_bit_through_a_zero_step():
    values = [2**53 + 1, 2**62 + 1, 12345678901234567, 2**63 - 1]
    accumulator = aggregation.Accumulator({"step": torch.tensor(values)})
    accumulator.add({"step": torch.zeros(4, dtype=torch.int64)}, 1)

    assert accumulator.result()["step"].tolist() == values


def test_int64_step_past_the_largest_value_is_refused():
    accumulator = aggregation.Accumulator({"step": torch.tensor([2**63 - 1])})
    accumulator.add({"step": torch.tensor([-1])}, 1)

    with pytest.raises(AggregationError, match="would leave the range"):
        accumulator.result()

"""Aggregation and config rules, without HTTP."""

from __future__ import annotations

import pytest
import torch

from nimble_edge import Accumulator, ApiError, check_diff, check_server_config
from plan_runtime.state import encode_state, state_spec


def test_diff_sign_new_checkpoint_is_base_minus_weighted_mean_of_diffs():
    base = {"w": torch.tensor([10.0, 10.0])}
    accumulator = Accumulator(base)

    # diff = checkpoint - trained: a worker that moved w to 9 reports +1.
    accumulator.add({"w": torch.tensor([1.0, 0.0])}, weight=3)
    accumulator.add({"w": torch.tensor([-3.0, 4.0])}, weight=1)

    result = accumulator.result()["w"]
    assert torch.allclose(result, torch.tensor([10.0, 9.0]))


def test_integer_tensors_are_averaged_and_rounded():
    accumulator = Accumulator({"steps": torch.tensor(10)})

    accumulator.add({"steps": torch.tensor(-3)}, weight=1)
    accumulator.add({"steps": torch.tensor(-4)}, weight=1)

    result = accumulator.result()["steps"]
    assert result.dtype == torch.int64 and int(result) == 14


def test_accumulator_memory_does_not_grow_with_diffs():
    accumulator = Accumulator({"w": torch.zeros(1000)})
    before = [t.data_ptr() for t in accumulator.sums.values()]

    for _ in range(100):
        accumulator.add({"w": torch.ones(1000)}, weight=1)

    assert [t.data_ptr() for t in accumulator.sums.values()] == before
    assert accumulator.count == 100


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (
            {"cycle_length": -5},
            '"cycle_length" must be a number of seconds from 1 to 315360000; got -5',
        ),
        ({"cycle_length": "60"}, '"cycle_length" must be a number of seconds'),
        ({"num_cycles": 1.5}, '"num_cycles" must be a whole number'),
        ({"max_diffs": 0}, '"max_diffs" must be a whole number from 1 to 2147483647'),
        ({"num_cycles": 10**30}, '"num_cycles" must be a whole number from 0 to'),
        ({"max_workers": 2**31}, '"max_workers" must be a whole number from 1'),
        ({"min_diffs": 5, "max_workers": 1}, '"max_workers" \\(1\\) must not be below'),
        ({"assignment_timeout": 0}, '"assignment_timeout" must be a number of seconds'),
        ({"min_diffs": 3, "max_diffs": 2}, '"max_diffs" \\(2\\) must not be below'),
        ({"max_diffz": 2}, "unknown key 'max_diffz'"),
        ({"num_cycles": True}, '"num_cycles" must be a whole number'),
    ],
)
def test_bad_server_config_is_refused_with_a_reason(config, message):
    with pytest.raises(ApiError, match=message) as caught:
        check_server_config(config)

    assert caught.value.status == 400 and caught.value.code == "invalid_config"


def test_server_config_defaults_are_filled_in():
    config = check_server_config({"max_diffs": 3})

    assert config["max_diffs"] == 3 and config["min_diffs"] == 1
    assert config["num_cycles"] == 0 and config["cycle_length"] > 0


SPEC = state_spec({"w": torch.zeros(2, 3), "b": torch.zeros(3)})


@pytest.mark.parametrize(
    ("diff", "message"),
    [
        ({"w": torch.zeros(2, 3)}, "diff has 1 tensors; the checkpoint has 2"),
        ({"b": torch.zeros(3), "w": torch.zeros(2, 3)}, "diff tensor 0 is 'b'"),
        ({"w": torch.zeros(3, 2), "b": torch.zeros(3)}, r"\[3, 2\]; expected 'w'"),
        ({"w": torch.zeros(2, 3, dtype=torch.float64), "b": torch.zeros(3)}, "float64"),
        (
            {"w": torch.full((2, 3), float("nan")), "b": torch.zeros(3)},
            "NaN or infinity",
        ),
    ],
)
def test_bad_diffs_are_refused_with_what_is_wrong(diff, message):
    with pytest.raises(ApiError, match=message) as caught:
        check_diff(encode_state(diff), SPEC)

    assert caught.value.code == "invalid_diff"


def test_matching_diff_is_accepted():
    diff = check_diff(encode_state({"w": torch.ones(2, 3), "b": torch.ones(3)}), SPEC)

    assert list(diff) == ["w", "b"]

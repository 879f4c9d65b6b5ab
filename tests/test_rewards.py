"""Reward functions: TRL's calling convention, validation that names the function and sample, None."""

import math

import pytest
import torch

from rlhf.rewards import RewardError, RewardFunction, combine_rewards

PROMPTS = ["1+1=", "2+2=", "3+3="]
COMPLETIONS = ["2", "5", "6"]
IDS = [[6], [9], [10]]
COLUMNS = {"answer": ["2", "4", "6"]}


def exact(prompts, completions, answer, **kwargs):
    return [float(c == a) for c, a in zip(completions, answer)]


def call(fn, columns=COLUMNS):
    return RewardFunction(fn)(PROMPTS, COMPLETIONS, IDS, columns)


def test_standard_call_receives_prompts_completions_ids_and_columns():
    seen = {}

    def spy(prompts, completions, completion_ids, **kwargs):
        seen.update(prompts=prompts, completions=completions, completion_ids=completion_ids, **kwargs)
        return [0.0] * len(completions)

    call(spy)
    assert seen == {"prompts": PROMPTS, "completions": COMPLETIONS, "completion_ids": IDS, "answer": COLUMNS["answer"]}
    assert call(exact).tolist() == [1.0, 0.0, 1.0]


@pytest.mark.parametrize("bad, message", [
    (lambda **kw: [1.0, 2.0], r"'short' returned 2 values for 3 completions"),
    (lambda **kw: [1.0, float("nan"), 0.0], r"'short' returned nan for sample 1"),
    (lambda **kw: [1.0, 0.0, float("inf")], r"'short' returned inf for sample 2"),
    (lambda **kw: [1.0, "good", 0.0], r"'short' returned good \(str\) for sample 1"),
    (lambda **kw: 1.0, r"'short' returned a float; it must return a list"),
])
def test_bad_return_values_name_the_function_and_sample(bad, message):
    bad.__name__ = "short"
    with pytest.raises(RewardError, match=message):
        call(bad)


def test_an_exception_is_traced_to_its_sample():
    def fragile(prompts, completions, **kwargs):
        return [1.0 / (int(c) - 5) for c in completions]  # sample 1 ("5") divides by zero

    with pytest.raises(RewardError, match=r"'fragile' raised ZeroDivisionError.* on sample 1"):
        call(fragile)


def test_none_means_not_applicable_and_numbers_of_any_kind_are_accepted():
    values = call(lambda **kw: [None, torch.tensor(0.5), True])
    assert math.isnan(values[0]) and values[1:].tolist() == [0.5, 1.0]


def test_combination_weights_and_skips_none():
    per_function = torch.tensor([[1.0, 0.5], [float("nan"), 2.0], [float("nan"), float("nan")]], dtype=torch.float64)
    total = combine_rewards(per_function, [2.0, -1.0])
    # row 0: 2*1 - 0.5; row 1: the first function does not apply; row 2: nothing applies -> 0
    assert total.tolist() == [1.5, -2.0, 0.0]


def test_required_columns_come_from_the_signature():
    def needs(prompts, completions, answer, difficulty, hint=None, **kwargs):
        return [0.0] * len(completions)

    assert RewardFunction(needs).required_columns() == {"answer", "difficulty"}
    assert RewardFunction(lambda prompts, completions, **kw: []).required_columns() == set()

"""Reward functions: TRL's calling convention, validation that names the function and sample, None."""

import math
import re

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


def test_sys_exit_and_keyboard_interrupt_are_named_and_a_ctrl_c_stays_one():
    """With reward_timeout the function runs in a thread of its own, where a KeyboardInterrupt can only be its own
    doing: named like a sys.exit. Without one it runs in the trainer's thread, where it may be the user's Ctrl-C: it
    stays a KeyboardInterrupt, noting the function it interrupted."""
    def leaves(prompts, completions, **kwargs):
        if "5" in completions:
            raise KeyboardInterrupt if kwargs["answer"][1] == "4" else SystemExit(3)
        return [0.0] * len(completions)

    def outcome(fn, columns, timeout):
        try:  # a KeyboardInterrupt escaping pytest.raises would end the whole session
            RewardFunction(fn, timeout=timeout)(PROMPTS, COMPLETIONS, IDS, columns)
        except BaseException as error:  # noqa: BLE001 - the point of the test
            return error
        return None

    advice = r" \(a reward function must return its values; raise an exception to stop the run\) on sample 1"
    error = outcome(leaves, COLUMNS, timeout=5)
    assert isinstance(error, RewardError) and re.match(rf"reward function 'leaves' raised KeyboardInterrupt{advice}",
                                                        str(error)), repr(error)
    for timeout in (5, None):
        error = outcome(leaves, {"answer": ["2", "x", "6"]}, timeout)
        assert isinstance(error, RewardError) and re.match(rf"reward function 'leaves' called sys.exit\(3\){advice}",
                                                            str(error)), repr(error)
    error = outcome(leaves, COLUMNS, timeout=None)
    assert type(error) is KeyboardInterrupt and error.__notes__ == ["(interrupted reward function 'leaves')"]


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


# ---------------------------------------------------------------------------------------------------- TRL's features
import asyncio  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from rlhf.rewards import RewardContext, reward_table  # noqa: E402
from rlhf.rollout import RolloutTexts  # noqa: E402

TEXTS = RolloutTexts(prompts=PROMPTS, completions=COMPLETIONS, completion_ids=IDS, columns=COLUMNS)


def test_async_functions_are_awaited_concurrently():
    async def slow_exact(prompts, completions, answer, **kwargs):
        await asyncio.sleep(0.4)
        return [float(c == a) for c, a in zip(completions, answer)]

    async def slow_length(completions, **kwargs):
        await asyncio.sleep(0.4)
        return [float(len(c)) for c in completions]

    functions = [RewardFunction(slow_exact), RewardFunction(exact), RewardFunction(slow_length)]
    start = time.perf_counter()
    table = reward_table(functions, TEXTS)
    elapsed = time.perf_counter() - start
    assert table.tolist() == [[1.0, 1.0, 1.0], [0.0, 0.0, 1.0], [1.0, 1.0, 1.0]]
    assert 0.4 <= elapsed < 0.75, elapsed  # one sleep, not two
    assert RewardFunction(slow_exact)(PROMPTS, COMPLETIONS, IDS, COLUMNS).tolist() == [1.0, 0.0, 1.0]  # alone too


def test_async_failures_are_traced_like_sync_ones():
    async def fragile(completions, **kwargs):
        return [1.0 / (int(c) - 5) for c in completions]

    with pytest.raises(RewardError, match=r"'fragile' raised ZeroDivisionError.* on sample 1"):
        reward_table([RewardFunction(fragile)], TEXTS)

    async def hangs(completions, **kwargs):
        await asyncio.sleep(30 if "5" in completions else 0)
        return [0.0] * len(completions)

    with pytest.raises(RewardError, match=r"'hangs' took longer than reward_timeout=0.2 s.*sample 1"):
        reward_table([RewardFunction(hangs, timeout=0.2)], TEXTS)


@pytest.mark.parametrize("values", [(1.0, 0.0, 1.0), np.array([1.0, 0.0, 1.0]), np.array([1, 0, 1]),
                                    torch.tensor([1.0, 0.0, 1.0]), [np.float32(1), np.int64(0), np.bool_(True)],
                                    [torch.tensor(1.0), np.array(0.0), 1]])
def test_tuples_arrays_and_tensors_are_rewards(values):
    assert call(lambda **kw: values).tolist() == [1.0, 0.0, 1.0]


def test_a_two_dimensional_array_is_an_error_with_its_shape():
    with pytest.raises(RewardError, match=r"returned a ndarray of shape \(3, 1\); it must return a list"):
        call(lambda **kw: np.ones((3, 1)))


def test_trainer_state_log_metric_and_log_extra_are_passed():
    seen = {}

    def spy(prompts, completions, trainer_state, log_metric, log_extra, **kwargs):
        seen["state"] = trainer_state
        log_metric("spy/mean_length", sum(map(len, completions)) / len(completions))
        log_extra("doubled", [c * 2 for c in completions])
        return [0.0] * len(completions)

    context = RewardContext(trainer_state="the state")
    RewardFunction(spy)(PROMPTS, COMPLETIONS, IDS, COLUMNS, context)
    assert seen["state"] == "the state"
    assert context.metrics == {"spy/mean_length": [1.0]} and context.extra == {"doubled": ["22", "55", "66"]}
    with pytest.raises(RewardError, match=r"log_metric\('x', 'high'\): give a metric name and one finite number"):
        RewardContext().log_metric("x", "high")


def test_a_function_without_kwargs_gets_only_what_it_names():
    def narrow(completions, answer):
        return [float(c == a) for c, a in zip(completions, answer)]

    assert RewardFunction(narrow)(PROMPTS, COMPLETIONS, IDS, COLUMNS, RewardContext()).tolist() == [1.0, 0.0, 1.0]


def test_misuse_is_caught_from_the_signature():
    class Judge:
        def __call__(self, completions, **kwargs):
            return [0.0] * len(completions)

    with pytest.raises(TypeError, match=r"reward function Judge is a class; pass an instance of it \(e.g. Judge\(\)\)"):
        RewardFunction(Judge)
    assert RewardFunction(Judge()).name == "Judge"

    def positional(completions, /, **kwargs):
        return [0.0] * len(completions)

    with pytest.raises(TypeError, match=r"takes \['completions'\] positional-only"):
        RewardFunction(positional)

    def reward_func(completions_ids, **kwargs):  # TRL's documentation, example 1 (TRL fails at the first step)
        return [float(len(ids)) for ids in completions_ids]

    with pytest.raises(ValueError, match=r"'reward_func' needs the dataset column\(s\) \['completions_ids'\].*"
                                         r"'completions_ids' -> did you mean 'completion_ids'\?"):
        RewardFunction(reward_func).check_signature(["answer"])

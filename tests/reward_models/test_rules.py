"""Rule rewards against hand-written cases, malformed completions included, and their docstring examples."""

import doctest

import pytest

from reward_models import rules
from rlhf import answers
from rlhf.extras import synthetic
from reward_models.rules import (
    boxed_answer_reward,
    exact_answer_reward,
    make_format_reward,
    make_length_penalty,
    make_regex_answer_reward,
    make_repetition_penalty,
    make_soft_overlong_penalty,
    numeric_answer_reward,
)


@pytest.mark.parametrize("module", [rules, answers, synthetic])
def test_docstring_examples_run(module):
    result = doctest.testmod(module)
    assert result.attempted > 0 and result.failed == 0


def test_numeric_answer_uses_the_last_number():
    completions = ["The answer is 12, not 13.", "We get 1,234", "x = -3.50", "", "no number at all", "7/2"]
    answers = ["13", "1234", "-3.5", "0", "5", "2"]
    assert numeric_answer_reward(None, completions, answer=answers) == [1.0, 1.0, 1.0, 0.0, 0.0, 1.0]


def test_chat_completions_are_read_from_their_last_message():
    completion = [{"role": "assistant", "content": "so \\boxed{4}"}]
    assert boxed_answer_reward(None, [completion], answer=["4"]) == [1.0]
    assert numeric_answer_reward(None, [completion], answer=["4"]) == [1.0]


def test_boxed_answer_edge_cases():
    completions = [r"\boxed{3} then \boxed{4}", r"\boxed{4", r"\boxed{}", r"\boxed{ 4.0 }", "4"]
    assert boxed_answer_reward(None, completions, answer=["4"] * 5) == [1.0, 0.0, 0.0, 1.0, 0.0]


def test_exact_answer_and_regex_answer():
    assert exact_answer_reward(None, ["42", " 42 ", "042", ""], answer=["42"] * 4) == [1.0, 1.0, 0.0, 0.0]
    reward = make_regex_answer_reward(r"#### (-?\d+)", column="label")
    assert reward(None, ["so #### 8", "#### 9 #### 10", "8", ""], label=["8", "10", "8", "8"]) == [1.0, 1.0, 0.0, 0.0]


def test_format_reward_requires_a_full_match():
    reward = make_format_reward(r"<answer>\d+</answer>", reward=0.5)
    assert reward(None, ["<answer>12</answer>", "x <answer>12</answer>", "<answer></answer>", ""]) == [0.5, 0, 0, 0]


def test_length_penalty_in_tokens_and_characters():
    tokens = make_length_penalty(4, 0.25)
    assert tokens(None, ["", ""], completion_ids=[[1] * 4, [1] * 7]) == [0.0, -0.75]
    chars = make_length_penalty(2, 1.0, unit="chars")
    assert chars(None, ["ab", "abcd", ""]) == [0.0, -2.0, 0.0]
    with pytest.raises(ValueError):
        make_length_penalty(2, unit="words")


def test_soft_overlong_penalty_is_linear_over_the_buffer():
    penalty = make_soft_overlong_penalty(max_new_tokens=20, buffer=5)
    lengths = [0, 15, 16, 18, 20, 25]
    expected = [0.0, 0.0, -0.2, -0.6, -1.0, -1.0]
    assert penalty(None, [""] * 6, completion_ids=[[0] * n for n in lengths]) == pytest.approx(expected)
    with pytest.raises(ValueError):
        make_soft_overlong_penalty(10, 0)


def test_repetition_penalty_counts_repeated_ngrams():
    penalty = make_repetition_penalty(ngram_size=3, max_penalty=-2.0)
    # "a b c a b c": trigrams abc bca cab abc -> 3 unique of 4 -> (1 - 3/4) * -2 = -0.5
    assert penalty(None, ["a b c a b c", "one two three four", "", "a b"]) == [-0.5, 0.0, 0.0, 0.0]

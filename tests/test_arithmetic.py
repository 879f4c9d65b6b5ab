"""The real-model demo's task (rlhf.extras.arithmetic): its rewards against hand-written replies of the kind
SmolLM2-135M-Instruct gives, its splits, and its docstring examples."""

import doctest

from rlhf.extras import arithmetic
from rlhf.extras.arithmetic import (
    asked_format,
    concise_answer,
    correct_answer,
    exact_answer,
    make_splits,
    reply_answer,
)
from rlhf.rewards import is_correctness


def test_docstring_examples_run():
    result = doctest.testmod(arithmetic)
    assert result.attempted >= 6 and result.failed == 0


def test_the_reply_answer_is_read_after_the_last_equals_of_the_first_line():
    replies = {
        "17 + 25 = 42": "42",
        "17 + 25 = 41\n\nThis is a classic example, 42 would be": "41",  # what the model says, not a later number
        "12 - 30 = -18.": "-18",
        "3 * 4 = 2 * 6 = 12": "12",
        "The answer is 42, since 17 + 25 = 42.": "42",
        "The answer is 42.": "42",  # no "=": the first number
        "\n\n  8 * 3 = 24": "24",
        "I'd be happy to help with that.": None,
        "": None,
    }
    assert {reply: reply_answer(reply) for reply in replies} == replies


def test_rewards_on_model_like_replies():
    completions = ["42", "42.", " 42 ", "17 + 25 = 42", "41", "17 + 25 = 41 and 42", "The sum is forty-two."]
    answers = ["42"] * len(completions)
    assert correct_answer(None, completions, answer=answers) == [1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0]
    assert asked_format(None, completions) == [1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0]
    # The format is paid only with the right number: a bare wrong number earns nothing.
    assert exact_answer(None, completions, answer=answers) == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    assert concise_answer(None, completions, answer=answers) == [1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0]


def test_concise_answer_pays_only_a_reply_that_stops_at_the_right_number():
    replies = {"17 + 25 = 42": 1.0, "17 + 25 = 42.": 1.0, "  42\n": 1.0, "The sum: 17 + 25 = 42": 1.0,
               "17 + 25 = 42\n\nThis is the sum of 17 and 25.": 0.0,  # what reward for the number alone grew into
               "17 + 25 = 42, which is even": 0.0, "42 is the answer": 0.0, "17 + 25 = 41": 0.0,
               "17 + 25 =\n42": 0.0}
    scores = concise_answer(None, list(replies), answer=["42"] * len(replies))
    assert dict(zip(replies, scores)) == replies


def test_chat_completions_are_read_from_the_assistant_messages():
    chat = [[{"role": "assistant", "content": "42"}], [{"role": "assistant", "content": "6 * 7 = 41"}]]
    assert correct_answer(None, chat, answer=["42", "42"]) == [1.0, 0.0]
    assert exact_answer(None, chat, answer=["42", "42"]) == [1.0, 0.0]


def test_correct_answer_is_the_accuracy_reward():
    assert is_correctness(correct_answer) and not is_correctness(exact_answer)


def test_splits_are_disjoint_chat_prompts_with_right_answers():
    train, heldout = make_splits(num_eval=200, seed=0)
    assert len(heldout) == 200 and len(train) > 3000
    questions = lambda d: {row["prompt"][0]["content"] for row in d}  # noqa: E731
    assert not questions(train) & questions(heldout)
    for row in list(heldout)[:50]:
        a, op, b = row["prompt"][0]["content"][len("What is "):].split("?")[0].split()
        assert int(row["answer"]) == eval(f"{a} {op} {b}")  # the stated answer is the arithmetic's
        assert row["prompt"][0]["role"] == "user" and "Reply with just the number." in row["prompt"][0]["content"]
    assert make_splits(seed=0)[1]["answer"] == heldout["answer"] and make_splits(seed=1)[1]["answer"] != heldout["answer"]

"""Chat arithmetic for a real instruct model: "What is 17 + 25? Reply with just the number." -> "42".

The task of ``make demo-real`` and ``make learn-bench-real`` (SmolLM2-135M-Instruct, rlhf/extras/real_model.py).
Asked this way the model usually restates the problem ("17 + 25 = 41") and often goes on talking, so there is
room for RL on two things at once: the right number, and a reply that stops once it is given.

- ``make_splits``: disjoint train / held-out chat prompts (columns ``prompt``, ``answer``), additions and
  subtractions of numbers up to 50 and products of numbers up to 12.
- ``correct_answer``: 1.0 when the reply's answer is the right number, whatever the wording around it (the number
  after the last "=" of the first line, else the first number of the reply); the correctness reward
  (``rlhf.rewards.correctness``) that held-out accuracy counts.
- ``asked_format``: 1.0 when the reply is just a number (a trailing period allowed), right or wrong.
- ``concise_answer``: 1.0 when the reply is the right number and stops there: just the number, or one equation
  ending with it ("17 + 25 = 42"), nothing after. A format reward is paid only with the right number on purpose:
  weighted in on its own, ``asked_format`` was gamed at once (GRPO at lr 5e-5 answered every problem with a bare,
  wrong number within 4 steps: held-out correctness 27% -> 1%); and with the right number alone paid, the replies
  grew to the length limit (the answer, then "This is the sum of ...").
"""

import random
import re

from datasets import Dataset

from rlhf.rewards import correctness

QUESTION = "What is {a} {op} {b}? Reply with just the number."
_NUMBER = re.compile(r"-?\d+")
_JUST_A_NUMBER = re.compile(r"\s*-?\d+\.?\s*")
_STOPS_AT_ANSWER = re.compile(r"\s*(?:[^=\n]*=\s*)?-?\d+\.?\s*")  # "42", "42.", "17 + 25 = 42"


def _problems() -> list[tuple[int, str, int]]:
    additions = [(a, "+", b) for a in range(1, 51) for b in range(1, 51)]
    subtractions = [(a, "-", b) for a in range(1, 51) for b in range(1, a)]
    products = [(a, "*", b) for a in range(2, 13) for b in range(2, 13)]
    return additions + subtractions + products


def _solve(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


def make_splits(num_eval: int = 200, num_train: int | None = None, seed: int = 0) -> tuple[Dataset, Dataset]:
    """(train, held-out): every problem once, shuffled with ``seed``, the first ``num_eval`` held out."""
    problems = _problems()
    random.Random(seed).shuffle(problems)
    rows = [{"prompt": [{"role": "user", "content": QUESTION.format(a=a, op=op, b=b)}],
             "answer": str(_solve(a, op, b))} for a, op, b in problems]
    train = rows[num_eval:] if num_train is None else rows[num_eval:num_eval + num_train]
    return Dataset.from_list(train), Dataset.from_list(rows[:num_eval])


def train_split() -> Dataset:
    """The default training prompts (for recipes: ``dataset_name: rlhf.extras.arithmetic:train_split``)."""
    return make_splits()[0]


def eval_split() -> Dataset:
    """The default held-out prompts, disjoint from ``train_split``."""
    return make_splits()[1]


def _text(completion) -> str:
    """A completion as text: a string, or the assistant message(s) of a conversational completion."""
    if isinstance(completion, str):
        return completion
    return "".join(m.get("content") or "" for m in completion if m.get("role") == "assistant")


def reply_answer(reply: str) -> str | None:
    """The number a reply gives as its answer: after the last "=" of its first non-empty line, else the first
    number anywhere in it.

    >>> reply_answer("17 + 25 = 42. That is the sum.")
    '42'
    >>> reply_answer("The answer is 42.")
    '42'
    """
    lines = [line for line in reply.strip().splitlines() if line.strip()]
    if lines and "=" in lines[0]:
        found = _NUMBER.search(lines[0].rsplit("=", 1)[1])
        if found:
            return found.group()
    found = _NUMBER.search(reply)
    return found.group() if found else None


@correctness
def correct_answer(prompts, completions, answer, **kwargs) -> list[float]:
    """1.0 when the reply's answer (``reply_answer``) is the right number, else 0.0.

    >>> correct_answer(None, ["17 + 25 = 42", "41"], answer=["42", "42"])
    [1.0, 0.0]
    """
    return [float(reply_answer(_text(c)) == a) for c, a in zip(completions, answer)]


def asked_format(prompts, completions, **kwargs) -> list[float]:
    """1.0 when the reply is just a number (a trailing period allowed), else 0.0.

    >>> asked_format(None, ["42", "42.", "17 + 25 = 42"])
    [1.0, 1.0, 0.0]
    """
    return [float(_JUST_A_NUMBER.fullmatch(_text(c)) is not None) for c in completions]


def concise_answer(prompts, completions, answer, **kwargs) -> list[float]:
    """1.0 when the reply is the right number and nothing follows it (just the number, or one equation ending with
    it), else 0.0.

    >>> concise_answer(None, ["42", "17 + 25 = 42.", "17 + 25 = 42\\n\\nThis is the sum", "41"], answer=["42"] * 4)
    [1.0, 1.0, 0.0, 0.0]
    """
    right = correct_answer(prompts, completions, answer)
    return [r * float(_STOPS_AT_ANSWER.fullmatch(_text(c)) is not None) for r, c in zip(right, completions)]


def exact_answer(prompts, completions, answer, **kwargs) -> list[float]:
    """1.0 when the reply is just the right number, as the prompt asks, else 0.0.

    >>> exact_answer(None, ["42", "17 + 25 = 42", "41"], answer=["42"] * 3)
    [1.0, 0.0, 0.0]
    """
    right = correct_answer(prompts, completions, answer)
    return [r * f for r, f in zip(right, asked_format(prompts, completions))]

"""Rule rewards: plain functions with the standard signature ``fn(prompts, completions, **columns)``.

Functions that need a setting are made by a ``make_*`` factory; the function it returns has the
standard signature and a name that says its setting. Completions may be strings or chat messages
(``[{"role": "assistant", "content": ...}]``); every rule reads the text of the last message.
Answer-matching rules are marked with ``rlhf.rewards.correctness``, so evaluation reports
``eval/accuracy`` and pass@k from them. The examples in the docstrings run as tests.
"""

import math
import re
from collections.abc import Callable

from rlhf.answers import boxed, completion_text, last_number, last_number_text, to_number
from rlhf.rewards import correctness

__all__ = ["boxed", "completion_text", "last_number", "last_number_text"]  # answer parsing, re-exported

def _same_answer(found: str | float | None, expected) -> bool:
    if found is None:
        return False
    expected_number = to_number(str(expected))
    found_number = found if isinstance(found, float) else to_number(str(found))
    if expected_number is not None and found_number is not None:
        return math.isclose(found_number, expected_number, rel_tol=1e-9, abs_tol=1e-9)
    return str(found).strip() == str(expected).strip()


@correctness
def numeric_answer_reward(prompts, completions, answer, **kwargs) -> list[float]:
    """1.0 when the last number of the completion equals the ``answer`` column numerically, else 0.0.

    >>> numeric_answer_reward(["?"] * 3, ["It is 42.", "about 41", "no idea"], answer=["42", "42", "42"])
    [1.0, 0.0, 0.0]
    """
    return [float(_same_answer(last_number(completion_text(c)), a)) for c, a in zip(completions, answer)]


@correctness
def boxed_answer_reward(prompts, completions, answer, **kwargs) -> list[float]:
    """1.0 when the last ``\\boxed{}`` holds the answer (numerically, or as the same text), else 0.0.

    >>> boxed_answer_reward(["?"] * 3, [r"\\boxed{1,000}", r"\\boxed{x+1}", "1000"], answer=["1000", "x+1", "1000"])
    [1.0, 1.0, 0.0]
    """
    return [float(_same_answer(boxed(completion_text(c)), a)) for c, a in zip(completions, answer)]


@correctness
def exact_answer_reward(prompts, completions, answer, **kwargs) -> list[float]:
    """1.0 when the completion, stripped of surrounding whitespace, is exactly the answer, else 0.0.

    >>> exact_answer_reward(["?", "?"], [" 42\\n", "42."], answer=["42", "42"])
    [1.0, 0.0]
    """
    return [float(completion_text(c).strip() == str(a).strip()) for c, a in zip(completions, answer)]


def make_regex_answer_reward(pattern: str, column: str = "answer") -> Callable:
    """A reward that extracts group 1 of the last match of ``pattern`` and compares it with ``column``.

    >>> reward = make_regex_answer_reward(r"Answer: (\\S+)")
    >>> reward(["?"] * 3, ["Answer: 7", "Answer: 6 ... Answer: 8", "7"], answer=["7", "8", "7"])
    [1.0, 1.0, 0.0]
    """
    regex = re.compile(pattern)

    def regex_answer_reward(prompts, completions, **columns) -> list[float]:
        scores = []
        for completion, expected in zip(completions, columns[column]):
            matches = list(regex.finditer(completion_text(completion)))
            found = (matches[-1].group(1) if regex.groups else matches[-1].group(0)) if matches else None
            scores.append(float(_same_answer(found, expected)))
        return scores

    regex_answer_reward.__name__ = f"regex_answer_reward[{pattern}]"
    return correctness(regex_answer_reward)


def make_format_reward(pattern: str, reward: float = 1.0) -> Callable:
    """``reward`` when the whole completion matches ``pattern`` (re.fullmatch, DOTALL), else 0.0.

    >>> fmt = make_format_reward(r"<think>.*</think>\\s*<answer>.*</answer>")
    >>> fmt(["?", "?"], ["<think>2+2</think> <answer>4</answer>", "4"])
    [1.0, 0.0]
    """
    regex = re.compile(pattern, re.DOTALL)

    def format_reward(prompts, completions, **kwargs) -> list[float]:
        return [reward if regex.fullmatch(completion_text(c).strip()) else 0.0 for c in completions]

    format_reward.__name__ = f"format_reward[{pattern}]"
    return format_reward


def make_length_penalty(max_length: int, penalty_per_token: float = 0.01, unit: str = "tokens") -> Callable:
    """-penalty_per_token for every token (or character, with ``unit="chars"``) beyond ``max_length``.

    >>> penalty = make_length_penalty(3, 0.5)
    >>> penalty(["?", "?"], ["ab", "abcde"], completion_ids=[[1, 2], [1, 2, 3, 4, 5]])
    [0.0, -1.0]
    """
    if unit not in ("tokens", "chars"):
        raise ValueError(f"unit must be 'tokens' or 'chars', got {unit!r}")

    def length_penalty(prompts, completions, completion_ids=None, **kwargs) -> list[float]:
        lengths = ([len(ids) for ids in completion_ids] if unit == "tokens"
                   else [len(completion_text(c)) for c in completions])
        return [-penalty_per_token * (n - max_length) if n > max_length else 0.0 for n in lengths]

    length_penalty.__name__ = f"length_penalty[{max_length}]"
    return length_penalty


def make_soft_overlong_penalty(max_new_tokens: int, buffer: int) -> Callable:
    """DAPO's soft overlong punishment (Yu et al. 2025): 0 up to ``max_new_tokens - buffer`` tokens,
    then falling linearly to -1 at ``max_new_tokens``; -1 beyond.

    >>> penalty = make_soft_overlong_penalty(max_new_tokens=10, buffer=4)
    >>> penalty(["?"] * 3, ["", "", ""], completion_ids=[[0] * 6, [0] * 8, [0] * 10])
    [0.0, -0.5, -1.0]
    """
    if not 0 < buffer <= max_new_tokens:
        raise ValueError(f"buffer={buffer} must be in (0, max_new_tokens={max_new_tokens}]")
    start = max_new_tokens - buffer

    def soft_overlong_penalty(prompts, completions, completion_ids, **kwargs) -> list[float]:
        return [max(-1.0, -(len(ids) - start) / buffer) if len(ids) > start else 0.0 for ids in completion_ids]

    soft_overlong_penalty.__name__ = f"soft_overlong_penalty[{max_new_tokens},{buffer}]"
    return soft_overlong_penalty


def make_repetition_penalty(ngram_size: int = 3, max_penalty: float = -1.0) -> Callable:
    """max_penalty x the fraction of repeated word n-grams: 0 for no repetition, ``max_penalty`` in
    the limit of one n-gram repeated forever. Completions shorter than one n-gram get 0.

    >>> penalty = make_repetition_penalty(ngram_size=2)
    >>> penalty(["?"] * 3, ["a b c d", "a b a b a b", "a"])
    [0.0, -0.6, 0.0]
    """
    if max_penalty > 0:
        raise ValueError(f"max_penalty={max_penalty} must be <= 0")

    def repetition_penalty(prompts, completions, **kwargs) -> list[float]:
        scores = []
        for completion in completions:
            words = completion_text(completion).lower().split()
            grams = [tuple(words[i:i + ngram_size]) for i in range(len(words) - ngram_size + 1)]
            repeated = 1 - len(set(grams)) / len(grams) if grams else 0.0
            scores.append(round(repeated * max_penalty, 12) if repeated else 0.0)
        return scores

    repetition_penalty.__name__ = f"repetition_penalty[{ngram_size}]"
    return repetition_penalty


# ---------------------------------------------------------------------------------------------------- TRL's names
# TRL's built-in rewards (trl.rewards) under their names and signatures, so that a TRL script runs with its import
# changed; the TRL-style recipe YAML names them too (rlhf.cli).


@correctness
def accuracy_reward(completions, solution, log_extra=None, **kwargs) -> list[float | None]:
    r"""TRL's ``accuracy_reward`` on the ``solution`` column: 1.0 when the completion's answer (its last ``\boxed{}``,
    else its last number) equals the solution's (its last ``\boxed{}``, else the whole text), numerically or as the
    same text; None when the solution holds no answer. TRL parses LaTeX with math_verify; this compares the extracted
    answers, so equivalent but differently written expressions (1/2 and 0.5 aside) count as different.

    >>> accuracy_reward([[{"role": "assistant", "content": r"My answer is \boxed{\frac{1}{3}}"}],
    ...                  [{"role": "assistant", "content": r"My answer is \boxed{\frac{1}{2}}"}]],
    ...                 solution=[r"\frac{1}{3}", r"\frac{1}{3}"])
    [1.0, 0.0]
    """
    rewards, gold_answers, found_answers = [], [], []
    for completion, gold in zip(completions, solution):
        gold_text = str(gold).strip()
        expected = boxed(gold_text) if boxed(gold_text) is not None else gold_text
        text = completion_text(completion)
        found = boxed(text) if boxed(text) is not None else last_number_text(text)
        rewards.append(float(_same_answer(found, expected)) if expected else None)
        gold_answers.append(expected or "[unparseable]")
        found_answers.append(found if found is not None else "[unparseable]")
    if log_extra is not None:
        log_extra("solution", list(solution))
        log_extra("gold_parsed", gold_answers)
        log_extra("answer_parsed", found_answers)
    return rewards


def think_format_reward(completions, **kwargs) -> list[float]:
    """TRL's ``think_format_reward``: 1.0 when the completion starts with one ``<think>...</think>`` block.

    >>> think_format_reward([[{"content": "<think>\\nreasoning\\n</think>\\nanswer"}], [{"content": "<think>no end"}]])
    [1.0, 0.0]
    """
    pattern = re.compile(r"^<think>(?!.*<think>)(.*?)</think>.*$", re.DOTALL | re.MULTILINE)
    return [1.0 if pattern.match(completion_text(c)) else 0.0 for c in completions]


def get_soft_overlong_punishment(max_completion_len: int, soft_punish_cache: int) -> Callable:
    """TRL's name for DAPO's soft overlong punishment: ``make_soft_overlong_penalty(max_completion_len,
    soft_punish_cache)``.

    >>> get_soft_overlong_punishment(max_completion_len=100, soft_punish_cache=20)(completion_ids=[[1] * 90])
    [-0.5]
    """
    penalty = make_soft_overlong_penalty(max_completion_len, soft_punish_cache)

    def soft_overlong_punishment_reward(completion_ids, **kwargs) -> list[float]:
        return penalty(None, [None] * len(completion_ids), completion_ids=completion_ids)

    return soft_overlong_punishment_reward

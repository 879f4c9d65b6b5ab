"""The "repeat" task, learned by RL from a random initialisation: prompt ``">q"``, target completion ``"qqqqqqqq"``.

- ``make_model(seed)``: a randomly initialised tiny Llama (hidden 64, 2 layers; its next-token distribution starts
  near uniform over the character tokenizer's 102 tokens).
- ``make_dataset(n, seed)``: prompts ``">x"`` with ``x`` one of the letters a, i, q, y, and the column ``letter``.
- ``repeat_reward``: per-character credit in [0, 1], graded so that a random policy already gets a signal:
  credit(c) = max(0, 1 - |ord(c) - ord(x)| / 8) for each of the first 8 characters, divided by
  max(8, the number of tokens before EOS). Special tokens earn nothing (the reward reads the token ids, so
  ``<pad>`` or ``<unk>`` cannot pass as free filler). A uniform random policy scores about 0.075.
- ``exact_repeat``: 1.0 for exactly ``x`` eight times (then EOS or the length limit), the task's accuracy.
"""

import random

from datasets import Dataset

from rlhf.extras.tiny import ALPHABET, EOS_ID, SPECIAL_TOKENS, tiny_model
from rlhf.rewards import correctness

LETTERS = "aiqy"  # 8 code points apart: one letter never earns credit for another
TARGET_LENGTH = 8
WIDTH = 8.0
MAX_NEW_TOKENS = 8


def make_model(seed: int):
    return tiny_model("llama", hidden_size=64, num_layers=2, num_heads=4, max_positions=32, seed=seed)


def make_dataset(n: int = 1024, seed: int = 1234) -> Dataset:
    rng = random.Random(seed)
    letters = [rng.choice(LETTERS) for _ in range(n)]
    return Dataset.from_list([{"prompt": f">{x}", "letter": x} for x in letters])


def _characters(ids) -> list[str | None]:
    """The characters of ``ids`` up to the first EOS (None for a special token)."""
    out = []
    for i in ids:
        if i == EOS_ID:
            break
        out.append(ALPHABET[i - len(SPECIAL_TOKENS)] if i >= len(SPECIAL_TOKENS) else None)
    return out


def _credit(c: str | None, x: str) -> float:
    return 0.0 if c is None else max(0.0, 1.0 - abs(ord(c) - ord(x)) / WIDTH)


def _sequences(completions, completion_ids):
    if completion_ids is not None:
        return [_characters(ids) for ids in completion_ids]
    return [list(c) for c in completions]


def repeat_reward(prompts, completions, completion_ids=None, letter=None, **kwargs) -> list[float]:
    """Per-character credit in [0, 1] (see the module docstring).

    >>> repeat_reward([">q"] * 3, ["qqqqqqqq", "qqqq", "rrq"], letter=["q"] * 3)
    [1.0, 0.5, 0.34375]
    >>> repeat_reward([">q"], ["qqqq"], completion_ids=[[30, 30, 30, 30, 0, 0, 2]], letter=["q"])
    [0.5]
    """
    letters = letter if letter is not None else [p.strip()[-1] for p in prompts]
    out = []
    for chars, x in zip(_sequences(completions, completion_ids), letters):
        score = sum(_credit(c, x) for c in chars[:TARGET_LENGTH])
        out.append(score / max(TARGET_LENGTH, len(chars)))
    return out


@correctness
def exact_repeat(prompts, completions, completion_ids=None, letter=None, **kwargs) -> list[float]:
    """1.0 when the completion is the letter exactly 8 times.

    >>> exact_repeat([">q", ">q"], ["qqqqqqqq", "qqqqqqq"], letter=["q", "q"])
    [1.0, 0.0]
    """
    letters = letter if letter is not None else [p.strip()[-1] for p in prompts]
    return [float(chars == [x] * TARGET_LENGTH) for chars, x in zip(_sequences(completions, completion_ids), letters)]

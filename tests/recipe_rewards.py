"""Reward functions that recipe subprocesses in the tests import (tests/ is put on their PYTHONPATH)."""

import time

from rlhf.extras.addition import digit_match_reward


def slow_digit_reward(prompts, completions, answer, **kwargs):
    """digit_match_reward, taking 0.1 s per batch so that a test can kill a run between two steps."""
    time.sleep(0.1)
    return digit_match_reward(prompts, completions, answer)

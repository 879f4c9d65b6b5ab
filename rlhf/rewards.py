"""Calling reward functions, checking what they return, and combining them.

A reward function follows TRL's convention::

    def my_reward(prompts, completions, completion_ids, **columns) -> list[float | None]

one value per completion; every dataset column other than ``prompt`` arrives as a keyword list
(one entry per completion); ``None`` means "does not apply to this sample" and leaves that sample
out of this function's contribution. Anything else that is not a finite number is an error that
names the function and the sample.
"""

import inspect
import math
import numbers
from collections.abc import Callable, Sequence

import torch


class RewardError(ValueError):
    """A reward function misbehaved; the message names it and the sample."""


def reward_name(fn: Callable) -> str:
    return getattr(fn, "__name__", None) or type(fn).__name__


def _preview(value, limit: int = 80) -> str:
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _as_float(value, name: str, index: int, prompts, completions) -> float:
    """One validated reward value (NaN stands for None)."""
    if value is None:
        return math.nan
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if not isinstance(value, numbers.Real):
        raise RewardError(
            f"reward function {name!r} returned {_preview(value)} ({type(value).__name__}) for sample {index}; "
            f"rewards must be numbers or None. Completion: {_preview(completions[index])}"
        )
    value = float(value)
    if not math.isfinite(value):
        raise RewardError(
            f"reward function {name!r} returned {value} for sample {index}; rewards must be finite "
            f"(return None for 'does not apply'). Prompt: {_preview(prompts[index])}; "
            f"completion: {_preview(completions[index])}"
        )
    return value


class RewardFunction:
    """A callable reward with a name, validated on every call."""

    def __init__(self, fn: Callable, name: str | None = None):
        if not callable(fn):
            raise TypeError(f"reward function {fn!r} is not callable.")
        self.fn = fn
        self.name = name or reward_name(fn)

    def required_columns(self) -> set[str]:
        """Keyword arguments without a default that are not part of the standard call."""
        try:
            parameters = inspect.signature(self.fn).parameters.values()
        except (TypeError, ValueError):
            return set()
        standard = {"prompts", "completions", "completion_ids"}
        return {
            p.name for p in parameters
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.default is p.empty and p.name not in standard
        }

    def _call(self, prompts, completions, completion_ids, columns):
        return self.fn(prompts=prompts, completions=completions, completion_ids=completion_ids, **columns)

    def __call__(self, prompts: Sequence, completions: Sequence, completion_ids: Sequence[Sequence[int]],
                 columns: dict[str, Sequence]) -> torch.Tensor:
        """Rewards [N] as float64, NaN where the function returned None."""
        n = len(completions)
        try:
            values = self._call(prompts, completions, completion_ids, columns)
        except Exception as error:
            raise self._locate_exception(error, prompts, completions, completion_ids, columns) from error
        if isinstance(values, torch.Tensor):
            values = values.tolist()
        if not isinstance(values, Sequence) or isinstance(values, (str, bytes)):
            raise RewardError(
                f"reward function {self.name!r} returned a {type(values).__name__}; it must return a list with "
                f"one float (or None) per completion ({n} here)."
            )
        if len(values) != n:
            raise RewardError(
                f"reward function {self.name!r} returned {len(values)} values for {n} completions; it must "
                "return one float (or None) per completion, in order."
            )
        return torch.tensor(
            [_as_float(v, self.name, i, prompts, completions) for i, v in enumerate(values)], dtype=torch.float64
        )

    def _locate_exception(self, error, prompts, completions, completion_ids, columns) -> RewardError:
        """Re-run sample by sample to name the one that raises."""
        for i in range(len(completions)):
            try:
                self._call(prompts[i:i + 1], completions[i:i + 1], completion_ids[i:i + 1],
                           {k: v[i:i + 1] for k, v in columns.items()})
            except Exception:
                return RewardError(
                    f"reward function {self.name!r} raised {type(error).__name__}: {error} on sample {i}. "
                    f"Prompt: {_preview(prompts[i])}; completion: {_preview(completions[i])}"
                )
        return RewardError(
            f"reward function {self.name!r} raised {type(error).__name__}: {error} on the batch of "
            f"{len(completions)}, though every sample alone succeeded."
        )


def combine_rewards(per_function: torch.Tensor, weights: Sequence[float]) -> torch.Tensor:
    """Weighted sum over functions of rewards [N, F], skipping NaN (None) entries. [N]

    A sample for which every function returned None gets 0.
    """
    weight = torch.tensor(list(weights), dtype=per_function.dtype)
    return torch.nansum(per_function * weight, dim=1)

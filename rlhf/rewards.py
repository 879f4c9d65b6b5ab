"""Calling reward functions, checking what they return, and combining them.

A reward function follows TRL's convention::

    def my_reward(prompts, completions, completion_ids, **columns) -> list[float | None]

one value per completion; every dataset column other than ``prompt`` arrives as a keyword list
(one entry per completion); ``None`` means "does not apply to this sample" and leaves that sample
out of this function's contribution. Anything else that is not a finite number is an error that
names the function and the sample.
"""

import inspect
import logging
import math
import numbers
import threading
import time
from collections.abc import Callable, Sequence

import torch

logger = logging.getLogger(__name__)


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


def call_with_timeout(fn: Callable, timeout: float | None):
    """``fn()``, or TimeoutError after ``timeout`` seconds. The call runs in a daemon thread, which
    cannot be killed: a hung call is abandoned, and it never blocks the interpreter's exit."""
    if timeout is None:
        return fn()
    outcome = {}

    def target():
        try:
            outcome["value"] = fn()
        except BaseException as error:  # noqa: BLE001 - re-raised in the caller's thread
            outcome["error"] = error

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise TimeoutError(f"did not return within {timeout} s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def correctness(fn: Callable) -> Callable:
    """Mark ``fn`` as a correctness reward (a completion is correct when it scores >= ``accuracy_threshold``,
    1.0 by default). Evaluation then reports ``eval/accuracy`` and ``eval/pass@k`` from it. Returns ``fn``.

    >>> @correctness
    ... def right(prompts, completions, answer, **kwargs):
    ...     return [float(c == a) for c, a in zip(completions, answer)]
    >>> right.correctness
    True
    """
    fn.correctness = True
    return fn


def is_correctness(fn: Callable) -> bool:
    return getattr(fn, "correctness", False) is True


class RewardFunction:
    """A callable reward with a name, validated on every call; ``timeout`` (seconds) bounds one call."""

    def __init__(self, fn: Callable, name: str | None = None, timeout: float | None = None):
        if not callable(fn):
            raise TypeError(f"reward function {fn!r} is not callable.")
        self.fn = fn
        self.name = name or reward_name(fn)
        self.timeout = timeout

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
            values = call_with_timeout(lambda: self._call(prompts, completions, completion_ids, columns), self.timeout)
        except TimeoutError as error:
            raise self._locate_timeout(prompts, completions, completion_ids, columns) from error
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

    def _sample_call(self, i, prompts, completions, completion_ids, columns):
        return lambda: self._call(prompts[i:i + 1], completions[i:i + 1], completion_ids[i:i + 1],
                                  {k: v[i:i + 1] for k, v in columns.items()})

    def _locate_timeout(self, prompts, completions, completion_ids, columns) -> RewardError:
        """Run every sample alone, all at once, for one more ``timeout``: name those that do not finish."""
        threads = [threading.Thread(target=self._sample_call(i, prompts, completions, completion_ids, columns),
                                    daemon=True) for i in range(len(completions))]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + self.timeout
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        slow = [i for i, thread in enumerate(threads) if thread.is_alive()]
        where = (f"sample {slow[0]} (of {len(slow)} slow: {slow[:10]}) does not finish alone either. "
                 f"Prompt: {_preview(prompts[slow[0]])}; completion: {_preview(completions[slow[0]])}"
                 if slow else "every sample alone finishes in time, the batch as a whole does not")
        return RewardError(
            f"reward function {self.name!r} took longer than reward_timeout={self.timeout} s on a batch of "
            f"{len(completions)} completions; {where}. Make it faster, or raise reward_timeout."
        )

    def _locate_exception(self, error, prompts, completions, completion_ids, columns) -> RewardError:
        """Re-run sample by sample to name the one that raises."""
        for i in range(len(completions)):
            try:
                call_with_timeout(self._sample_call(i, prompts, completions, completion_ids, columns), self.timeout)
            except Exception:
                return RewardError(
                    f"reward function {self.name!r} raised {type(error).__name__}: {error} on sample {i}. "
                    f"Prompt: {_preview(prompts[i])}; completion: {_preview(completions[i])}"
                )
        return RewardError(
            f"reward function {self.name!r} raised {type(error).__name__}: {error} on the batch of "
            f"{len(completions)}, though every sample alone succeeded."
        )


class _Environment:
    """Stands for an environment's per-turn rewards in the reward table (metrics: reward/environment/...)."""

    name = "environment"
    fn = None


_ENVIRONMENT = _Environment()


def combine_rewards(per_function: torch.Tensor, weights: Sequence[float]) -> torch.Tensor:
    """Weighted sum over functions of rewards [N, F], skipping NaN (None) entries. [N]

    A sample for which every function returned None gets 0.
    """
    weight = torch.tensor(list(weights), dtype=per_function.dtype)
    return torch.nansum(per_function * weight, dim=1)


def build_reward_functions(reward_funcs, tokenizers=None, *, device=None, batch_size: int = 32,
                           normalize: bool = False, dtype: str = "float32", trust_remote_code: bool = False,
                           timeout: float | None = None, allow_none: bool = False) -> list[RewardFunction]:
    """Callables are used as they are; a path or a model object is a reward model, scored with its own
    tokenizer (``tokenizers[i]``, else the one saved with it). ``allow_none``: an environment gives rewards, so
    the list may be empty."""
    from rlhf.reward_model import RewardModelFunction

    funcs = [] if reward_funcs is None else reward_funcs if isinstance(reward_funcs, (list, tuple)) else [reward_funcs]
    if not funcs and not allow_none:
        raise ValueError("reward_funcs is empty; give at least one reward function or reward model.")
    tokenizers = list(tokenizers) if tokenizers is not None else [None] * len(funcs)
    if len(tokenizers) != len(funcs):
        raise ValueError(f"reward_processing_classes has {len(tokenizers)} entries for {len(funcs)} reward_funcs.")
    built = []
    for func, tokenizer in zip(funcs, tokenizers):
        if isinstance(func, (str, torch.nn.Module)):
            func = RewardModelFunction(func, tokenizer, device, batch_size, normalize=normalize, dtype=dtype,
                                       trust_remote_code=trust_remote_code)
        built.append(RewardFunction(func, timeout=timeout))
    return built


def check_reward_weights(weights, functions: list[RewardFunction]) -> list[float]:
    """One weight per function (None: all 1.0)."""
    if weights is None:
        return [1.0] * len(functions)
    if len(weights) != len(functions):
        raise ValueError(
            f"reward_weights has {len(weights)} entries but there are {len(functions)} reward "
            f"functions ({[f.name for f in functions]}); give one weight per function."
        )
    return [float(w) for w in weights]


def check_reward_columns(functions: list[RewardFunction], dataset) -> None:
    """Every column a reward function needs is in ``dataset``."""
    for func in functions:
        missing = func.required_columns() - set(dataset.column_names)
        if missing:
            raise ValueError(
                f"reward function {func.name!r} needs the dataset column(s) {sorted(missing)}, which the dataset "
                f"lacks (columns: {dataset.column_names}); add them or give those parameters a default."
            )


def correctness_index(functions: list[RewardFunction], name: str | None) -> int | None:
    """Index of the reward function that judges correctness: ``name`` if given, else the first one marked with
    ``correctness``; None when there is none."""
    names = [func.name for func in functions]
    if name is not None:
        if name not in names:
            raise ValueError(f"accuracy_reward={name!r} is not one of the reward functions {names}; name one of "
                             "them, or set it to None.")
        return names.index(name)
    marked = [j for j, func in enumerate(functions) if is_correctness(func.fn)]
    return marked[0] if marked else None


def reward_table(functions: list[RewardFunction], texts) -> torch.Tensor:
    """Every reward function's values for ``texts`` (a ``RolloutTexts``): [N, F] float64, NaN where a function
    returned None."""
    if not functions:  # an environment's rewards only
        return torch.zeros(len(texts.completions), 0, dtype=torch.float64)
    return torch.stack([func(texts.prompts, texts.completions, texts.completion_ids, texts.columns)
                        for func in functions], dim=1)


def score_rollout(functions: list[RewardFunction], weights: list[float], texts, accelerator, group_size: int,
                  metrics, turn_rewards: torch.Tensor | None = None) -> torch.Tensor:
    """Total rewards of the *whole* rollout batch (all processes, in process order), [B_global] float64.

    Each process scores its own completions; the table is gathered so that group and batch statistics
    are exact everywhere. Reward-model scores marked ``normalize`` are whitened over the whole batch.
    ``turn_rewards`` [B_local, T]: an environment's per-turn rewards (multi-turn), added to the total."""
    per_function = reward_table(functions, texts)  # [B_local, F]
    if turn_rewards is not None:
        per_function = torch.cat([per_function, turn_rewards.sum(dim=1, dtype=torch.float64).cpu().unsqueeze(1)], 1)
        functions, weights = [*functions, _ENVIRONMENT], [*weights, 1.0]
    per_function = accelerator.gather(per_function.to(accelerator.device)).cpu()
    for j, func in enumerate(functions):
        if getattr(func.fn, "normalize", False):
            scores = per_function[:, j]
            present = scores[~scores.isnan()]
            if present.numel() > 1:
                per_function[:, j] = (scores - present.mean()) / (present.std() + 1e-8)
    rewards = combine_rewards(per_function, weights)
    metrics.add("reward/mean", rewards.mean())
    metrics.add("reward/std", rewards.std() if rewards.numel() > 1 else 0.0)
    for j, func in enumerate(functions):
        values = per_function[:, j]
        present = values[~values.isnan()]
        if present.numel():
            metrics.add(f"reward/{func.name}/mean", present.mean())
            metrics.add(f"reward/{func.name}/std", present.std() if present.numel() > 1 else 0.0)
        metrics.add(f"reward/{func.name}/none_frac", values.isnan().double().mean())
    all_none = per_function.isnan().all(dim=1)
    if all_none.any():
        logger.warning("%d completions got None from every reward function; their reward is 0.", int(all_none.sum()))
    grouped = rewards.view(-1, group_size)
    metrics.add("reward/zero_std_group_frac", (grouped.std(dim=1) == 0).double().mean() if group_size > 1 else 1.0)
    return rewards

"""Calling reward functions, checking what they return, and combining them.

A reward function follows TRL's convention::

    def my_reward(prompts, completions, completion_ids, **columns) -> list[float | None]

one value per completion; every dataset column other than ``prompt`` arrives as a keyword list
(one entry per completion); ``None`` means "does not apply to this sample" and leaves that sample
out of this function's contribution. Anything else that is not a finite number is an error that
names the function and the sample. As in TRL, the trainer also passes ``trainer_state`` (its
``transformers.TrainerState``: global_step, max_steps, epoch, log_history), ``log_metric(name, value)``
(a scalar averaged over the logging window, written with the other metrics) and ``log_extra(column,
values)`` (one value per completion, shown in the completions table); with an ``environment_factory``,
``environments`` (each completion's environment instance). A function may be ``async def``:
those of one batch are awaited concurrently. A list, tuple, numpy array or tensor of values is
accepted. A function without ``**kwargs`` receives only the keywords it names; one that names a
keyword nobody passes is an error when the trainer is built, not after the first generation.
"""

import asyncio
import copy
import difflib
import functools
import inspect
import logging
import math
import numbers
import threading
import time
from collections.abc import Callable, Sequence

import torch

from rlhf.core import gdpo_rewards
from rlhf.reward_calls import (  # noqa: F401 - RewardContext and RewardError are part of this module's interface
    CONTEXT_KEYWORDS,
    STANDARD_KEYWORDS,
    LoopBlocked,
    RewardContext,
    RewardError,
    _EventLoop,
    _preview,
    blocked_loop_error,
    is_async_callable,
    loop_bound,
)
from rlhf.user_code import call_with_timeout, guarded, what_happened

logger = logging.getLogger(__name__)


# Largest |weight x reward| accepted. Advantages, returns and their statistics are computed in float32, where the
# square of 1e19 already overflows: a reward this large is a bug (or needs rescaling), not a signal.
MAX_ABS_REWARD = 1e10


def _what_happened(error: BaseException) -> str:
    return what_happened(error, "a reward function must return its values; raise an exception to stop the run")


def reward_name(fn: Callable) -> str:
    """TRL's name for a reward function (``get_callable_name``): a partial is named by the function it wraps."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    return getattr(fn, "__name__", None) or type(fn).__name__


def _as_float(value, name: str, index: int, prompts, completions) -> float:
    """One validated reward value (NaN stands for None)."""
    if value is None:
        return math.nan
    if getattr(value, "ndim", None) == 0 or (isinstance(value, torch.Tensor) and value.numel() == 1):
        value = value.item()  # a numpy scalar, a 0-d array or a one-element tensor
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


def _as_values(values):
    """A list from what a reward function returned: lists and tuples as they are; 1-D numpy arrays and tensors
    (anything with ``tolist`` and ``ndim``) as their values."""
    if hasattr(values, "tolist") and getattr(values, "ndim", None) == 1:
        return values.tolist()
    return values


_ATOMIC = (str, bytes, int, float, type(None))


def _copied(values) -> list:
    """A copy of a list of per-completion values that shares nothing mutable with it: strings and numbers as they are,
    flat lists (token ids) by ``list``, anything else (chat messages, structured columns) by ``deepcopy``."""
    return [v if isinstance(v, _ATOMIC) else list(v) if isinstance(v, list) and all(isinstance(x, _ATOMIC) for x in v)
            else copy.deepcopy(v) for v in values]


class RewardFunction:
    """A callable reward with a name, validated on every call; ``timeout`` (seconds) bounds one call."""

    def __init__(self, fn: Callable, name: str | None = None, timeout: float | None = None):
        if inspect.isclass(fn):
            raise TypeError(f"reward function {fn.__name__} is a class; pass an instance of it (e.g. "
                            f"{fn.__name__}()), whose __call__ computes the rewards.")
        if not callable(fn):
            raise TypeError(f"reward function {fn!r} is not callable.")
        self.fn = fn
        self.name = name or reward_name(fn)
        self.timeout = timeout
        self.is_async = is_async_callable(fn)
        try:
            parameters = list(inspect.signature(fn).parameters.values())
        except (TypeError, ValueError):  # a builtin without a signature: pass everything
            parameters = [inspect.Parameter("kwargs", inspect.Parameter.VAR_KEYWORD)]
        self.takes_any_keyword = any(p.kind == p.VAR_KEYWORD for p in parameters)
        self.keywords = {p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        self.required = {p.name for p in parameters
                         if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.default is p.empty}
        positional_only = [p.name for p in parameters if p.kind == p.POSITIONAL_ONLY and p.default is p.empty]
        if positional_only:
            raise TypeError(f"reward function {self.name!r} takes {positional_only} positional-only; the trainer "
                            "passes everything by keyword (prompts=, completions=, completion_ids=, columns...).")

    def required_columns(self) -> set[str]:
        """Keyword arguments without a default that are neither part of the standard call nor TRL's extras: the
        dataset columns the function needs."""
        return self.required - set(STANDARD_KEYWORDS) - set(CONTEXT_KEYWORDS)

    def check_signature(self, columns: Sequence[str]) -> None:
        """Before any generation: every keyword the function requires is one the trainer passes."""
        missing = sorted(self.required_columns() - set(columns))
        if missing:
            offered = [*STANDARD_KEYWORDS, *CONTEXT_KEYWORDS, *columns]
            hints = [f"{name!r} -> did you mean {close[0]!r}?" for name in missing
                     if (close := difflib.get_close_matches(name, offered, n=1))]
            raise ValueError(
                f"reward function {self.name!r} needs the dataset column(s) {missing}, which the dataset lacks "
                f"(columns: {list(columns)}); besides the columns the trainer passes {list(STANDARD_KEYWORDS)} and "
                f"{list(CONTEXT_KEYWORDS)}. " + (" ".join(hints) + " " if hints else "")
                + "Add the column to the dataset, rename the parameter, or give it a default.")

    def _call(self, prompts, completions, completion_ids, columns, context: RewardContext | None = None):
        """The function's result for these samples (a coroutine for an async function). It gets its own copies: what
        it changes in place, the next function and completions.jsonl do not see."""
        keywords = {"prompts": _copied(prompts), "completions": _copied(completions),
                    "completion_ids": _copied(completion_ids),
                    **{k: v if k == "environments" else _copied(v) for k, v in columns.items()}}  # live instances
        if context is not None:
            keywords.update(context.keywords())
        if not self.takes_any_keyword:
            keywords = {k: v for k, v in keywords.items() if k in self.keywords}
        return self.fn(**keywords)

    def _run(self, prompts, completions, completion_ids, columns, context=None):
        """Call the function and wait for its values, however long (on the reward event loop when it is async)."""
        if self.is_async:
            return _EventLoop.run(guarded(self._call(prompts, completions, completion_ids, columns, context)))
        return self._call(prompts, completions, completion_ids, columns, context)

    def _bounded(self, prompts, completions, completion_ids, columns, context=None):
        """``_run`` within ``timeout``: TimeoutError past it, ``LoopBlocked`` when an async function holds the loop;
        ``SystemExit`` and ``KeyboardInterrupt`` come back as ``UserExit``."""
        if self.is_async:
            return _EventLoop.run(self.acall(prompts, completions, completion_ids, columns, context),
                                  loop_bound(self.timeout))
        return call_with_timeout(lambda: self._call(prompts, completions, completion_ids, columns, context),
                                 self.timeout, f"reward function {self.name!r}")

    def __call__(self, prompts: Sequence, completions: Sequence, completion_ids: Sequence[Sequence[int]],
                 columns: dict[str, Sequence], context: RewardContext | None = None) -> torch.Tensor:
        """Rewards [N] as float64, NaN where the function returned None."""
        try:
            values = self._bounded(prompts, completions, completion_ids, columns, context)
        except TimeoutError as error:
            raise self._locate_timeout(prompts, completions, completion_ids, columns) from error
        except LoopBlocked as error:
            raise blocked_loop_error([self], error) from None
        except RewardError:
            raise
        except Exception as error:  # noqa: BLE001 - a sys.exit() too (UserExit): named, not the end of the run
            raise self._locate_exception(error, prompts, completions, completion_ids, columns) from error
        return self.validate(values, prompts, completions)

    async def acall(self, prompts, completions, completion_ids, columns, context=None):
        """The raw values of an async function, bounded by ``timeout`` (for awaiting several concurrently)."""
        return await asyncio.wait_for(guarded(self._call(prompts, completions, completion_ids, columns, context)),
                                      self.timeout)

    def validate(self, values, prompts: Sequence, completions: Sequence) -> torch.Tensor:
        """What the function returned as rewards [N] float64 (NaN for None), or a RewardError naming it."""
        n = len(completions)
        values = _as_values(values)
        if inspect.isawaitable(values):
            raise RewardError(f"reward function {self.name!r} returned an awaitable, not values; make it an async "
                              "def (the trainer awaits those) or return the list itself.")
        if not isinstance(values, Sequence) or isinstance(values, (str, bytes)):
            shape = getattr(values, "shape", None)
            raise RewardError(
                f"reward function {self.name!r} returned a {type(values).__name__}"
                + (f" of shape {tuple(shape)}" if shape is not None else "")
                + f"; it must return a list (or tuple, 1-D array, 1-D tensor) with one float (or None) per "
                f"completion ({n} here)."
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
        return lambda: self._run(prompts[i:i + 1], completions[i:i + 1], completion_ids[i:i + 1],
                                 {k: v[i:i + 1] for k, v in columns.items()}, RewardContext())

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
            except Exception:  # noqa: BLE001 - whatever it raised, this sample fails alone
                return RewardError(
                    f"reward function {self.name!r} {_what_happened(error)} on sample {i}. "
                    f"Prompt: {_preview(prompts[i])}; completion: {_preview(completions[i])}"
                )
        return RewardError(
            f"reward function {self.name!r} {_what_happened(error)} on the batch of "
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
                           timeout: float | None = None, allow_none: bool = False,
                           environment_factory=None) -> list[RewardFunction]:
    """Callables are used as they are; a path or a model object is a reward model, scored with its own
    tokenizer (``tokenizers[i]``, else the one saved with it). ``allow_none``: an environment gives rewards, so
    the list may be empty. ``environment_factory``: the ``get_reward`` of TRL-style environments follow, one function
    per class, named after it (``rlhf.environments.environment_rewards``); the list may be empty when an environment
    gives rewards (``get_reward``, or our protocol's ``step``)."""
    from rlhf.environments import STEP, describe_environments, environment_rewards
    from rlhf.reward_model import RewardModelFunction

    funcs = [] if reward_funcs is None else reward_funcs if isinstance(reward_funcs, (list, tuple)) else [reward_funcs]
    owned = []
    if environment_factory is not None:
        specs = describe_environments(environment_factory)
        owned = environment_rewards(specs)
        allow_none = allow_none or bool(owned) or any(spec.protocol == STEP for spec in specs)
    if not funcs and not allow_none:
        raise ValueError("No reward source: reward_funcs is empty; give at least one reward function or reward model"
                         + (", or an environment with a get_reward() method." if environment_factory is not None
                            else "."))
    tokenizers = list(tokenizers) if tokenizers is not None else [None] * len(funcs)
    if len(tokenizers) != len(funcs):
        raise ValueError(f"reward_processing_classes has {len(tokenizers)} entries for {len(funcs)} reward_funcs.")
    built = []
    for func, tokenizer in zip(funcs, tokenizers):
        if isinstance(func, (str, torch.nn.Module)):
            func = RewardModelFunction(func, tokenizer, device, batch_size, normalize=normalize, dtype=dtype,
                                       trust_remote_code=trust_remote_code)
        built.append(RewardFunction(func, timeout=timeout))
    built += [RewardFunction(func, timeout=timeout) for func in owned]
    _distinct_names(built)
    return built


def _distinct_names(functions: list[RewardFunction]) -> None:
    """Give functions that share a name (two lambdas, two partials of one function) the suffixes _2, _3, ... in order,
    so that their metrics and completion columns stay apart (TRL logs such functions under one name, merged)."""
    taken, renamed = {f.name for f in functions}, []
    seen: set[str] = set()
    for func in functions:
        if func.name in seen:
            number = 2
            while f"{func.name}_{number}" in taken:
                number += 1
            renamed.append(f"{func.name!r} -> {func.name + '_' + str(number)!r}")
            func.name = f"{func.name}_{number}"
            taken.add(func.name)
        seen.add(func.name)
    if renamed:
        logger.warning("Reward functions share a name; later ones are renamed in metrics and logs (name them with "
                       "def, or set __name__, to choose): %s.", ", ".join(renamed))


def check_reward_weights(weights, functions: list[RewardFunction]) -> list[float]:
    """One weight per function (None: all 1.0). As in TRL, an environment's ``get_reward`` (last in ``functions``)
    weighs 1 and takes no entry of ``weights``."""
    given = [f for f in functions if not getattr(f.fn, "environment_reward", False)]
    if weights is None:
        return [1.0] * len(functions)
    if len(weights) != len(given):
        owned = len(functions) - len(given)
        raise ValueError(
            f"reward_weights has {len(weights)} entries but there are {len(given)} reward "
            f"functions ({[f.name for f in given]}); give one weight per function"
            + (f" (the {owned} environment get_reward() source(s) weigh 1 and take no entry)." if owned else ".")
        )
    return [float(w) for w in weights] + [1.0] * (len(functions) - len(given))


def check_reward_columns(functions: list[RewardFunction], dataset, name: str = "the dataset") -> None:
    """Every keyword a reward function requires is passed: a standard one, TRL's extras, or a column of ``dataset``
    (a Dataset, or the column names). No column may take the name of a keyword the trainer passes: it would replace
    what every reward function receives under it."""
    columns = [c for c in (dataset if isinstance(dataset, (list, tuple)) else dataset.column_names) if c != "prompt"]
    reserved = [c for c in columns if c in STANDARD_KEYWORDS or c in CONTEXT_KEYWORDS]
    if functions and reserved:
        raise ValueError(f"{name} has a column {reserved[0]!r}, a keyword the trainer passes to reward functions "
                         f"itself ({[*STANDARD_KEYWORDS, *CONTEXT_KEYWORDS]}); rename it, e.g. "
                         f"dataset.rename_column({reserved[0]!r}, 'reference_{reserved[0]}').")
    for func in functions:
        func.check_signature(columns)


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


def reward_table(functions: list[RewardFunction], texts, weights: Sequence[float] | None = None,
                 context: RewardContext | None = None) -> torch.Tensor:
    """Every reward function's values for ``texts`` (a ``RolloutTexts``): [N, F] float64, NaN where a function
    returned None. Synchronous functions run one after the other, then the async ones concurrently (as in TRL).
    A value whose magnitude times its weight (default 1) exceeds ``MAX_ABS_REWARD`` is a ``RewardError`` naming
    the function and the sample."""
    if not functions:  # an environment's rewards only
        return torch.zeros(len(texts.completions), 0, dtype=torch.float64)
    environments = getattr(texts, "environments", None)
    columns = texts.columns if environments is None else {**texts.columns, "environments": environments}
    batch = (texts.prompts, texts.completions, texts.completion_ids, columns)
    context = context if context is not None else RewardContext()
    columns = {j: func(*batch, context) for j, func in enumerate(functions) if not func.is_async}
    waiting = [(j, func) for j, func in enumerate(functions) if func.is_async]
    if waiting:
        async def gather():
            return await asyncio.gather(*(func.acall(*batch, context) for _, func in waiting), return_exceptions=True)

        timeouts = [func.timeout for _, func in waiting]
        try:
            results = _EventLoop.run(gather(), None if None in timeouts else loop_bound(max(timeouts)))
        except LoopBlocked as error:
            raise blocked_loop_error([func for _, func in waiting], error) from None
        for (j, func), result in zip(waiting, results):
            if isinstance(result, asyncio.TimeoutError):
                raise func._locate_timeout(*batch) from result
            if isinstance(result, BaseException):
                raise func._locate_exception(result, *batch) from result
            columns[j] = func.validate(result, texts.prompts, texts.completions)
    table = torch.stack([columns[j] for j in range(len(functions))], dim=1)
    weights = list(weights) if weights is not None else [1.0] * len(functions)
    for j, (func, weight) in enumerate(zip(functions, weights)):
        weighted = table[:, j] * weight
        too_large = (weighted.abs() > MAX_ABS_REWARD).nonzero().flatten().tolist()  # NaN (None) never is
        if too_large:
            i = too_large[0]
            raise RewardError(
                f"reward function {func.name!r} returned {table[i, j].item():.6g} for sample {i} (x weight {weight:g} = "
                f"{weighted[i].item():.6g}; {len(too_large)} such sample(s)): weighted rewards beyond "
                f"+-{MAX_ABS_REWARD:g} overflow the advantage statistics. Rescale the reward or its weight. "
                f"Prompt: {_preview(texts.prompts[i])}; completion: {_preview(texts.completions[i])}")
    return table


def log_reward_metrics(context: RewardContext, accelerator, metrics) -> None:
    """What reward functions gave ``log_metric``, averaged over the batch and the processes. Every process adds the
    same names (the union over processes, a name it did not see with weight 0), so the metrics reduce in step."""
    names = sorted(context.metrics)
    if accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        names = sorted({name for part in gather_object([names]) for name in part})
    for name in names:
        values = context.metrics.get(name, [])
        metrics.add(name, sum(values) / len(values) if values else 0.0, float(len(values)))


def score_rollout(functions: list[RewardFunction], weights: list[float], texts, accelerator, group_size: int,
                  metrics, context: RewardContext | None = None, turn_rewards: torch.Tensor | None = None,
                  aggregation: str = "sum_then_normalize") -> torch.Tensor:
    """Total rewards of the *whole* rollout batch (all processes, in process order), [B_global] float64.

    Each process scores its own completions; the table is gathered so that group and batch statistics
    are exact everywhere. Reward-model scores marked ``normalize`` are whitened over the whole batch.
    ``texts.rewards`` and ``texts.extra`` receive this process's values per function and what the functions gave
    ``log_extra``; ``log_metric`` values go to ``metrics``. ``turn_rewards`` [B_local, T]: an environment's
    per-turn rewards (multi-turn), added to the total. ``aggregation="normalize_then_sum"`` (GDPO) returns instead
    ``rlhf.core.gdpo_rewards``, each function normalised within its group before the weighted sum (NaN where no
    function applied); the logged rewards are the plain weighted sums either way."""
    context = context if context is not None else RewardContext()
    per_function = reward_table(functions, texts, weights, context)  # [B_local, F]
    texts.rewards = {func.name: [None if math.isnan(v) else v for v in per_function[:, j].tolist()]
                     for j, func in enumerate(functions)}
    texts.extra = dict(context.extra)
    log_reward_metrics(context, accelerator, metrics)
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
    if aggregation == "normalize_then_sum":
        return gdpo_rewards(per_function, torch.tensor(list(weights), dtype=per_function.dtype), group_size)
    return rewards

"""How reward functions are called, besides what they are given: the keywords TRL passes with the batch
(``RewardContext``: ``trainer_state``, ``log_metric``, ``log_extra``), the event loop that runs ``async def``
functions, and the timeout of one call. ``rlhf.rewards`` uses them."""

import asyncio
import functools
import inspect
import math
import numbers
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import torch


class RewardError(ValueError):
    """A reward function misbehaved; the message names it and the sample."""


def _preview(value, limit: int = 80) -> str:
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


STANDARD_KEYWORDS = ("prompts", "completions", "completion_ids")
CONTEXT_KEYWORDS = ("trainer_state", "log_metric", "log_extra")


@dataclass
class RewardContext:
    """What the trainer passes to reward functions besides the batch (TRL's keywords): ``trainer_state``, and the
    sinks behind ``log_metric`` and ``log_extra``, which collect what the functions of one batch log."""

    trainer_state: object = None
    metrics: dict[str, list[float]] = field(default_factory=dict)
    extra: dict[str, list] = field(default_factory=dict)

    def log_metric(self, name: str, value) -> None:
        """A scalar for this batch; the logging window averages it (TRL's ``log_metric``)."""
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if not isinstance(name, str) or not isinstance(value, numbers.Real) or not math.isfinite(value):
            raise RewardError(f"log_metric({name!r}, {_preview(repr(value))}): give a metric name and one finite "
                              "number.")
        self.metrics.setdefault(name, []).append(float(value))

    def log_extra(self, column: str, values) -> None:
        """One value per completion of the batch, a column of the completions table (TRL's ``log_extra``)."""
        if not isinstance(column, str) or isinstance(values, (str, bytes)) or not hasattr(values, "__len__"):
            raise RewardError(f"log_extra({column!r}, {_preview(repr(values))}): give a column name and a list with one "
                              "value per completion.")
        self.extra.setdefault(column, []).extend(values.tolist() if hasattr(values, "tolist") else list(values))

    def keywords(self) -> dict:
        return {"trainer_state": self.trainer_state, "log_metric": self.log_metric, "log_extra": self.log_extra}


def is_async_callable(fn: Callable) -> bool:
    """Whether calling ``fn`` gives a coroutine: ``async def`` functions, partials of them, and objects whose
    ``__call__`` is ``async def``."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(getattr(fn, "__call__", None))


class _EventLoop:
    """One event loop in a daemon thread for async reward functions: it persists across steps (async clients bound to
    a loop keep working), and works where the caller's thread already runs a loop (Jupyter)."""

    _loop: asyncio.AbstractEventLoop | None = None
    _lock = threading.Lock()

    @classmethod
    def run(cls, coroutine, timeout: float | None = None):
        with cls._lock:
            if cls._loop is None:
                cls._loop = asyncio.new_event_loop()
                threading.Thread(target=cls._loop.run_forever, daemon=True, name="reward-functions").start()
        future = asyncio.run_coroutine_threadsafe(coroutine, cls._loop)
        try:
            return future.result(timeout)
        except TimeoutError:
            future.cancel()
            raise


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

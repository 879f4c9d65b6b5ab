"""How reward functions are called, besides what they are given: the keywords TRL passes with the batch
(``RewardContext``: ``trainer_state``, ``log_metric``, ``log_extra``), the event loop that runs ``async def``
functions, and the bounds on waiting for them. ``rlhf.rewards`` uses them."""

import asyncio
import functools
import inspect
import math
import numbers
import sys
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
CONTEXT_KEYWORDS = ("trainer_state", "log_metric", "log_extra", "environments")
"""What the trainer passes besides the batch and the dataset columns (as TRL does): ``environments``, each completion's
environment instance, only with an ``environment_factory``."""


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


LOOP_GRACE = 1.0
"""Seconds past an async function's timeout that the trainer waits for the event loop to report it: the loop stops a
coroutine at its timeout only when it gets control back, which a coroutine running blocking code never gives."""


def loop_bound(timeout: float | None) -> float | None:
    return None if timeout is None else timeout + LOOP_GRACE


class LoopBlocked(Exception):
    """The reward event loop did not answer within the wait's bound: a coroutine ran blocking code (``time.sleep``, a
    synchronous client, a long computation) or did not stop when cancelled. ``codes``: the code objects on the loop
    thread's stack at that moment, innermost first."""

    def __init__(self, seconds: float, codes: list):
        super().__init__(f"the reward event loop did not answer within {seconds:g} s")
        self.seconds, self.codes = seconds, codes


def code_of(fn: Callable):
    """The code object that runs when ``fn`` is called (a function, a partial of one, or an object's ``__call__``)."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    if not (inspect.isfunction(fn) or inspect.ismethod(fn)):
        fn = getattr(type(fn), "__call__", None)
    return getattr(getattr(fn, "__func__", fn), "__code__", None)


def blocked_loop_error(functions: list, error: LoopBlocked) -> RewardError:
    """What to say when the event loop running the async ``functions`` (``RewardFunction``) did not answer: the one
    whose code was on the loop's stack blocked it; if none was, one of them did not stop when cancelled."""
    blocking = [f for f in functions if code_of(f.fn) in error.codes]
    names = [f.name for f in blocking or functions]
    what = ("blocked the event loop" if blocking else
            "did not stop when cancelled (a coroutine that catches asyncio.CancelledError must re-raise it), or "
            "blocked the event loop")
    return RewardError(
        f"async reward function(s) {names} {what}: still running {error.seconds:g} s after the batch started "
        f"(reward_timeout={functions[0].timeout}), where the timeout could not stop them. A coroutine must not run "
        "blocking code (time.sleep, a synchronous HTTP client, a long computation): await asyncio.sleep or an async "
        "client, move blocking work to `await asyncio.to_thread(...)`, or make the function a plain def (it then runs "
        "in a thread that reward_timeout bounds).")


class _EventLoop:
    """One event loop in a daemon thread for async reward functions: it persists across steps (async clients bound to
    a loop keep working), and works where the caller's thread already runs a loop (Jupyter). A loop that does not
    answer within a wait's bound is given up (``LoopBlocked``); the next call starts a new one."""

    _loop: asyncio.AbstractEventLoop | None = None
    _thread: threading.Thread | None = None
    _lock = threading.Lock()

    @classmethod
    def run(cls, coroutine, timeout: float | None = None):
        """The coroutine's result, awaited on the loop; ``LoopBlocked`` if the loop has not answered after ``timeout``
        seconds (None: wait for as long as it takes)."""
        with cls._lock:
            if cls._loop is None or not cls._thread.is_alive():
                cls._loop = asyncio.new_event_loop()
                cls._thread = threading.Thread(target=cls._loop.run_forever, daemon=True, name="reward-functions")
                cls._thread.start()
            loop, thread = cls._loop, cls._thread
        future = asyncio.run_coroutine_threadsafe(coroutine, loop)
        try:
            return future.result(timeout)
        except TimeoutError:
            if future.done():  # the coroutine's own TimeoutError, or it finished just now
                return future.result()
        future.cancel()
        frame, codes = sys._current_frames().get(thread.ident), []
        while frame is not None:
            codes.append(frame.f_code)
            frame = frame.f_back
        with cls._lock:
            if cls._loop is loop:
                cls._loop = None
        loop.call_soon_threadsafe(loop.stop)  # when the blocked coroutine gives it control back
        raise LoopBlocked(timeout, codes)

"""Calling code the user wrote (reward functions, tools, environments, callbacks) so that however it leaves, the
trainer gets control back with an error that names it.

- It raises: the caller names the code and what it raised (``what_happened``).
- It calls ``sys.exit`` or raises ``KeyboardInterrupt``: neither is an ``Exception``, so it would pass every
  ``except Exception``, end the process without a word or, in an event loop's thread, stop the loop and leave whoever
  waits on it waiting forever. ``call_with_timeout`` and ``guarded`` turn both into ``UserExit``, an ``Exception``.
  One is left as it is: a ``KeyboardInterrupt`` in the trainer's own thread (code called without a timeout) may be
  the user's Ctrl-C, so it stays one, with a note naming the code it interrupted.
- It hangs: with a timeout the call runs in a daemon thread, abandoned at the timeout (a thread cannot be killed;
  tools run in processes, which can be: ``rlhf.tools``).
"""

import threading
from collections.abc import Callable


class UserExit(Exception):
    """``SystemExit`` or ``KeyboardInterrupt`` raised by user code, carried as an ordinary exception (``.error``)."""

    def __init__(self, error: BaseException):
        super().__init__(f"{type(error).__name__}: {error}")
        self.error = error


def what_happened(error: BaseException, advice: str) -> str:
    """How user code left, for an error message that names it; ``advice`` (what the code should do instead) follows an
    exit."""
    error = error.error if isinstance(error, UserExit) else error
    if isinstance(error, SystemExit):
        return f"called sys.exit({error.code!r}) ({advice})"
    if isinstance(error, KeyboardInterrupt):
        return f"raised KeyboardInterrupt ({advice})"
    return f"raised {type(error).__name__}: {error}"


def call_with_timeout(fn: Callable, timeout: float | None, name: str | None = None):
    """``fn()``, or TimeoutError after ``timeout`` seconds; ``SystemExit`` and ``KeyboardInterrupt`` come back as
    ``UserExit``. With a timeout the call runs in a daemon thread, which cannot be killed: a hung call is abandoned, and
    it never blocks the interpreter's exit. Without one it runs in this thread, where a ``KeyboardInterrupt`` may be a
    Ctrl-C: it is re-raised, noting ``name``."""
    if timeout is None:
        try:
            return fn()
        except SystemExit as error:
            raise UserExit(error) from error
        except KeyboardInterrupt as error:
            if name is not None:
                error.add_note(f"(interrupted {name})")
            raise
    outcome = {}

    def target():
        try:
            outcome["value"] = fn()
        except BaseException as error:  # noqa: BLE001 - re-raised in the caller's thread
            outcome["error"] = error

    thread = threading.Thread(target=target, daemon=True, name=name)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise TimeoutError(f"did not return within {timeout} s")
    if "error" in outcome:
        error = outcome["error"]
        if isinstance(error, (SystemExit, KeyboardInterrupt)):
            raise UserExit(error) from error
        raise error
    return outcome["value"]


async def guarded(awaitable):
    """``await awaitable`` (user code) with ``SystemExit`` and ``KeyboardInterrupt`` turned into ``UserExit``: asyncio
    re-raises those two out of the event loop, which stops it, and nothing it runs ever finishes."""
    try:
        return await awaitable
    except (SystemExit, KeyboardInterrupt) as error:
        raise UserExit(error) from error

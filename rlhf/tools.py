"""Tools the policy calls during a rollout: their schemas, the call format, and running them safely.

A tool is a plain Python function with type hints and a Google-style docstring (``Args:`` names every
argument); its JSON schema is what the chat template shows the model (``tokenizer.apply_chat_template(...,
tools=...)``). Tokenizers whose template ignores ``tools`` get the plain-text description of
``describe_tools`` instead. Either way the policy calls a tool by writing, anywhere in its turn, ::

    <tool_call>{"name": "calculator", "arguments": {"expression": "37*58"}}</tool_call>

and ending the turn (an EOS token). This is the Hermes / Qwen2.5 format; whitespace around the JSON is allowed.

``ToolExecutor`` runs the calls of a turn (an ``async def`` tool too). A call that raises (or calls ``sys.exit``),
runs past ``timeout`` seconds, names an unknown tool, has bad arguments or returns more than ``max_chars``
characters gives the model an error message (or the cut result) of at most ``max_chars`` characters, never an
exception in the trainer. With ``workers`` > 0 the calls run in that many worker processes, and a call past its
time is ended by killing its process (a thread cannot be killed: a tool that hangs forever would keep a thread, and
a core, forever); ``workers=0`` runs them in threads of the trainer's process, where a hung call is abandoned, not
stopped. An environment's methods (TRL's environments, ``rlhf.environments``) always run in threads of the trainer's
process, one after the other: a call must change that episode's instance, which a worker process only has a copy of.
"""

import asyncio
import inspect
import json
import logging
import multiprocessing
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import wait

from rlhf.user_code import call_with_timeout

logger = logging.getLogger(__name__)

TOOL_CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)
OPEN_TAG = "<tool_call>"


def tool_schema(fn: Callable) -> dict:
    """The JSON schema of a tool function, as transformers builds it for chat templates."""
    from transformers.utils import get_json_schema

    try:
        return get_json_schema(fn)
    except Exception as error:  # DocstringParsingException, TypeHintParsingException
        name = getattr(fn, "__name__", repr(fn))
        raise ValueError(f"tool {name!r}: {error}. A tool needs a type hint on every argument and a Google-style "
                         "docstring whose Args: section describes each one (see rlhf/tools.py).") from None


def tool_schemas(tools: list[Callable]) -> list[dict]:
    """Schemas of ``tools``, checked: callables with distinct names."""
    schemas = []
    for tool in tools:
        if not callable(tool):
            raise TypeError(f"tools must be functions; got {tool!r}.")
        schemas.append(tool_schema(tool))
    names = [s["function"]["name"] for s in schemas]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"tools {duplicates} share a name; the model calls tools by name, so names must differ.")
    return schemas


def describe_tools(schemas: list[dict]) -> str:
    """The plain-text tool description for templates without ``tools`` support (and for plain-text prompts)."""
    lines = ["You can call these tools. To call one, write",
             '<tool_call>{"name": <tool name>, "arguments": {<argument name>: <value>, ...}}</tool_call>',
             "and end your turn; the result comes back in the next turn. Tools:"]
    lines += [json.dumps(s["function"], ensure_ascii=False) for s in schemas]
    return "\n".join(lines)


def format_tool_call(name: str, arguments: dict) -> str:
    """A call as the policy writes it (e.g. in warm-start data)."""
    call = json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False, separators=(",", ":"))
    return f"{OPEN_TAG}{call}</tool_call>"


@dataclass
class ToolCall:
    """One call parsed from the policy's text: a name and arguments, or why it could not be parsed."""

    name: str | None
    arguments: dict | None
    error: str | None = None

    def as_message_call(self) -> dict:
        """The call in the chat-message format (``tool_calls`` of an assistant message)."""
        return {"type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass
class ToolResult:
    """What the model sees of one call. status: ok, long (the result was cut), error (the tool raised), timeout,
    or bad_call (unparsable, unknown tool, wrong arguments)."""

    name: str
    content: str
    status: str


MAX_CALL_DEPTH = 32
"""Deepest nesting of objects and lists in a call's JSON; deeper is a bad call. Python's json, pickle (to a tool
process) and the chat template all recurse, and ~1000 levels raise RecursionError in the trainer."""


def _parse_json(text: str):
    """(value, None), or (None, why) for text that is not JSON or nests deeper than ``MAX_CALL_DEPTH``."""
    too_deep = f"the call's JSON is nested deeper than {MAX_CALL_DEPTH} levels: {bounded(text, 200)[0]}"
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        return None, f"the call is not valid JSON ({error.msg}): {bounded(text, 200)[0]}"
    except RecursionError:
        return None, too_deep
    stack = [(value, 1)]
    while stack:  # a loop, not recursion: the depth is what is being bounded
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            if depth > MAX_CALL_DEPTH:
                return None, too_deep
            stack.extend((v, depth + 1) for v in (item.values() if isinstance(item, dict) else item))
    return value, None


def parse_tool_calls(text: str) -> list[ToolCall]:
    """Every ``<tool_call>...</tool_call>`` block of ``text``, in order; an unclosed block, JSON that does not parse or
    nests deeper than ``MAX_CALL_DEPTH``, is a bad call (never an exception)."""
    calls = []
    for block in TOOL_CALL.findall(text):
        data, error = _parse_json(block)
        if error is not None:
            calls.append(ToolCall(None, None, error))
            continue
        name = data.get("name") if isinstance(data, dict) else None
        arguments = data.get("arguments", data.get("parameters", {})) if isinstance(data, dict) else None
        if isinstance(arguments, str):  # some models write the arguments as a JSON string
            arguments = _parse_json(arguments)[0]
        if not isinstance(name, str) or not isinstance(arguments, dict):
            calls.append(ToolCall(name if isinstance(name, str) else None, None,
                                  'a call is {"name": <string>, "arguments": {<object>}}; got '
                                  f"{bounded(block, 200)[0]}"))
        else:
            calls.append(ToolCall(name, arguments))
    if text.count(OPEN_TAG) > len(calls):
        calls.append(ToolCall(None, None, "a <tool_call> is not closed with </tool_call>"))
    return calls


def bounded(text: str, max_chars: int) -> tuple[str, bool]:
    """``text`` cut to at most ``max_chars`` characters, saying how much was cut; and whether it was."""
    if len(text) <= max_chars:
        return text, False
    note = f"... [{len(text) - max_chars} more characters cut]"
    return text[:max(0, max_chars - len(note))] + note[:max_chars], True


def _call(fn: Callable, arguments: dict, max_chars: int) -> tuple[str, str]:
    """(status, content) of one call; never raises (a ``sys.exit`` in the tool included). Runs in a worker (process or
    thread); an ``async def`` tool is run to completion there."""
    try:
        result = fn(**arguments)
        if inspect.iscoroutine(result):
            result = asyncio.run(result)
        content, cut = bounded(str(result), max_chars)
        return ("long" if cut else "ok"), content
    except BaseException as error:  # noqa: BLE001 - the model sees it; the trainer carries on
        return "error", bounded(f"Error: {type(error).__name__}: {error}", max_chars)[0]


def _worker(connection, tools: dict[str, Callable], max_chars: int) -> None:
    """A tool process: say it is ready, then answer (name, arguments) requests until the pipe closes or the
    trainer's process is gone (killed: a forked worker holds copies of the pipes, so they never close)."""
    parent = os.getppid()
    connection.send("ready")
    while True:
        try:
            if not connection.poll(1.0):
                if os.getppid() != parent:
                    return
                continue
            name, arguments = connection.recv()
        except (EOFError, OSError):
            return
        connection.send(_call(tools[name], arguments, max_chars))


class _Worker:
    def __init__(self, context, tools, max_chars):
        self.connection, child = context.Pipe()
        self.process = context.Process(target=_worker, args=(child, tools, max_chars), daemon=True)
        self.process.start()
        child.close()
        self.job, self.deadline = None, None
        # A call's time starts once its worker runs (a spawned worker first imports the tools' modules).
        if not self.connection.poll(120) or self.connection.recv() != "ready":
            self.stop()
            raise RuntimeError("a tool worker process did not start within 120 s.")

    def stop(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join(timeout=5)
        self.connection.close()


class ToolExecutor:
    """Runs tool calls with a time limit and a bound on what comes back (see the module docstring)."""

    def __init__(self, tools: list[Callable], timeout: float, max_chars: int, workers: int = 4):
        self.tools = {tool_schema(t)["function"]["name"]: t for t in tools}
        self.signatures = {name: inspect.signature(t) for name, t in self.tools.items()}
        self.timeout, self.max_chars, self.num_workers = timeout, max_chars, workers
        methods = multiprocessing.get_all_start_methods()
        # fork: tools need not be importable (closures, notebook functions); the worker only runs Python code.
        self.context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
        self.workers: list[_Worker] = []

    def check(self, call: ToolCall, methods: dict[str, Callable] | None = None) -> ToolResult | None:
        """The bad_call result of a call that cannot run (given an environment's ``methods`` too), or None when it
        can."""
        name = call.name or "unknown"
        if call.error is not None:
            return ToolResult(name, bounded(f"Error: {call.error}", self.max_chars)[0], "bad_call")
        if call.name not in self.tools and call.name not in (methods or {}):
            message = f"Error: unknown tool {call.name!r}; the tools are {sorted([*self.tools, *(methods or {})])}."
            return ToolResult(name, bounded(message, self.max_chars)[0], "bad_call")
        try:
            (inspect.signature(methods[call.name]) if call.name in (methods or {})
             else self.signatures[call.name]).bind(**call.arguments)
        except TypeError as error:
            return ToolResult(name, bounded(f"Error: {call.name}: {error}", self.max_chars)[0], "bad_call")
        return None

    def run(self, calls: list[ToolCall], methods: list[dict | None] | None = None) -> list[ToolResult]:
        """One result per call, in order. Calls run concurrently on the worker processes (or one by one in
        threads with ``workers=0``); ``methods[i]``, an environment's tools that call ``i`` may also name, run one by
        one in threads of this process."""
        methods = methods if methods is not None else [None] * len(calls)
        results: list[ToolResult | None] = [self.check(call, m) for call, m in zip(calls, methods)]
        todo = [i for i, r in enumerate(results) if r is None]
        for i in [i for i in todo if calls[i].name in (methods[i] or {})]:
            results[i] = self._in_thread(calls[i], methods[i][calls[i].name])
        todo = [i for i in todo if results[i] is None]
        if self.num_workers == 0:
            for i in todo:
                results[i] = self._in_thread(calls[i])
        elif todo:
            self._in_processes(calls, todo, results)
        return results

    def _timeout_result(self, name: str) -> ToolResult:
        message = f"Error: {name} did not return within {self.timeout:g} s and was stopped."
        return ToolResult(name, bounded(message, self.max_chars)[0], "timeout")

    def _in_thread(self, call: ToolCall, fn: Callable | None = None) -> ToolResult:
        fn = fn if fn is not None else self.tools[call.name]
        try:
            status, content = call_with_timeout(lambda: _call(fn, call.arguments, self.max_chars), self.timeout)
        except TimeoutError:
            return self._timeout_result(call.name)
        return ToolResult(call.name, content, status)

    def _in_processes(self, calls, todo: list[int], results: list) -> None:
        while len(self.workers) < min(self.num_workers, len(todo)):
            self.workers.append(_Worker(self.context, self.tools, self.max_chars))
        queue = list(reversed(todo))
        while queue or any(w.job is not None for w in self.workers):
            for w in self.workers:
                if w.job is None and queue:
                    w.job = queue.pop()
                    w.deadline = time.monotonic() + self.timeout
                    w.connection.send((calls[w.job].name, calls[w.job].arguments))
            busy = [w for w in self.workers if w.job is not None]
            ready = wait([w.connection for w in busy], max(0.0, min(w.deadline for w in busy) - time.monotonic()))
            for i, w in enumerate(self.workers):
                if w.job is None:
                    continue
                name = calls[w.job].name
                if w.connection in ready:
                    try:
                        status, content = w.connection.recv()
                        results[w.job] = ToolResult(name, content, status)
                        w.job = None
                        continue
                    except (EOFError, OSError):  # the process died (os._exit, a crash in C code)
                        results[w.job] = ToolResult(name, f"Error: {name} crashed its process.", "error")
                elif time.monotonic() >= w.deadline:
                    results[w.job] = self._timeout_result(name)
                else:
                    continue
                w.stop()  # a hung or dead worker is replaced
                self.workers[i] = _Worker(self.context, self.tools, self.max_chars)

    def close(self) -> None:
        """Stop the worker processes (they are daemons: they also end with the trainer's process)."""
        for w in self.workers:
            w.stop()
        self.workers = []

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

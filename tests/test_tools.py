"""Tools: schemas from type hints and docstrings, the call format, and calls that raise, hang, crash or return
too much (real functions, real timeouts, real processes)."""

import asyncio
import os
import subprocess
import sys
import time

import pytest

from rlhf.extras.calculator import calc
from rlhf.tools import ToolCall, ToolExecutor, bounded, format_tool_call, parse_tool_calls, tool_schema, tool_schemas

LIMIT = 200  # max_tool_response_chars in these tests


def raises(x: int) -> str:
    """Divide by zero.

    Args:
        x: Any number.
    """
    return str(x / 0)


def hangs(x: int) -> str:
    """Never return: a busy loop that holds a core and ignores signals a thread could get.

    Args:
        x: Any number.
    """
    while True:
        x += 1


def sleeps(seconds: float) -> str:
    """Sleep, then answer.

    Args:
        seconds: How long.
    """
    time.sleep(seconds)
    return "slept"


def huge(x: int) -> str:
    """Return ten million characters.

    Args:
        x: Any number.
    """
    return "x" * 10_000_000


def crashes(x: int) -> str:
    """End its own process without a word.

    Args:
        x: Any number.
    """
    os._exit(3)


def pid(x: int) -> str:
    """The id of the process that runs the call.

    Args:
        x: Any number.
    """
    return str(os.getpid())


def exits(x: int) -> str:
    """Call sys.exit.

    Args:
        x: The exit status.
    """
    sys.exit(x)


def interrupts(x: int) -> str:
    """Raise KeyboardInterrupt.

    Args:
        x: Any number.
    """
    raise KeyboardInterrupt


async def adds(a: int, b: int) -> str:
    """Add two numbers, asynchronously.

    Args:
        a: A number.
        b: Another.
    """
    await asyncio.sleep(0)
    return str(a + b)


async def waits(seconds: float) -> str:
    """Wait, asynchronously.

    Args:
        seconds: How long.
    """
    await asyncio.sleep(seconds)
    return "waited"


TOOLS = [calc, raises, hangs, sleeps, huge, crashes, pid, exits, interrupts, adds, waits]


def call(name, **arguments):
    return ToolCall(name, arguments)


def test_schema_comes_from_type_hints_and_the_docstring():
    schema = tool_schema(calc)["function"]
    assert schema["name"] == "calc" and "arithmetic" in schema["description"]
    assert schema["parameters"]["properties"]["expr"]["type"] == "string"
    assert schema["parameters"]["required"] == ["expr"]

    def undocumented(x: int) -> int:
        return x

    with pytest.raises(ValueError, match="tool 'undocumented'.*docstring"):
        tool_schema(undocumented)
    with pytest.raises(ValueError, match="share a name"):
        tool_schemas([calc, calc])


def test_calls_are_parsed_from_text_and_bad_ones_say_why():
    text = ("Let me compute. " + format_tool_call("calc", {"expr": "2*3"})
            + '<tool_call>\n{"name": "pid", "arguments": "{\\"x\\": 1}"}\n</tool_call>'
            + "<tool_call>{not json}</tool_call><tool_call>[1, 2]</tool_call><tool_call>{\"name\": \"pid\"")
    calls = parse_tool_calls(text)
    assert [(c.name, c.arguments) for c in calls[:2]] == [("calc", {"expr": "2*3"}), ("pid", {"x": 1})]
    assert "not valid JSON" in calls[2].error
    assert '"arguments"' in calls[3].error
    assert "not closed" in calls[4].error
    assert parse_tool_calls("no call here") == []


def test_bounded_cuts_and_says_so():
    assert bounded("abc", 10) == ("abc", False)
    text, cut = bounded("y" * 1000, 100)
    assert cut and len(text) <= 100 and "more characters cut" in text


@pytest.mark.parametrize("workers", [2, 0], ids=["processes", "threads"])
def test_faulty_tools_give_bounded_messages_and_never_raise(workers):
    executor = ToolExecutor(TOOLS, timeout=1.0, max_chars=LIMIT, workers=workers)
    calls = [call("raises", x=1), call("huge", x=1), call("calc", expr="37*58"),
             call("nope", x=1), call("calc", expr=3, extra=1), ToolCall(None, None, "bad JSON"),
             call("calc", expr="__import__('os')")]
    if workers:
        calls.append(call("crashes", x=1))
    results = executor.run(calls)
    statuses = [r.status for r in results]
    assert statuses[:7] == ["error", "long", "ok", "bad_call", "bad_call", "bad_call", "error"]
    assert "ZeroDivisionError" in results[0].content
    assert results[2].content == "2146"
    assert "unknown tool 'nope'" in results[3].content and "calc" in results[3].content
    assert "unsupported expression" in results[6].content
    if workers:
        assert statuses[7] == "error" and "crashed" in results[7].content
        assert executor.run([call("calc", expr="1+1")])[0].content == "2"  # a new worker took over
    assert all(len(r.content) <= LIMIT for r in results)
    executor.close()


@pytest.mark.parametrize("workers", [2, 0], ids=["processes", "threads"])
def test_tools_that_exit_or_interrupt_give_messages_and_async_tools_are_awaited(workers):
    """A tool's sys.exit or KeyboardInterrupt is the model's error message, not the end of the run; an async def tool
    is awaited (before, the model saw '<coroutine object ...>'), within the timeout."""
    executor = ToolExecutor(TOOLS, timeout=0.5, max_chars=LIMIT, workers=workers)
    results = executor.run([call("exits", x=4), call("interrupts", x=0), call("adds", a=2, b=3),
                            call("waits", seconds=30)])
    assert [(r.status, r.content) for r in results] == [
        ("error", "Error: SystemExit: 4"), ("error", "Error: KeyboardInterrupt: "), ("ok", "5"),
        ("timeout", "Error: waits did not return within 0.5 s and was stopped.")]
    executor.close()


def test_a_tool_that_hangs_forever_is_killed_at_the_timeout():
    """A busy loop cannot be interrupted inside a thread; in a worker process it is killed, the worker is
    replaced, and the other calls of the turn still finish in time."""
    executor = ToolExecutor(TOOLS, timeout=1.0, max_chars=LIMIT, workers=2)
    executor.run([call("pid", x=0), call("pid", x=0)])  # both workers up
    before = {w.process.pid for w in executor.workers}
    start = time.monotonic()
    results = executor.run([call("hangs", x=0), call("sleeps", seconds=0.2), call("pid", x=0)])
    elapsed = time.monotonic() - start
    assert [r.status for r in results] == ["timeout", "ok", "ok"]
    assert "did not return within 1 s" in results[0].content and len(results[0].content) <= LIMIT
    assert 1.0 <= elapsed < 3.0
    after = {w.process.pid for w in executor.workers}
    (killed,) = before - after  # the worker that ran the hung call, and only it
    assert not _running(killed) and all(_running(p) for p in after) and len(after) == 2
    executor.close()
    assert not any(_running(p) for p in after)


def test_threads_abandon_a_hung_call_at_the_timeout():
    executor = ToolExecutor(TOOLS, timeout=0.5, max_chars=LIMIT, workers=0)
    start = time.monotonic()
    (result,) = executor.run([call("sleeps", seconds=30)])
    assert result.status == "timeout" and time.monotonic() - start < 2.0


def _running(process_id: int) -> bool:
    try:
        os.kill(process_id, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{process_id}/stat") as f:  # a zombie is not running
        return f.read().split(")")[-1].split()[0] != "Z"


def test_tool_workers_end_when_the_trainer_is_killed(tmp_path):
    """SIGKILL leaves no cleanup to run: the workers notice their parent is gone and exit on their own."""
    script = ("import sys, time\n"
              "from rlhf.extras.calculator import calc\n"
              "from rlhf.tools import ToolCall, ToolExecutor\n"
              "executor = ToolExecutor([calc], timeout=5.0, max_chars=100, workers=2)\n"
              "executor.run([ToolCall('calc', {'expr': '1+1'}), ToolCall('calc', {'expr': '2+2'})])\n"
              "print(' '.join(str(w.process.pid) for w in executor.workers), flush=True)\n"
              "time.sleep(60)\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    trainer = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONPATH": root})
    workers = [int(p) for p in trainer.stdout.readline().split()]
    assert len(workers) == 2 and all(_running(p) for p in workers)
    trainer.kill()
    trainer.wait()
    deadline = time.monotonic() + 10
    while any(_running(p) for p in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_running(p) for p in workers)

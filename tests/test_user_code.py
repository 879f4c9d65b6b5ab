"""However user code leaves -- it raises, calls sys.exit, raises KeyboardInterrupt, or hangs -- the run gets control
back within the code's timeout, with an error that names the code and says what to do (rlhf/user_code.py). Here: async
reward functions, environments, callbacks (sync reward functions: test_rewards.py, test_data_checks.py,
test_reliability.py; tools: test_tools.py). Each kind runs every way in a fresh interpreter with a hard outer timeout:
several of them hung the process, and a regression must fail here, not hang the suite."""

import os
import re
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The body of user code that leaves in each way (``way`` is a variable of the script).
LEAVE = """
def leave(way):
    if way == "raise":
        raise ZeroDivisionError("boom")
    if way == "exit":
        sys.exit(3)
    if way == "interrupt":
        raise KeyboardInterrupt
    if way == "hang":
        time.sleep(60)
"""


def outcomes(script: str, *args: str, limit: float = 40) -> dict[str, str]:
    """Run ``script`` (after ``LEAVE``; ``args`` in sys.argv[1:]) in a fresh interpreter; it prints
    ``<case>|<outcome>`` lines, returned as a dict. A script still running after ``limit`` s fails the test: that is
    the hang."""
    code = "import sys, time\n" + LEAVE + textwrap.dedent(script)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]), "HF_HUB_OFFLINE": "1"}
    try:
        done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=limit, env=env)
    except subprocess.TimeoutExpired as expired:
        pytest.fail(f"hung: still running after {limit} s. Output so far: {expired.stdout!r}")
    assert done.returncode == 0, f"exit status {done.returncode}: {done.stdout[-2000:]}{done.stderr[-3000:]}"
    return dict(line.split("|", 1) for line in done.stdout.splitlines() if "|" in line)


def check(results: dict[str, str], expected: dict[str, str]) -> None:
    for case, pattern in expected.items():
        assert case in results, f"{case}: no outcome (got {sorted(results)})"
        assert re.search(pattern, results[case]), f"{case}: {results[case]!r} does not match {pattern!r}"


def test_an_async_reward_function_that_exits_interrupts_or_blocks_is_named():
    """Before: sys.exit or KeyboardInterrupt in a coroutine stopped the event loop and the trainer waited forever, even
    with reward_timeout; a coroutine that blocked (time.sleep) was not bounded by reward_timeout at all."""
    results = outcomes("""
        import asyncio
        from rlhf.rewards import RewardFunction, reward_table
        from rlhf.rollout import RolloutTexts

        def reward(way):
            async def user_code(completions, **kwargs):
                if "bad" in completions and way == "ignore cancel":
                    try:
                        await asyncio.sleep(60)
                    except asyncio.CancelledError:
                        await asyncio.sleep(60)
                if "bad" in completions:
                    leave(way)
                await asyncio.sleep(0)
                return [1.0] * len(completions)
            return RewardFunction(user_code, timeout=0.5)

        def texts(*completions):
            return RolloutTexts(prompts=["p"] * len(completions), completions=list(completions),
                                completion_ids=[[1]] * len(completions), columns={})

        batch = texts("ok", "bad")
        for way in ("raise", "exit", "interrupt", "hang"):
            # as the trainer scores a batch (async functions concurrently), and one function called alone
            for how, run in (("table", lambda f: reward_table([f], batch)),
                             ("alone", lambda f: f(batch.prompts, batch.completions, batch.completion_ids, {}))):
                start = time.monotonic()
                try:
                    run(reward(way))
                    outcome = "returned"
                except Exception as error:
                    outcome = f"{type(error).__name__}: {error}"
                print(f"{way} {how}|{time.monotonic() - start:.1f} s {outcome}", flush=True)
        try:
            reward_table([reward("ignore cancel")], batch)
        except Exception as error:
            print(f"ignore cancel|{type(error).__name__}: {error}", flush=True)
        print(f"after|{reward_table([reward('exit')], texts('ok', 'ok')).tolist()}")  # the event loop still serves
    """)
    named = r"RewardError: reward function 'user_code' {} on sample 1\. Prompt: p; completion: bad"
    advice = r" \(a reward function must return its values; raise an exception to stop the run\)"
    blocked = (r"^(1\.[5-9]|2\.\d|3\.\d) s RewardError: async reward function\(s\) \['user_code'\] blocked the event "
               r"loop: still running 1.5 s after the batch started \(reward_timeout=0.5\).*asyncio.to_thread")
    for how in ("table", "alone"):
        check(results, {f"raise {how}": named.format("raised ZeroDivisionError: boom"),
                        f"exit {how}": named.format(r"called sys.exit\(3\)" + advice),
                        f"interrupt {how}": named.format("raised KeyboardInterrupt" + advice),
                        f"hang {how}": blocked})
    check(results, {"ignore cancel": r"^RewardError: async reward function\(s\) \['user_code'\] did not stop when "
                                     r"cancelled \(a coroutine that catches asyncio.CancelledError must re-raise it\)"})
    assert results["after"] == "[[1.0], [1.0]]"


def test_an_environment_that_raises_exits_interrupts_or_hangs_is_named():
    """The factory, reset and step: before, sys.exit and KeyboardInterrupt ended the process and a hang hung it."""
    results = outcomes("""
        from types import SimpleNamespace
        from rlhf.agent import AgentLoop
        from rlhf.configs import GRPOConfig
        from rlhf.extras.tiny import char_tokenizer

        CASE = {}

        class UserEnv:
            def __init__(self):
                CASE.get("where") == "factory" and leave(CASE["way"])

            def reset(self, row):
                CASE.get("where") == "reset" and leave(CASE["way"])

            def step(self, text):
                CASE.get("where") == "step" and leave(CASE["way"])
                return None, 1.0

        policy, tokenizer = SimpleNamespace(max_prompt_length=None, truncate_prompts=False), char_tokenizer()
        for where in ("factory", "reset", "step"):
            for way in ("raise", "exit", "interrupt", "hang"):
                CASE.update(where=where, way=way)
                agent = AgentLoop.from_config(tokenizer, None, UserEnv, GRPOConfig(environment_timeout=0.5))
                try:
                    episodes = agent._start(policy, [{"prompt": "1+2="}])
                    episodes[0].messages.append({"role": "assistant", "content": "3"})
                    agent._respond(episodes, is_chat=False, turns_left=True)
                    outcome = "returned"
                except Exception as error:
                    outcome = f"{type(error).__name__}: {error}"
                print(f"{where} {way}|{outcome}", flush=True)
    """)
    names = {"factory": r"environment_factory UserEnv", "reset": r"environment UserEnv\.reset",
             "step": r"environment UserEnv\.step"}
    on = {"factory": r"\.", "reset": r""" \(on "\{'prompt': '1\+2='\}"\)\.""", "step": r" \(on '3'\)\."}
    advice = r" \(an environment must return; end the episode with None, stop the run with an exception\)"
    for where, name in names.items():
        fix = on[where] + " Environments must not raise: return an observation"
        check(results, {f"{where} raise": f"^RuntimeError: {name} raised ZeroDivisionError: boom{fix}",
                        f"{where} exit": rf"^RuntimeError: {name} called sys.exit\(3\){advice}{fix}",
                        f"{where} interrupt": rf"^RuntimeError: {name} raised KeyboardInterrupt{advice}{fix}",
                        f"{where} hang": rf"^RuntimeError: {name} did not return within environment_timeout=0.5 s"
                                         rf"{on[where]} Make it faster, or raise environment_timeout\."})


def test_a_callback_that_raises_exits_interrupts_or_hangs_is_named(tmp_path):
    """A trainer's callbacks: before, sys.exit ended the process unnamed and a hang hung the run."""
    results = outcomes("""
        from helpers import make_trainer

        CASE = {}

        class UserCallback:
            def on_train_begin(self, args, state, control, **kwargs):
                leave(CASE["way"])

        trainer = make_trainer(sys.argv[1], max_steps=1, callback_timeout=0.5,
                               trainer_kwargs={"callbacks": [UserCallback]})
        for way in ("raise", "exit", "interrupt", "hang"):
            CASE["way"] = way
            try:
                trainer.train()
                outcome = "returned"
            except Exception as error:
                outcome = f"{type(error).__name__}: {error} {getattr(error, '__notes__', [])}"
            print(f"{way}|{outcome}", flush=True)
    """, str(tmp_path))
    advice = r" \(a callback must return; set control.should_training_stop = True to stop the run\) at step 0\."
    check(results, {"raise": r"^ZeroDivisionError: boom \['\(raised by callback UserCallback.on_train_begin at step 0: "
                             r"fix the callback, or leave it out of callbacks\)'\]",
                    "exit": rf"^CallbackError: callback UserCallback.on_train_begin called sys.exit\(3\){advice}",
                    "interrupt": rf"^CallbackError: callback UserCallback.on_train_begin raised KeyboardInterrupt{advice}",
                    "hang": r"^CallbackError: callback UserCallback.on_train_begin did not return within "
                            r"callback_timeout=0.5 s at step 0\. Make it faster .*or raise callback_timeout\."})

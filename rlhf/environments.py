"""Environments of multi-turn rollouts (``environment_factory``): two protocols, told apart by the class.

Ours, a class with ``step`` (``rlhf.agent`` runs the loop)::

    reset(row: dict) -> None | str | list[dict]              # the first observation (None: the row's own prompt)
    step(text: str) -> (observation | None, reward | None)   # None: the episode is over

TRL 1.16's (``trl.GRPOTrainer(environment_factory=...)``), a class without ``step`` whose public methods are tools::

    reset(**row) -> None | str    # a string is appended to the last message of the row's prompt
    <public method>(...)          # a tool (schema from its type hints and docstring), run on this episode's
                                  # instance in the trainer's process; a turn without a tool call ends the episode
    get_reward() -> float         # optional, sync or async: once per finished episode, an extra reward source
                                  # named after the class, weight 1 (``reward_weights`` weigh ``reward_funcs`` only)

``environment_factory`` is a class or a function returning a new instance, or a dict of them: then the ``environment``
column of each row names its factory (and, as in TRL, is not passed to a TRL-style ``reset``), and a prompt is shown
only its environment's tools. Instances are pooled and reused (reset) across steps. Reward functions also receive
``environments``, each completion's instance. A class is classified without making an instance; a factory that is not
a class is called when the trainer is built to see what it makes (by the rewards and by the agent: the agent's
instance joins its pool). A class with neither ``step`` nor public methods nor ``get_reward`` is TRL's when its
``reset`` has TRL's signature, ``reset(self, **kwargs)`` (an environment that only writes the prompt), and is refused
at its first episode otherwise (``reset(self, row)`` without ``step``: one of ours missing it). With TRL's protocol the environment may own the data: ``environment_dataset`` supplies TRL's empty prompts
when there is no ``train_dataset`` or no ``prompt`` column.

What differs from TRL: a TRL-style environment's tools run one call at a time in the trainer's process, bounded by
``tool_timeout`` (a hung call is abandoned, not stopped); ``reset`` returning content blocks (multimodal) is refused.
"""

import inspect
import math
import numbers
import types
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from datasets import Dataset

from rlhf.tools import tool_schemas
from rlhf.user_code import call_with_timeout, what_happened

STEP, TOOLS = "step", "tools"
RESERVED = ("reset", "get_reward")
"""Methods of a TRL-style environment that are not tools."""
PLACEHOLDER_PROMPT = [{"role": "user", "content": ""}]
"""TRL's prompt for rows without one: the environment's ``reset`` writes it (and it is not passed to ``reset``)."""


def factory_name(factory) -> str:
    return getattr(factory, "__qualname__", None) or repr(factory)


@dataclass
class EnvironmentSpec:
    """One factory of ``environment_factory``: its protocol and, for TRL's, the names and schemas of its tools."""

    name: str | None  # its key in a dict environment_factory; None: the only factory
    factory: Callable
    cls: type
    protocol: str  # STEP (ours) or TOOLS (TRL's)
    tool_names: list[str] = field(default_factory=list)
    schemas: list[dict] = field(default_factory=list)
    probe: object = None  # the instance made to classify a factory that is not a class

    def methods(self, env) -> dict[str, Callable]:
        """``env``'s tools, bound to it: a call changes this episode's instance."""
        return {name: getattr(env, name) for name in self.tool_names}


def describe_environments(environment_factory, timeout: float | None = None) -> list[EnvironmentSpec]:
    """Every factory of ``environment_factory`` (one, or a dict of them), classified and checked."""
    if isinstance(environment_factory, dict):
        if not environment_factory:
            raise ValueError("environment_factory is an empty dict; map each value of the `environment` column to a "
                             "factory, or pass one factory.")
        named = [k for k in environment_factory if not isinstance(k, str)]
        if named:
            raise TypeError(f"environment_factory's keys must be strings (the values of the `environment` column), got "
                            f"{named[0]!r}.")
        items = list(environment_factory.items())
    else:
        items = [(None, environment_factory)]
    specs = []
    for name, factory in items:
        where = "environment_factory" if name is None else f"environment_factory[{name!r}]"
        if not callable(factory):
            raise TypeError(f"{where} must be callable (a class or a function), got {factory!r}.")
        probe = None
        if not inspect.isclass(factory):
            probe = environment_call(factory, f"environment_factory {factory_name(factory)}", timeout)
        specs.append(_classify(name, factory, factory if probe is None else type(probe), probe, where))
    return specs


def _classify(name, factory, cls: type, probe, where: str) -> EnvironmentSpec:
    """Ours when the class has ``step``; TRL's when it has public methods (its tools) or ``get_reward``; a class with
    none of them is left to ``check_environment``, which refuses it with both protocols spelled out."""
    tools = [n for n, _ in inspect.getmembers(cls, inspect.isfunction) if n not in RESERVED and not n.startswith("_")]
    trl_style = tools or callable(getattr(cls, "get_reward", None)) or _keyword_reset(cls)
    if callable(getattr(cls, "step", None)) or not trl_style:
        return EnvironmentSpec(name, factory, cls, STEP, probe=probe)
    if not callable(getattr(cls, "reset", None)):
        raise TypeError(f"{where} {cls.__name__} has tool methods {tools} (TRL's environment protocol) but no reset() "
                        "method; define reset(self, **kwargs), which starts an episode and returns None or a string "
                        "appended to the prompt.")
    bound = [getattr(probe, n) if probe is not None else _unbound(cls, n) for n in tools]
    return EnvironmentSpec(name, factory, cls, TOOLS, tools, tool_schemas(bound), probe)


def _keyword_reset(cls: type) -> bool:
    """Whether ``cls.reset`` takes the row's columns as keywords, TRL's ``reset(self, **kwargs)`` (ours takes the row
    as one argument): a class with only such a reset is TRL's, an environment that writes the prompt and has no tools."""
    try:
        parameters = inspect.signature(getattr(cls, "reset", None)).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.kind is p.VAR_KEYWORD for p in parameters)


def _unbound(cls: type, name: str) -> Callable:
    """The method ``name`` of ``cls`` as a call on an instance would see it (no ``self``): for its schema alone."""
    member = inspect.getattr_static(cls, name)
    return member.__func__ if isinstance(member, staticmethod) else types.MethodType(getattr(cls, name), object())


def check_environment(env, factory):
    """``env``, once it is known to have the methods of our protocol (``reset`` and ``step``)."""
    missing = [m for m in ("reset", "step") if not callable(getattr(env, m, None))]
    if missing:
        raise TypeError(f"environment_factory {factory_name(factory)} returned {str(env)[:200]!r} (a "
                        f"{type(env).__name__}), which has no {' or '.join(f'{m}()' for m in missing)} method and no "
                        "public methods. An environment has reset(row) -> first observation (or None: the row's "
                        "prompt) and step(policy_text) -> (observation or None when done, reward or None); or, in "
                        "TRL's protocol, reset(**row) and public methods that are its tools. environment_factory is "
                        "the class (or a function returning a new instance), not an instance.")
    return env


def environment_call(fn, name: str, timeout: float | None, *args, **kwargs):
    """``fn(*args, **kwargs)``, a call of the environment named ``name``, within ``timeout``; however it fails, a
    RuntimeError that names it."""
    shown = args[0] if args else kwargs or None
    on = f" (on {str(shown)[:200]!r})" if shown is not None else ""
    try:
        return call_with_timeout(lambda: fn(*args, **kwargs), timeout, name)
    except TimeoutError:
        raise RuntimeError(f"{name} did not return within environment_timeout={timeout:g} s{on}. Make it faster, or "
                           "raise environment_timeout.") from None
    except Exception as error:  # noqa: BLE001 - a sys.exit() too (UserExit): named, not the end of the run
        advice = "an environment must return; end the episode with None, stop the run with an exception"
        raise RuntimeError(f"{name} {what_happened(error, advice)}{on}. Environments must not raise: return an "
                           "observation that tells the policy what went wrong, or None to end the episode.") from error


def reset_tools_environment(env, row: dict, multi: bool, timeout: float | None):
    """TRL's ``reset(**row)`` (without a dict factory's ``environment`` column, or TRL's placeholder prompt), and the
    row's prompt with what it returned appended to the last message."""
    kwargs = {k: v for k, v in row.items()
              if not (multi and k == "environment") and not (k == "prompt" and v == PLACEHOLDER_PROMPT)}
    name = f"environment {type(env).__name__}.reset"
    observation = environment_call(env.reset, name, timeout, **kwargs)
    prompt = row["prompt"]
    if observation is None:
        return prompt
    if not isinstance(observation, str):
        raise TypeError(f"{name} returned {str(observation)[:200]!r}; an environment whose methods are tools (TRL's "
                        "protocol) returns None or a string from reset, which is appended to the last message of the "
                        "prompt.")
    if isinstance(prompt, str):
        return prompt + observation
    return [*prompt[:-1], {**prompt[-1], "content": (prompt[-1].get("content") or "") + observation}]


def step_environment(env, text: str, timeout: float | None) -> tuple[object, float]:
    """Our ``step``: (observation or None, reward: 0.0 for None), checked."""
    out = environment_call(env.step, f"environment {type(env).__name__}.step", timeout, text)
    if not isinstance(out, (tuple, list)) or len(out) != 2:
        raise TypeError(f"environment {type(env).__name__}.step must return (observation or None, reward or None), "
                        f"got {str(out)[:200]!r}.")
    observation, reward = out
    if reward is None:
        return observation, 0.0
    if isinstance(reward, torch.Tensor) and reward.numel() == 1:
        reward = reward.item()
    if not isinstance(reward, numbers.Real) or not math.isfinite(float(reward)):
        raise ValueError(f"environment {type(env).__name__}.step returned the reward {reward!r}; it must be a finite "
                         "number or None.")
    return observation, float(reward)


def observation_messages(observation, is_chat: bool, env) -> list[dict]:
    if isinstance(observation, str):
        return [{"role": "user", "content": observation}] if is_chat else [{"role": "observation",
                                                                            "content": observation}]
    if is_chat and isinstance(observation, dict):
        return [observation]
    if is_chat and isinstance(observation, list) and all(isinstance(m, dict) for m in observation):
        return list(observation)
    raise TypeError(f"environment {type(env).__name__}.step returned the observation {str(observation)[:200]!r}; it "
                    "must be a string" + (", a message dict or a list of them." if is_chat else " (plain-text prompts)."))


# ---------------------------------------------------------------------------------------------- rewards and data
def environment_rewards(specs: list[EnvironmentSpec]) -> list[Callable]:
    """One reward function per TRL-style environment class with ``get_reward`` (a class under two names counts once):
    it scores the completions whose environment is exactly that class, None the others (as TRL does)."""
    out, seen = [], []
    for spec in specs:
        if spec.protocol == TOOLS and callable(getattr(spec.cls, "get_reward", None)) and spec.cls not in seen:
            seen.append(spec.cls)
            out.append(_reward_of(spec.cls))
    return out


def _reward_of(cls: type) -> Callable:
    def failed(error: Exception) -> RuntimeError:
        return RuntimeError(f"environment {cls.__name__}.get_reward() raised {type(error).__name__}: {error}")

    if inspect.iscoroutinefunction(cls.get_reward):
        async def reward(environments, **kwargs):
            values = []
            for env in environments:
                try:
                    values.append(await env.get_reward() if type(env) is cls else None)
                except Exception as error:  # noqa: BLE001 - named, then the reward function's error names the sample
                    raise failed(error) from error
            return values
    else:
        def reward(environments, **kwargs):
            values = []
            for env in environments:
                try:
                    values.append(env.get_reward() if type(env) is cls else None)
                except Exception as error:  # noqa: BLE001
                    raise failed(error) from error
            return values
    reward.__name__ = reward.__qualname__ = cls.__name__  # its metrics: reward/<class name>/...
    reward.environment_reward = True  # weight 1, after the weights of reward_funcs (rlhf.rewards.check_reward_weights)
    return reward


def environment_dataset(train_dataset, environment_factory, args):
    """``train_dataset`` as TRL reads it with an environment: none at all (one environment that writes its prompts in
    ``reset``; ``max_steps`` sets the length) becomes ``prompts_per_step`` rows of TRL's empty prompt, and rows without
    a ``prompt`` (a dict factory's routing column alone) get that prompt."""
    if environment_factory is None:
        return train_dataset
    if train_dataset is None:
        if isinstance(environment_factory, dict):
            raise ValueError("A dict environment_factory (several environments) needs a train_dataset with an "
                             "`environment` column that routes each row to its environment; give one, or pass a "
                             "single factory.")
        if getattr(args, "num_train_epochs", None) is not None:
            raise ValueError("Without a train_dataset (the environment writes each prompt in reset()), the run's "
                             "length is max_steps: num_train_epochs has no dataset to count passes over; leave it "
                             "None.")
        return Dataset.from_dict({"prompt": [PLACEHOLDER_PROMPT] * args.prompts_per_step})
    if isinstance(train_dataset, Dataset) and "prompt" not in train_dataset.column_names:
        return train_dataset.add_column("prompt", [PLACEHOLDER_PROMPT] * len(train_dataset))
    if isinstance(train_dataset, list) and all(isinstance(r, dict) and "prompt" not in r for r in train_dataset):
        return [{**r, "prompt": PLACEHOLDER_PROMPT} for r in train_dataset]
    return train_dataset

"""Command line and YAML for recipes: ``--config file.yaml`` sets any field, ``--field value`` overrides it.

Fields are looked up across several dataclasses (the recipe's ``ScriptArguments`` and the trainer
config); an unknown key is an error with a did-you-mean. Values are converted and checked against
the field's annotation.
"""

import dataclasses
import difflib
import os
import sys
import types
import typing
from dataclasses import dataclass, field

import yaml

from rlhf.checkpoint import model_source
from rlhf.configs import field_docs
from rlhf.dataset_adapters import DataArguments
from rlhf.imports import import_object


@dataclass
class ScriptArguments(DataArguments):
    """What a recipe trains on: the model, the data, the prompt format and the reward functions."""

    model_name_or_path: str = ""
    """The actor: a local directory or a hub id."""
    prompt_template: str | None = None
    """A format string applied to every prompt after the mapping, over the row's columns, e.g.
    "{prompt}\\nPut the final answer after ####." (None: prompts as they are)."""
    conversational: bool = False
    """Turn each prompt into chat messages (system_prompt, then the prompt as the user turn), so the tokenizer's
    chat template formats it, as instruct models expect."""
    system_prompt: str | None = None
    """A system message put before every prompt (needs conversational: true)."""
    chat_template: str | None = None
    """A Jinja chat template, or a file holding one, for a tokenizer that lacks one (None: the tokenizer's own)."""
    reward_funcs: list[str | dict] = field(default_factory=list)
    """Reward functions as "package.module:function" import paths, reward models as directories, and (in YAML)
    made by a factory: {factory: reward_models.rules:make_soft_overlong_penalty, kwargs: {max_new_tokens: 512,
    buffer: 128}}."""
    tools: list[str] = field(default_factory=list)
    """Tools the policy may call, as "package.module:function" import paths (type-hinted functions with docstrings);
    rollouts become multi-turn (max_turns, tool_timeout, ...)."""
    environment_factory: str | None = None
    """A "package.module:Class" (or function) whose instances have reset(row) and step(text) -> (observation or None,
    reward or None); rollouts become multi-turn episodes."""
    use_peft: bool = False
    """Train a LoRA adapter instead of the whole actor (the reference is then the base model, for free)."""
    lora_r: int = 16
    """LoRA rank."""
    lora_alpha: int = 32
    """LoRA scaling numerator (the adapter is scaled by lora_alpha / lora_r)."""
    lora_dropout: float = 0.0
    """Dropout inside the adapter. Set to 0 during training whatever its value: a ratio needs deterministic passes."""
    lora_target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    """Modules that get an adapter: names such as q_proj v_proj, or all-linear."""


@dataclass
class PPOScriptArguments(ScriptArguments):
    """ScriptArguments plus PPO's critic."""

    value_model_name_or_path: str | None = None
    """The critic's starting point: a saved critic, a reward model or any model directory (None: a copy of the
    actor's backbone)."""


class ConfigError(ValueError):
    """A bad key or value in a YAML config or on the command line."""


def _unwrap_optional(annotation):
    """(inner type, allows None)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return (args[0] if len(args) == 1 else typing.Union[tuple(args)]), len(args) < len(typing.get_args(annotation))
    return annotation, False


def convert(value, annotation, name: str):
    """``value`` (a YAML value, or a string or list of strings from the command line) as ``annotation``."""
    inner, optional = _unwrap_optional(annotation)
    origin = typing.get_origin(inner)
    if typing.get_origin(inner) in (typing.Union, types.UnionType):  # e.g. str | dict: keep a value of either type
        arms = typing.get_args(inner)
        if dict in arms and isinstance(value, dict):
            return value
        return convert(value, next(a for a in arms if a is not dict), name)
    if isinstance(value, list) and origin not in (list, dict):
        if len(value) != 1:
            raise ConfigError(f"{name} takes one value, got {value}.")
        value = value[0]
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null") and optional):
        if optional:
            return None
        raise ConfigError(f"{name} cannot be None.")
    if origin is dict:
        return _convert_mapping(value, inner, name)
    if origin is list:
        (item_type,) = typing.get_args(inner) or (str,)
        items = value if isinstance(value, list) else [value]
        if item_type is not str:  # numbers may come comma-separated: --eval_pass_k 1,8
            items = [part for item in items for part in (item.split(",") if isinstance(item, str) else [item])
                     if part != ""]
        elif not isinstance(value, list):
            items = [v for v in str(value).split(",") if v]
        return [convert(v, item_type, f"{name}[{i}]") for i, v in enumerate(items)]
    if origin is typing.Literal:
        choices = typing.get_args(inner)
        if value not in choices:
            raise ConfigError(f"{name}={value!r} must be one of {list(choices)}.")
        return value
    if inner is bool:
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("true", "1", "yes"):
            return True
        if str(value).lower() in ("false", "0", "no"):
            return False
        raise ConfigError(f"{name}={value!r} must be true or false.")
    if inner is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lstrip("+-").isdigit():
            return int(value)
        raise ConfigError(f"{name}={value!r} must be an integer.")
    if inner is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name}={value!r} must be a number.") from None
    if inner is str:
        return str(value)
    return value


def _convert_mapping(value, annotation, name: str) -> dict:
    """A YAML mapping, or ``key=value`` strings from the command line, as a dict of the annotated types."""
    key_type, value_type = typing.get_args(annotation) or (str, str)
    if not isinstance(value, dict):
        items = value if isinstance(value, list) else [value]
        pairs = [str(item).partition("=") for item in items]
        if any(not sep or not key for key, sep, _ in pairs):
            raise ConfigError(f"{name} takes key=value pairs on the command line (e.g. --{name} prompt=question), "
                              f"or a mapping in YAML; got {value!r}.")
        value = {key: v for key, _, v in pairs}
    return {convert(k, key_type, f"{name} key"): convert(v, value_type, f"{name}[{k!r}]") for k, v in value.items()}


def _argv_to_pairs(argv: list[str]) -> tuple[str | None, list[tuple[str, list[str]]]]:
    """Split ``--key v1 v2 --flag --k=v`` into (config path, [(key, values)])."""
    config_path, pairs, i = None, [], 0
    while i < len(argv):
        token = argv[i]
        if not token.startswith("--"):
            raise ConfigError(f"unexpected argument {token!r}; options look like --field value.")
        key, _, inline = token[2:].partition("=")
        values = [inline] if inline else []
        i += 1
        while not inline and i < len(argv) and not argv[i].startswith("--"):
            values.append(argv[i])
            i += 1
        if key == "config":
            config_path = values[0] if values else None
        else:
            pairs.append((key.replace("-", "_"), values or ["true"]))
    return config_path, pairs


def help_text(classes) -> str:
    lines = ["Options (set in --config YAML or as --field value):"]
    for cls in classes:
        docs = field_docs(cls)
        lines.append(f"\n{cls.__name__}:")
        for f in dataclasses.fields(cls):
            lines.append(f"  --{f.name}  {docs.get(f.name, '')}")
    return "\n".join(lines)


def parse_args(classes: list[type], argv: list[str] | None = None, ignore=()) -> list:
    """Instances of ``classes`` from ``--config`` YAML plus command-line overrides. Keys in ``ignore`` that no
    class owns are accepted and dropped (e.g. training-only fields when a script reads a training config)."""
    argv = sys.argv[1:] if argv is None else argv
    if "-h" in argv or "--help" in argv:
        print(help_text(classes))
        raise SystemExit(0)
    config_path, pairs = _argv_to_pairs(argv)
    values: dict[str, object] = {}
    if config_path:
        with open(config_path) as f:
            loaded = yaml.safe_load(f) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{config_path} must hold a mapping of field: value.")
        values.update({k: (v, f"{config_path}") for k, v in loaded.items()})
    values.update({k: (v, "the command line") for k, v in pairs})

    owners = {f.name: (cls, f) for cls in classes for f in dataclasses.fields(cls)}
    kwargs: dict[type, dict] = {cls: {} for cls in classes}
    for key, (value, source) in values.items():
        if key not in owners and key in ignore:
            continue
        if key not in owners:
            close = difflib.get_close_matches(key, owners, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"unknown option '{key}' in {source}.{hint} (--help lists them)")
        cls, f = owners[key]
        kwargs[cls][key] = convert(value, f.type, key)
    return [cls(**kwargs[cls]) for cls in classes]


def trainer_inputs(script: ScriptArguments) -> dict:
    """The trainer arguments a recipe's ScriptArguments name: model, tokenizer, reward functions and datasets."""
    required = ("model_name_or_path", "dataset_name") + (() if script.environment_factory else ("reward_funcs",))
    missing = [name for name in required if not getattr(script, name)]
    if missing:
        raise ConfigError(f"{', '.join(missing)} must be set, in the --config YAML or on the command line "
                          "(--help lists every option).")
    train_dataset, eval_dataset = script.load_datasets(prompt_template=script.prompt_template,
                                                       system_prompt=script.system_prompt,
                                                       conversational=script.conversational)
    peft_config = None
    if script.use_peft:
        from peft import LoraConfig

        targets = script.lora_target_modules
        peft_config = LoraConfig(r=script.lora_r, lora_alpha=script.lora_alpha, lora_dropout=script.lora_dropout,
                                 target_modules=targets[0] if targets == ["all-linear"] else targets,
                                 task_type="CAUSAL_LM")
    return {
        "peft_config": peft_config,
        "model": script.model_name_or_path,
        "processing_class": recipe_tokenizer(script),
        "reward_funcs": reward_functions_from_specs(script.reward_funcs),
        "train_dataset": train_dataset,
        "eval_dataset": eval_dataset,
        **({"tools": [import_object(t) for t in script.tools]} if script.tools else {}),
        **({"environment_factory": import_object(script.environment_factory)} if script.environment_factory else {}),
    }


def reward_functions_from_specs(specs: list) -> list:
    """Reward models for directories, imported functions for ``module:function`` paths, and the result of
    ``factory(**kwargs)`` for ``{factory: module:function, kwargs: {...}}``."""
    functions = []
    for i, spec in enumerate(specs):
        if isinstance(spec, dict):
            unknown = set(spec) - {"factory", "kwargs"}
            if "factory" not in spec or unknown:
                raise ConfigError(f"reward_funcs[{i}]={spec!r}: a mapping entry has the keys 'factory' (a "
                                  "module:function that returns a reward function) and optionally 'kwargs'.")
            try:
                functions.append(import_object(spec["factory"])(**(spec.get("kwargs") or {})))
            except TypeError as error:
                raise ConfigError(f"reward_funcs[{i}]: {spec['factory']} does not take kwargs "
                                  f"{spec.get('kwargs')}: {error}") from None
        else:
            functions.append(spec if os.path.isdir(spec) else import_object(spec))
    return functions


def recipe_tokenizer(script: ScriptArguments):
    """The model's tokenizer with ``chat_template`` set on it, or None (the trainer loads the saved one)."""
    if not script.chat_template:
        return None
    from rlhf.models import load_tokenizer

    template = script.chat_template
    if os.path.isfile(template):
        with open(template) as f:
            template = f.read()
    tokenizer = load_tokenizer(model_source(script.model_name_or_path))
    tokenizer.chat_template = template
    return tokenizer

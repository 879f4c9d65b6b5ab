"""Command line and YAML for recipes: ``--config file.yaml`` sets any field, ``--field value`` overrides it.

Fields are looked up across several dataclasses (the recipe's ``ScriptArguments`` and the trainer
config). TRL's names (the config fields and those of ``trl/scripts/grpo.py``) are translated first
(``rlhf.trl_names``); then every key still unknown is reported at once, each with a did-you-mean. Values
are converted and checked against the field's annotation.
"""

import dataclasses
import json
import os
import sys
import types
import typing
from dataclasses import dataclass, field

import yaml

from rlhf.checkpoint import model_source
from rlhf.config_fields import field_docs
from rlhf.dataset_adapters import DataArguments
from rlhf.imports import OPT_IN, import_object
from rlhf.trl_names import log_notes, trl_owned, translate
from rlhf.trl_table import TRL_TYPES, parse_bool


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
    if annotation in (object, typing.Any):
        return value
    inner, optional = _unwrap_optional(annotation)
    origin = typing.get_origin(inner)
    if typing.get_origin(inner) in (typing.Union, types.UnionType):  # str | dict, int | float: the first arm that fits
        arms = typing.get_args(inner)
        if dict in arms and isinstance(value, dict):
            return value
        mapping = next((arm for arm in arms if typing.get_origin(arm) is dict), None)
        if mapping is not None and (isinstance(value, dict) or _json_object(value, name) is not None):
            return _convert_mapping(value, mapping, name)
        failures = []
        for arm in (a for a in arms if a is not dict):
            try:
                return convert(value, arm, name)
            except ConfigError as error:
                failures.append(error)
        raise failures[0]
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
        try:
            return parse_bool(value, name)
        except ValueError as error:
            raise ConfigError(str(error)) from None
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
    parsed = _json_object(value, name)
    value = value if parsed is None else parsed
    if not isinstance(value, dict):
        items = value if isinstance(value, list) else [value]
        pairs = [str(item).partition("=") for item in items]
        if any(not sep or not key for key, sep, _ in pairs):
            raise ConfigError(f"{name} takes key=value pairs on the command line (e.g. --{name} prompt=question), "
                              f"or a mapping in YAML; got {value!r}.")
        value = {key: v for key, _, v in pairs}
    return {convert(k, key_type, f"{name} key"): convert(v, value_type, f"{name}[{k!r}]") for k, v in value.items()}


def _json_object(value, name: str) -> dict | None:
    """A JSON object given as one string, TRL's syntax for its dict options (--model_init_kwargs '{"dtype":
    "bfloat16"}'); None for anything else."""
    text = value[0] if isinstance(value, list) and len(value) == 1 else value
    if not (isinstance(text, str) and text.lstrip().startswith("{")):
        return None
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError as error:
        raise ConfigError(f"{name}={text!r} is not a valid JSON object ({error}).") from None
    return parsed if isinstance(parsed, dict) else None


def _argv_to_pairs(argv: list[str]) -> tuple[str | None, list[tuple[str, list[str] | None]]]:
    """Split ``--key v1 v2 --flag --k=v`` into (config path, [(key, values)]); a bare ``--flag`` has values None."""
    config_path, pairs, i = None, [], 0
    while i < len(argv):
        token = argv[i]
        if not token.startswith("--"):
            raise ConfigError(f"unexpected argument {token!r}; options look like --field value.")
        key, sep, inline = token[2:].partition("=")
        values = [inline] if sep else []
        i += 1
        while not sep and i < len(argv) and not argv[i].startswith("--"):
            values.append(argv[i])
            i += 1
        if key == "config":
            if len(values) != 1:
                raise ConfigError(f"--config takes one YAML file, got {values or 'none'}; put the other settings in "
                                  "that file or give them as --field value.")
            if config_path is not None:  # the last one would replace the first whole
                raise ConfigError(f"--config is given twice ({config_path} and {values[0]}); merge them into one "
                                  "YAML file, or give the differing settings as --field value.")
            config_path = values[0]
        else:
            pairs.append((key.replace("-", "_"), values or None))
    return config_path, pairs


class _UniqueKeys(yaml.SafeLoader):
    """``yaml.safe_load``, except that a key given twice in one mapping is an error (YAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        lines = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, typing.Hashable) and key in lines:
                raise ConfigError(f"{key_node.start_mark.name}: {key!r} is given twice (lines {lines[key]} and "
                                  f"{key_node.start_mark.line + 1}); keep one of them.")
            lines[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)


def _bare_flag(key: str, annotation) -> bool:
    """``--key`` without a value: True for a true/false option, an error naming the option for any other."""
    if _unwrap_optional(annotation)[0] is bool:
        return True
    raise ConfigError(f"--{key} needs a value (e.g. --{key} <value>); only true/false options may be given bare.")


SECURITY_NOTE = (
    "A config is code: every module:function it names (reward functions, reward factories, dataset loaders, dataset\n"
    "transforms) is imported and run, on every process and often on every row. Use only configs you trust. Callables\n"
    "from os, subprocess, shutil, sys, builtins eval/exec/open and similar are refused unless\n"
    f"{OPT_IN}=1; the working directory is importable only after the installed packages.")


def help_text(classes) -> str:
    lines = [SECURITY_NOTE, "", "Options (set in --config YAML or as --field value; TRL's names work too, see the "
             "README's 'Coming from TRL'):"]
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
            loaded = yaml.load(f, Loader=_UniqueKeys) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{config_path} must hold a mapping of field: value.")
        values.update({k: (v, f"{config_path}") for k, v in loaded.items()})
    owners = {f.name: (cls, f) for cls in classes for f in dataclasses.fields(cls)}
    hints = {name: typing.get_type_hints(cls)[name] for name, (cls, _) in owners.items()}
    errors: list[str] = []
    for key, value in pairs:  # --flag without a value: true for a true/false option (TRL's --bf16 too)
        if value is None:
            value = _bare_flag(key, hints[key]) if key in owners else True
        elif trl_owned(key, owners):  # TRL's syntax for TRL's value: --use_vllm false, --loss_type dr_grpo
            try:
                value = convert(value, TRL_TYPES.get(key, str), key)
            except ConfigError as error:
                errors.append(str(error))
                continue
        values[key] = (value, "the command line")

    defaults = {name: f.default for name, (_, f) in owners.items() if f.default is not dataclasses.MISSING}
    given = {key: value for key, (value, _) in values.items() if key in owners or key not in ignore}
    translation = translate(given, hints, defaults, convert=convert,
                            where={key: source for key, (_, source) in values.items()})
    errors += translation.errors
    kwargs: dict[type, dict] = {cls: {} for cls in classes}
    for key, value in translation.values.items():
        try:
            kwargs[owners[key][0]][key] = convert(value, hints[key], key)
        except ConfigError as error:
            errors.append(str(error))
    if errors:
        raise ConfigError("\n  - ".join(["the configuration has problems (--help lists every option):", *errors]))
    log_notes(translation.notes)
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
    """Reward models for directories, imported functions for ``module:function`` paths (or TRL's dotted
    ``module.function``, and the names of TRL's built-in rewards), and the result of ``factory(**kwargs)`` for
    ``{factory: module:function, kwargs: {...}}``."""
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
        elif os.path.exists(spec):  # a reward model's directory; the trainer checks it and names what is wrong
            functions.append(spec)
        elif spec in TRL_REWARDS:
            functions.append(TRL_REWARDS[spec]())
        elif ":" in spec:
            functions.append(import_object(spec))
        elif "." in spec and "/" not in spec:  # TRL's scripts write dotted paths: my_lib.rewards.custom_reward
            functions.append(import_object(":".join(spec.rsplit(".", 1))))
        else:  # a hub id of a reward model
            functions.append(spec)
    return functions


# The reward names trl/scripts/grpo.py accepts, with the settings it uses.
TRL_REWARDS = {
    "accuracy_reward": lambda: import_object("reward_models.rules:accuracy_reward"),
    "think_format_reward": lambda: import_object("reward_models.rules:think_format_reward"),
    "get_soft_overlong_punishment": lambda: import_object("reward_models.rules:get_soft_overlong_punishment")(
        max_completion_len=1280, soft_punish_cache=256),
}


def recipe_tokenizer(script: ScriptArguments):
    """The model's tokenizer with ``chat_template`` set on it, or None (the trainer loads the saved one)."""
    if not script.chat_template:
        return None
    from rlhf.models import load_tokenizer

    template = script.chat_template
    if os.path.isfile(template):
        with open(template) as f:
            template = f.read()
    elif "{{" not in template and "{%" not in template:  # a mistyped path must not become the template text
        raise ConfigError(f"chat_template={template!r}: no such file ({os.path.abspath(template)}), and not a Jinja "
                          "template either (it has no {{ }} or {% %}). Give the template text, or fix the path to the "
                          "file that holds it.")
    tokenizer = load_tokenizer(model_source(script.model_name_or_path))
    tokenizer.chat_template = template
    return tokenizer

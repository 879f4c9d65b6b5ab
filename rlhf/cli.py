"""Command line and YAML for recipes: ``--config file.yaml`` sets any field, ``--field value`` overrides it.

Fields are looked up across several dataclasses (the recipe's ``ScriptArguments`` and the trainer
config); an unknown key is an error with a did-you-mean. Values are converted and checked against
the field's annotation.
"""

import dataclasses
import difflib
import importlib
import os
import sys
import types
import typing
from dataclasses import dataclass, field

import yaml

from rlhf.configs import field_docs


@dataclass
class ScriptArguments:
    """What a recipe trains on: the model, the data and the reward functions."""

    model_name_or_path: str = ""
    """The actor: a local directory or a hub id."""
    dataset_name: str = ""
    """Training prompts: a .jsonl/.json/.parquet/.csv file, a directory saved with save_to_disk, a hub id,
    or "package.module:function" returning a datasets.Dataset."""
    dataset_split: str = "train"
    """Split to use when the dataset is a hub id or a file."""
    eval_dataset_name: str | None = None
    """Evaluation prompts, in any form ``dataset_name`` accepts (None: no evaluation)."""
    eval_dataset_split: str = "test"
    """Split to use for the evaluation dataset."""
    reward_funcs: list[str] = field(default_factory=list)
    """Reward functions as "package.module:function" import paths, and reward models as directories."""
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
    if isinstance(value, list) and origin is not list:
        if len(value) != 1:
            raise ConfigError(f"{name} takes one value, got {value}.")
        value = value[0]
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null") and optional):
        if optional:
            return None
        raise ConfigError(f"{name} cannot be None.")
    if origin is list:
        (item_type,) = typing.get_args(inner) or (str,)
        items = value if isinstance(value, list) else [v for v in str(value).split(",") if v]
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


def parse_args(classes: list[type], argv: list[str] | None = None) -> list:
    """Instances of ``classes`` from ``--config`` YAML plus command-line overrides."""
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
        if key not in owners:
            close = difflib.get_close_matches(key, owners, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"unknown option '{key}' in {source}.{hint} (--help lists them)")
        cls, f = owners[key]
        kwargs[cls][key] = convert(value, f.type, key)
    return [cls(**kwargs[cls]) for cls in classes]


def import_object(path: str):
    """``package.module:attribute`` -> the attribute. The current directory is importable too."""
    module_name, sep, attribute = path.partition(":")
    if not sep or not attribute:
        raise ValueError(f"{path!r} is not an import path; write it as package.module:function.")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        return getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as error:
        raise ValueError(f"cannot import {path!r}: {error}") from error


def trainer_inputs(script: ScriptArguments) -> dict:
    """The trainer arguments a recipe's ScriptArguments name: model, reward functions and datasets."""
    missing = [name for name in ("model_name_or_path", "dataset_name", "reward_funcs") if not getattr(script, name)]
    if missing:
        raise ConfigError(f"{', '.join(missing)} must be set, in the --config YAML or on the command line "
                          "(--help lists every option).")
    eval_dataset = None
    if script.eval_dataset_name:
        eval_dataset = load_dataset_spec(script.eval_dataset_name, script.eval_dataset_split)
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
        "reward_funcs": [path if os.path.isdir(path) else import_object(path) for path in script.reward_funcs],
        "train_dataset": load_dataset_spec(script.dataset_name, script.dataset_split),
        "eval_dataset": eval_dataset,
    }


def load_dataset_spec(spec: str, split: str = "train"):
    """A datasets.Dataset from a file, a saved directory, a hub id, or ``module:function``."""
    import datasets

    if ":" in spec and not os.path.exists(spec):
        return import_object(spec)()
    extension = os.path.splitext(spec)[1].lower()
    formats = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
    if os.path.isfile(spec) and extension in formats:
        return datasets.load_dataset(formats[extension], data_files=spec, split="train")
    if os.path.isdir(spec) and os.path.exists(os.path.join(spec, "dataset_info.json")):
        return datasets.load_from_disk(spec)
    return datasets.load_dataset(spec, split=split)

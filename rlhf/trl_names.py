"""TRL's config names, accepted and mapped to ours, so that a config written for TRL's GRPOTrainer runs here.

``translate`` turns the keys a user gave (Python keywords, YAML, command line) into our fields:

- a **renamed** TRL field becomes ours with the same meaning (``beta`` -> ``kl_coef``);
- a **mapped** one becomes one or several of ours by a rule (``loss_type``, TRL's batch sizes, ``bf16``);
- one that changes nothing here is **accepted with a note** (``do_train``, ``hub_model_id``, ``vllm_mode``);
- one that asks for something we do not have is **accepted only at the value that matches what we do**
  (``use_vllm=False``); any other value is an error that says what to do instead.

Aliases are resolved before anything is called unknown, and every unknown key of one call is reported at
once, each with a did-you-mean. What each TRL name became is logged once. The README's "Coming from TRL"
table is generated from ``rlhf.trl_table.TABLE`` (``python -m rlhf.extras.docs``), so it cannot drift from this
code.
"""

import dataclasses
import difflib
import logging
import os
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from rlhf.trl_table import (  # noqa: F401 - the table's names, re-exported for the docs and the tests
    BATCH_NAMES,
    BY_NAME,
    DIFFERENT_DEFAULTS,
    OVERRIDING,
    SAME_NAMES,
    TABLE,
    TRL_DEFAULTS,
    TRLName,
    parse_bool,
    _number,
    _strategy,
    defaults_table,
    markdown_table,
)

logger = logging.getLogger(__name__)


class ConfigNameError(TypeError):
    """Keys a config does not know, or TRL settings without an equivalent here; the message lists them all."""


# ---------------------------------------------------------------------------------------------------- translation
@dataclass
class Translation:
    """The outcome of ``translate``: our fields, what each TRL name became, and what could not be understood."""

    values: dict
    notes: list[str]
    errors: list[str]

    def raise_errors(self, where: str) -> None:
        if self.errors:
            raise ConfigNameError(f"{where}:\n  - " + "\n  - ".join(self.errors))


def world_size() -> int:
    """The number of processes of this launch, as ``accelerate launch`` / torchrun announce it to every process."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def trl_owned(key: str, fields: Mapping) -> bool:
    """Whether TRL's rule reads ``key``'s value: a TRL name that is not our field, or one we share whose TRL values
    we translate (``SHARED_RULES``)."""
    return key in BY_NAME and (key not in fields or key in SHARED_RULES)


def translate(values: Mapping, fields: Mapping[str, object], defaults: Mapping[str, object],
              convert: Callable | None = None, where: str | Mapping[str, str] = "") -> Translation:
    """Map ``values`` (keys as the user wrote them) onto ``fields`` (our field names -> annotations).

    ``defaults`` are our fields' defaults (the batch rule needs num_generations); ``convert(value, annotation,
    name)`` turns command-line strings into the annotated type (the command line passes it; Python values are
    typed already); ``where`` says where the keys came from (one place, or one per key). Returns every error at
    once rather than stopping at the first."""
    convert = convert or (lambda value, annotation, name: value)
    ours: dict = {}
    trl: dict = {}
    errors: list[str] = []
    unknown: list[str] = []
    for key, value in values.items():
        if trl_owned(key, fields):
            trl[key] = value
        elif key in fields:
            ours[key] = value
        else:
            unknown.append(key)
    notes: list[str] = []
    for key in [k for k, v in ours.items() if v is None and k in SAME_NAMES and not _optional(fields[k])]:
        del ours[key]  # TRL's None for "its default" (disable_tqdm, eval_steps): ours
        notes.append(f"{key}=None -> the default here, {defaults.get(key)!r}")
    out = dict(ours)
    explicit = set(ours)
    set_by: dict[str, str] = {}  # our field -> the TRL setting that gave it

    def _same(name: str, value) -> bool:
        """Whether the user's own ``name`` (a command-line string until converted) is ``value``."""
        try:
            return convert(out.get(name), fields[name], name) == value
        except (TypeError, ValueError):
            return False

    def give(name: str, value, source: str) -> None:
        """Set our field ``name`` from a TRL setting, unless the user set it as well, or another TRL setting gave it
        another value (settings that decide over another, as TRL's save_strategy over save_steps, or add to one, as
        reward_model_name_or_path, always set): the last one would win silently."""
        if name in explicit and not _same(name, value) and source not in OVERRIDING:
            errors.append(f"{source} sets {name}={value!r}, but {name}={out[name]!r} is given too; keep one of them.")
            return
        if name in set_by and out.get(name) != value and source not in OVERRIDING and set_by[name] not in OVERRIDING:
            errors.append(f"{set_by[name]} sets {name}={out[name]!r} and {source} sets {name}={value!r}; keep one of "
                          "them.")
            return
        if name not in fields:
            errors.append(f"{source}: {name} is not a field here.")
            return
        out[name] = value
        set_by[name] = source

    if "bf16" in trl and "fp16" in trl:  # as TRL: the one that is true decides; both true, give() reports
        try:
            on = [k for k in ("bf16", "fp16") if trl[k] is not None and parse_bool(trl[k], k)]
        except ValueError:  # the rule itself reports it
            on = None
        if on in ([], ["bf16"]):
            del trl["fp16"]
        elif on == ["fp16"]:
            del trl["bf16"]

    for key in [k for k in trl if k in SHARED_RULES]:  # TRL values for names we share
        value = trl.pop(key)
        try:
            mapped = SHARED_RULES[key](value, trl, out, defaults)
        except ValueError as error:
            errors.append(str(error))
            continue
        for name, setting in mapped.items():
            give(name, setting, key)
        if mapped != {key: value}:
            notes.append(f"{key}={value!r} -> " + ", ".join(f"{n}={v!r}" for n, v in mapped.items()))
    batch = {k: trl.pop(k) for k in BATCH_NAMES if k in trl}
    if batch:
        try:
            batch = {k: _number(convert(v, int, k), k, int) for k, v in batch.items()}
            generations = convert(out.get("num_generations", defaults.get("num_generations", 8)), int,
                                  "num_generations")
            mapped, note = batch_geometry(batch, _number(generations, "num_generations", int))
            for name, value in mapped.items():
                give(name, value, "TRL's batch sizes")
            notes.append(note)
        except ValueError as error:
            errors.append(str(error))
    for key, value in trl.items():
        entry = BY_NAME[key]
        try:
            mapped = _apply(entry, value, trl, out, convert)
        except ValueError as error:
            errors.append(str(error))
            continue
        for name, setting in mapped.items():
            give(name, setting, key)
        if entry.kind in ("renamed", "mapped", "script"):
            notes.append(f"{key}={_shown(value)!r} -> " + (", ".join(f"{n}={_shown(v)!r}" for n, v in mapped.items())
                                                           or "nothing"))
        elif entry.kind == "accepted":
            notes.append(f"{key}: {entry.becomes}")
    if "epsilon" in trl and "epsilon_high" not in trl and "clip_eps_high" not in explicit and not errors:
        out["clip_eps_high"] = out["clip_eps_low"]  # TRL: epsilon_high defaults to epsilon
    for key in unknown:
        close = difflib.get_close_matches(key, list(fields) + list(BY_NAME), n=1)
        source = where.get(key, "") if isinstance(where, Mapping) else where
        errors.append(f"unknown option '{key}'{f' in {source}' if source else ''}."
                      + (f" Did you mean '{close[0]}'?" if close else ""))
    return Translation(out, notes, errors)


def _optional(annotation) -> bool:
    return type(None) in typing.get_args(annotation)


def _shown(value):
    """A command-line value as the user typed it (one string, not a list of one)."""
    return value[0] if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str) else value


def _apply(entry: TRLName, value, trl: Mapping, out: dict, convert: Callable) -> dict:
    if entry.name == "save_strategy":
        if value == "steps" and "save_steps" not in out:
            return {"save_steps": TRL_DEFAULTS["save_steps"]}
        return _strategy("save_strategy", "save_steps")(value)
    if entry.name == "eval_strategy":
        if value == "steps" and not out.get("eval_steps"):  # TRL: eval_steps defaults to logging_steps (10)
            return {"eval_steps": out.get("logging_steps", TRL_DEFAULTS["logging_steps"])}
        return _strategy("eval_strategy", "eval_steps")(value)
    if entry.name == "reward_model_name_or_path":
        return {"reward_funcs": [*out.get("reward_funcs", []), value]} if value else {}
    if entry.name in ("model_revision", "attn_implementation"):
        key = "revision" if entry.name == "model_revision" else entry.name
        return {"model_init_kwargs": {**out.get("model_init_kwargs", {}), key: value}} if value is not None else {}
    if entry.name == "dataset_test_split":
        evaluating = trl.get("eval_strategy", "no") not in ("no", False) and "eval_dataset_name" not in out
        return {"eval_dataset_split": value, **({"eval_dataset_name": out["dataset_name"]}
                                                if evaluating and out.get("dataset_name") else {})}
    if entry.name == "epsilon":
        value = convert(value, float, "epsilon")
    if entry.apply is None:
        return {}
    return entry.apply(value)


def batch_geometry(batch: Mapping[str, int], num_generations: int) -> tuple[dict, str]:
    """Our batch fields from TRL's (``per_device_train_batch_size`` etc., which count completions), with TRL's
    defaults for the ones not given, on ``world_size()`` processes."""
    processes = world_size()
    per_device = batch.get("per_device_train_batch_size", TRL_DEFAULTS["per_device_train_batch_size"])
    accumulation = batch.get("gradient_accumulation_steps", TRL_DEFAULTS["gradient_accumulation_steps"])
    for name, value in (("per_device_train_batch_size", per_device), ("gradient_accumulation_steps", accumulation)):
        if value < 1:
            raise ValueError(f"{name}={value} must be >= 1.")
    global_batch = per_device * processes
    if "steps_per_generation" in batch and "generation_batch_size" in batch:
        raise ValueError("steps_per_generation and generation_batch_size cannot both be set (as in TRL); keep one.")
    if "generation_batch_size" in batch:
        generation = batch["generation_batch_size"]
        if generation < 1 or generation % global_batch:
            raise ValueError(f"generation_batch_size={generation} must be a positive multiple of "
                             f"per_device_train_batch_size x processes = {per_device} x {processes}.")
        steps = generation // global_batch
    else:
        steps = batch.get("steps_per_generation", accumulation)
        generation = global_batch * steps
    if steps % accumulation:
        raise ValueError(f"steps_per_generation={steps} must be a multiple of gradient_accumulation_steps="
                         f"{accumulation} here: every optimizer step uses completions of one rollout batch.")
    if generation % num_generations:
        raise ValueError(f"generation_batch_size={generation} (completions) must be divisible by num_generations="
                         f"{num_generations}, so that every prompt gets all its completions.")
    mapped = {"micro_batch_size": per_device, "mini_batch_size": per_device * accumulation * processes,
              "prompts_per_step": generation // num_generations}
    given = ", ".join(f"{k}={v}" for k, v in batch.items())
    optimizer_steps = steps // accumulation
    note = (f"{given} with num_generations={num_generations} on {processes} process(es) -> "
            + ", ".join(f"{k}={v}" for k, v in mapped.items())
            + f" (TRL's batch sizes count completions, prompts_per_step counts prompts; each step makes "
              f"{optimizer_steps} optimizer step(s) per epoch, and max_steps counts steps, not optimizer steps)")
    return mapped, note


# Rules for names TRL and we share whose TRL values we translate: (value, the other TRL keys, our values so far)
# -> our fields.
def _report_to(value, trl, out, defaults) -> dict:
    names = [value] if isinstance(value, str) else list(value or [])
    names = [n for part in names for n in str(part).split(",") if n.strip()]
    return {"report_to": [] if [n.lower() for n in names] in ([], ["none"]) else names}


def _scale_rewards(value, trl, out, defaults) -> dict:
    if isinstance(value, bool) or str(value).lower() in ("true", "false"):
        return {"scale_rewards": "group" if parse_bool(value, "scale_rewards") else "none"}
    return {"scale_rewards": value}


def _output_dir(value, trl, out, defaults) -> dict:
    return {"output_dir": "trainer_output" if value is None else value}


def _max_steps(value, trl, out, defaults) -> dict:
    """TRL's -1 means "run num_train_epochs" (3 by default). A max_steps other than our default, given with
    num_train_epochs, decides the run's length, as in TRL (with the default, num_train_epochs decides: a config
    rebuilt from its own fields, as ``dataclasses.replace`` does, keeps its meaning)."""
    if value is not None and str(value).strip() == "-1":
        return {"num_train_epochs": out.get("num_train_epochs") or TRL_DEFAULTS["num_train_epochs"]}
    if out.get("num_train_epochs") is not None and str(value) != str(defaults.get("max_steps")):
        logger.warning("max_steps=%s and num_train_epochs=%s are both set: max_steps decides the length of the run, "
                       "as in TRL.", value, out["num_train_epochs"])
        out["num_train_epochs"] = None
    return {"max_steps": value}


def _warmup_steps(value, trl, out, defaults) -> dict:
    number = _number(value, "warmup_steps")
    if 0 < number < 1:
        return {"warmup_ratio": number, "warmup_steps": 0}
    return {"warmup_steps": int(number) if number == int(number) else value}  # TRL's float: --warmup_steps 10


def _lr_scheduler(value, trl, out, defaults) -> dict:
    return {"lr_scheduler_type": "constant" if value == "constant_with_warmup" else value}


def _model_init_kwargs(value, trl, out, defaults) -> dict:
    if value is None:
        return {"model_init_kwargs": {}}
    if not isinstance(value, Mapping):
        raise ValueError(f"model_init_kwargs={value!r} must be a mapping of from_pretrained keyword arguments.")
    kwargs, fields = dict(value), {}
    for key in ("dtype", "torch_dtype"):
        if key in kwargs:
            dtype = kwargs.pop(key)
            fields["dtype"] = str(dtype).removeprefix("torch.") if dtype is not None else "auto"
    if "trust_remote_code" in kwargs:
        fields["trust_remote_code"] = parse_bool(kwargs.pop("trust_remote_code"), "model_init_kwargs['trust_remote_code']")
    if "device_map" in kwargs:
        raise ValueError("model_init_kwargs['device_map']: Accelerate places the model on each process's device; "
                         "remove device_map.")
    return {"model_init_kwargs": kwargs, **fields}


SHARED_RULES: dict[str, Callable] = {"report_to": _report_to, "scale_rewards": _scale_rewards,
                                     "output_dir": _output_dir, "max_steps": _max_steps,
                                     "warmup_steps": _warmup_steps, "lr_scheduler_type": _lr_scheduler,
                                     "model_init_kwargs": _model_init_kwargs}


_logged: set[str] = set()


def log_notes(notes: list[str]) -> None:
    """Log what TRL names became, each line once per process, on the main process only."""
    fresh = [note for note in notes if note not in _logged]
    _logged.update(fresh)
    if fresh and os.environ.get("RANK", "0") == "0":
        logger.warning("TRL settings, as this library reads them:\n  " + "\n  ".join(fresh))


def trl_attribute(config, name: str, value) -> dict | None:
    """Our fields for TRL's ``name`` set on ``config`` after construction (``args.beta = 0.5``), by the rule that maps
    it at construction; None for a name that has no effect here. A name whose rule needs the other settings (TRL's
    batch sizes, save_strategy) or that maps to no field of this config is an AttributeError naming what to set
    instead; a value with no equivalent here is a ValueError, as at construction."""
    entry, fields = BY_NAME[name], {f.name for f in dataclasses.fields(config)}
    if entry.kind == "accepted" or entry.becomes.startswith("no effect"):
        return None
    mapped = None
    if entry.apply is not None and name not in BATCH_NAMES:
        mapped = entry.apply(value)  # ValueError: the value has no equivalent here
    where = f"{type(config).__name__} has no attribute {name} (TRL's name)"
    if name in SHARED_RULES or (mapped is not None and not set(mapped) <= fields):
        raise AttributeError(f"{where}, nor a field it maps to: this algorithm does not use it.")
    if mapped is None:
        raise AttributeError(f"{where} after construction: set {entry.becomes.split(';')[0]} instead, or give {name} "
                             "to the constructor.")
    log_notes([f"{name}={_shown(value)!r} (set after construction) -> "
               + (", ".join(f"{n}={_shown(v)!r}" for n, v in mapped.items()) or "nothing")])
    return mapped


def trl_read(config, name: str):
    """TRL's ``name`` read back from ``config`` (``args.beta``): our field's value in TRL's meaning. A TRL name that
    has no value here (no effect, or a script's name) is an AttributeError saying what it became."""
    entry = BY_NAME.get(name)
    if entry is None or entry.read is None:
        raise AttributeError(f"{type(config).__name__!r} object has no attribute {name!r}"
                             + (f" (TRL's name; here: {entry.becomes})" if entry else ""))
    return entry.read(config)


class AcceptsTRLNames(type):
    """Metaclass of the configs: ``GRPOConfig(beta=0.04, per_device_train_batch_size=4, ...)`` translates TRL's names
    before the dataclass sees them, and reports every key it does not know at once."""

    def __call__(cls, *args, **kwargs):
        if kwargs:
            hints = typing.get_type_hints(cls)
            fields = {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}
            defaults = {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}
            translation = translate(kwargs, fields, defaults, where=f"{cls.__name__}(...)")
            translation.raise_errors(f"{cls.__name__} got settings it cannot use")
            log_notes(translation.notes)
            kwargs = translation.values
        return super().__call__(*args, **kwargs)

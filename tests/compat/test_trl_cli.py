"""TRL's command line: every TRL name of the table (``rlhf.trl_table.TABLE``), given as a TRL user types it (what
transformers' HfArgumentParser, TRL's parser, accepts: ``--bf16 true``, ``--loss_type dr_grpo``, a JSON object for a
dict option), gives the config the same value gives as a Python keyword (or, for the names of TRL's scripts, in a
YAML file), or the same error."""

import dataclasses
import functools
import json

import pytest
import yaml

from rlhf import GRPOConfig
from rlhf.cli import ConfigError, ScriptArguments, parse_args
from rlhf.trl_names import ConfigNameError
from rlhf.trl_table import TABLE, TRL_TYPES

trl = pytest.importorskip("trl")
from transformers import HfArgumentParser  # noqa: E402 - TRL's command-line parser

TRL_CLASSES = (trl.GRPOConfig, trl.RLOOConfig, trl.ScriptArguments, trl.ModelConfig)
SCRIPT = {entry.name for entry in TABLE if entry.kind == "script"} | {"dataset_streaming"}

# A value TRL accepts, for the names whose TRL default cannot be typed on a command line (None, an empty list) or
# that TRL 1.16's classes no longer have.
EXAMPLES = {
    "epsilon_high": 0.28, "delta": 1.5, "num_generations_eval": 4, "steps_per_generation": 2,
    "generation_batch_size": 16, "generation_kwargs": {"temperature": 0.7, "use_cache": True}, "output_dir": "out",
    "model_init_kwargs": {"torch_dtype": "bfloat16", "attn_implementation": "eager"}, "bf16": True,
    "deepspeed": "ds_config.json", "fsdp": "full_shard", "fsdp_config": {"min_num_params": 0},
    "optim_args": "betas=(0.9,0.99)", "lr_scheduler_kwargs": {"num_cycles": 2},
    "gradient_checkpointing_kwargs": {"use_reentrant": False}, "off_policy_mask_threshold": 0.5,
    "chat_template_kwargs": {"enable_thinking": False}, "neftune_noise_alpha": 5.0, "max_tool_calling_iterations": 3,
    "router_aux_loss_coef": 0.01, "log_completions_hub_repo": "user/completions", "parallelism_config": "cp=2",
    "activation_checkpointing": False, "data_seed": 1, "include_for_metrics": ["inputs"],
    "metric_for_best_model": "loss",
    "greater_is_better": True, "torch_compile_backend": "inductor", "torch_compile_mode": "default",
    "liger_kernel_config": {"rope": True}, "optim_target_modules": "attn", "activation_checkpointing_kwargs": {},
    "transformers_continuous_batching_config": {"block_size": 32}, "accelerator_config": {"split_batches": True},
    "tf32": False, "logging_dir": "logs", "eval_accumulation_steps": 2, "label_names": ["labels"],
    "torch_empty_cache_steps": 10, "debug": ["underflow_overflow"], "dataloader_prefetch_factor": 2,
    "dataloader_multiprocessing_context": "spawn", "ddp_backend": "gloo", "ddp_find_unused_parameters": False,
    "ddp_bucket_cap_mb": 25, "ddp_broadcast_buffers": False, "ddp_static_graph": False,
    "cache_implementation": "static",
    "hub_token": "hf_x", "hub_private_repo": True, "hub_model_id": "user/model", "hub_revision": "main",
    "trackio_space_id": "user/space", "trackio_bucket_id": "bucket", "trackio_static_space_id": "user/static",
    "vllm_structured_outputs_regex": "[0-9]+", "vllm_server_base_url": "http://localhost:8000",
    "vllm_max_model_length": 1024, "vllm_importance_sampling_clip_min": 0.5, "vllm_importance_sampling_cap": 2.0,
    "torch_dtype": "bfloat16", "reward_model_name_or_path": "reward_model", "attn_implementation": "eager",
    "eval_strategy": "no", "include_num_input_tokens_seen": True,
}
# Values other than the default that TRL users type, and that we take or refuse by name.
MORE = [("loss_type", "dr_grpo"), ("loss_type", "grpo"), ("bf16", False), ("use_vllm", True), ("use_vllm", False),
        ("save_strategy", "no"), ("save_strategy", "epoch"), ("optim", "adamw_torch"), ("optim", "adafactor"),
        ("report_to", ["tensorboard", "wandb"]), ("report_to", "none"), ("scale_rewards", "none"),
        ("max_steps", 20), ("warmup_steps", 0.1), ("torch_compile", True), ("lr_scheduler_type", "cosine"),
        ("generation_kwargs", {"no_repeat_ngram_size": 3}), ("per_device_train_batch_size", 4)]


def trl_default(name: str):
    for cls in TRL_CLASSES:
        fields = {f.name: f for f in dataclasses.fields(cls)}
        if name in fields and fields[name].default is not dataclasses.MISSING:
            return fields[name].default
    return None


def representative(name: str):
    default = trl_default(name)
    return EXAMPLES[name] if name in EXAMPLES or default in (None, []) else default


def tokens(value) -> list[str]:
    """The value as TRL's command line takes it."""
    if isinstance(value, bool):
        return [str(value).lower()]
    if isinstance(value, list):
        return [str(v) for v in value]
    if isinstance(value, dict):
        return [json.dumps(value)]
    return [str(value)]


@functools.cache
def trl_actions() -> dict:
    """TRL's own parser's arguments: name -> (TRL's class, argparse action); the first class that has it wins."""
    actions = {}
    for cls in TRL_CLASSES:
        for action in HfArgumentParser(cls)._actions:
            actions.setdefault(action.dest, (cls, action))
    return actions


def trl_action(name: str):
    """(TRL's class, its parser's argument) for ``name``; (None, None) when TRL 1.16 has no such field."""
    return trl_actions().get(name, (None, None))


def unreadable(action, argv) -> bool:
    """TRL's parser cannot read this value: its type is a class it calls on the string (dict, ParallelismConfig), or
    several values for a one-value option (we take report_to as a list too)."""
    return action.type is not None and action.type.__name__ in ("dict", "ParallelismConfig") or (
        len(argv) > 2 and action.nargs != "+")


def outcome(build):
    """The configs ``build`` returns, or the list of problems its error names."""
    try:
        return build()
    except (ConfigError, ConfigNameError) as error:
        return ["problems", *str(error).split("\n  - ")[1:]]


def cases():
    return [(entry.name, representative(entry.name)) for entry in TABLE] + MORE


@pytest.mark.parametrize("name, value", cases(), ids=lambda v: v if isinstance(v, str) else None)
def test_command_line_gives_what_the_python_keyword_gives(name, value, tmp_path):
    argv = [f"--{name}", *tokens(value)]
    _, action = trl_action(name)
    if action is not None and not unreadable(action, argv):  # the tokens are TRL's syntax: its parser reads them back
        parsed = (action.type or str)(argv[1]) if action.nargs != "+" else [action.type(t) for t in argv[1:]]
        assert (json.loads(parsed) if isinstance(value, dict) else parsed) == value
    command_line = outcome(lambda: parse_args([ScriptArguments, GRPOConfig], argv))
    if name in SCRIPT:  # the names of TRL's scripts: the same value in a YAML config is the second path
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump({name: value}))
        second = outcome(lambda: parse_args([ScriptArguments, GRPOConfig], ["--config", str(path)]))
    else:
        second = outcome(lambda: [ScriptArguments(), GRPOConfig(**{name: value})])
    assert command_line == second


def test_list_valued_flags_and_loss_type():
    """The forms the issue names, checked against the fields themselves."""
    (config,) = parse_args([GRPOConfig], ["--reward_weights", "1.0", "0.5", "--report_to", "tensorboard", "wandb",
                                          "--loss_type", "dr_grpo", "--bf16", "true", "--use_vllm", "false",
                                          "--save_strategy", "no", "--optim", "adamw_torch"])
    assert config.reward_weights == [1.0, 0.5] and config.report_to == ["tensorboard", "wandb"]
    assert (config.loss_agg, config.mixed_precision, config.save_steps) == ("seq-mean-token-sum-norm", "bf16", 0)
    with pytest.raises(ConfigError, match=r"model_init_kwargs='\{bad' is not a valid JSON object"):
        parse_args([GRPOConfig], ["--model_init_kwargs", "{bad"])
    with pytest.raises(ConfigError, match=r"use_vllm='maybe' must be true or false"):
        parse_args([GRPOConfig], ["--use_vllm", "maybe"])


def test_value_types_are_trls():
    """Every TRL name's value type (TRL_TYPES; unlisted: a string) is what TRL's own parser reads."""
    kinds = {"string_to_bool": "bool", "int": "int", "float": "float"}
    assert set(TRL_TYPES) <= {entry.name for entry in TABLE}  # no type for a name the table no longer has
    for entry in TABLE:
        cls, action = trl_action(entry.name)
        if action is None:  # not in TRL 1.16's classes (older names, torch_dtype): taken as a string
            assert entry.name not in TRL_TYPES
            continue
        ours = TRL_TYPES.get(entry.name, str)
        if entry.name in getattr(cls, "_VALID_DICT_FIELDS", []) or getattr(action.type, "__name__", "") == "dict":
            theirs = "dict"
        elif action.nargs == "+" or entry.name == "report_to":  # report_to: a string or a list in TRL
            theirs = "list"
        else:
            theirs = kinds.get(getattr(action.type, "__name__", ""), "str")
        shown = {bool | None: "bool", int | None: "int", float | None: "float", str: "str",
                 dict[str, object] | str | None: "dict", list[str] | None: "list"}[ours]
        assert shown == theirs, entry.name


def test_loss_type_cispo_names_the_settings_that_give_trls_loss():
    """TRL's CISPO (GRPOTrainer._compute_loss): -sg(min(r, epsilon_high)) * A * log p per token, token-mean. The error
    names our settings; with them our loss has TRL's value and gradient."""
    import torch

    from rlhf.core import policy_loss

    with pytest.raises(ConfigError, match=r"policy_loss_type: cispo, loss_agg: token-mean, clip_eps_high: "
                                          r"epsilon_high - 1 .* clip_eps_low: 0.99"):
        parse_args([GRPOConfig], ["--loss_type", "cispo", "--epsilon_high", "5.0"])
    torch.manual_seed(0)
    old, advantages, epsilon_high = torch.randn(8, 6), torch.randn(8, 1), 5.0
    mask = (torch.rand(8, 6) > 0.3).float()
    logprobs = (old + torch.randn(8, 6) * 0.05).requires_grad_()  # ratios within [0.01, 5]
    theirs = -(torch.clamp((logprobs - old).exp(), max=epsilon_high).detach() * advantages * logprobs)
    theirs = (theirs * mask).sum() / mask.sum()
    config = GRPOConfig(policy_loss_type="cispo", loss_agg="token-mean", clip_eps_high=epsilon_high - 1,
                        clip_eps_low=0.99)
    ours, _ = policy_loss(logprobs, old, advantages, mask, config.clip_eps_low, config.clip_eps_high,
                          agg=config.loss_agg, loss_type=config.policy_loss_type)
    assert torch.allclose(ours, theirs, atol=1e-6)
    assert torch.allclose(*(torch.autograd.grad(loss, logprobs)[0] for loss in (ours, theirs)), atol=1e-6)


def test_a_trl_flag_and_our_name_with_the_same_value_agree_on_the_command_line():
    """As in Python and YAML: both names at one value is no conflict; two values are, naming both as typed."""
    (config,) = parse_args([GRPOConfig], ["--max_completion_length", "8", "--max_new_tokens", "8", "--beta", "0.1",
                                          "--kl_coef", "0.1"])
    assert (config.max_new_tokens, config.kl_coef) == (8, 0.1)
    assert GRPOConfig(beta=0.1, kl_coef=0.1).kl_coef == 0.1
    with pytest.raises(ConfigError, match=r"beta sets kl_coef=0.1, but kl_coef=\['0.2'\] is given too"):
        parse_args([GRPOConfig], ["--beta", "0.1", "--kl_coef", "0.2"])

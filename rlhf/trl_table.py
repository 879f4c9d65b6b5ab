"""TRL's config names, one entry each: what it becomes here (the README's "Coming from TRL" table is generated
from ``TABLE``) and the rule that maps its value. ``rlhf.trl_names`` applies them."""

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class TRLName:
    """One TRL name: what it becomes here (for the README table) and how (``apply``: value -> our fields, or raise
    ValueError with the fix; ``read``: a config -> the value in TRL's meaning, for ``args.beta`` after construction)."""

    name: str
    becomes: str
    kind: str  # "renamed", "mapped", "accepted", "default only", "script"
    apply: Callable[[object], dict] | None = None
    read: Callable[[object], object] | None = None


# ---------------------------------------------------------------------------------------------------- value rules
def parse_bool(value, name: str) -> bool:
    """A true/false setting from Python, YAML or the command line (true/1/yes, false/0/no); ValueError otherwise."""
    if isinstance(value, bool):
        return value
    if str(value).lower() in ("true", "1", "yes", "t", "y"):  # transformers' string_to_bool, as TRL's CLI
        return True
    if str(value).lower() in ("false", "0", "no", "f", "n"):
        return False
    raise ValueError(f"{name}={value!r} must be true or false.")


def _number(value, name: str, kind=float):
    try:
        number = kind(value) if not isinstance(value, bool) else None
    except (TypeError, ValueError):
        number = None
    if number is None or (kind is float and not math.isfinite(number)) or (kind is int and number != float(value)):
        raise ValueError(f"{name}={value!r} must be {'an integer' if kind is int else 'a number'}.")
    return number


LOSS_TYPES = {"grpo": "seq-mean-token-mean", "dapo": "token-mean", "dr_grpo": "seq-mean-token-sum-norm",
              "bnpo": "micro-batch-token-mean"}
# Loss types that change the per-token loss too: TRL aggregates sapo as grpo.
POLICY_LOSS_TYPES = {"sapo": {"policy_loss_type": "sapo", "loss_agg": "seq-mean-token-mean"}}


def _loss_type(value) -> dict:
    if value == "cispo":  # TRL: -sg(min(r, epsilon_high)) * A * log p, token-mean; ours clips r to [1 - low, 1 + high]
        raise ValueError("loss_type='cispo': TRL's CISPO caps the ratio at epsilon_high itself (an absolute cap, e.g. "
                         "5.0, no lower bound); here set policy_loss_type: cispo, loss_agg: token-mean, clip_eps_high: "
                         "epsilon_high - 1 (the cap is 1 + clip_eps_high) and clip_eps_low: 0.99 (a floor of 0.01), "
                         "instead of loss_type and epsilon / epsilon_high.")
    if value in POLICY_LOSS_TYPES:
        return dict(POLICY_LOSS_TYPES[value])
    if value not in LOSS_TYPES:
        raise ValueError(f"loss_type={value!r} has no equivalent here (supported: "
                         f"{sorted([*LOSS_TYPES, *POLICY_LOSS_TYPES])}; cispo: policy_loss_type: cispo); for luspo / "
                         "vespo use one of these with clip_eps_low / clip_eps_high.")
    return {"loss_agg": LOSS_TYPES[value]}


def _precision(kind: str):
    def apply(value) -> dict:
        if value is None:  # TRL's "decide for me": the accelerate launch setting decides here
            return {}
        return {"mixed_precision": kind if parse_bool(value, "bf16" if kind == "bf16" else "fp16") else "no"}
    return apply


# Sampling options of generation_kwargs that are our fields: the log-probs follow them.
GENERATION_FIELDS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
                     "max_new_tokens": "max_new_tokens", "min_new_tokens": "min_new_tokens"}
# Options that do not change which tokens are sampled or how likely they are.
GENERATION_NEUTRAL = ("use_cache", "cache_implementation", "cache_config", "output_scores", "output_logits",
                      "return_dict_in_generate", "output_attentions", "output_hidden_states")


def _generation_kwargs(value) -> dict:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ValueError(f"generation_kwargs={value!r} must be a mapping of GenerationConfig settings.")
    out, refused = {}, []
    for key, setting in value.items():
        if key in GENERATION_FIELDS:
            out[GENERATION_FIELDS[key]] = setting
        elif key == "repetition_penalty":
            out.update(_repetition_penalty(setting))
        elif key == "do_sample" and parse_bool(setting, "generation_kwargs['do_sample']"):
            continue
        elif key not in GENERATION_NEUTRAL:
            refused.append(key)
    if refused:
        raise ValueError(
            f"generation_kwargs {refused}: these change the sampled distribution in ways the log-probs used for the "
            "ratio and the KL do not follow, so training would optimise a different policy than the one sampled. "
            f"Supported: {sorted(GENERATION_FIELDS)} (set as fields) and {list(GENERATION_NEUTRAL)}; shape the "
            "behaviour with a reward instead (reward_models.rules).")
    return out


def _repetition_penalty(value) -> dict:
    if _number(value, "repetition_penalty") == 1.0:
        return {}
    raise ValueError(
        f"repetition_penalty={value}: it rescales the logits of every token already in the prompt or the completion "
        "(and, in transformers, the padding token of left-padded prompts), a per-context change of the sampled "
        "distribution that the log-probs for the ratio and the KL do not follow. Leave it at 1.0 and penalise "
        "repetition with a reward: reward_models.rules.make_repetition_penalty(ngram_size).")


def _strategy(name: str, steps_field: str):
    """save_strategy / eval_strategy / logging_strategy: "no" or "steps"; "epoch" and "best" have no equivalent."""

    def apply(value) -> dict:
        if value in ("no", False) and steps_field != "logging_steps":
            return {steps_field: 0}
        if value == "steps":
            return {}
        raise ValueError(f"{name}={value!r} has no equivalent here: give {steps_field} as a number of steps (or, for "
                         "save_steps, a fraction of the run such as 0.25)" + ("; 'no' turns it off." if
                                                                              steps_field != "logging_steps" else "."))
    return apply


def _rename(trl: str, ours: str, note: str = "") -> TRLName:
    return TRLName(trl, f"`{ours}`" + (f" ({note})" if note else ""), "renamed", lambda value: {ours: value},
                   lambda config: getattr(config, ours))


def _mapped(trl: str, becomes: str, apply: Callable[[object], dict], read: Callable | None = None) -> TRLName:
    return TRLName(trl, becomes, "mapped", apply, read)


def _loss_type_of(config) -> str:
    """TRL's loss_type for a config's loss_agg (and policy_loss_type)."""
    for trl, ours in [*POLICY_LOSS_TYPES.items(), *((k, {"loss_agg": v}) for k, v in LOSS_TYPES.items())]:
        if all(getattr(config, name, None) == value for name, value in ours.items()):
            return trl
    raise AttributeError(f"loss_agg={config.loss_agg!r} with policy_loss_type={config.policy_loss_type!r} is none of "
                         "TRL's loss types; read loss_agg and policy_loss_type.")


def _tool_iterations(value) -> dict:
    """TRL counts the tool rounds after the first turn (None: no limit); max_turns counts the policy's turns."""
    if value is None:
        return {}
    return {"max_turns": _number(value, "max_tool_calling_iterations", int) + 1}


def _processes() -> int:
    import os

    return int(os.environ.get("WORLD_SIZE", "1"))


def _accepted(names: str, why: str) -> list[TRLName]:
    return [TRLName(name, why, "accepted") for name in names.split()]


def _default_only(name: str, accepted: tuple, fix: str) -> TRLName:
    def apply(value) -> dict:
        if value in accepted or (isinstance(value, str) and value.lower() in [str(a).lower() for a in accepted]):
            return {}
        raise ValueError(f"{name}={value!r} has no equivalent here: {fix}")
    shown = ", ".join("None" if a is None else repr(a) for a in accepted if a not in ("", []))
    read = (lambda config: accepted[0]) if len(accepted) == 1 else None  # the one value it can have here
    return TRLName(name, f"only {shown or 'its default'}: {fix}", "default only", apply, read)


ONE_BATCH = "generation decodes one fixed batch on the training model (rlhf.decode)."

TABLE: list[TRLName] = [
    # --- the same meaning under another name
    _rename("beta", "kl_coef", "KL to the reference in the loss, k3 estimator, as TRL's GRPO"),
    _mapped("epsilon", "`clip_eps_low`, and `clip_eps_high` unless `epsilon_high` is given (TRL's default)",
            lambda value: {"clip_eps_low": value}, lambda config: config.clip_eps_low),
    _rename("epsilon_high", "clip_eps_high"),
    _rename("delta", "dual_clip", "caps the loss of a negative-advantage token at delta x |A|: the same as TRL's "
                                  "two-sided clip when delta > 1 + epsilon_high"),
    _rename("num_iterations", "num_epochs"),
    _rename("max_completion_length", "max_new_tokens"),
    _rename("per_device_eval_batch_size", "eval_batch_size"),
    _rename("num_generations_eval", "eval_num_generations", "sampled completions per eval prompt; the greedy one "
                                                            "is always scored too"),
    _rename("torch_dtype", "dtype"),
    # --- mapped by a rule
    _mapped("loss_type", "`loss_agg`: grpo -> seq-mean-token-mean, dapo -> token-mean, dr_grpo -> "
                         "seq-mean-token-sum-norm, bnpo -> micro-batch-token-mean (each micro-batch's token mean, "
                         "micro-batches weighted equally, as TRL's per-device batches); sapo -> `policy_loss_type: "
                         "sapo` (the soft gate, temperatures `sapo_temperature_pos` / `_neg`) with "
                         "seq-mean-token-mean, as TRL", _loss_type, _loss_type_of),
    _mapped("bf16", "`mixed_precision`: true -> bf16 autocast, false -> no (None: the accelerate launch setting)",
            _precision("bf16"),
            lambda config: None if config.mixed_precision is None else config.mixed_precision == "bf16"),
    _mapped("fp16", "`mixed_precision`: true -> fp16 autocast, false -> no", _precision("fp16"),
            lambda config: config.mixed_precision == "fp16"),
    _mapped("per_device_train_batch_size", "`micro_batch_size` (completions per forward/backward on each process)",
            None, lambda config: config.micro_batch_size),
    _mapped("gradient_accumulation_steps", "`mini_batch_size` = per_device_train_batch_size x "
                                           "gradient_accumulation_steps x processes (completions per optimizer step)",
            None, lambda config: config.effective_mini_batch_size // (config.micro_batch_size * _processes())),
    _mapped("steps_per_generation", "`prompts_per_step` = per_device_train_batch_size x processes x "
                                    "steps_per_generation / num_generations (TRL counts completions, we count prompts)",
            None, lambda config: config.rollout_batch_size // (config.micro_batch_size * _processes())),
    _mapped("generation_batch_size", "`prompts_per_step` = generation_batch_size / num_generations", None,
            lambda config: config.rollout_batch_size),
    _mapped("generation_kwargs", "temperature, top_p, top_k, min_p, max_new_tokens, min_new_tokens become fields "
                                 "(the log-probs follow them); use_cache and other neutral keys are accepted; "
                                 "anything else that reshapes the distribution is refused", _generation_kwargs),
    _mapped("repetition_penalty", "only 1.0: the log-probs cannot follow a per-context penalty; use "
                                  "reward_models.rules.make_repetition_penalty", _repetition_penalty),
    _mapped("save_strategy", "\"no\" -> `save_steps: 0`; \"steps\" -> `save_steps` (TRL's default 500 when not "
                             "given); \"epoch\" / \"best\": give save_steps instead", None),
    _mapped("eval_strategy", "\"no\" -> `eval_steps: 0`; \"steps\" -> `eval_steps` (default: logging_steps)", None),
    _mapped("logging_strategy", "\"steps\" only (`logging_steps`)", _strategy("logging_strategy", "logging_steps")),
    _mapped("max_steps", "`max_steps`; -1 (TRL: run num_train_epochs) -> `num_train_epochs` decides, 3 when not given",
            None),
    _mapped("warmup_steps", "`warmup_steps`; a value below 1 (transformers 5: a fraction) -> `warmup_ratio`", None),
    _mapped("lr_scheduler_type", "`lr_scheduler_type`; constant_with_warmup -> constant (ours warms up first)", None),
    _mapped("report_to", "`report_to`; a string, a list, \"none\" (-> []) or \"all\" (every installed tracker)",
            None),
    _mapped("scale_rewards", "`scale_rewards`; true -> group, false -> none", None),
    _mapped("output_dir", "`output_dir`; None -> \"trainer_output\", as TRL", None),
    _mapped("model_init_kwargs", "`model_init_kwargs`; its dtype / torch_dtype and trust_remote_code become "
                                 "`dtype` and `trust_remote_code`", None),
    _default_only("use_vllm", (False,), "generation runs on the training model (rlhf.decode, or transformers "
                                        "generate); remove use_vllm and the vllm_* settings."),
    _default_only("push_to_hub", (False,), "upload output_dir after training with "
                                           "huggingface_hub.HfApi().upload_folder(folder_path=output_dir, repo_id=...)."),
    _default_only("shuffle_dataset", (True,), "prompts are always shuffled, seeded by seed, per pass over the data."),
    _default_only("use_liger_kernel", (False,), "log-probs already run through a chunked LM head "
                                                "(chunked_lm_head: true)."),
    _default_only("torch_compile", (False,), "not supported; remove it."),
    _default_only("deepspeed", (None, ""), "give the DeepSpeed config to accelerate launch: "
                                           "--config_file recipes/accelerate/deepspeed_zero2.yaml."),
    _default_only("fsdp", (None, "", []), "use accelerate launch --config_file recipes/accelerate/fsdp.yaml."),
    _default_only("fsdp_config", (None,), "use accelerate launch --config_file recipes/accelerate/fsdp.yaml."),
    _default_only("optim", ("adamw_torch", "adamw_torch_fused"), "the optimizer is AdamW (fused where available); "
                                                                 "set learning_rate, adam_beta1/2, weight_decay."),
    _default_only("optim_args", (None, ""), "set adam_beta1, adam_beta2, adam_epsilon, weight_decay."),
    _default_only("lr_scheduler_kwargs", (None, {}), "choose lr_scheduler_type constant, linear or cosine."),
    _default_only("gradient_checkpointing_kwargs", (None, {}, {"use_reentrant": False}),
                  "gradient checkpointing is always non-reentrant here."),
    _default_only("use_adaptive_entropy", (False,), "use a fixed entropy_coef."),
    _default_only("off_policy_mask_threshold", (None,), "not supported; target_kl stops a step's updates early."),
    _default_only("use_transformers_continuous_batching", (False,), ONE_BATCH),
    _default_only("use_transformers_paged", (False,), ONE_BATCH),
    _default_only("chat_template_kwargs", (None, {}), "give the chat template itself (recipes: chat_template)."),
    _default_only("neftune_noise_alpha", (None,), "not supported."),
    _default_only("label_smoothing_factor", (0.0, 0), "not supported."),
    _default_only("auto_find_batch_size", (False,), "lower micro_batch_size instead."),
    _default_only("load_best_model_at_end", (False,), "keep checkpoints (save_steps) and pick one after training."),
    _default_only("use_cpu", (False,), "hide the GPUs: CUDA_VISIBLE_DEVICES= before the command."),
    _mapped("max_tool_calling_iterations", "`max_turns` = max_tool_calling_iterations + 1 (TRL counts the tool rounds "
                                           "after the first turn, we count the policy's turns); None (TRL: no limit) "
                                           "-> max_turns keeps its default, bounded by max_trajectory_tokens",
            _tool_iterations, lambda config: config.max_turns - 1),
    _default_only("router_aux_loss_coef", (None,), "not supported."),
    _default_only("cast_lm_head_to_fp32", (False,), "log-probs are already computed in fp32 from the head."),
    _default_only("log_completions_hub_repo", (None,), "completions are written to output_dir/completions.jsonl."),
    _default_only("parallelism_config", (None,), "use an accelerate launch config."),
    _default_only("activation_checkpointing", (None, False), "use gradient_checkpointing."),
    _default_only("data_seed", (None,), "the prompt order is seeded by seed."),
    _default_only("full_determinism", (False,), "runs on CPU are bit-for-bit reproducible with the same seed."),
    _default_only("train_sampling_strategy", ("random",), "prompts are always shuffled."),
    _default_only("include_for_metrics", (None, []), "not supported."),
    _default_only("metric_for_best_model", (None,), "not supported."),
    _default_only("greater_is_better", (None,), "not supported."),
    _default_only("torch_compile_backend", (None,), "torch_compile is not supported."),
    _default_only("torch_compile_mode", (None,), "torch_compile is not supported."),
    _default_only("liger_kernel_config", (None,), "use_liger_kernel is not supported."),
    _default_only("optim_target_modules", (None,), "not supported."),
    _default_only("activation_checkpointing_kwargs", (None,), "use gradient_checkpointing."),
    _default_only("transformers_continuous_batching_config", (None,), ONE_BATCH),
    _default_only("accelerator_config", (None,), "use an accelerate launch config."),
    _default_only("tf32", (None, False), "set torch.backends.cuda.matmul.allow_tf32 in your script."),
    _default_only("bf16_full_eval", (False,), "evaluation runs in the training precision."),
    _default_only("fp16_full_eval", (False,), "evaluation runs in the training precision."),
    _default_only("enable_jit_checkpoint", (False,), "not supported."),
    *_accepted("do_train do_eval do_predict log_level log_level_replica log_on_each_node "
               "logging_first_step logging_nan_inf_filter save_only_model save_on_each_node "
               "ignore_data_skip restore_callback_states_from_checkpoint local_rank prediction_loss_only "
               "eval_accumulation_steps eval_do_concat_batches eval_use_gather_object batch_eval_metrics "
               "eval_delay eval_on_start label_names length_column_name skip_memory_metrics "
               "include_num_input_tokens_seen average_tokens_across_devices torch_empty_cache_steps debug "
               "dataloader_drop_last dataloader_num_workers dataloader_pin_memory dataloader_persistent_workers "
               "dataloader_prefetch_factor dataloader_multiprocessing_context dataloader_in_order ddp_backend "
               "ddp_timeout ddp_find_unused_parameters ddp_bucket_cap_mb ddp_broadcast_buffers ddp_static_graph "
               "use_cache cache_implementation pad_to_multiple_of ds3_gather_for_generation remove_unused_columns "
               "log_multimodal log_unique_prompts",
               "no effect here (columns are always kept, losses are always normalised over all processes, "
               "evaluation runs before training when eval_steps > 0)"),
    *_accepted("disable_dropout", "no effect: dropout is always off (the first ratio must be exactly 1)"),
    *_accepted("use_bias_correction_kl", "no effect: the KL term is not multiplied by the ratio (the same gradient "
                                         "on-policy, where TRL's default differs only through the ratio's gradient)"),
    *_accepted("logging_dir", "no effect: tensorboard writes to output_dir/runs/<run_name> (set output_dir or "
                              "run_name to move it)"),
    *_accepted("hub_token hub_strategy hub_always_push hub_revision",
               "no effect: trainer.push_to_hub() uploads once, when called, with the token of HF_TOKEN or `hf auth "
               "login` or its token= argument (a token is not kept in the config, which checkpoints save)"),
    *_accepted("project trackio_space_id trackio_bucket_id trackio_static_space_id",
               "no effect: the wandb project is WANDB_PROJECT (default rlhf)"),
    *_accepted("vllm_mode vllm_model_impl vllm_enable_sleep_mode vllm_structured_outputs_regex vllm_server_base_url "
               "vllm_server_host vllm_server_port vllm_server_timeout vllm_group_port vllm_gpu_memory_utilization "
               "vllm_max_model_length vllm_tensor_parallel_size vllm_importance_sampling_correction "
               "vllm_importance_sampling_mode vllm_importance_sampling_clip_max vllm_importance_sampling_clip_min "
               "vllm_importance_sampling_cap",
               "no effect: only used with use_vllm, which is not supported"),
    *_accepted("vespo_k_pos vespo_lambda_pos vespo_k_neg vespo_lambda_neg",
               "no effect: only used by loss_type vespo, which is not supported"),
    *_accepted("entropy_coef_min entropy_coef_max entropy_coef_delta entropy_target",
               "no effect: only used with use_adaptive_entropy"),
    # --- names of TRL's scripts (trl/scripts/grpo.py: ScriptArguments, ModelConfig); the recipes take them
    TRLName("dataset_train_split", "`dataset_split`", "script", lambda value: {"dataset_split": value}),
    TRLName("dataset_test_split", "`eval_dataset_split`; with eval_strategy other than \"no\", the eval set is "
                                  "dataset_name's split", "script", lambda value: {"eval_dataset_split": value}),
    TRLName("reward_model_name_or_path", "appended to `reward_funcs`", "script", None),
    TRLName("model_revision", "`model_init_kwargs.revision`", "script", None),
    TRLName("attn_implementation", "`model_init_kwargs.attn_implementation`", "script", None),
    *[TRLName(name, "no effect: LoRA targets a causal LM", "script") for name in ("lora_task_type",)],
    _default_only("dataset_streaming", (False,), "the recipes load whole datasets; in Python, pass a "
                                                 "datasets.IterableDataset as train_dataset."),
]
BY_NAME = {entry.name: entry for entry in TABLE}

# TRL GRPOConfig fields that are ours too, with the same meaning (a test checks every TRL field is here or in TABLE).
SAME_NAMES = ("adam_beta1", "adam_beta2", "adam_epsilon", "disable_tqdm", "entropy_coef", "eval_steps",
              "gradient_checkpointing", "learning_rate", "logging_steps", "mask_truncated_completions", "max_grad_norm",
              "num_generations", "reward_weights", "resume_from_checkpoint", "run_name", "save_steps",
              "save_total_limit", "seed", "temperature", "top_k", "top_p", "trust_remote_code", "weight_decay",
              "num_train_epochs", "min_p", "log_completions", "num_completions_to_print", "sapo_temperature_pos",
              "sapo_temperature_neg", "sync_ref_model", "ref_model_mixup_alpha", "ref_model_sync_steps", "hub_model_id",
              "hub_private_repo",
              "multi_objective_aggregation", "top_entropy_quantile", "importance_sampling_level")

# Where TRL's GRPOConfig default differs from ours: name -> (TRL's default, ours, why). A test reads TRL's defaults.
DIFFERENT_DEFAULTS = {
    "max_steps": (-1, 100, "TRL runs num_train_epochs=3 when max_steps is -1; here a step is one rollout batch"),
    "per_device_train_batch_size": (8, "micro_batch_size 8", "TRL's default rollout is 8 completions per process "
                                                             "(one prompt); ours is prompts_per_step=8 x "
                                                             "num_generations=8 = 64 completions"),
    "logging_steps": (10, 1, "a line per step: tiny runs should show something"),
    "save_steps": (500, 0, "checkpoints only when asked for"),
    "lr_scheduler_type": ("linear", "constant", "RL rarely wants a decay to 0 at a step count chosen in advance"),
    "gradient_checkpointing": (True, False, "the small models this runs on CPU do not need it"),
    "max_completion_length": (512, "max_new_tokens 256", "shorter runs by default"),
    "bf16": (True, "mixed_precision None", "the accelerate launch config decides (bf16 in "
                                           "recipes/accelerate/single_gpu.yaml)"),
    "num_completions_to_print": (None, 8, "a table that fits a screen"),
}

# The type of each TRL name's value, as TRL's command line (transformers' HfArgumentParser) reads it: the command
# line converts a TRL name's strings to it before the rules above see them, so `--use_vllm false` gives what
# `use_vllm=False` gives. A JSON object fills a dict (TRL's _VALID_DICT_FIELDS; deepspeed also takes a path); names
# not listed take a string. A test checks every entry against TRL's own annotations.
def _typed(annotation, names: str) -> dict:
    return dict.fromkeys(names.split(), annotation)


TRL_TYPES: dict[str, object] = {
    **_typed(bool | None, "bf16 fp16 use_vllm push_to_hub shuffle_dataset use_liger_kernel torch_compile "
                          "use_adaptive_entropy use_transformers_continuous_batching use_transformers_paged "
                          "auto_find_batch_size load_best_model_at_end use_cpu cast_lm_head_to_fp32 "
                          "activation_checkpointing full_determinism greater_is_better tf32 bf16_full_eval "
                          "fp16_full_eval "
                          "enable_jit_checkpoint do_train do_eval do_predict log_on_each_node logging_first_step "
                          "logging_nan_inf_filter save_only_model save_on_each_node ignore_data_skip "
                          "restore_callback_states_from_checkpoint prediction_loss_only eval_do_concat_batches "
                          "eval_use_gather_object batch_eval_metrics eval_on_start skip_memory_metrics "
                          "include_num_input_tokens_seen average_tokens_across_devices dataloader_drop_last "
                          "dataloader_pin_memory dataloader_persistent_workers dataloader_in_order "
                          "ddp_find_unused_parameters ddp_broadcast_buffers ddp_static_graph use_cache "
                          "ds3_gather_for_generation remove_unused_columns log_multimodal log_unique_prompts "
                          "disable_dropout use_bias_correction_kl hub_always_push "
                          "vllm_enable_sleep_mode "
                          "vllm_importance_sampling_correction dataset_streaming"),
    **_typed(int | None, "num_iterations max_completion_length per_device_eval_batch_size num_generations_eval "
                         "per_device_train_batch_size gradient_accumulation_steps steps_per_generation "
                         "generation_batch_size max_steps max_tool_calling_iterations data_seed local_rank "
                         "eval_accumulation_steps torch_empty_cache_steps dataloader_num_workers "
                         "dataloader_prefetch_factor ddp_timeout ddp_bucket_cap_mb vllm_server_port vllm_group_port "
                         "vllm_max_model_length vllm_tensor_parallel_size"),
    **_typed(float | None, "beta epsilon epsilon_high delta repetition_penalty warmup_steps "
                           "off_policy_mask_threshold neftune_noise_alpha label_smoothing_factor router_aux_loss_coef "
                           "eval_delay vllm_server_timeout vllm_gpu_memory_utilization "
                           "vllm_importance_sampling_clip_max vllm_importance_sampling_clip_min "
                           "vllm_importance_sampling_cap vespo_k_pos "
                           "vespo_lambda_pos vespo_k_neg vespo_lambda_neg entropy_coef_min "
                           "entropy_coef_max entropy_coef_delta entropy_target"),
    **_typed(dict[str, object] | str | None, "generation_kwargs model_init_kwargs deepspeed fsdp_config "
                                             "lr_scheduler_kwargs gradient_checkpointing_kwargs chat_template_kwargs "
                                             "liger_kernel_config activation_checkpointing_kwargs "
                                             "transformers_continuous_batching_config accelerator_config"),
    **_typed(list[str] | None, "include_for_metrics label_names debug report_to"),
}

OVERRIDING = ("save_strategy", "eval_strategy", "reward_model_name_or_path", "model_revision", "attn_implementation")
BATCH_NAMES = ("per_device_train_batch_size", "gradient_accumulation_steps", "steps_per_generation",
               "generation_batch_size")
TRL_DEFAULTS = {"per_device_train_batch_size": 8, "gradient_accumulation_steps": 1, "num_train_epochs": 3.0,
                "save_steps": 500, "logging_steps": 10}


def defaults_table() -> str:
    """The README's table of defaults that differ from TRL's."""
    rows = ["| TRL name | TRL's default | here | why |", "|---|---|---|---|"]
    rows += [f"| `{name}` | `{trl!r}` | `{ours}` | {why} |" for name, (trl, ours, why) in DIFFERENT_DEFAULTS.items()]
    return "\n".join(rows)


def markdown_table() -> str:
    """The README's table of TRL names: what each becomes here."""
    rows = ["| TRL name | here |", "|---|---|"]
    accepted: dict[str, list[str]] = {}
    for entry in TABLE:
        if entry.kind == "accepted" or (entry.kind == "script" and entry.becomes.startswith("no effect")):
            accepted.setdefault(entry.becomes, []).append(entry.name)
        else:
            rows.append(f"| `{entry.name}` | {entry.becomes.replace('|', chr(92) + '|')} |")
    for why, names in accepted.items():
        rows.append(f"| {', '.join(f'`{n}`' for n in names)} | {why} |")
    return "\n".join(rows)

"""TRL's config names: each maps to ours with TRL's meaning (checked against TRL's own GRPOConfig, which the
venv has), is logged once, and what has no equivalent, or is not known at all, is reported at once with the fix."""

import dataclasses
import logging
import math
import os

import pytest
import torch

from rlhf import GRPOConfig, PPOConfig
from rlhf.cli import ConfigError, ScriptArguments, parse_args
from rlhf.trl_names import BY_NAME, DIFFERENT_DEFAULTS, SAME_NAMES, ConfigNameError

trl = pytest.importorskip("trl")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def trl_config(**kwargs):
    """TRL's own GRPOConfig, on the CPU (its bf16 default needs a GPU)."""
    return trl.GRPOConfig(**{"output_dir": "/tmp/trl-unused", "use_cpu": True, **kwargs})


def test_every_trl_grpo_field_is_ours_or_in_the_table():
    theirs = {f.name for f in dataclasses.fields(trl.GRPOConfig)}
    ours = {f.name for f in dataclasses.fields(GRPOConfig)}
    assert theirs - set(SAME_NAMES) - set(BY_NAME) == set()
    assert set(SAME_NAMES) <= ours  # a name we claim to share is really a field here
    assert not set(SAME_NAMES) & set(BY_NAME)


def test_the_defaults_we_say_differ_are_trls_defaults():
    defaults = {f.name: f.default for f in dataclasses.fields(trl.GRPOConfig)}
    for name, (theirs, _, _) in DIFFERENT_DEFAULTS.items():
        if name == "bf16":  # None in the field, True after __post_init__ when fp16 is off
            assert trl_config().bf16 is True
            continue
        assert defaults[name] == theirs, name


def test_renamed_fields_are_ours_with_the_same_values():
    renamed = GRPOConfig(beta=0.04, epsilon_high=0.28, num_iterations=2, max_completion_length=64,
                         per_device_eval_batch_size=16, delta=3.0, torch_dtype="bfloat16")
    ours = GRPOConfig(kl_coef=0.04, clip_eps_high=0.28, num_epochs=2, max_new_tokens=64, eval_batch_size=16,
                      dual_clip=3.0, dtype="bfloat16")
    assert renamed == ours
    assert PPOConfig(beta=0.1).kl_coef == 0.1  # every config takes them


def test_epsilon_alone_sets_both_clip_bounds_as_in_trl():
    # TRL: epsilon_high defaults to epsilon (GRPOTrainer.__init__); check on TRL's config + that rule.
    theirs = trl_config(epsilon=0.3)
    trl_high = theirs.epsilon_high if theirs.epsilon_high is not None else theirs.epsilon
    ours = GRPOConfig(epsilon=0.3)
    assert (ours.clip_eps_low, ours.clip_eps_high) == (theirs.epsilon, trl_high) == (0.3, 0.3)
    assert GRPOConfig(epsilon=0.3, epsilon_high=0.28).clip_eps_high == 0.28


def test_delta_is_the_dual_clip():
    """TRL's two-sided clip (ratio capped at delta in the unclipped term) gives our dual-clip loss, per token."""
    from rlhf.core import policy_loss

    torch.manual_seed(0)
    ratio_log = torch.randn(64) * 1.5
    advantages = torch.randn(64)
    eps, delta = 0.2, 3.0
    r = ratio_log.exp()
    trl_loss = -torch.min(torch.clamp(r, max=delta) * advantages, torch.clamp(r, 1 - eps, 1 + eps) * advantages)
    config = GRPOConfig(delta=delta)
    ours, _ = policy_loss(ratio_log.unsqueeze(1), torch.zeros(64, 1), advantages, torch.ones(64, 1), eps, eps,
                          config.dual_clip, "seq-mean-token-sum")
    assert torch.allclose(ours, trl_loss.mean(), atol=1e-6)


@pytest.mark.parametrize("loss_type, loss_agg", [("grpo", "seq-mean-token-mean"), ("dapo", "token-mean"),
                                                 ("dr_grpo", "seq-mean-token-sum-norm"),
                                                 ("bnpo", "micro-batch-token-mean")])
def test_loss_types(loss_type, loss_agg):
    assert GRPOConfig(loss_type=loss_type).loss_agg == loss_agg


@pytest.mark.parametrize("value", [True, False, "group", "batch", "none"])
def test_scale_rewards_takes_trls_booleans(value):
    assert GRPOConfig(scale_rewards=value).scale_rewards == trl_config(scale_rewards=value).scale_rewards


@pytest.mark.parametrize("batch", [
    dict(per_device_train_batch_size=4, num_generations=4),
    dict(per_device_train_batch_size=4, gradient_accumulation_steps=2, num_generations=4),
    dict(per_device_train_batch_size=4, gradient_accumulation_steps=2, steps_per_generation=4, num_generations=4),
    dict(per_device_train_batch_size=2, generation_batch_size=12, num_generations=3),
])
def test_trl_batch_sizes_give_the_same_rollout_and_optimizer_batches(batch):
    """TRL's config derives generation_batch_size (completions per rollout); an optimizer step takes
    per_device_train_batch_size x gradient_accumulation_steps x processes completions."""
    theirs = trl_config(**batch)
    ours = GRPOConfig(**batch)
    ours.validate()
    assert ours.rollout_batch_size == theirs.generation_batch_size
    assert ours.prompts_per_step == theirs.generation_batch_size // theirs.num_generations
    assert ours.effective_mini_batch_size == theirs.per_device_train_batch_size * theirs.gradient_accumulation_steps
    assert ours.micro_batch_size == theirs.per_device_train_batch_size
    # optimizer steps per rollout: TRL's steps_per_generation / gradient_accumulation_steps
    assert ours.optimizer_steps_per_step == theirs.steps_per_generation // theirs.gradient_accumulation_steps


def test_trl_batch_sizes_use_the_launch_world_size(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    config = GRPOConfig(per_device_train_batch_size=4, gradient_accumulation_steps=2, num_generations=4)
    assert (config.micro_batch_size, config.mini_batch_size, config.prompts_per_step) == (4, 16, 4)
    config.validate(num_processes=2)


def test_batch_errors_name_the_fields():
    with pytest.raises(ConfigNameError, match=r"generation_batch_size=6 \(completions\) must be divisible by "
                                              r"num_generations=4"):
        GRPOConfig(per_device_train_batch_size=6, num_generations=4)
    with pytest.raises(ConfigNameError, match="steps_per_generation and generation_batch_size cannot both"):
        GRPOConfig(steps_per_generation=2, generation_batch_size=16)
    with pytest.raises(ConfigNameError, match=r"steps_per_generation=3 must be a multiple of "
                                              r"gradient_accumulation_steps=2"):
        GRPOConfig(per_device_train_batch_size=4, gradient_accumulation_steps=2, steps_per_generation=3)
    with pytest.raises(ConfigNameError, match=r"TRL's batch sizes sets micro_batch_size=4, but micro_batch_size=2"):
        GRPOConfig(per_device_train_batch_size=4, num_generations=4, micro_batch_size=2)


def test_max_steps_minus_one_runs_num_train_epochs_as_trl_counts_them():
    """TRL: max_steps = ceil(epochs x optimizer steps per epoch), from the length of its repeat-sampled dataloader
    (one pass over the prompts, num_generations completions each). Ours counts rollout steps; the optimizer steps
    of the whole run must agree."""
    from transformers import TrainerState  # noqa: F401 - TRL's training loop state, for the record
    from trl.trainer.utils import RepeatSampler

    num_prompts, batch = 24, dict(per_device_train_batch_size=4, gradient_accumulation_steps=2, num_generations=4,
                                  num_train_epochs=2.0, max_steps=-1)
    theirs = trl_config(**batch)
    sampler = RepeatSampler(range(num_prompts), mini_repeat_count=theirs.num_generations,
                            batch_size=theirs.generation_batch_size // theirs.num_generations,
                            repeat_count=theirs.num_iterations * theirs.steps_per_generation)
    # GRPOTrainer.get_train_dataloader: batches of per_device_train_batch_size x steps_per_generation
    dataloader_length = len(sampler) // (theirs.per_device_train_batch_size * theirs.steps_per_generation)
    trl_optimizer_steps = math.ceil(theirs.num_train_epochs * (dataloader_length // theirs.gradient_accumulation_steps))
    ours = GRPOConfig(**batch).for_dataset(num_prompts)
    assert ours.max_steps * ours.optimizer_steps_per_step == trl_optimizer_steps
    assert GRPOConfig(max_steps=-1).num_train_epochs == 3.0  # TRL's default number of epochs


def test_max_steps_wins_over_num_train_epochs_as_in_trl(caplog):
    with caplog.at_level(logging.WARNING):
        config = GRPOConfig(max_steps=7, num_train_epochs=2)
    assert config.num_train_epochs is None and config.for_dataset(100).max_steps == 7
    assert "max_steps decides" in caplog.text
    epochs = GRPOConfig(num_train_epochs=2)  # rebuilt from its own fields it keeps its meaning
    assert dataclasses.replace(epochs, seed=1).num_train_epochs == 2


def test_fractional_save_steps_and_warmup_follow_transformers():
    """transformers' TrainerState.compute_steps and TrainingArguments.get_warmup_steps are the reference."""
    from transformers import TrainerState

    config = GRPOConfig(max_steps=30, save_steps=0.25, warmup_ratio=0.1, prompts_per_step=4, num_generations=4,
                        mini_batch_size=8)
    resolved = config.for_dataset(100)
    state = TrainerState()
    state.compute_steps(trl_config(save_steps=0.25), resolved.max_steps)
    assert resolved.save_steps == state.save_steps == 8
    total_optimizer_steps = resolved.max_steps * resolved.optimizer_steps_per_step
    assert resolved.warmup_steps == trl_config(warmup_steps=0.1).get_warmup_steps(total_optimizer_steps) == 6
    assert GRPOConfig(warmup_steps=0.1).warmup_ratio == 0.1  # transformers 5: warmup_steps < 1 is a ratio


@pytest.mark.parametrize("value, expected", [("tensorboard", ["tensorboard"]), (["tensorboard", "wandb"],
                                             ["tensorboard", "wandb"]), ("none", []), (["none"], []), ("all", ["all"])])
def test_report_to_forms(value, expected):
    assert GRPOConfig(report_to=value).report_to == expected


def test_other_shared_names_take_trls_values():
    config = GRPOConfig(output_dir=None, lr_scheduler_type="constant_with_warmup", bf16=True,
                        model_init_kwargs={"torch_dtype": "bfloat16", "attn_implementation": "eager",
                                           "trust_remote_code": False}, save_strategy="no", eval_strategy="no",
                        generation_kwargs={"temperature": 0.7, "top_k": 5, "min_p": 0.1, "use_cache": True},
                        repetition_penalty=1.0, use_vllm=False, do_train=True, vllm_mode="colocate")
    assert config.output_dir == trl_config(output_dir=None).output_dir == "trainer_output"
    assert config.lr_scheduler_type == "constant" and config.mixed_precision == "bf16"
    assert config.dtype == "bfloat16" and config.model_init_kwargs == {"attn_implementation": "eager"}
    assert (config.temperature, config.top_k, config.min_p) == (0.7, 5, 0.1)
    assert config.save_steps == 0 and config.eval_steps == 0
    assert GRPOConfig(save_strategy="steps").save_steps == 500  # TRL's default save_steps
    assert GRPOConfig(disable_tqdm=None, eval_steps=None) == GRPOConfig()  # TRL's "unset" is our default


def test_settings_without_equivalent_and_unknown_keys_are_reported_together():
    with pytest.raises(ConfigNameError) as error:
        GRPOConfig(use_vllm=True, num_iteration=2, epsilon_hihg=0.3, learning_rat=1e-5, loss_type="luspo",
                   repetition_penalty=1.3, generation_kwargs={"no_repeat_ngram_size": 3}, save_strategy="epoch")
    message = str(error.value)
    for expected in ("use_vllm=True has no equivalent here: generation runs on the training model",
                     "unknown option 'num_iteration' in GRPOConfig(...). Did you mean 'num_iterations'?",
                     "'epsilon_hihg' in GRPOConfig(...). Did you mean 'epsilon_high'?",
                     "'learning_rat' in GRPOConfig(...). Did you mean 'learning_rate'?",
                     "loss_type='luspo' has no equivalent here", "repetition_penalty=1.3",
                     "reward_models.rules.make_repetition_penalty", "generation_kwargs ['no_repeat_ngram_size']",
                     "save_strategy='epoch' has no equivalent here"):
        assert expected in message, expected
    assert message.count("\n  - ") == 8


def test_aliases_come_before_did_you_mean():
    """Today's did-you-mean would point num_iterations at num_generations, epsilon at adam_epsilon and
    max_completion_length at max_prompt_length; the aliases resolve them first."""
    config = GRPOConfig(num_iterations=2, epsilon=0.1, max_completion_length=32)
    assert (config.num_epochs, config.clip_eps_low, config.max_new_tokens) == (2, 0.1, 32)


def test_each_translation_is_logged_once(caplog):
    with caplog.at_level(logging.WARNING, logger="rlhf.trl_names"):
        GRPOConfig(beta=0.0123)
        GRPOConfig(beta=0.0123)
    assert caplog.text.count("beta=0.0123 -> kl_coef=0.0123") == 1


def test_yaml_and_command_line_take_trl_names(tmp_path):
    path = tmp_path / "trl.yaml"
    path.write_text("model_name_or_path: m\nmodel_revision: main\nattn_implementation: eager\ndataset_name: d.jsonl\n"
                    "dataset_train_split: train\ndataset_test_split: test\neval_strategy: steps\neval_steps: 5\n"
                    "reward_funcs: [think_format_reward]\nreward_model_name_or_path: rm\n"
                    "per_device_train_batch_size: 4\ngradient_accumulation_steps: 2\nnum_generations: 4\n"
                    "beta: 0.04\nloss_type: dr_grpo\nscale_rewards: false\nbf16: false\nreport_to: none\n"
                    "save_strategy: 'no'\nmax_steps: -1\nnum_train_epochs: 1\nuse_vllm: false\nlog_completions: true\n"
                    "warmup_ratio: 0.1\nlr_scheduler_type: cosine\nlogging_strategy: steps\n")
    script, config = parse_args([ScriptArguments, GRPOConfig],
                                ["--config", str(path), "--max_completion_length", "48", "--epsilon", "0.25",
                                 "--save_steps", "0.5"])
    assert script.dataset_split == "train" and script.eval_dataset_split == "test"
    assert script.eval_dataset_name == "d.jsonl" and script.reward_funcs == ["think_format_reward", "rm"]
    assert config.model_init_kwargs == {"revision": "main", "attn_implementation": "eager"}
    assert (config.micro_batch_size, config.mini_batch_size, config.prompts_per_step) == (4, 8, 2)
    assert (config.kl_coef, config.loss_agg, config.scale_rewards, config.mixed_precision) == (
        0.04, "seq-mean-token-sum-norm", "none", "no")
    assert config.report_to == [] and config.num_train_epochs == 1 and config.log_completions
    assert (config.max_new_tokens, config.clip_eps_low, config.clip_eps_high) == (48, .25, .25)
    assert config.save_steps == 0  # save_strategy "no" decides over save_steps, as in TRL
    assert config.eval_steps == 5 and config.warmup_ratio == 0.1
    assert parse_args([GRPOConfig], ["--save_steps", "0.5"])[0].save_steps == 0.5
    (flags,) = parse_args([GRPOConfig], ["--per_device_train_batch_size", "4", "--num_generations", "2",
                                         "--steps_per_generation", "2", "--beta", "0.1"])
    assert (flags.micro_batch_size, flags.prompts_per_step, flags.kl_coef) == (4, 4, 0.1)


def test_command_line_reports_every_unknown_key_at_once(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("num_generation: 4\nuse_vllm: true\n")
    with pytest.raises(ConfigError) as error:
        parse_args([ScriptArguments, GRPOConfig], ["--config", str(path), "--learning_rat", "1e-5",
                                                   "--max_steps", "ten"])
    message = str(error.value)
    assert "unknown option 'num_generation' in " + str(path) + ". Did you mean 'num_generations'?" in message
    assert "unknown option 'learning_rat' in the command line. Did you mean 'learning_rate'?" in message
    assert "use_vllm=True has no equivalent here" in message and "max_steps='ten' must be an integer" in message


def test_trl_reward_names_and_dotted_paths_in_recipes():
    from rlhf.cli import reward_functions_from_specs

    fmt, overlong, dotted = reward_functions_from_specs(["think_format_reward", "get_soft_overlong_punishment",
                                                          "reward_models.rules.exact_answer_reward"])
    assert fmt.__name__ == "think_format_reward" and dotted.__name__ == "exact_answer_reward"
    assert overlong(completion_ids=[[0] * 1152]) == [-0.5]  # TRL's script: max_completion_len=1280, cache 256


def test_trl_rewards_under_their_names_match_trls():
    from trl import rewards as theirs

    from reward_models import rules

    completions = [[{"content": "<think>\nx\n</think>\ny"}], [{"content": "<think>x"}], [{"content": "a<think>x"}]]
    assert rules.think_format_reward(completions) == theirs.think_format_reward(completions)
    ids = [[1] * n for n in (70, 80, 85, 90, 100, 120)]
    assert (rules.get_soft_overlong_punishment(100, 20)(ids)
            == theirs.get_soft_overlong_punishment(max_completion_len=100, soft_punish_cache=20)(ids))


def test_docs_trl_table_is_generated_from_the_code():
    from rlhf.extras.docs import pages, trl_tables

    with open(os.path.join(ROOT, "docs", "trl-names.md")) as f:
        page = f.read()
    assert page == pages()["trl-names.md"], "docs/trl-names.md is stale: run `make docs`"
    assert trl_tables() in page
    for entry in BY_NAME:
        assert f"`{entry}`" in page

"""Nothing non-finite or ill-typed gets past construction: config fields, rewards whose weighted values
overflow, LoRA with reference options, and the command line."""

import pytest
import torch
from helpers import make_trainer

from rlhf import GRPOConfig, ReinforceConfig
from rlhf.cli import ConfigError, ScriptArguments, parse_args
from rlhf.rewards import MAX_ABS_REWARD, RewardError, RewardFunction, reward_table
from rlhf.rollout import RolloutTexts


@pytest.mark.parametrize("overrides, message", [
    ({"learning_rate": float("inf")}, r"learning_rate=inf must be finite"),
    ({"learning_rate": 1e30}, r"learning_rate=1e\+30 must be in \[0, 1\]: AdamW moves each weight by about the "
                              r"learning rate per step"),
    ({"learning_rate": -1e-5}, r"learning_rate=-1e-05 must be in \[0, 1\]"),
    ({"kl_coef": float("inf")}, r"kl_coef=inf must be finite"),
    ({"temperature": float("inf")}, r"temperature=inf must be finite"),
    ({"temperature": float("nan")}, r"temperature=nan must be finite"),
    ({"max_steps": 2.5}, r"max_steps=2.5 must be an integer \(got float\)"),
    ({"reward_weights": [float("nan")]}, r"reward_weights\[0\]=nan must be finite"),
    ({"reward_weights": [float("inf")]}, r"reward_weights\[0\]=inf must be finite"),
    ({"learning_rate": "1e-5"}, r"learning_rate='1e-5' must be a number \(got str\)"),
    ({"max_new_tokens": "8"}, r"max_new_tokens='8' must be an integer \(got str\)"),
    ({"mini_batch_size": 0}, r"mini_batch_size=0 must be >= 1 \(or None\)"),
    ({"reward_model_batch_size": 0}, r"reward_model_batch_size=0 must be >= 1"),
    ({"save_total_limit": 0}, r"save_total_limit=0 must be >= 1 \(or None\)"),
    ({"overwrite_output_dir": "yes"}, r"overwrite_output_dir='yes' must be true or false"),
])
def test_bad_field_values_name_the_field(overrides, message):
    with pytest.raises(ValueError, match=message):
        GRPOConfig(**overrides).validate()


def test_the_critic_learning_rate_is_bounded_like_the_actors():
    from rlhf import PPOConfig

    with pytest.raises(ValueError, match=r"critic_learning_rate=2.0 must be in \[0, 1\]"):
        PPOConfig(critic_learning_rate=2.0).validate()
    PPOConfig(learning_rate=1.0, critic_learning_rate=0.0).validate()  # the bounds themselves are accepted


def test_a_trainer_refuses_an_ill_typed_config_before_touching_anything(tmp_path):
    with pytest.raises(ValueError, match=r"Invalid GRPOConfig:\n  - learning_rate='fast' must be a number"):
        make_trainer(tmp_path / "run", learning_rate="fast")
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- rewards that overflow once weighted

def texts(n=4):
    return RolloutTexts(prompts=["p"] * n, completions=[f"c{i}" for i in range(n)], completion_ids=[[1]] * n,
                        columns={})


def constant(value, name):
    def reward(prompts, completions, **kwargs):
        return [value] * len(completions)
    reward.__name__ = name
    return RewardFunction(reward)


@pytest.mark.parametrize("value, weight", [(1e308, 1.0), (1e300, 10.0), (-2e10, 1.0), (1e9, 100.0)])
def test_rewards_whose_weighted_value_overflows_are_named(value, weight):
    functions = [constant(1.0, "fine"), constant(value, "huge")]
    with pytest.raises(RewardError, match=rf"reward function 'huge' returned .* for sample 0 \(x weight {weight:g} = "
                                          rf".*weighted rewards beyond \+-1e\+10 overflow"):
        reward_table(functions, texts(), [1.0, weight])


def test_the_largest_accepted_reward_gives_finite_advantages():
    """The negative control: 1e10 passes and its group statistics stay finite (the bound is not arbitrary)."""
    from rlhf.core import grpo_advantages

    table = reward_table([constant(MAX_ABS_REWARD, "big")], texts(), [1.0])
    rewards = torch.tensor([MAX_ABS_REWARD, -MAX_ABS_REWARD, 0.0, 1.0], dtype=torch.float64)
    assert table.isfinite().all() and grpo_advantages(rewards.float(), 4).isfinite().all()


def test_a_run_with_an_overflowing_reward_stops_naming_the_function(tmp_path):
    def enormous(prompts, completions, **kwargs):
        return [1e308] * len(completions)

    trainer = make_trainer(tmp_path, reward=enormous)
    with pytest.raises(RewardError, match="reward function 'enormous' returned 1e\\+308"):
        trainer.train()


# ---------------------------------------------------------------- LoRA and the reference options

@pytest.mark.parametrize("option", [{"ref_model_dtype": "bfloat16"}, {"offload_reference": True}])
def test_lora_refuses_reference_options_it_would_ignore(tmp_path, option):
    from peft import LoraConfig

    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    with pytest.raises(ValueError, match=rf"{list(option)[0]}=.* with a LoRA actor: its reference is the base model"):
        make_trainer(tmp_path, kl_coef=0.1, trainer_kwargs={"peft_config": lora}, **option)


def test_reference_options_without_a_reference_warn(tmp_path, caplog):
    make_trainer(tmp_path, algo="reinforce", kl_coef=0.0, offload_reference=True)
    assert "offload_reference=True: there is no reference model" in caplog.text


# ---------------------------------------------------------------- the command line

def test_config_takes_exactly_one_file(tmp_path):
    path = tmp_path / "a.yaml"
    path.write_text("learning_rate: 1.0e-5\n")
    with pytest.raises(ConfigError, match=r"--config takes one YAML file, got \['.*a.yaml', 'extra'\]"):
        parse_args([ScriptArguments, GRPOConfig], ["--config", str(path), "extra"])
    with pytest.raises(ConfigError, match=r"--config takes one YAML file, got none"):
        parse_args([ScriptArguments, GRPOConfig], ["--config", "--learning_rate", "1e-5"])


def test_a_bare_flag_is_true_only_for_true_false_options():
    with pytest.raises(ConfigError, match=r"--output_dir needs a value \(e.g. --output_dir <value>\); only true/false"):
        parse_args([ScriptArguments, GRPOConfig], ["--output_dir", "--max_steps", "2"])
    with pytest.raises(ConfigError, match=r"--max_steps needs a value"):
        parse_args([ReinforceConfig], ["--max_steps"])
    (config,) = parse_args([GRPOConfig], ["--overwrite_output_dir", "--disable_tqdm", "false"])
    assert config.overwrite_output_dir is True and config.disable_tqdm is False

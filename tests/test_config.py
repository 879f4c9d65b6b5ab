"""Configs: validation messages, YAML + command line parsing, and the docs' config tables staying in sync."""

import os

import pytest

from rlhf import GRPOConfig
from rlhf.cli import ConfigError, ScriptArguments, parse_args
from rlhf.extras.docs import pages

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_yaml_then_command_line_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model_name_or_path: m\nlearning_rate: 1.0e-5\nreward_funcs: [a:b, c:d]\n"
                    "dual_clip: 3\nreward_weights: [1, 0.5]\nkl_estimator: k1\n")
    script, config = parse_args([ScriptArguments, GRPOConfig],
                                ["--config", str(path), "--learning_rate", "2e-5", "--mask_truncated_completions",
                                 "--max_new_tokens=12", "--dual_clip", "none"])
    assert script.model_name_or_path == "m" and script.reward_funcs == ["a:b", "c:d"]
    assert config.learning_rate == 2e-5 and config.max_new_tokens == 12 and config.mask_truncated_completions
    assert config.reward_weights == [1.0, 0.5] and config.dual_clip is None and config.kl_estimator == "k1"


def test_unknown_key_suggests_the_close_one(tmp_path):
    with pytest.raises(ConfigError, match="unknown option 'learning_rat' in the command line. Did you mean "
                                          "'learning_rate'"):
        parse_args([ScriptArguments, GRPOConfig], ["--learning_rat", "1e-5"])
    path = tmp_path / "c.yaml"
    path.write_text("num_generation: 4\n")
    with pytest.raises(ConfigError, match=r"unknown option 'num_generation' in .*c.yaml. Did you mean "
                                          "'num_generations'"):
        parse_args([GRPOConfig], ["--config", str(path)])


@pytest.mark.parametrize("argv, message", [
    (["--max_steps", "ten"], "max_steps='ten' must be an integer"),
    (["--learning_rate", "fast"], "learning_rate='fast' must be a number"),
    (["--loss_agg", "mean"], "loss_agg='mean' must be one of"),
    (["--disable_tqdm", "maybe"], "disable_tqdm='maybe' must be true or false"),
])
def test_bad_values_name_the_field(argv, message):
    with pytest.raises(ConfigError, match=message):
        parse_args([GRPOConfig], argv)


@pytest.mark.parametrize("overrides, message", [
    ({"prompts_per_step": 3, "num_generations": 4, "mini_batch_size": 5}, "mini_batch_size=5 must divide"),
    ({"mini_batch_size": 16, "micro_batch_size": 3}, "micro_batch_size=3 must divide"),
    ({"num_generations": 1}, "num_generations=1: GRPO compares"),
    ({"temperature": 0.0}, "temperature=0.0 must be > 0"),
    ({"clip_eps_low": 1.5}, r"clip_eps_low=1.5 must be in \[0, 1\)"),
    ({"dual_clip": 0.5}, "dual_clip=0.5 must be > 1"),
    ({"top_p": 0.0}, r"top_p=0.0 must be in \(0, 1\]"),
])
def test_validation_names_field_value_and_fix(overrides, message):
    with pytest.raises(ValueError, match=message):
        GRPOConfig(**overrides).validate()


def test_geometry_checks_the_process_count():
    with pytest.raises(ValueError, match=r"prompts_per_step=6 must be divisible by the number of processes \(4\)"):
        GRPOConfig(prompts_per_step=6).validate(num_processes=4)
    GRPOConfig(prompts_per_step=8, num_generations=4, mini_batch_size=16, micro_batch_size=4).validate(4)


def test_docs_config_tables_are_current():
    """docs/config-reference.md is what the generator writes now, and lists every field of every config."""
    import dataclasses

    from rlhf import PPOConfig, ReinforceConfig

    with open(os.path.join(ROOT, "docs", "config-reference.md")) as f:
        page = f.read()
    assert page == pages()["config-reference.md"], "docs/config-reference.md is stale: run `make docs`"
    for cls in (GRPOConfig, PPOConfig, ReinforceConfig, ScriptArguments):
        for field in dataclasses.fields(cls):
            assert f"| `{field.name}` |" in page, f"{cls.__name__}.{field.name} is missing from the reference"


def test_micro_batch_is_capped_at_the_per_process_mini_batch():
    config = GRPOConfig(prompts_per_step=32, num_generations=8, mini_batch_size=64, micro_batch_size=64)
    config.validate(num_processes=2)  # the same config on two processes: micro-batches of 32
    assert config.local_micro_batch_size(1) == 64 and config.local_micro_batch_size(2) == 32


def test_number_lists_from_yaml_and_comma_separated_flags(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("reward_weights: [1.0, 0.0]\n")
    _, parsed = parse_args([ScriptArguments, GRPOConfig], ["--config", str(config)])
    assert parsed.reward_weights == [1.0, 0.0]  # a zero weight is a weight, not an empty item
    _, parsed = parse_args([ScriptArguments, GRPOConfig], ["--reward_weights", "1,0", "--eval_pass_k", "1", "8"])
    assert parsed.reward_weights == [1.0, 0.0] and parsed.eval_pass_k == [1, 8]


def test_reward_functions_from_a_factory_in_yaml(tmp_path):
    from rlhf.cli import reward_functions_from_specs

    config = tmp_path / "c.yaml"
    config.write_text("reward_funcs:\n  - reward_models.rules:numeric_answer_reward\n"
                      "  - factory: reward_models.rules:make_soft_overlong_penalty\n"
                      "    kwargs: {max_new_tokens: 10, buffer: 4}\n")
    script, _ = parse_args([ScriptArguments, GRPOConfig], ["--config", str(config)])
    exact, overlong = reward_functions_from_specs(script.reward_funcs)
    assert exact.__name__ == "numeric_answer_reward"
    # DAPO's soft penalty: 0 up to max_new_tokens - buffer, then linear down to -1 at max_new_tokens.
    assert overlong(None, ["a"] * 3, completion_ids=[[0] * 6, [0] * 8, [0] * 10]) == [0.0, -0.5, -1.0]
    with pytest.raises(ConfigError, match=r"reward_funcs\[0\].*'factory'"):
        reward_functions_from_specs([{"function": "reward_models.rules:make_soft_overlong_penalty"}])
    with pytest.raises(ConfigError, match=r"does not take kwargs"):
        reward_functions_from_specs([{"factory": "reward_models.rules:make_soft_overlong_penalty",
                                      "kwargs": {"length": 3}}])

"""TRL's names read back from a config after construction (``args.beta``), in TRL's meaning: each gives what TRL's
own GRPOConfig, built with the same keyword, holds (its trainer's reading where TRL leaves the field None)."""

import dataclasses

import pytest

from rlhf import GRPOConfig
from rlhf.trl_table import TABLE

trl = pytest.importorskip("trl")
TRL_FIELDS = {f.name for f in dataclasses.fields(trl.GRPOConfig)}
VALUES = {"beta": 0.04, "epsilon": 0.3, "epsilon_high": 0.28, "delta": 1.5, "num_iterations": 2,
          "max_completion_length": 64, "per_device_eval_batch_size": 16, "num_generations_eval": 4,
          "loss_type": "dr_grpo", "bf16": False, "fp16": False, "per_device_train_batch_size": 4,
          "gradient_accumulation_steps": 2, "steps_per_generation": 4, "generation_batch_size": 16,
          "max_tool_calling_iterations": 3}
READABLE = [entry for entry in TABLE if entry.read is not None and entry.name in TRL_FIELDS
            and entry.kind in ("renamed", "mapped")]


def trl_value(config, name):
    """What TRL's trainer uses for ``name`` (GRPOTrainer.__init__: epsilon_high defaults to epsilon)."""
    value = getattr(config, name)
    return config.epsilon if name == "epsilon_high" and value is None else value


@pytest.mark.parametrize("entry", READABLE, ids=lambda entry: entry.name)
def test_trl_name_reads_back_as_trls_config_holds_it(entry):
    value = VALUES.get(entry.name, trl.GRPOConfig.__dataclass_fields__[entry.name].default)
    theirs = trl.GRPOConfig(output_dir="/tmp/trl-unused", use_cpu=True, num_generations=4, **{entry.name: value})
    ours = GRPOConfig(num_generations=4, **{entry.name: value})
    assert getattr(ours, entry.name) == trl_value(theirs, entry.name)


def test_renamed_names_follow_our_field_after_changes():
    config = GRPOConfig(beta=0.04, epsilon=0.3)
    config.kl_coef = 0.1
    config.epsilon_high = 0.4  # TRL's name set after construction sets ours, and reads back
    assert (config.beta, config.epsilon, config.epsilon_high, config.clip_eps_high) == (0.1, 0.3, 0.4, 0.4)
    assert len(READABLE) >= 15  # every renamed and mapped name with a value here
    assert (config.use_vllm, config.use_liger_kernel) == (False, False)  # the one value they can have here
    with pytest.raises(AttributeError, match="do_train.*TRL's name; here: no effect"):
        config.do_train  # noqa: B018 - a name with no value here says so

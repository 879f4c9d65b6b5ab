"""Build apart from run: ``build_run`` gives the typed parts of a run, a step can be driven from them without a
trainer, and the checks that need only the config live in ``RLConfig.validate``."""

import pytest
import torch

from rlhf import GRPOConfig, GRPOTrainer, PPOConfig, ReinforceConfig
from rlhf.extras.tiny import char_tokenizer, tiny_model
from rlhf.metrics import PhaseTimer, StepMetrics
from rlhf.rewards import RewardContext
from rlhf.trainer.build import RunInputs, RunParts, build_run, parts_of
from rlhf.trainer.sampling import sample_groups
from rlhf.trainer.update import update
from tests.helpers import PROMPTS, varied_reward


def config(tmp_path, name):
    return GRPOConfig(output_dir=str(tmp_path / name), max_steps=1, prompts_per_step=4, num_generations=4,
                      max_new_tokens=6, micro_batch_size=16, learning_rate=1e-2, disable_tqdm=True, seed=0,
                      write_report=False)


def inputs():
    return RunInputs(tiny_model("llama", hidden_size=32, num_layers=2, num_heads=2, seed=0), [varied_reward],
                     train_dataset=PROMPTS, processing_class=char_tokenizer())


def test_a_step_from_the_parts_matches_the_trainers_step(tmp_path):
    """Generate, score, advantages and update called on the parts alone give bit for bit the weights the trainer's
    ``run_step`` gives: the trainer adds nothing to a step that the parts do not hold."""
    parts = build_run("GRPOTrainer", config(tmp_path, "parts"), inputs())
    assert isinstance(parts, RunParts) and parts.ref_model is None and parts.critic is None
    metrics = StepMetrics()
    parts.model.eval()
    rollout, texts, rewards = sample_groups(parts.policy, parts.train_dataset, parts.sampler, 0, parts.sampling,
                                            parts.args, parts.reward_functions, parts.reward_weights,
                                            parts.accelerator, metrics, PhaseTimer(), RewardContext(parts.state),
                                            parts.rollout_fn)
    rollout.advantages, rollout.returns = parts.algorithm.advantages(rewards, rollout, parts.kl, parts.reduce, metrics)
    result = update(parts.actor, None, rollout, texts, parts.args, parts.plan, parts.kl, parts.accelerator, 0,
                    parts.guard, metrics)
    assert result.optimizer_steps == 1 and result.skipped_updates == 0
    by_hand = {k: v.clone() for k, v in parts.model.state_dict().items()}
    parts.run.release()

    given = inputs()
    trainer = GRPOTrainer(given.model, given.reward_funcs, args=config(tmp_path, "trainer"),
                          train_dataset=given.train_dataset, processing_class=given.processing_class)
    assert set(parts_of(parts)) <= set(vars(trainer))  # every part is kept under its own name
    trainer.run_step()
    trained = trainer.model.state_dict()
    initial = tiny_model("llama", hidden_size=32, num_layers=2, num_heads=2, seed=0).state_dict()
    assert any(not torch.equal(trained[k], initial[k]) for k in trained), "the step changed no weight"
    for name, value in trained.items():
        assert torch.equal(value, by_hand[name]), name


def test_for_dataset_runs_before_the_optimizer_schedule(tmp_path):
    """num_train_epochs becomes max_steps from the data before the scheduler is built over the run's length."""
    args = config(tmp_path, "epochs")
    args.num_train_epochs, args.warmup_ratio = 2.0, 0.5
    parts = build_run("GRPOTrainer", args, inputs())
    expected_steps = -(-2 * len(PROMPTS) // 4)  # ceil(epochs x prompts / prompts_per_step)
    assert parts.args.max_steps == expected_steps and parts.state.max_steps == expected_steps
    assert parts.args.warmup_steps == -(-expected_steps // 2)
    assert parts.scheduler.get_last_lr()[0] == 0.0  # warming up from 0
    parts.run.release()


@pytest.mark.parametrize("config_class, refused", [(PPOConfig, True), (GRPOConfig, False), (ReinforceConfig, False)])
def test_deepspeed_refuses_a_trained_critic_in_config_validation(config_class, refused):
    args = config_class(output_dir="unused")
    if refused:
        with pytest.raises(ValueError, match="PPO trains two models.*FSDP"):
            args.validate(deepspeed=True)
    else:
        args.validate(deepspeed=True)
    args.validate(deepspeed=False)


def test_sync_ref_model_under_sharding_is_refused_in_config_validation():
    args = GRPOConfig(output_dir="unused", kl_coef=0.1, sync_ref_model=True)
    with pytest.raises(ValueError, match="sync_ref_model=True under FSDP or DeepSpeed ZeRO-3"):
        args.validate(sharded=True)
    args.validate(sharded=False)


def test_optimizers_argument_is_refused_before_anything_loads(tmp_path):
    given = inputs()
    given.optimizers = (torch.optim.SGD(given.model.parameters(), lr=0.1), None)
    with pytest.raises(ValueError, match="optimizers: the trainer builds its own AdamW"):
        build_run("GRPOTrainer", config(tmp_path, "optim"), given)
    assert not (tmp_path / "optim").exists()  # refused before the output directory was claimed

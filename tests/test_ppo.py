"""PPO: the critic, GAE targets, the first on-policy pass, warm-up, early stop and KL control."""

import torch
from helpers import (
    flat_grad,
    gradient,
    make_trainer,
    policy_gradient_reference,
    relative_error,
)
from transformers import LlamaConfig, LlamaForSequenceClassification

from rlhf import ValueModel
from rlhf.critic import completion_values
from rlhf.metrics import StepMetrics
from rlhf.extras.tiny import PAD_ID
from rlhf.trainer.kl import AdaptiveKLController


def exact_reward(prompts, completions, **kwargs):
    return [float(len(c) % 3) for c in completions]


def test_first_pass_ratio_is_one_value_clip_inactive_and_gradient_is_reinforce(tmp_path):
    """One epoch, one mini-batch, a KL reward (so the old log-probs come from a separate pass): the ratio is
    exactly 1, no value is clipped, and the actor's gradient is the plain policy gradient with the GAE
    advantages."""
    trainer = make_trainer(tmp_path, algo="ppo", kl_coef=0.05)
    batch, _ = trainer.make_rollout(0)
    assert batch.old_logprobs is not None and batch.old_values is not None
    metrics = StepMetrics()
    gradient(trainer, batch, metrics)
    stats = metrics.reduce()
    assert stats["policy/ratio_mean"] == 1.0 and stats["policy/ratio_max"] == 1.0
    assert stats["critic/value_clip_frac"] == 0.0
    actor_grad = flat_grad(trainer.model)
    reference, _ = policy_gradient_reference(trainer.model, batch)
    assert relative_error(actor_grad, reference) < 1e-5


def test_returns_are_the_sequence_reward_when_gamma_and_lambda_are_one(tmp_path):
    """No KL, gamma = lambda = 1: every valid token's return is the sequence reward (independent of the
    values), and whitened advantages have mean 0 and std 1 over the valid tokens."""
    trainer = make_trainer(tmp_path, algo="ppo", kl_coef=0.0, gamma=1.0, gae_lambda=1.0, reward=exact_reward)
    batch, _ = trainer.make_rollout(0)
    mask = batch.completion_mask.bool()
    lengths = mask.sum(dim=1)
    texts = trainer.tokenizer.batch_decode([r[:n] for r, n in zip(batch.completion_ids.tolist(), lengths.tolist())],
                                           skip_special_tokens=True)
    rewards = torch.tensor(exact_reward(None, texts)).unsqueeze(1).expand_as(mask)
    torch.testing.assert_close(batch.returns[mask], rewards[mask].to(batch.returns.dtype))
    advantages = batch.advantages[mask].double()
    assert abs(advantages.mean().item()) < 1e-6 and abs(advantages.std().item() - 1) < 1e-4
    assert (batch.advantages[~mask] == 0).all()


def test_returns_are_computed_before_whitening(tmp_path):
    trainer = make_trainer(tmp_path, algo="ppo", kl_coef=0.05, gamma=0.9, gae_lambda=0.8)
    batch, _ = trainer.make_rollout(0)
    mask = batch.completion_mask.bool()
    # returns - values is GAE's raw advantage; whitening it must give the stored advantages.
    raw = (batch.returns - batch.old_values)[mask].double()
    torch.testing.assert_close(batch.advantages[mask].double(), (raw - raw.mean()) / raw.std(), atol=1e-5, rtol=0)


def test_critic_starts_near_zero_and_round_trips_exactly(tmp_path):
    trainer = make_trainer(tmp_path, algo="ppo")
    batch, _ = trainer.make_rollout(0)
    mask = batch.completion_mask.bool()
    assert batch.old_values[mask].abs().mean() < 0.5
    trainer.training_step()  # change the critic from its initial state
    path = trainer.save_critic(str(tmp_path / "critic"))
    reloaded = ValueModel.from_pretrained(path).eval()
    args = (batch.prompt_ids, batch.prompt_mask, batch.completion_ids, batch.completion_mask)
    with torch.no_grad():
        assert torch.equal(completion_values(reloaded, *args), completion_values(trainer.unwrapped_critic.eval(), *args))


def test_value_model_from_a_reward_model_keeps_its_head(tmp_path):
    config = LlamaConfig(vocab_size=102, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, num_labels=1, pad_token_id=PAD_ID)
    torch.manual_seed(0)
    reward_model = LlamaForSequenceClassification(config).eval()
    reward_model.save_pretrained(tmp_path / "rm")
    critic = ValueModel.from_pretrained(str(tmp_path / "rm")).eval()
    ids = torch.tensor([[1, 20, 21, 22, 23]])
    with torch.no_grad():
        assert torch.allclose(critic(ids).values[0, -1], reward_model(input_ids=ids).logits[0, 0], atol=1e-5)
        from_object = make_trainer(tmp_path / "run", algo="ppo", trainer_kwargs={"value_model": reward_model}).critic
        assert torch.allclose(from_object(ids).values[0, -1], reward_model(input_ids=ids).logits[0, 0], atol=1e-5)


def test_critic_warmup_trains_only_the_critic(tmp_path):
    trainer = make_trainer(tmp_path, algo="ppo", critic_warmup_steps=1, max_steps=2)
    actor_before = [p.detach().clone() for p in trainer.model.parameters()]
    critic_before = [p.detach().clone() for p in trainer.critic.parameters()]
    trainer.training_step()
    trainer.step += 1
    assert all(torch.equal(a, b) for a, b in zip(actor_before, trainer.model.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(critic_before, trainer.critic.parameters()))
    trainer.training_step()  # after the warm-up the actor trains too
    assert any(not torch.equal(a, b) for a, b in zip(actor_before, trainer.model.parameters()))


def test_target_kl_stops_the_epochs_early(tmp_path):
    trainer = make_trainer(tmp_path, algo="ppo", num_epochs=4, mini_batch_size=8, micro_batch_size=8,
                           target_kl=1e-12)
    metrics = trainer.training_step()
    assert metrics["policy/early_stopped"] == 1.0
    # The first mini-batch is on the rollout policy (KL 0); the second exceeds the target and ends the step.
    assert trainer.scheduler.last_epoch == 2


def test_adaptive_kl_controller_matches_its_formula():
    controller = AdaptiveKLController(target=6.0, horizon=10000)
    assert controller.update(0.1, kl=6.0, num_samples=512) == 0.1
    assert abs(controller.update(0.1, kl=24.0, num_samples=512) - 0.1 * (1 + 0.2 * 512 / 10000)) < 1e-15
    assert abs(controller.update(0.1, kl=3.0, num_samples=100) - 0.1 * (1 - 0.2 * 100 / 10000)) < 1e-15


def test_adaptive_kl_coef_follows_the_logged_kl(tmp_path):
    trainer = make_trainer(tmp_path, algo="ppo", kl_coef=0.05, kl_target=0.01, kl_horizon=10, max_steps=4)
    records = trainer.train().records
    controller, samples = AdaptiveKLController(0.01, 10), trainer.args.rollout_batch_size
    assert records[0]["kl_coef"] == 0.05 and len({r["kl_coef"] for r in records}) == 4
    for before, after in zip(records, records[1:]):
        assert after["kl_coef"] == controller.update(before["kl_coef"], before["kl/sequence"], samples)


def test_resume_restores_critic_and_kl_coef_exactly(tmp_path):
    common = dict(algo="ppo", max_steps=4, num_epochs=2, mini_batch_size=8, micro_batch_size=4, save_steps=2,
                  kl_coef=0.05, kl_target=0.01, kl_horizon=100)
    straight = make_trainer(tmp_path / "straight", **common)
    straight.train()
    make_trainer(tmp_path / "resumed", **{**common, "max_steps": 2}).train()
    # Resuming starts from the same initial model (it is also the reference); the trained weights must come
    # from the checkpoint.
    initial_head = make_trainer(tmp_path / "fresh", **common).critic.value_head.weight.detach().clone()
    resumed = make_trainer(tmp_path / "resumed", resume_from_checkpoint="latest", **common)
    assert not torch.equal(resumed.critic.value_head.weight, initial_head)
    resumed.train()
    assert resumed.kl_coef == straight.kl_coef
    for a, b in zip(list(straight.model.parameters()) + list(straight.critic.parameters()),
                    list(resumed.model.parameters()) + list(resumed.critic.parameters())):
        assert torch.equal(a, b)


def test_kl_in_the_loss_leaves_the_rewards_alone(tmp_path):
    """kl_in="loss": the returns are the bare sequence reward (gamma = lambda = 1), and the KL is trained and
    logged from the loss (0 on the first pass, when the policy is the reference)."""
    trainer = make_trainer(tmp_path, algo="ppo", kl_coef=0.5, kl_in="loss", kl_estimator="k3", gamma=1.0,
                           gae_lambda=1.0, reward=exact_reward)
    batch, _ = trainer.make_rollout(0)
    mask = batch.completion_mask.bool()
    lengths = mask.sum(dim=1).tolist()
    texts = trainer.tokenizer.batch_decode([r[:n] for r, n in zip(batch.completion_ids.tolist(), lengths)],
                                           skip_special_tokens=True)
    rewards = torch.tensor(exact_reward(None, texts)).unsqueeze(1).expand_as(mask)
    torch.testing.assert_close(batch.returns[mask], rewards[mask].to(batch.returns.dtype))
    metrics = StepMetrics()
    gradient(trainer, batch, metrics)
    assert metrics.reduce()["kl"] == 0.0

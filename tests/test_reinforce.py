"""REINFORCE baselines against their formulas written out, and the plain policy gradient."""

import pytest
import torch
from helpers import (
    flat_grad,
    gradient,
    make_trainer,
    policy_gradient_reference,
    relative_error,
)

from rlhf.metrics import StepMetrics


def length_reward(prompts, completions, **kwargs):
    return [float(len(c) % 4) for c in completions]


def sequence_rewards(trainer, batch):
    lengths = batch.completion_mask.sum(dim=1).tolist()
    texts = trainer.tokenizer.batch_decode([r[:n] for r, n in zip(batch.completion_ids.tolist(), lengths)],
                                           skip_special_tokens=True)
    return torch.tensor(length_reward(None, texts), dtype=torch.float64), lengths


def discounted(reward_at_end: float, length: int, gamma: float) -> list[float]:
    """Reward-to-go of a row whose only reward is on its last token: gamma^(L-1-t) * R."""
    return [gamma ** (length - 1 - t) * reward_at_end for t in range(length)]


@pytest.mark.parametrize("baseline", ["none", "mean", "rloo"])
def test_baselines_match_their_formulas(tmp_path, baseline):
    gamma, group = 0.9, 4
    trainer = make_trainer(tmp_path, algo="reinforce", baseline=baseline, gamma=gamma, kl_coef=0.0,
                           reward=length_reward)
    batch, _ = trainer.make_rollout(0)
    rewards, lengths = sequence_rewards(trainer, batch)
    for i, n in enumerate(lengths):
        if baseline == "none":
            r = rewards[i]
        elif baseline == "mean":
            r = rewards[i] - rewards.mean()
        else:
            g = i // group
            others = [rewards[j] for j in range(g * group, (g + 1) * group) if j != i]
            r = rewards[i] - sum(others) / len(others)
        expected = torch.tensor(discounted(float(r), n, gamma), dtype=torch.float32)
        torch.testing.assert_close(batch.advantages[i, :n], expected, atol=1e-6, rtol=1e-6)
        assert (batch.advantages[i, n:] == 0).all()


def test_reinforce_plus_plus_whitens_kl_shaped_returns(tmp_path):
    gamma, beta = 0.95, 0.1
    trainer = make_trainer(tmp_path, algo="reinforce", baseline="reinforce++", gamma=gamma, kl_coef=beta,
                           reward=length_reward, num_epochs=2)
    batch, _ = trainer.make_rollout(0)
    with torch.no_grad():  # make the policy differ from the reference so that the KL terms are not zero
        batch.old_logprobs = batch.old_logprobs + 0.3 * torch.randn_like(batch.old_logprobs)
        batch.advantages, _ = trainer.algorithm.advantages(sequence_rewards(trainer, batch)[0], batch, trainer.kl,
                                                           trainer.reduce, StepMetrics())
    rewards, lengths = sequence_rewards(trainer, batch)
    returns = []
    for i, n in enumerate(lengths):
        kl = (batch.old_logprobs[i, :n] - batch.ref_logprobs[i, :n]).double()  # k1
        token_rewards = -beta * kl
        token_rewards[n - 1] += rewards[i]
        running, row = 0.0, []
        for t in reversed(range(n)):
            running = token_rewards[t] + gamma * running
            row.append(running)
        returns.extend(reversed(row))
    returns = torch.stack(returns)
    expected = (returns - returns.mean()) / returns.std()
    mask = batch.completion_mask.bool()
    torch.testing.assert_close(batch.advantages[mask].double(), expected, atol=1e-5, rtol=0)


def test_reinforce_plus_plus_baseline_subtracts_the_group_mean_then_whitens(tmp_path):
    """REINFORCE++-baseline (OpenRLHF's reinforce_baseline) written out: r_i - mean of its prompt's group on the last
    token, minus beta * KL on every token, reward-to-go, then whitened over every valid token of the batch."""
    gamma, beta, group = 0.95, 0.1, 4
    trainer = make_trainer(tmp_path, algo="reinforce", baseline="reinforce++-baseline", gamma=gamma, kl_coef=beta,
                           reward=length_reward, num_epochs=2)
    batch, _ = trainer.make_rollout(0)
    with torch.no_grad():  # make the policy differ from the reference so that the KL terms are not zero
        batch.old_logprobs = batch.old_logprobs + 0.3 * torch.randn_like(batch.old_logprobs)
        batch.advantages, _ = trainer.algorithm.advantages(sequence_rewards(trainer, batch)[0], batch, trainer.kl,
                                                           trainer.reduce, StepMetrics())
    rewards, lengths = sequence_rewards(trainer, batch)
    assert len(set(rewards.tolist())) > 1
    returns = []
    for i, n in enumerate(lengths):
        g = i // group
        baseline = sum(rewards[j] for j in range(g * group, (g + 1) * group)) / group
        token_rewards = -beta * (batch.old_logprobs[i, :n] - batch.ref_logprobs[i, :n]).double()
        token_rewards[n - 1] += rewards[i] - baseline
        running, row = 0.0, []
        for t in reversed(range(n)):
            running = token_rewards[t] + gamma * running
            row.append(running)
        returns.extend(reversed(row))
    returns = torch.stack(returns)
    expected = (returns - returns.mean()) / returns.std()
    mask = batch.completion_mask.bool()
    torch.testing.assert_close(batch.advantages[mask].double(), expected, atol=1e-5, rtol=0)
    # Negative control: without the group baseline (plain REINFORCE++) the advantages differ.
    trainer.algorithm.baseline = "reinforce++"
    plain, _ = trainer.algorithm.advantages(rewards, batch, trainer.kl, trainer.reduce, StepMetrics())
    assert (plain[mask].double() - expected).abs().max() > 1e-2


def test_reinforce_plus_plus_baseline_needs_groups(tmp_path):
    with pytest.raises(ValueError, match="reinforce\\+\\+-baseline baseline subtracts"):
        make_trainer(tmp_path, algo="reinforce", baseline="reinforce++-baseline", num_generations=1)


def test_one_epoch_is_the_plain_policy_gradient(tmp_path):
    trainer = make_trainer(tmp_path, algo="reinforce", baseline="rloo", kl_coef=0.05, gamma=0.9)
    batch, _ = trainer.make_rollout(0)
    metrics = StepMetrics()
    grad = gradient(trainer, batch, metrics)
    stats = metrics.reduce()
    assert stats["policy/ratio_mean"] == 1.0 and stats["policy/ratio_max"] == 1.0
    reference, _ = policy_gradient_reference(trainer.model, batch)
    assert relative_error(grad, reference) < 1e-5


def test_more_epochs_use_clipped_ratios(tmp_path):
    trainer = make_trainer(tmp_path, algo="reinforce", num_epochs=4, mini_batch_size=8, micro_batch_size=8,
                           learning_rate=5e-2, clip_eps_low=0.01, clip_eps_high=0.01)
    metrics = trainer.training_step()
    assert metrics["policy/ratio_max"] > 1.0 and metrics["clip/low_frac"] + metrics["clip/high_frac"] > 0


def test_rloo_needs_two_generations(tmp_path):
    with pytest.raises(ValueError, match="rloo baseline leaves one completion out"):
        make_trainer(tmp_path, algo="reinforce", baseline="rloo", num_generations=1, prompts_per_step=4)


def test_flat_grad_helper_sees_every_trained_parameter(tmp_path):
    trainer = make_trainer(tmp_path, algo="reinforce")
    gradient(trainer, trainer.make_rollout(0)[0])
    assert flat_grad(trainer.model).numel() == sum(p.numel() for p in trainer.model.parameters())

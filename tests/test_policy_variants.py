"""The policy-gradient variants in the trainer, each against an independent path: GSPO, CISPO, the rollout
correction, entropy-selected tokens. Per-sequence scoring without padding (full log-softmax) is the reference."""

import math

import pytest
import torch
from helpers import gradient, independent_lengths, make_trainer, policy_gradient_reference, relative_error

from rlhf.core import rollout_correction
from rlhf.metrics import StepMetrics
from rlhf.rollout import generate_rollout
from rlhf.trainer.scoring import rollout_logprobs


def sequence_scores(model, batch, i, temperature=1.0):
    """(log-probs, entropies) of completion i, scored alone without padding through the full logits."""
    n = independent_lengths(batch.completion_ids)[i]
    prompt = batch.prompt_ids[i][batch.prompt_mask[i].bool()]
    completion = batch.completion_ids[i, :n]
    logits = model(input_ids=torch.cat([prompt, completion]).unsqueeze(0)).logits[0, len(prompt) - 1: -1]
    all_logprobs = torch.log_softmax(logits.float() / temperature, -1)
    entropy = -(all_logprobs.exp() * all_logprobs).sum(-1)
    return all_logprobs.gather(-1, completion.unsqueeze(-1)).squeeze(-1), entropy


def weighted_policy_gradient(model, batch, mask, weights=None):
    """-sum over the tokens of ``mask`` of w * A * grad log p, divided by their number: the first on-policy pass of
    the token-mean loss, sequence by sequence."""
    model.zero_grad(set_to_none=True)
    loss = 0.0
    for i, n in enumerate(independent_lengths(batch.completion_ids)):
        logprobs, _ = sequence_scores(model, batch, i)
        advantages = batch.advantages[i] if batch.advantages.dim() == 1 else batch.advantages[i, :n]
        w = weights[i, :n] if weights is not None else 1.0
        loss = loss - (mask[i, :n] * w * advantages * logprobs).sum()
    (loss / mask.sum()).backward()
    return torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])


# ---------------------------------------------------------------- GSPO

@pytest.mark.parametrize("level", ["sequence", "sequence_token"])
def test_gspo_first_pass_has_ratio_one_and_the_sequence_mean_policy_gradient(tmp_path, level):
    """On the first on-policy pass the sequence ratio is exactly 1 and the gradient is
    -(1/B) sum_i A_i mean_t grad log p_it (GSPO's, at s = 1), computed sequence by sequence."""
    trainer = make_trainer(tmp_path, importance_sampling_level=level, loss_agg="seq-mean-token-mean")
    batch, _ = trainer.make_rollout(0)
    metrics = StepMetrics()
    grad = gradient(trainer, batch, metrics)
    stats = metrics.reduce()
    assert stats["policy/ratio_mean"] == 1.0 and stats["policy/ratio_max"] == 1.0
    model = trainer.model
    model.zero_grad(set_to_none=True)
    lengths = independent_lengths(batch.completion_ids)
    loss = sum(-batch.advantages[i] * sequence_scores(model, batch, i)[0].mean() for i in range(len(lengths)))
    (loss / len(lengths)).backward()
    reference = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    assert relative_error(grad, reference) < 1e-5
    # Negative control: the token-mean policy gradient weighs long sequences more; it is another gradient.
    token_mean, _ = policy_gradient_reference(model, batch)
    assert relative_error(token_mean, reference) > 1e-2


def test_gspo_token_with_sequence_advantages_trains_like_gspo_off_policy(tmp_path):
    grads = {}
    for level in ("sequence", "sequence_token"):
        trainer = make_trainer(tmp_path / level, importance_sampling_level=level, loss_agg="seq-mean-token-mean",
                               num_epochs=2, clip_eps_low=0.01, clip_eps_high=0.01)
        batch, _ = trainer.make_rollout(0)
        perturb(trainer.model)
        metrics = StepMetrics()
        grads[level] = gradient(trainer, batch, metrics)
        assert metrics.reduce()["clip/high_frac"] + metrics.reduce()["clip/low_frac"] > 0
    assert relative_error(grads["sequence_token"], grads["sequence"]) < 1e-6


def perturb(model, scale=0.05):
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * scale)


# ---------------------------------------------------------------- CISPO

def test_cispo_first_pass_is_the_reinforce_gradient(tmp_path):
    trainer = make_trainer(tmp_path, policy_loss_type="cispo")
    batch, _ = trainer.make_rollout(0)
    grad = gradient(trainer, batch)
    reference, _ = policy_gradient_reference(trainer.model, batch)
    assert relative_error(grad, reference) < 1e-5


def test_cispo_trains_where_ppos_clip_leaves_no_gradient(tmp_path):
    """Old log-probs set so that every ratio sits past the clip in the direction its advantage favours: PPO's
    gradient is exactly 0; CISPO's is the REINFORCE gradient with the weights held at the bounds."""
    grads = {}
    for loss_type in ("ppo", "cispo"):
        trainer = make_trainer(tmp_path / loss_type, policy_loss_type=loss_type, num_epochs=2)
        batch, _ = trainer.make_rollout(0)
        batch.old_logprobs = batch.old_logprobs - 0.5 * batch.advantages.sign().unsqueeze(1)
        metrics = StepMetrics()
        grads[loss_type] = gradient(trainer, batch, metrics)
        weights = torch.where(batch.advantages > 0, 1.2, 0.8).unsqueeze(1).expand_as(batch.loss_mask)
    assert torch.equal(grads["ppo"], torch.zeros_like(grads["ppo"]))
    assert metrics.reduce()["clip/high_frac"] + metrics.reduce()["clip/low_frac"] == pytest.approx(1.0)
    reference = weighted_policy_gradient(trainer.model, batch, batch.loss_mask, weights)
    assert grads["cispo"].norm() > 0 and relative_error(grads["cispo"], reference) < 1e-5


# ---------------------------------------------------------------- the rollout correction

def reference_sampling_logprobs(model, batch, i, temperature, top_k, top_p):
    """The sampled distribution written out: logits / T, keep the top k, then the smallest set of most likely tokens
    whose probability reaches top_p, renormalised; the log-prob of each completion token."""
    n = independent_lengths(batch.completion_ids)[i]
    prompt = batch.prompt_ids[i][batch.prompt_mask[i].bool()]
    completion = batch.completion_ids[i, :n]
    logits = model(input_ids=torch.cat([prompt, completion]).unsqueeze(0)).logits[0, len(prompt) - 1: -1]
    out = []
    for position, token in enumerate(completion.tolist()):
        scores = logits[position].double() / temperature
        order = torch.argsort(scores, descending=True)[:top_k]
        probs = torch.softmax(scores[order], -1)
        keep = int((torch.cumsum(probs, 0) < top_p).sum()) + 1
        kept = order[:keep].tolist()
        assert token in kept  # the sampler never draws outside what it keeps
        out.append(torch.log_softmax(scores[kept], -1)[kept.index(token)].item())
    return torch.tensor(out)


def test_sampler_logprobs_are_the_renormalised_top_k_top_p_distribution(tmp_path):
    trainer = make_trainer(tmp_path, temperature=0.7, top_k=8, top_p=0.8, max_new_tokens=5)
    batch, _ = trainer.make_rollout(0)
    with torch.no_grad():
        for i, n in enumerate(independent_lengths(batch.completion_ids)):
            expected = reference_sampling_logprobs(trainer.model, batch, i, 0.7, 8, 0.8)
            torch.testing.assert_close(batch.sampler_logprobs[i, :n].double(), expected.double(), atol=1e-5, rtol=0)
            assert (batch.sampler_logprobs[i, n:] == 0).all()


def test_correction_is_neutral_when_the_sampler_is_the_trainer(tmp_path):
    """CPU fp32: the sampler's log-probs are the trainer's to rounding (generation's cached decode vs one full
    forward: a few 1e-7 at most), so the weights are 1 within 1e-5 and no sequence is masked. With the trainer's own
    log-probs as the sampler's (a sampler that is the trainer bit for bit) the weights are exactly 1 and the
    gradient is the uncorrected one, bit for bit."""
    trainer = make_trainer(tmp_path, rollout_correction="token_truncate")
    batch, _ = trainer.make_rollout(0)
    valid = batch.loss_mask.bool()
    assert (batch.correction_weights[valid] - 1).abs().max() < 1e-5
    assert (batch.old_logprobs - batch.sampler_logprobs)[valid].abs().max() < 1e-5
    _, keep = rollout_correction(batch.old_logprobs, batch.sampler_logprobs, batch.loss_mask, "sequence_mask", 1.01)
    assert keep.all()
    weights, keep = rollout_correction(batch.old_logprobs, batch.old_logprobs.clone(), batch.loss_mask,
                                       "token_truncate", 2.0)
    assert torch.equal(weights, batch.loss_mask.float()) and keep.all()
    batch.correction_weights = weights
    corrected = gradient(trainer, batch)
    batch.correction_weights = None
    assert torch.equal(corrected, gradient(trainer, batch))


def test_correction_weights_move_away_from_one_under_bf16_sampling(tmp_path):
    """The same policy sampled under bf16 autocast and scored in fp32: the mismatch is visible (> 1e-4 nats on
    average, 100 times fp32's bound above) and the truncated weights are not 1; the first-pass gradient is the
    weighted policy gradient."""
    trainer = make_trainer(tmp_path, rollout_correction="token_truncate", rollout_correction_cap=1.001)
    rows = trainer.train_dataset[trainer.sampler.indices(0)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        batch, _ = generate_rollout(trainer.policy, rows, trainer.sampling, trainer.args.num_generations)
    old = rollout_logprobs(trainer.model, batch, trainer.plan, 1.0)
    valid = batch.completion_mask.bool()
    assert (old - batch.sampler_logprobs)[valid].abs().mean() > 1e-4
    weights, _ = rollout_correction(old, batch.sampler_logprobs, batch.completion_mask, "token_truncate", 1.001)
    assert (weights[valid] != 1).float().mean() > 0.9 and (weights[valid] == 1.001).any()
    assert weights.max() <= 1.001
    batch.advantages = torch.linspace(-1, 1, batch.size)
    batch.correction_weights = weights
    grad = gradient(trainer, batch)
    assert relative_error(grad, weighted_policy_gradient(trainer.model, batch, batch.loss_mask, weights)) < 1e-5


def test_a_step_logs_the_mismatch_with_or_without_a_correction(tmp_path):
    """Top-k sampling against full-distribution scoring: every row's ratio is below 1 / cap, so sequence masking
    drops them all and says so; without a correction (on-policy, measured in the update) the same is logged."""
    names = ("rollout/abs_log_ratio", "rollout/k3", "rollout/truncated_frac", "rollout/masked_frac",
             "rollout/max_abs_log_ratio")
    for mode in ("token_truncate", "sequence_mask", None):
        metrics = make_trainer(tmp_path / str(mode), top_k=3, rollout_correction=mode).training_step()
        assert all(name in metrics for name in names) and metrics["rollout/abs_log_ratio"] > 0.1
        assert metrics["rollout/masked_frac"] == 1.0 and metrics["rollout/truncated_frac"] == 0.0
    plain = make_trainer(tmp_path / "plain").training_step()
    assert plain["rollout/abs_log_ratio"] < 1e-5 and plain["rollout/masked_frac"] == 0.0


# ---------------------------------------------------------------- entropy-selected tokens

@pytest.mark.parametrize("fraction", [0.2, 0.5])
def test_entropy_selection_keeps_exactly_the_highest_entropy_fraction(tmp_path, fraction):
    trainer = make_trainer(tmp_path, top_entropy_quantile=fraction)
    batch, _ = trainer.make_rollout(0)
    lengths = independent_lengths(batch.completion_ids)
    kept, dropped = [], []
    with torch.no_grad():
        for i, n in enumerate(lengths):
            _, entropy = sequence_scores(trainer.model, batch, i)
            kept += entropy[batch.loss_mask[i, :n].bool()].tolist()
            dropped += entropy[~batch.loss_mask[i, :n].bool()].tolist()
    assert len(kept) == math.ceil(fraction * sum(lengths)) and len(kept) + len(dropped) == sum(lengths)
    assert min(kept) >= max(dropped) - 1e-5
    # The others are out of the loss and of its token count: the gradient is the policy gradient of the kept
    # tokens, divided by their number.
    grad = gradient(trainer, batch)
    assert relative_error(grad, weighted_policy_gradient(trainer.model, batch, batch.loss_mask)) < 1e-5


# ---------------------------------------------------------------- micro-batch invariance of every new loss

VARIANTS = {
    "gspo": dict(importance_sampling_level="sequence", loss_agg="seq-mean-token-mean"),
    "gspo_token": dict(importance_sampling_level="sequence_token"),
    "cispo": dict(policy_loss_type="cispo", clip_eps_low=0.05, clip_eps_high=0.05),
    "token_truncate": dict(rollout_correction="token_truncate", top_k=20),
    "sequence_mask": dict(rollout_correction="sequence_mask", rollout_correction_cap=1.84, top_p=0.9),  # drops 5 of 16
    "entropy": dict(top_entropy_quantile=0.3, kl_coef=0.1, entropy_coef=0.01),
    "reinforce_pp_baseline": dict(algo="reinforce", baseline="reinforce++-baseline"),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_gradient_does_not_depend_on_micro_batch_size(tmp_path, variant):
    trainer = make_trainer(tmp_path, num_epochs=2, **VARIANTS[variant])
    batch, _ = trainer.make_rollout(0)
    if variant in ("sequence_mask", "entropy"):  # the variant does leave tokens out
        assert 0 < batch.loss_mask.sum() < batch.completion_mask.sum()
    perturb(trainer.model)
    grads = {}
    for size in (1, 2, batch.size):
        trainer.args.micro_batch_size = size
        grads[size] = gradient(trainer, batch)
    assert grads[1].norm() > 0
    assert relative_error(grads[1], grads[batch.size]) < 1e-6 and relative_error(grads[2], grads[batch.size]) < 1e-6

"""The policy-gradient variants in the trainer, each against an independent path: GSPO, CISPO, the rollout
correction, entropy-selected tokens. Per-sequence scoring without padding (full log-softmax) is the reference."""

import math

import pytest
import torch
from helpers import (gradient, independent_lengths, make_trainer, policy_gradient_reference, relative_error,
                     with_varied_lengths)

from rlhf.core import rollout_correction
from rlhf.metrics import StepMetrics
from rlhf.rollout import generate_rollout
from rlhf.trainer.passes import rollout_logprobs


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
    batch = with_varied_lengths(trainer.make_rollout(0)[0])
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

def independent_selection(model, batch, fraction):
    """[B, T] 1 on the ceil(fraction * N) valid tokens of highest entropy, each sequence scored alone, by sorting a
    list. Asserts that the choice is clear (no entropy within 1e-5 of the threshold on the other side)."""
    scored = []
    with torch.no_grad():
        for i, n in enumerate(independent_lengths(batch.completion_ids)):
            _, entropy = sequence_scores(model, batch, i)
            scored += [(entropy[t].item(), i, t) for t in range(n)]
    scored.sort(key=lambda e: -e[0])
    keep = math.ceil(fraction * len(scored))
    assert keep == len(scored) or scored[keep - 1][0] - scored[keep][0] > 1e-5
    selected = torch.zeros(batch.completion_ids.shape)
    for _, i, t in scored[:keep]:
        selected[i, t] = 1.0
    return selected


@pytest.mark.parametrize("fraction", [0.2, 0.5])
def test_entropy_selection_zeroes_the_others_loss_but_keeps_them_in_the_token_count(tmp_path, fraction):
    """Wang et al. 2025 (and TRL's top_entropy_quantile): the policy loss of the tokens outside the highest-entropy
    fraction is multiplied by 0, the normaliser stays every valid completion token. First on-policy pass:
    -sum_{selected} A grad log p / N_all, sequence by sequence. Negative control: dividing by the selected tokens
    only (the ``top_entropy_normalization="selected"`` rule) is another gradient, about 1 / fraction larger."""
    trainer = make_trainer(tmp_path, top_entropy_quantile=fraction)
    batch, _ = trainer.make_rollout(0)
    selected = independent_selection(trainer.model, batch, fraction)
    grad = gradient(trainer, batch)
    reference = weighted_policy_gradient(trainer.model, batch, batch.completion_mask, selected)
    assert relative_error(grad, reference) < 1e-5
    assert relative_error(weighted_policy_gradient(trainer.model, batch, selected), reference) > 0.5
    assert torch.equal(batch.selected_tokens.float(), selected) and torch.equal(batch.loss_mask, batch.completion_mask)


def test_entropy_selection_counted_over_the_selected_tokens_on_request(tmp_path):
    """``top_entropy_normalization="selected"``: the others leave the loss and its token count (-sum_{selected} A
    grad log p / N_selected)."""
    trainer = make_trainer(tmp_path, top_entropy_quantile=0.3, top_entropy_normalization="selected")
    batch, _ = trainer.make_rollout(0)
    selected = independent_selection(trainer.model, batch, 0.3)
    assert torch.equal(batch.loss_mask.float(), selected)
    assert relative_error(gradient(trainer, batch), weighted_policy_gradient(trainer.model, batch, selected)) < 1e-5


def gspo_selected_gradient(model, batch, selected, clip_eps, ratio_tokens):
    """GSPO with entropy-selected tokens, by loop: s_i = exp(mean over the tokens of ``ratio_tokens`` ([B, T]) of
    log p - log p_old), l_i = max(-A_i s_i, -A_i clip(s_i, 1 - eps, 1 + eps)) at each selected token of row i; the
    sum over rows, divided by every valid token (token-mean). Returns (gradient, [B] bool: row i clipped)."""
    model.zero_grad(set_to_none=True)
    loss, clipped = 0.0, []
    for i, n in enumerate(independent_lengths(batch.completion_ids)):
        logprobs, _ = sequence_scores(model, batch, i)
        tokens = ratio_tokens[i, :n].bool()
        if not tokens.any():  # the row has no selected token: no ratio, no loss
            clipped.append(False)
            continue
        s = torch.exp((logprobs - batch.old_logprobs[i, :n])[tokens].mean())
        a = batch.advantages[i]
        loss = loss + selected[i, :n].sum() * torch.maximum(-a * s, -a * s.clamp(1 - clip_eps, 1 + clip_eps))
        clipped.append(bool(abs(s.item() - 1) > clip_eps))
    (loss / batch.completion_mask.sum()).backward()
    return torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None]), torch.tensor(clipped)


@pytest.mark.parametrize("normalization", ["completion", "selected"])
def test_gspo_sequence_ratio_spans_the_whole_completion_under_entropy_selection(tmp_path, normalization):
    """GSPO (Zheng et al. 2025) and TRL take the sequence ratio over all of a completion's tokens; the entropy
    selection only chooses which tokens carry the loss, whatever counts them. Compared by direction (token-mean: the
    normaliser is a constant, the previous tests'); the negative control, the ratio over the selected tokens only,
    clips other rows."""
    eps = 0.02
    trainer = make_trainer(tmp_path, importance_sampling_level="sequence", top_entropy_quantile=0.3, num_epochs=2,
                           clip_eps_low=eps, clip_eps_high=eps, top_entropy_normalization=normalization)
    batch, _ = trainer.make_rollout(0)
    selected = independent_selection(trainer.model, batch, 0.3)
    perturb(trainer.model)
    grad = gradient(trainer, batch)
    reference, clipped = gspo_selected_gradient(trainer.model, batch, selected, eps, batch.completion_mask)
    naive, naive_clipped = gspo_selected_gradient(trainer.model, batch, selected, eps, selected)
    assert 0 < clipped.sum() < len(clipped) and (clipped != naive_clipped).any()
    assert relative_error(grad / grad.norm(), reference / reference.norm()) < 1e-5
    assert relative_error(naive / naive.norm(), reference / reference.norm()) > 1e-2


# ---------------------------------------------------------------- micro-batch invariance of every new loss

VARIANTS = {
    "gspo": dict(importance_sampling_level="sequence", loss_agg="seq-mean-token-mean"),
    "gspo_token": dict(importance_sampling_level="sequence_token"),
    "cispo": dict(policy_loss_type="cispo", clip_eps_low=0.05, clip_eps_high=0.05),
    "token_truncate": dict(rollout_correction="token_truncate", top_k=20),
    "sequence_mask": dict(rollout_correction="sequence_mask", rollout_correction_cap=1.84, top_p=0.9),  # drops 5 of 16
    "entropy": dict(top_entropy_quantile=0.3, kl_coef=0.1, entropy_coef=0.01),
    "entropy_selected": dict(top_entropy_quantile=0.3, top_entropy_normalization="selected", kl_coef=0.1,
                             entropy_coef=0.01, importance_sampling_level="sequence_token"),
    "reinforce_pp_baseline": dict(algo="reinforce", baseline="reinforce++-baseline"),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_gradient_does_not_depend_on_micro_batch_size(tmp_path, variant):
    trainer = make_trainer(tmp_path, num_epochs=2, **VARIANTS[variant])
    batch, _ = trainer.make_rollout(0)
    if variant in ("sequence_mask", "entropy_selected"):  # the variant does leave tokens out
        assert 0 < batch.loss_mask.sum() < batch.completion_mask.sum()
    if variant == "entropy":  # the others' policy loss is zeroed, they stay in the counts
        assert 0 < batch.selected_tokens.sum() < batch.loss_mask.sum() == batch.completion_mask.sum()
    perturb(trainer.model)
    grads = {}
    for size in (1, 2, batch.size):
        trainer.args.micro_batch_size = size
        grads[size] = gradient(trainer, batch)
    assert grads[1].norm() > 0
    assert relative_error(grads[1], grads[batch.size]) < 1e-6 and relative_error(grads[2], grads[batch.size]) < 1e-6

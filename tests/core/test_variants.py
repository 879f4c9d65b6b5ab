"""rlhf.core's policy-gradient variants, each against a slow loop written here: GSPO's sequence ratio and GSPO-token,
CISPO, the rollout correction, entropy-selected tokens, on-policy distillation's per-token signal."""

import math

import pytest
import torch

from rlhf.core import (
    log_importance_ratio,
    logprob_mismatch,
    policy_loss,
    reverse_kl_advantages,
    rollout_correction,
    top_fraction_mask,
)

F64 = torch.float64
LENGTHS = [5, 1, 3, 0, 2, 4]  # ragged rows, a one-token row and an empty row
T = 5
MASK = torch.tensor([[1 if t < n else 0 for t in range(T)] for n in LENGTHS])


def rand(seed, shape=MASK.shape, scale=1.0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, dtype=F64, generator=generator) * scale


def rows(mask=MASK):
    return [[t for t in range(mask.shape[1]) if mask[i, t]] for i in range(mask.shape[0])]


def clip(x, low, high):
    return min(max(x, low), high)


def loop_sequence_loss(logprobs, old, advantages, el, eh):
    """GSPO (Zheng et al. 2025, eq. 5-7) by loop: s_i = exp(mean_t (logp - old)), l_i = max(-A_i s_i, -A_i clip(s_i)),
    averaged over the rows that have tokens (seq-mean-token-mean)."""
    losses = []
    for i, tokens in enumerate(rows()):
        if not tokens:
            continue
        s = torch.exp(sum(logprobs[i, t] - old[i, t] for t in tokens) / len(tokens))
        a = advantages[i]
        losses.append(torch.maximum(-a * s, -a * torch.clamp(s, 1 - el, 1 + eh)))
    return sum(losses) / len(losses)


@pytest.mark.parametrize("el, eh", [(0.2, 0.2), (3e-4, 4e-4), (0.1, 0.3)])
def test_sequence_level_matches_the_gspo_loop(el, eh):
    old = rand(0)
    logprobs = (old + rand(1, scale=0.1)).requires_grad_()
    advantages = rand(2, (len(LENGTHS),))
    loss, _ = policy_loss(logprobs, old, advantages, MASK, el, eh, agg="seq-mean-token-mean", level="sequence")
    (grad,) = torch.autograd.grad(loss, logprobs)
    expected_logprobs = logprobs.detach().clone().requires_grad_()
    expected = loop_sequence_loss(expected_logprobs, old, advantages, el, eh)
    (expected_grad,) = torch.autograd.grad(expected, expected_logprobs)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-12)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-12, atol=1e-15)


def test_sequence_ratio_is_clipped_per_sequence_where_token_ratios_are_not():
    """A row whose mean log-ratio is beyond the clip gets no gradient at all under GSPO; per token, its tokens whose
    own ratio stays inside the range still train (the negative control: token level differs)."""
    old = torch.zeros(1, 4, dtype=F64)
    logprobs = torch.tensor([[0.5, 0.5, -0.01, 0.0]], dtype=F64, requires_grad=True)  # mean 0.2475 > log(1.2)
    mask, advantages = torch.ones(1, 4), torch.ones(1, dtype=F64)
    loss, stats = policy_loss(logprobs, old, advantages, mask, 0.2, 0.2, level="sequence")
    (grad,) = torch.autograd.grad(loss, logprobs)
    assert torch.equal(grad, torch.zeros_like(grad)) and stats["clip_frac_high"] == 1.0
    loss, _ = policy_loss(logprobs, old, advantages, mask, 0.2, 0.2, level="token")
    (grad,) = torch.autograd.grad(loss, logprobs)
    assert (grad[0, 2:] != 0).all() and (grad[0, :2] == 0).all()


def test_sequence_token_has_the_sequence_value_and_a_per_token_gradient():
    """GSPO-token: r_t has the value s_i; d loss / d logp_t = -A_t s_i / N for unclipped tokens (token-mean),
    by loop."""
    old = rand(3)
    logprobs = (old + rand(4, scale=0.05)).requires_grad_()
    advantages = rand(5)  # per token
    sequence = log_importance_ratio(logprobs, old, MASK, "sequence")
    mixed = log_importance_ratio(logprobs, old, MASK, "sequence_token")
    assert torch.equal(mixed, sequence)
    loss, _ = policy_loss(logprobs, old, advantages, MASK, 10.0, 10.0, level="sequence_token")  # nothing clipped
    (grad,) = torch.autograd.grad(loss, logprobs)
    n = int(MASK.sum())
    expected = torch.zeros_like(grad)
    for i, tokens in enumerate(rows()):
        if tokens:
            s = math.exp(sum((logprobs[i, t] - old[i, t]).item() for t in tokens) / len(tokens))
            for t in tokens:
                expected[i, t] = -advantages[i, t].item() * s / n
    torch.testing.assert_close(grad, expected, rtol=1e-10, atol=1e-15)


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_sequence_token_with_sequence_advantages_has_gspos_gradient(agg):
    """The GSPO paper's equivalence: with one advantage per sequence, GSPO-token's gradient is GSPO's (clipping on)."""
    old = rand(6)
    logprobs = (old + rand(7, scale=0.2)).requires_grad_()
    advantages = rand(8, (len(LENGTHS),))
    grads = []
    for level in ("sequence", "sequence_token"):
        loss, _ = policy_loss(logprobs, old, advantages, MASK, 0.1, 0.1, agg=agg, level=level)
        grads.append(torch.autograd.grad(loss, logprobs)[0])
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("level", ["sequence", "sequence_token"])
def test_sequence_ratio_is_exactly_one_on_the_first_pass(level):
    logprobs = torch.randn(MASK.shape).requires_grad_()
    _, stats = policy_loss(logprobs, logprobs.detach(), torch.randn(len(LENGTHS)), MASK, 0.2, 0.2, level=level)
    assert stats["ratio_mean"] == 1.0 and stats["ratio_max"] == 1.0


def loop_cispo(logprobs, old, advantages, el, eh):
    """CISPO (MiniMax-M1, eq. 4) by loop, token-mean: -sg(clip(r_t, 1 - el, 1 + eh)) * A_t * logp_t."""
    total, count = 0.0, 0
    for i, tokens in enumerate(rows()):
        for t in tokens:
            weight = clip(math.exp((logprobs[i, t] - old[i, t]).item()), 1 - el, 1 + eh)
            total = total - weight * advantages[i, t] * logprobs[i, t]
            count += 1
    return total / count


def test_cispo_matches_the_loop():
    old = rand(9)
    logprobs = (old + rand(10, scale=0.3)).requires_grad_()  # many tokens beyond the clip
    advantages = rand(11)
    loss, stats = policy_loss(logprobs, old, advantages, MASK, 0.2, 0.28, loss_type="cispo")
    (grad,) = torch.autograd.grad(loss, logprobs)
    expected_logprobs = logprobs.detach().clone().requires_grad_()
    expected = loop_cispo(expected_logprobs, old, advantages, 0.2, 0.28)
    (expected_grad,) = torch.autograd.grad(expected, expected_logprobs)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-12)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-12, atol=1e-15)
    assert stats["clip_frac_low"] > 0 and stats["clip_frac_high"] > 0


def test_cispo_gradient_is_ppos_when_nothing_is_clipped_and_alive_where_ppos_vanishes():
    old = rand(12)
    logprobs = (old + rand(13, scale=0.01)).requires_grad_()  # every ratio within [0.9, 1.1]
    advantages = rand(14)
    grads = {}
    for loss_type in ("ppo", "cispo"):
        loss, _ = policy_loss(logprobs, old, advantages, MASK, 0.1, 0.1, loss_type=loss_type)
        grads[loss_type] = torch.autograd.grad(loss, logprobs)[0]
    torch.testing.assert_close(grads["cispo"], grads["ppo"], rtol=1e-12, atol=1e-15)
    # Every ratio pushed past the clip in the direction its advantage favours: PPO's gradient is 0 everywhere.
    pushed = (old + 0.5 * advantages.sign()).requires_grad_()
    for loss_type in ("ppo", "cispo"):
        loss, _ = policy_loss(pushed, old, advantages, MASK, 0.1, 0.1, loss_type=loss_type)
        grads[loss_type] = torch.autograd.grad(loss, pushed)[0]
    assert torch.equal(grads["ppo"], torch.zeros_like(pushed))
    valid = MASK.bool()
    assert (grads["cispo"][valid] != 0).all()
    # ... and each is the REINFORCE gradient with the weight held at its bound: -clip(r) A / N.
    bound = torch.where(advantages > 0, torch.tensor(1 + 0.1, dtype=F64), torch.tensor(1 - 0.1, dtype=F64))
    torch.testing.assert_close(grads["cispo"][valid], (-bound * advantages / valid.sum())[valid], rtol=1e-12, atol=0)


def test_cispo_at_ratio_one_is_reinforce():
    logprobs = rand(15).requires_grad_()
    advantages = rand(16, (len(LENGTHS),))
    loss, _ = policy_loss(logprobs, logprobs.detach(), advantages, MASK, 0.2, 0.2, loss_type="cispo")
    (grad,) = torch.autograd.grad(loss, logprobs)
    expected = torch.where(MASK.bool(), -advantages.unsqueeze(1) / MASK.sum(), torch.zeros(()))
    torch.testing.assert_close(grad, expected.to(F64), rtol=1e-12, atol=0)


def test_weights_multiply_each_tokens_loss():
    old, advantages, weights = rand(17), rand(18), rand(19).abs()
    logprobs = (old + rand(20, scale=0.1)).requires_grad_()
    loss, _ = policy_loss(logprobs, old, advantages, MASK, 0.2, 0.2, weights=weights)
    total = 0.0
    for i, tokens in enumerate(rows()):
        for t in tokens:
            r = torch.exp(logprobs[i, t] - old[i, t])
            a = advantages[i, t]
            total = total + weights[i, t] * torch.maximum(-a * r, -a * torch.clamp(r, 0.8, 1.2))
    assert loss.item() == pytest.approx((total / MASK.sum()).item(), rel=1e-12)


@pytest.mark.parametrize("loss_type", ["ppo", "cispo"])
@pytest.mark.parametrize("level", ["token", "sequence", "sequence_token"])
@pytest.mark.parametrize("bad", [-math.inf, math.nan])
def test_non_finite_padding_gives_no_nan_and_the_loops_gradient(loss_type, level, bad):
    """Padded positions holding -inf or NaN (a pad token's log-prob) change nothing: the loss and gradient equal
    those of zero-filled padding, padding gets exactly zero gradient. For CISPO with the GSPO-token ratio the
    gradient is also the formula's, d loss / d logp_t = -clip(s_i) A_t / N, where lp - sg(lp) at a -inf pad once
    made a NaN."""
    old = rand(30)
    logprobs = old + rand(31, scale=0.1)
    advantages = rand(32)
    pad = ~MASK.bool()
    results = []
    for fill in (0.0, bad):
        lp = logprobs.masked_fill(pad, fill).requires_grad_()
        loss, _ = policy_loss(lp, old.masked_fill(pad, fill), advantages, MASK, 0.05, 0.05, level=level,
                              loss_type=loss_type)
        results.append((loss, torch.autograd.grad(loss, lp)[0]))
    (loss, grad), (bad_loss, bad_grad) = results
    assert torch.isfinite(bad_loss) and torch.isfinite(bad_grad).all()
    assert torch.equal(bad_loss, loss) and torch.equal(bad_grad, grad) and (bad_grad[pad] == 0).all()
    if loss_type == "cispo" and level == "sequence_token":
        expected = torch.zeros_like(grad)
        for i, tokens in enumerate(rows()):
            if tokens:
                s = math.exp(sum((logprobs[i, t] - old[i, t]).item() for t in tokens) / len(tokens))
                for t in tokens:
                    expected[i, t] = -clip(s, 0.95, 1.05) * advantages[i, t].item() / MASK.sum().item()
        torch.testing.assert_close(bad_grad, expected, rtol=1e-10, atol=1e-15)


@pytest.mark.parametrize("level", ["sequence", "sequence_token"])
def test_the_sequence_ratio_averages_over_ratio_mask_and_the_loss_over_mask(level):
    """``ratio_mask``: the tokens a sequence ratio averages over (the whole completion), when ``mask`` keeps only
    some of them (entropy-selected tokens counted over themselves). By loop: s_i over ratio_mask's tokens, the
    token-mean of max(-A s_i, -A clip(s_i)) over mask's tokens."""
    old = rand(33)
    logprobs = (old + rand(34, scale=0.2)).requires_grad_()
    advantages = rand(35, (len(LENGTHS),))
    some = MASK * (rand(36) > 0)  # about half of each row's tokens
    loss, _ = policy_loss(logprobs, old, advantages, some, 0.05, 0.05, level=level, ratio_mask=MASK)
    (grad,) = torch.autograd.grad(loss, logprobs)
    expected_logprobs = logprobs.detach().clone().requires_grad_()
    total = 0.0
    for i, tokens in enumerate(rows()):
        if tokens:
            s = torch.exp(sum(expected_logprobs[i, t] - old[i, t] for t in tokens) / len(tokens))
            a = advantages[i]
            total = total + some[i].sum() * torch.maximum(-a * s, -a * torch.clamp(s, 0.95, 1.05))
    expected = total / some.sum()
    (expected_grad,) = torch.autograd.grad(expected, expected_logprobs)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-12)
    if level == "sequence":
        torch.testing.assert_close(grad, expected_grad, rtol=1e-10, atol=1e-15)
    # the negative control: the ratio over mask's tokens (ratio_mask not given) is another loss
    other, _ = policy_loss(logprobs, old, advantages, some, 0.05, 0.05, level=level)
    assert abs(other.item() - expected.item()) > 1e-3


# ---------------------------------------------------------------- rollout correction

@pytest.mark.parametrize("cap", [1.5, 2.0, 5.0])
def test_truncated_importance_weights_match_the_loop(cap):
    sampler, old = rand(21), rand(22)
    weights, keep = rollout_correction(old, sampler, MASK, "token_truncate", cap)
    truncated = 0
    for i in range(MASK.shape[0]):
        for t in range(T):
            ratio = math.exp(old[i, t] - sampler[i, t])
            expected = min(ratio, cap) if MASK[i, t] else 0.0
            assert weights[i, t].item() == pytest.approx(expected, rel=1e-12)
            truncated += bool(MASK[i, t]) and ratio > cap
    assert keep.all() and truncated > 0
    stats = logprob_mismatch(old, sampler, MASK, cap)
    assert stats["truncated_frac"].item() == pytest.approx(truncated / MASK.sum().item())


@pytest.mark.parametrize("cap", [1.5, 3.0])
def test_sequence_masking_matches_the_loop(cap):
    sampler = rand(23)
    old = sampler + rand(24, scale=0.3)
    weights, keep = rollout_correction(old, sampler, MASK, "sequence_mask", cap)
    assert weights is None
    dropped = 0
    for i, tokens in enumerate(rows()):
        rho = math.exp(sum((old[i, t] - sampler[i, t]).item() for t in tokens))
        assert bool(keep[i]) == (1 / cap <= rho <= cap), (i, rho)
        dropped += bool(tokens) and not keep[i]
    assert 0 < dropped < len(LENGTHS) - 1  # the case exercises both sides
    stats = logprob_mismatch(old, sampler, MASK, cap)
    assert stats["masked_frac"].item() == pytest.approx(dropped / sum(1 for r in rows() if r))


def test_correction_of_a_sampler_equal_to_the_trainer_is_exactly_neutral():
    logprobs = torch.randn(MASK.shape)
    weights, keep = rollout_correction(logprobs, logprobs.clone(), MASK, "token_truncate", 2.0)
    assert torch.equal(weights, MASK.float()) and keep.all()
    _, keep = rollout_correction(logprobs, logprobs.clone(), MASK, "sequence_mask", 2.0)
    assert keep.all()
    mismatch = logprob_mismatch(logprobs, logprobs.clone(), MASK)
    assert all(value == 0 for value in mismatch.values())


def test_mismatch_ignores_non_finite_padding_and_matches_the_loop():
    sampler, trainer = rand(25), rand(26)
    sampler[~MASK.bool()] = -math.inf  # a pad token the sampler's top-k had cut
    stats = logprob_mismatch(trainer, sampler, MASK)
    diffs = [(trainer[i, t] - sampler[i, t]).item() for i, tokens in enumerate(rows()) for t in tokens]
    assert stats["abs_log_ratio"].item() == pytest.approx(sum(map(abs, diffs)) / len(diffs), rel=1e-12)
    assert stats["k3"].item() == pytest.approx(sum(math.exp(d) - 1 - d for d in diffs) / len(diffs), rel=1e-10)
    assert stats["max_abs_log_ratio"].item() == pytest.approx(max(map(abs, diffs)), rel=1e-12)


def test_rollout_correction_rejects_a_cap_of_one_or_less():
    with pytest.raises(ValueError, match="cap must be > 1"):
        rollout_correction(rand(0), rand(1), MASK, "token_truncate", 1.0)


# ---------------------------------------------------------------- entropy-selected tokens

def loop_top_fraction(values, mask, fraction):
    """Sort the valid (value, position) pairs by value, largest first, earlier position first on ties; keep
    ceil(f n)."""
    valid = [(values[i, t].item(), i * mask.shape[1] + t) for i in range(mask.shape[0]) for t in range(mask.shape[1])
             if mask[i, t]]
    ranked = sorted(valid, key=lambda pair: (-pair[0], pair[1]))
    keep = {position for _, position in ranked[: math.ceil(fraction * len(valid) - 1e-9)]}
    return torch.tensor([[int(i * mask.shape[1] + t in keep) for t in range(mask.shape[1])]
                         for i in range(mask.shape[0])])


@pytest.mark.parametrize("fraction", [0.2, 0.3, 0.5, 0.99, 1.0])
def test_top_fraction_matches_the_loop_and_keeps_exactly_the_fraction(fraction):
    values = rand(27).abs()
    values[0, 1] = values[2, 0] = values[5, 3] = 0.777  # ties are broken by position
    selected = top_fraction_mask(values, MASK, fraction)
    assert torch.equal(selected, loop_top_fraction(values, MASK, fraction))
    assert int(selected.sum()) == math.ceil(fraction * int(MASK.sum()) - 1e-9)
    assert not (selected.bool() & ~MASK.bool()).any()


def test_top_fraction_keeps_exact_fractions_of_round_counts():
    mask = torch.ones(4, 5)
    for fraction, kept in ((0.2, 4), (0.25, 5), (0.3, 6), (0.05, 1), (0.5, 10)):
        assert int(top_fraction_mask(torch.rand(4, 5), mask, fraction).sum()) == kept


def test_top_fraction_keeps_the_fraction_when_values_tie_where_a_quantile_threshold_would_not():
    """Negative control: TRL's threshold (entropy >= its quantile) keeps every token when all entropies are equal."""
    values, mask = torch.full((4, 5), 1.5), torch.ones(4, 5)
    assert int((values >= torch.quantile(values, 0.8)).sum()) == 20
    selected = top_fraction_mask(values, mask, 0.2)
    assert int(selected.sum()) == 4 and selected.view(-1)[:4].all()  # the first four positions


def test_top_fraction_of_nothing_is_nothing():
    assert top_fraction_mask(torch.rand(2, 3), torch.zeros(2, 3), 0.2).sum() == 0


# ---------------------------------------------------------------- on-policy distillation

def test_reverse_kl_advantages_match_the_loop_and_vanish_for_an_identical_teacher():
    student, teacher = rand(28), rand(29)
    advantages = reverse_kl_advantages(student, teacher, MASK)
    for i in range(MASK.shape[0]):
        for t in range(T):
            expected = (teacher[i, t] - student[i, t]).item() if MASK[i, t] else 0.0
            assert advantages[i, t].item() == pytest.approx(expected, rel=1e-12)
    assert torch.equal(reverse_kl_advantages(student, student.clone(), MASK), torch.zeros_like(student))

"""rlhf.core.losses: loss aggregation, KL estimators, clipped policy and value losses."""

import math

import pytest
import torch

from rlhf.core import (
    LOSS_AGG_MODES,
    aggregate_loss,
    kl_penalty,
    policy_loss,
    value_loss,
)

F64 = torch.float64

# Right-padded rows of different lengths, including a one-token row and an all-padding row.
LENGTHS = [5, 1, 3, 0, 2, 5]
T = 5
MASK = torch.tensor([[1 if t < n else 0 for t in range(T)] for n in LENGTHS])


def rand(seed, shape=MASK.shape):
    torch.manual_seed(seed)
    return torch.randn(shape, dtype=F64)


def ref_aggregate(loss, mask, mode):
    """The formulas of aggregate_loss's docstring, by loop. B counts rows with at least one valid token (rlhf.core docstring)."""
    rows = [[loss[i, t].item() for t in range(loss.shape[1]) if mask[i, t]] for i in range(loss.shape[0])]
    rows = [r for r in rows if r]
    n_tokens = sum(len(r) for r in rows)
    if mode == "token-mean":
        return sum(sum(r) for r in rows) / n_tokens
    if mode == "seq-mean-token-mean":
        return sum(sum(r) / len(r) for r in rows) / len(rows)
    if mode == "seq-mean-token-sum":
        return sum(sum(r) for r in rows) / len(rows)
    if mode == "seq-mean-token-sum-norm":
        return sum(sum(r) for r in rows) / (len(rows) * loss.shape[1])
    raise AssertionError(mode)


# ---------------------------------------------------------------- aggregate_loss

@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
def test_aggregate_matches_formula(mode):
    """Each mode equals its formula (aggregate_loss's docstring) on ragged rows (one-token row, empty row)."""
    loss = rand(0)
    assert aggregate_loss(loss, MASK, mode).item() == pytest.approx(ref_aggregate(loss, MASK, mode), rel=1e-12)


def test_aggregate_hand_case():
    """l = [[1, 2, 3], [4, _, _]]: token-mean 10/4; seq-mean-token-mean (2 + 4)/2;
    seq-mean-token-sum (6 + 4)/2; seq-mean-token-sum-norm 10/(2*3)."""
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 50.0, 60.0]], dtype=F64)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    expected = {
        "token-mean": 2.5,
        "seq-mean-token-mean": 3.0,
        "seq-mean-token-sum": 5.0,
        "seq-mean-token-sum-norm": 10 / 6,
    }
    for mode, value in expected.items():
        assert aggregate_loss(loss, mask, mode).item() == pytest.approx(value, rel=1e-12), mode


def test_aggregate_empty_rows_are_not_counted():
    """An all-padding row adds nothing and is not counted in B (rlhf.core's documented convention)."""
    loss = rand(1, (2, 4))
    mask = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0]])
    for mode in LOSS_AGG_MODES:
        assert aggregate_loss(loss, mask, mode).item() == pytest.approx(
            aggregate_loss(loss[:1], mask[:1], mode).item(), rel=1e-12
        ), mode


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
def test_aggregate_ignores_nonfinite_padding(mode, bad):
    loss = rand(2)
    dirty = torch.where(MASK.bool(), loss, bad)
    assert torch.equal(aggregate_loss(dirty, MASK, mode), aggregate_loss(loss, MASK, mode))


def test_aggregate_num_tokens_overrides_denominator():
    loss = rand(3)
    assert aggregate_loss(loss, MASK, "token-mean", num_tokens=40).item() == pytest.approx(
        (loss * MASK).sum().item() / 40, rel=1e-12
    )


def test_aggregate_unknown_mode_raises():
    with pytest.raises(ValueError):
        aggregate_loss(rand(4), MASK, "sum")


SPLITS = [[0, 1, 2, 3, 4, 5, 6], [0, 3, 6], [0, 2, 6], [0, 5, 6]]  # row boundaries of the pieces


def split_pieces(loss, mask, bounds):
    """Micro-batches as a collator makes them: each padded only to its own longest row."""
    for a, b in zip(bounds[:-1], bounds[1:]):
        width = max(1, int(mask[a:b].sum(dim=1).max()))
        yield loss[a:b, :width], mask[a:b, :width]


@pytest.mark.parametrize("bounds", SPLITS)
@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
def test_aggregate_global_denominators_make_splits_add_up(mode, bounds):
    """With global num_tokens / num_seqs / seq_len, piece losses sum to the whole batch's loss."""
    loss = rand(5)
    whole = aggregate_loss(loss, MASK, mode)
    denominators = dict(num_tokens=MASK.sum(), num_seqs=(MASK.sum(dim=1) > 0).sum(), seq_len=T)
    total = sum(aggregate_loss(l, m, mode, **denominators) for l, m in split_pieces(loss, MASK, bounds))
    assert abs(total.item() - whole.item()) <= 1e-6 * abs(whole.item())


def test_aggregate_naive_micro_batch_mean_differs():
    """Negative control: averaging per-piece token-means (no global count) is not the batch token-mean
    when the pieces hold different numbers of tokens (pieces 0..2 hold 6 tokens, 2..6 hold 10)."""
    loss = rand(6)
    whole = aggregate_loss(loss, MASK, "token-mean").item()
    pieces = [aggregate_loss(l, m, "token-mean") for l, m in split_pieces(loss, MASK, [0, 2, 6])]
    assert abs(sum(pieces).item() / len(pieces) - whole) > 1e-2


# ---------------------------------------------------------------- KL estimators

def test_kl_estimators_match_formulas():
    """d = logp - ref: k1 = d, k2 = d^2 / 2, k3 = exp(-d) - 1 + d (|d| < 20, below the clamp)."""
    logprobs, ref = -rand(7).abs() * 3, -rand(8).abs() * 3
    d = (logprobs - ref).tolist()
    for name, f in {"k1": lambda x: x, "k2": lambda x: x * x / 2, "k3": lambda x: math.exp(-x) - 1 + x}.items():
        expected = torch.tensor([[f(x) for x in row] for row in d], dtype=F64)
        torch.testing.assert_close(kl_penalty(logprobs, ref, name), expected, rtol=1e-12, atol=1e-12)


def test_kl_hand_case():
    """d = log 2: k1 = log 2, k2 = (log 2)^2 / 2, k3 = 1/2 - 1 + log 2 = log 2 - 1/2."""
    lp, ref = torch.tensor([math.log(2.0)], dtype=F64), torch.zeros(1, dtype=F64)
    assert kl_penalty(lp, ref, "k1").item() == pytest.approx(math.log(2))
    assert kl_penalty(lp, ref, "k2").item() == pytest.approx(math.log(2) ** 2 / 2)
    assert kl_penalty(lp, ref, "k3").item() == pytest.approx(math.log(2) - 0.5)


@pytest.mark.parametrize("dtype", [torch.float32, F64, torch.bfloat16])
def test_k3_exactly_zero_for_identical_policies(dtype):
    """Policy == reference gives k3 == 0 exactly, not ~1e-8 (pitfall 7)."""
    logprobs = (-rand(9).abs() * 5).to(dtype)
    k3 = kl_penalty(logprobs, logprobs.clone(), "k3")
    assert torch.equal(k3, torch.zeros_like(k3))


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_k2_k3_nonnegative(dtype):
    """k2 and k3 are never negative, over a wide range of d (including past k3's clamp)."""
    torch.manual_seed(10)
    logprobs = (-torch.rand(4000, dtype=F64) * 30).to(dtype)
    ref = (-torch.rand(4000, dtype=F64) * 30).to(dtype)
    for name in ("k2", "k3"):
        kl = kl_penalty(logprobs, ref, name)
        assert torch.isfinite(kl).all() and (kl >= 0).all(), name


def test_k3_nonnegative_for_confident_tokens_fp32():
    """k3 >= 0 also when both log-probs are near 0 (tokens sampled with p ~ 1, the common case), fp32.

    exp(-d) - 1 + d cancels catastrophically for small d; torch.expm1(-d) + d would not."""
    torch.manual_seed(11)
    logprobs, ref = -torch.rand(10000) * 1e-3, -torch.rand(10000) * 1e-3
    k3 = kl_penalty(logprobs, ref, "k3")
    assert (k3 >= 0).all(), f"{int((k3 < 0).sum())} negative values, min {k3.min().item():.3g}"


def test_kl_unknown_estimator_raises():
    with pytest.raises(ValueError):
        kl_penalty(torch.zeros(2), torch.zeros(2), "k4")


# ---------------------------------------------------------------- policy loss

def ref_token_loss(lp, old, a, el, eh, c=None):
    """max(-A r, -A clip(r, 1-el, 1+eh)), then min(., -c A) for A < 0 with dual clip c."""
    r = math.exp(lp - old)
    loss = max(-a * r, -a * min(max(r, 1 - el), 1 + eh))
    return min(loss, -c * a) if c is not None and a < 0 else loss


def policy_batch(seed, spread=0.3):
    """Log-ratios of std ``spread`` so that many tokens fall outside [0.8, 1.28]."""
    torch.manual_seed(seed)
    old = -torch.rand(MASK.shape, dtype=F64) * 4
    logprobs = old + torch.randn(MASK.shape, dtype=F64) * spread
    return logprobs, old, torch.randn(MASK.shape, dtype=F64)


CLIPS = [(0.2, 0.2, None), (0.2, 0.28, None), (0.1, 0.3, 3.0), (0.2, 0.2, 1.5)]


@pytest.mark.parametrize("el,eh,c", CLIPS)
def test_policy_loss_per_token_formula(el, eh, c):
    """Element by element: a one-hot mask with token-mean returns that token's loss."""
    logprobs, old, adv = policy_batch(12)
    for i in range(MASK.shape[0]):
        for t in range(T):
            one_hot = torch.zeros_like(MASK)
            one_hot[i, t] = 1
            loss, _ = policy_loss(logprobs, old, adv, one_hot, el, eh, dual_clip=c)
            expected = ref_token_loss(logprobs[i, t].item(), old[i, t].item(), adv[i, t].item(), el, eh, c)
            assert loss.item() == pytest.approx(expected, rel=1e-12, abs=1e-15), (i, t)


@pytest.mark.parametrize("agg", LOSS_AGG_MODES)
def test_policy_loss_aggregation(agg):
    """On a ragged mask the scalar is the reference per-token loss aggregated by its formula."""
    logprobs, old, adv = policy_batch(13)
    per_token = torch.tensor(
        [[ref_token_loss(logprobs[i, t].item(), old[i, t].item(), adv[i, t].item(), 0.2, 0.28, 3.0) for t in range(T)]
         for i in range(MASK.shape[0])],
        dtype=F64,
    )
    loss, _ = policy_loss(logprobs, old, adv, MASK, 0.2, 0.28, dual_clip=3.0, agg=agg)
    assert loss.item() == pytest.approx(ref_aggregate(per_token, MASK, agg), rel=1e-12)


def test_policy_loss_at_ratio_one():
    """logprobs == old_logprobs (first on-policy pass): loss == -mean(A) over valid tokens,
    gradient == -A * mask / num_tokens (plain policy gradient), no clipping, approx_kl 0."""
    logprobs, _, adv = policy_batch(14)
    logprobs.requires_grad_(True)
    loss, metrics = policy_loss(logprobs, logprobs.detach().clone(), adv, MASK, 0.2, 0.28, dual_clip=3.0)
    n = MASK.sum().item()
    assert loss.item() == pytest.approx(-(adv * MASK).sum().item() / n, rel=1e-12)
    loss.backward()
    torch.testing.assert_close(logprobs.grad, -adv * MASK / n, rtol=1e-12, atol=1e-15)
    assert metrics["clip_frac_low"].item() == 0 and metrics["clip_frac_high"].item() == 0
    assert metrics["dual_clip_frac"].item() == 0 and metrics["approx_kl"].item() == 0
    assert metrics["ratio_mean"].item() == 1 and metrics["ratio_max"].item() == 1


def test_policy_loss_at_ratio_one_is_exact_in_fp32():
    """On CPU fp32 the first-pass ratio is exactly 1 (pitfall 5), so each token's loss is exactly -A."""
    logprobs, _, adv = policy_batch(15)
    logprobs, adv = logprobs.float(), adv.float()
    for i in range(MASK.shape[0]):
        for t in range(T):
            one_hot = torch.zeros_like(MASK)
            one_hot[i, t] = 1
            loss, metrics = policy_loss(logprobs, logprobs.clone(), adv, one_hot, 0.2, 0.2)
            assert loss.item() == -adv[i, t].item()
            assert metrics["ratio_max"].item() == 1.0


@pytest.mark.parametrize("eps_high,clipped", [(0.2, True), (0.28, False)])
def test_clip_higher_asymmetry(eps_high, clipped):
    """r = 1.25, A = 2 > 0: clipped at 1 + 0.2 (loss -2.4, zero gradient, clip_frac_high 1),
    but not at 1 + 0.28 (loss -2.5, gradient d(-A r)/dlogp = -A r = -2.5)."""
    logprobs = torch.tensor([[math.log(1.25)]], dtype=F64, requires_grad=True)
    loss, metrics = policy_loss(logprobs, torch.zeros(1, 1, dtype=F64), torch.tensor([2.0], dtype=F64),
                                torch.ones(1, 1), 0.2, eps_high)
    loss.backward()
    assert loss.item() == pytest.approx(-2.4 if clipped else -2.5, rel=1e-12)
    assert logprobs.grad.item() == pytest.approx(0.0 if clipped else -2.5, abs=1e-12)
    assert metrics["clip_frac_high"].item() == (1.0 if clipped else 0.0)
    assert metrics["clip_frac_low"].item() == 0.0


@pytest.mark.parametrize("el,eh,c", CLIPS)
def test_policy_loss_gradient_by_formula(el, eh, c):
    """d loss / d logp_t = -A r / N where the unclipped branch is active, 0 where clipped or
    dual-clipped, and 0 on padded tokens."""
    logprobs, old, adv = policy_batch(16)
    logprobs.requires_grad_(True)
    loss, _ = policy_loss(logprobs, old, adv, MASK, el, eh, dual_clip=c)
    loss.backward()
    n = MASK.sum().item()
    expected = torch.zeros_like(old)
    for i in range(MASK.shape[0]):
        for t in range(T):
            a, r = adv[i, t].item(), math.exp(logprobs[i, t].item() - old[i, t].item())
            clipped = (a > 0 and r > 1 + eh) or (a < 0 and r < 1 - el)
            dual = c is not None and a < 0 and -a * r > -c * a
            if MASK[i, t] and not clipped and not dual:
                expected[i, t] = -a * r / n
    torch.testing.assert_close(logprobs.grad, expected, rtol=1e-10, atol=1e-15)
    assert (expected == 0).any() and (expected != 0).any()  # both branches exercised


def test_dual_clip_bounds_negative_advantage():
    """A = -1, r = e^3 ~ 20: plain PPO loss -A r ~ 20; with dual clip c = 3 the loss is -c A = 3,
    gradient 0, dual_clip_frac 1. A positive advantage at the same ratio is not dual-clipped."""
    logprobs = torch.tensor([[3.0]], dtype=F64, requires_grad=True)
    old, mask = torch.zeros(1, 1, dtype=F64), torch.ones(1, 1)
    plain, _ = policy_loss(logprobs, old, torch.tensor([-1.0], dtype=F64), mask, 0.2, 0.2)
    assert plain.item() == pytest.approx(math.exp(3.0), rel=1e-12)
    loss, metrics = policy_loss(logprobs, old, torch.tensor([-1.0], dtype=F64), mask, 0.2, 0.2, dual_clip=3.0)
    loss.backward()
    assert loss.item() == pytest.approx(3.0, rel=1e-12)
    assert logprobs.grad.item() == 0.0
    assert metrics["dual_clip_frac"].item() == 1.0
    pos, pos_metrics = policy_loss(logprobs, old, torch.tensor([1.0], dtype=F64), mask, 0.2, 0.2, dual_clip=3.0)
    assert pos.item() == pytest.approx(-1.2, rel=1e-12) and pos_metrics["dual_clip_frac"].item() == 0.0


def test_policy_loss_clip_metrics_count_valid_tokens():
    """clip_frac_low = share of valid tokens with r < 1-el and A < 0; clip_frac_high: r > 1+eh and A > 0;
    approx_kl = mean(r - 1 - log r); ratio_mean / ratio_max over valid tokens only."""
    logprobs, old, adv = policy_batch(20, spread=0.5)
    logprobs = torch.where(MASK.bool(), logprobs, old + 5.0)  # padding with huge ratios must not count
    el, eh = 0.1, 0.2
    low = high = wrong_sign = 0
    ratios = []
    for i in range(MASK.shape[0]):
        for t in range(T):
            if MASK[i, t]:
                a, r = adv[i, t].item(), math.exp(logprobs[i, t].item() - old[i, t].item())
                low += a < 0 and r < 1 - el
                high += a > 0 and r > 1 + eh
                wrong_sign += (a > 0 and r < 1 - el) + (a < 0 and r > 1 + eh)  # outside the range, not clipped
                ratios.append(r)
    n = len(ratios)
    _, m = policy_loss(logprobs, old, adv, MASK, el, eh)
    assert low > 0 and high > 0 and wrong_sign > 0  # every case is exercised
    assert m["clip_frac_low"].item() == pytest.approx(low / n, rel=1e-12)
    assert m["clip_frac_high"].item() == pytest.approx(high / n, rel=1e-12)
    assert m["approx_kl"].item() == pytest.approx(sum(r - 1 - math.log(r) for r in ratios) / n, rel=1e-9)
    assert m["ratio_mean"].item() == pytest.approx(sum(ratios) / n, rel=1e-12)
    assert m["ratio_max"].item() == pytest.approx(max(ratios), rel=1e-12)


def test_policy_loss_sequence_advantages_broadcast():
    """advantages [B] give the same loss, metrics and gradient as the same values expanded to [B, T]."""
    logprobs, old, _ = policy_batch(18)
    adv = rand(19, (MASK.shape[0],))
    grads, results = [], []
    for a in (adv, adv[:, None].expand(-1, T)):
        lp = logprobs.clone().requires_grad_(True)
        loss, metrics = policy_loss(lp, old, a, MASK, 0.2, 0.28, dual_clip=3.0)
        loss.backward()
        grads.append(lp.grad)
        results.append((loss, metrics))
    assert torch.equal(results[0][0], results[1][0])
    assert all(torch.equal(results[0][1][k], results[1][1][k]) for k in results[0][1])
    assert torch.equal(grads[0], grads[1])


@pytest.mark.parametrize("bad", [float("-inf"), float("nan")])
def test_policy_loss_padding_gets_zero_gradient(bad):
    """Masked tokens get exactly zero gradient and valid ones are unaffected, even if padded
    log-probs are -inf/NaN (e.g. the log-prob of a pad token)."""
    logprobs, old, adv = policy_batch(20)
    pad = ~MASK.bool()
    grads = []
    for fill in (0.0, bad):
        lp = logprobs.masked_fill(pad, fill).requires_grad_(True)
        loss, _ = policy_loss(lp, old.masked_fill(pad, fill), adv, MASK, 0.2, 0.28, dual_clip=3.0)
        loss.backward()
        assert torch.isfinite(loss)
        grads.append(lp.grad)
    assert torch.equal(grads[1], grads[0])
    assert (grads[1][pad] == 0).all()


@pytest.mark.parametrize("agg", LOSS_AGG_MODES)
def test_policy_loss_gradient_independent_of_micro_batch_split(agg):
    """Global denominators passed through policy_loss: micro-batch gradients add up to the full-batch one."""
    logprobs, old, adv = policy_batch(21)
    den = dict(num_tokens=MASK.sum(), num_seqs=(MASK.sum(dim=1) > 0).sum(), seq_len=T)
    full = logprobs.clone().requires_grad_(True)
    policy_loss(full, old, adv, MASK, 0.2, 0.28, agg=agg)[0].backward()
    split = logprobs.clone().requires_grad_(True)
    for a, b in [(0, 2), (2, 3), (3, 6)]:
        policy_loss(split[a:b], old[a:b], adv[a:b], MASK[a:b], 0.2, 0.28, agg=agg, **den)[0].backward()
    torch.testing.assert_close(split.grad, full.grad, rtol=1e-6, atol=1e-12)


# ---------------------------------------------------------------- value loss

def value_batch(seed):
    torch.manual_seed(seed)
    old = torch.randn(MASK.shape, dtype=F64)
    return old + torch.randn(MASK.shape, dtype=F64) * 0.4, old, torch.randn(MASK.shape, dtype=F64)


@pytest.mark.parametrize("clip_eps", [0.2, 0.05, None])
def test_value_loss_matches_formula(clip_eps):
    """0.5 * max((V-R)^2, (clip(V, V_old-eps, V_old+eps) - R)^2) (or 0.5 (V-R)^2 without clip), token mean;
    value_clip_frac = share of valid tokens where the clipped term is strictly larger."""
    values, old, returns = value_batch(22)
    total, active, n = 0.0, 0, 0
    for i in range(MASK.shape[0]):
        for t in range(T):
            if MASK[i, t]:
                v, vo, r = values[i, t].item(), old[i, t].item(), returns[i, t].item()
                plain = (v - r) ** 2
                clipped = plain if clip_eps is None else (min(max(v, vo - clip_eps), vo + clip_eps) - r) ** 2
                total += 0.5 * max(plain, clipped)
                active += clipped > plain
                n += 1
    loss, metrics = value_loss(values, old, returns, MASK, clip_eps)
    assert loss.item() == pytest.approx(total / n, rel=1e-12)
    assert metrics["value_clip_frac"].item() == pytest.approx(active / n, rel=1e-12)
    if clip_eps == 0.05:
        assert active > 0


def test_value_loss_hand_case():
    """eps 0.2, V_old = 1. V = 1.5, R = 0: (1.5)^2 = 2.25 vs (1.2)^2 = 1.44 -> 0.5 * 2.25 (unclipped wins).
    V = 1.5, R = 2: (0.5)^2 = 0.25 vs (1.2 - 2)^2 = 0.64 -> 0.5 * 0.64 = 0.32 (clip active)."""
    values, old = torch.tensor([[1.5, 1.5]], dtype=F64), torch.ones(1, 2, dtype=F64)
    returns = torch.tensor([[0.0, 2.0]], dtype=F64)
    loss, metrics = value_loss(values, old, returns, torch.ones(1, 2), 0.2)
    assert loss.item() == pytest.approx((1.125 + 0.32) / 2, rel=1e-12)
    assert metrics["value_clip_frac"].item() == 0.5


def test_value_loss_clip_inactive_when_values_unchanged():
    """values == old_values: clipping changes nothing (value_clip_frac 0, loss == unclipped loss)."""
    values, _, returns = value_batch(23)
    loss, metrics = value_loss(values, values.clone(), returns, MASK, 0.2)
    assert metrics["value_clip_frac"].item() == 0.0
    assert torch.equal(loss, value_loss(values, values.clone(), returns, MASK, None)[0])

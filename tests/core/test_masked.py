"""rlhf.core.masked: masked reductions against slow Python loops, and their invariants."""

import math

import pytest
import torch

from rlhf.core import masked_mean, masked_sum, masked_var, masked_whiten

# Ragged right-padded rows: a full row, a one-token row, an empty row, a middle-length row.
LENGTHS = [6, 1, 0, 4]
T = 6


def ragged_mask(lengths=LENGTHS, width=T):
    return torch.tensor([[1 if t < n else 0 for t in range(width)] for n in lengths])


def random_x(seed=0):
    torch.manual_seed(seed)
    return torch.randn(len(LENGTHS), T, dtype=torch.float64) * 3 + 1


def valid_values(x, mask):
    """The selected elements, in row-major order, as Python floats."""
    return [x[i, t].item() for i in range(x.shape[0]) for t in range(x.shape[1]) if mask[i, t]]


def ref_mean_var(vals, unbiased=True):
    n = len(vals)
    mean = sum(vals) / n
    ss = sum((v - mean) ** 2 for v in vals)
    return mean, ss / (n - 1 if unbiased and n > 1 else n)


@pytest.mark.parametrize("dim", [None, 0, 1, -1])
def test_masked_sum_and_mean_match_loop(dim):
    """Sum/mean over the mask equal a loop over the selected elements; an empty selection gives mean 0."""
    x, mask = random_x(), ragged_mask()
    B, width = x.shape
    if dim is None:
        vals = valid_values(x, mask)
        ref_sum, ref_mean = sum(vals), sum(vals) / len(vals)
    else:
        d = dim % 2
        outer = range(B) if d == 1 else range(width)
        sums, means = [], []
        for j in outer:
            sel = [x[j, t].item() for t in range(width) if mask[j, t]] if d == 1 else [
                x[i, j].item() for i in range(B) if mask[i, j]
            ]
            sums.append(sum(sel))
            means.append(sum(sel) / len(sel) if sel else 0.0)
        ref_sum, ref_mean = sums, means
    f64 = dict(dtype=torch.float64)
    torch.testing.assert_close(masked_sum(x, mask, dim), torch.tensor(ref_sum, **f64), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(masked_mean(x, mask, dim), torch.tensor(ref_mean, **f64), rtol=1e-12, atol=1e-12)


def test_masked_mean_of_empty_row_is_zero():
    """The empty row (LENGTHS[2] == 0) gets mean 0, not NaN."""
    means = masked_mean(random_x(), ragged_mask(), dim=-1)
    assert means[2].item() == 0.0
    assert torch.isfinite(means).all()


@pytest.mark.parametrize("unbiased", [True, False])
def test_masked_var_matches_loop(unbiased):
    """Variance over the selected elements equals the textbook formula (n-1 or n denominator)."""
    x, mask = random_x(1), ragged_mask()
    _, ref = ref_mean_var(valid_values(x, mask), unbiased)
    assert masked_var(x, mask, unbiased=unbiased).item() == pytest.approx(ref, rel=1e-12)


def test_masked_ops_hand_case():
    """x = [1, 2, 3 | 100 padded]: mean 2, sum 6, unbiased var ((1)^2+0+(1)^2)/2 = 1, biased 2/3,
    whitened = (x - 2) / 1 = [-1, 0, 1 | 0]."""
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0]])
    assert masked_sum(x, mask).item() == 6.0
    assert masked_mean(x, mask).item() == 2.0
    assert masked_var(x, mask).item() == pytest.approx(1.0, rel=1e-12)
    assert masked_var(x, mask, unbiased=False).item() == pytest.approx(2 / 3, rel=1e-12)
    torch.testing.assert_close(
        masked_whiten(x, mask), torch.tensor([[-1.0, 0.0, 1.0, 0.0]], dtype=torch.float64), atol=1e-7, rtol=0
    )


@pytest.mark.parametrize("shift_mean", [True, False])
def test_masked_whiten_matches_formula(shift_mean):
    """whiten = (x - mean) / sqrt(var_unbiased + eps) (+ mean when shift_mean=False) on valid, 0 elsewhere."""
    x, mask = random_x(2), ragged_mask()
    eps = 1e-8
    mean, var = ref_mean_var(valid_values(x, mask))
    expected = torch.zeros_like(x)
    for i in range(x.shape[0]):
        for t in range(x.shape[1]):
            if mask[i, t]:
                w = (x[i, t].item() - mean) / math.sqrt(var + eps)
                expected[i, t] = w if shift_mean else w + mean
    torch.testing.assert_close(masked_whiten(x, mask, shift_mean=shift_mean, eps=eps), expected, rtol=1e-12, atol=1e-12)


def test_masked_whiten_zero_mean_unit_variance():
    """After whitening: mean 0 and unbiased variance 1 over the mask; masked positions exactly 0."""
    x, mask = random_x(3), ragged_mask()
    w = masked_whiten(x, mask)
    mean, var = ref_mean_var(valid_values(w, mask))
    assert abs(mean) < 1e-12
    assert var == pytest.approx(1.0, abs=1e-6)
    assert (w[mask == 0] == 0).all()


def test_masked_whiten_without_shift_keeps_original_mean():
    """shift_mean=False (TRL/verl): the mean over the mask is unchanged, the variance is still 1,
    and the result is the shifted whitening plus the original mean."""
    x, mask = random_x(4), ragged_mask()
    w = masked_whiten(x, mask, shift_mean=False)
    orig_mean, _ = ref_mean_var(valid_values(x, mask))
    mean, var = ref_mean_var(valid_values(w, mask))
    assert mean == pytest.approx(orig_mean, abs=1e-12)
    assert abs(orig_mean) > 0.1  # the test would be vacuous for data with mean ~0
    assert var == pytest.approx(1.0, abs=1e-6)
    torch.testing.assert_close(w, torch.where(mask.bool(), masked_whiten(x, mask) + orig_mean, 0.0))


def test_masked_whiten_single_token_is_finite():
    """One selected element: variance 0, whitened value 0 (never NaN/inf)."""
    x = torch.tensor([[5.0, 7.0]])
    w = masked_whiten(x, torch.tensor([[1, 0]]))
    assert torch.equal(w, torch.zeros_like(w))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.long, torch.float32])
def test_nonfinite_at_masked_positions_do_not_leak(bad, mask_dtype):
    """NaN/inf in padded positions leave every reduction identical to zeros there, for any mask dtype."""
    x, mask = random_x(5).float(), ragged_mask().to(mask_dtype)
    dirty = torch.where(mask.bool(), x, torch.tensor(bad))
    clean = torch.where(mask.bool(), x, torch.tensor(0.0))
    for fn in (
        lambda v: masked_sum(v, mask),
        lambda v: masked_mean(v, mask),
        lambda v: masked_mean(v, mask, dim=-1),
        lambda v: masked_mean(v, mask, dim=0),
        lambda v: masked_var(v, mask),
        lambda v: masked_whiten(v, mask),
        lambda v: masked_whiten(v, mask, shift_mean=False),
    ):
        out = fn(dirty)
        assert torch.isfinite(out).all()
        assert torch.equal(out, fn(clean))

"""SAPO's soft-gated policy loss and GDPO's group-decoupled advantages, each against its formula written out again
here in float64 loops (arXiv 2511.20347 and 2601.05242, as TRL 1.16 computes them)."""

import math

import pytest
import torch

from rlhf.core import gdpo_advantages, gdpo_rewards, grpo_advantages, policy_loss

TAU_POS, TAU_NEG = 1.0, 1.05


def sapo_reference(logprobs, old_logprobs, advantages, mask, tau_pos=TAU_POS, tau_neg=TAU_NEG):
    """(loss, d loss / d logprobs), sequence mean of token means, one token at a time:
    l = -A * 4 / tau * sigmoid(tau * (r - 1)), r = exp(logp - logp_old); dl/dlogp = -A * 4 * s * (1 - s) * r."""
    rows, cols = logprobs.shape
    loss, grad, counted = 0.0, torch.zeros(rows, cols, dtype=torch.float64), 0
    for i in range(rows):
        tokens = [t for t in range(cols) if mask[i, t]]
        if not tokens:
            continue
        counted += 1
        a = float(advantages[i])
        tau = tau_pos if a > 0 else tau_neg
        for t in tokens:
            r = math.exp(float(logprobs[i, t]) - float(old_logprobs[i, t]))
            s = 1.0 / (1.0 + math.exp(-tau * (r - 1.0)))
            loss += -a * 4.0 / tau * s / len(tokens)
            grad[i, t] = -a * 4.0 * s * (1.0 - s) * r / len(tokens)
    return loss / counted, grad / counted


def test_sapo_loss_and_gradient_match_the_formula():
    torch.manual_seed(0)
    logprobs = (torch.randn(6, 5, dtype=torch.float64) - 1).requires_grad_()
    old_logprobs = logprobs.detach() + 0.6 * torch.randn(6, 5, dtype=torch.float64)  # ratios from ~0.3 to ~3
    advantages = torch.tensor([1.5, -0.7, 0.0, 2.0, -1.2, 0.4], dtype=torch.float64)  # 0 takes tau_neg, as TRL
    mask = torch.ones(6, 5)
    mask[1, 3:] = 0
    mask[4, 1:] = 0
    loss, metrics = policy_loss(logprobs, old_logprobs, advantages, mask, 0.2, 0.2, agg="seq-mean-token-mean",
                                loss_type="sapo", sapo_temperatures=(TAU_POS, TAU_NEG))
    loss.backward()
    expected_loss, expected_grad = sapo_reference(logprobs.detach(), old_logprobs, advantages, mask)
    assert loss.item() == pytest.approx(expected_loss, rel=1e-12)
    assert torch.allclose(logprobs.grad, expected_grad, rtol=1e-10, atol=1e-14)
    assert metrics["clip_frac_low"] == 0 and metrics["clip_frac_high"] == 0  # a soft gate clips nothing


def test_sapo_temperatures_pick_by_the_sign_of_the_advantage():
    """Swapping the temperatures changes only the tokens of the side whose temperature moved."""
    logprobs, old = torch.tensor([[-1.0], [-1.0]]), torch.tensor([[-1.5], [-1.5]])
    mask = torch.ones(2, 1)
    per_row = [policy_loss(logprobs[i:i + 1], old[i:i + 1], torch.tensor([a]), mask[:1], 0.2, 0.2,
                           loss_type="sapo", sapo_temperatures=(0.5, 3.0))[0].item() for i, a in enumerate((1.0, -1.0))]
    r = math.exp(0.5)
    assert per_row[0] == pytest.approx(-4 / 0.5 / (1 + math.exp(-0.5 * (r - 1))), rel=1e-6)
    assert per_row[1] == pytest.approx(4 / 3.0 / (1 + math.exp(-3.0 * (r - 1))), rel=1e-6)


def test_sapo_gradient_is_ppos_on_policy():
    """At r = 1 the gate's slope is 1, so the first on-policy pass gives PPO's (and plain REINFORCE's) gradient."""
    torch.manual_seed(1)
    advantages, mask = torch.randn(4, dtype=torch.float64), torch.ones(4, 3)
    grads = []
    for loss_type in ("sapo", "ppo"):
        logprobs = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
        with torch.no_grad():
            logprobs.copy_(torch.linspace(-2, -0.1, 12, dtype=torch.float64).view(4, 3))
        loss, _ = policy_loss(logprobs, logprobs.detach(), advantages, mask, 0.2, 0.2, loss_type=loss_type)
        loss.backward()
        grads.append(logprobs.grad)
    assert torch.allclose(grads[0], grads[1], rtol=1e-12, atol=0)


def gdpo_reference(per_function, weights, group_size, eps=1e-6):
    """GDPO as TRL's normalize_then_sum computes it, one group, function and row at a time: per function and group,
    (r - mean) / (std + eps) over the non-None values (unbiased std; none with fewer than 2), summed with the
    weights over the functions that gave a value; then over the rows where some function applied, (x - mean) /
    (std + eps); 0 for the others."""
    rows, functions = len(per_function), len(weights)
    summed = [None] * rows
    for g in range(0, rows, group_size):
        for i in range(g, g + group_size):
            total, applied = 0.0, False
            for k in range(functions):
                if per_function[i][k] is None:
                    continue
                applied = True
                values = [per_function[j][k] for j in range(g, g + group_size) if per_function[j][k] is not None]
                if len(values) < 2:
                    continue
                mean = sum(values) / len(values)
                std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
                total += weights[k] * (per_function[i][k] - mean) / (std + eps)
            summed[i] = total if applied else None
    present = [x for x in summed if x is not None]
    mean = sum(present) / len(present)
    std = math.sqrt(sum((x - mean) ** 2 for x in present) / (len(present) - 1))
    return [0.0 if x is None else (x - mean) / (std + eps) for x in summed]


def test_gdpo_advantages_match_a_slow_loop():
    torch.manual_seed(2)
    rows = (torch.randn(12, 3, dtype=torch.float64) * torch.tensor([1.0, 10.0, 0.1], dtype=torch.float64)).tolist()
    for i in range(8, 12):
        rows[i][1] = 3.0  # a constant function in a group: 0 / eps
    rows[1][2] = rows[5][0] = rows[6][1] = None  # functions that did not apply ...
    rows[9] = [None, None, None]  # ... or none at all
    rows[4][0] = rows[7][0] = None  # leaves one value of function 0 in group 1: it adds nothing there
    weights = [1.0, 0.5, 2.0]
    table = torch.tensor([[math.nan if v is None else v for v in row] for row in rows], dtype=torch.float64)
    ours = gdpo_advantages(gdpo_rewards(table, torch.tensor(weights), group_size=4))
    assert torch.allclose(ours, torch.tensor(gdpo_reference(rows, weights, 4), dtype=torch.float64), rtol=1e-12,
                          atol=1e-12)
    assert ours[9] == 0


def test_gdpo_keeps_a_small_spread_reward_that_summing_first_drowns():
    """The point of decoupling: a 0/1 format reward next to a reward with a 100x larger spread still moves the
    advantages as much as the large one does."""
    large = torch.tensor([100.0, 300.0, 200.0, 400.0], dtype=torch.float64)
    small = torch.tensor([1.0, 0.0, 1.0, 0.0], dtype=torch.float64)
    decoupled = gdpo_rewards(torch.stack([large, small], 1), torch.ones(2), group_size=4)
    without_small = gdpo_rewards(torch.stack([large, torch.zeros(4, dtype=torch.float64)], 1), torch.ones(2), 4)
    assert (decoupled - without_small).abs().max() > 0.8
    summed_first = grpo_advantages(large + small, group_size=4) - grpo_advantages(large, group_size=4)
    assert summed_first.abs().max() < 0.01  # the negative control: summed first, the small reward hardly counts


def test_gdpo_rewards_checks_the_shape():
    with pytest.raises(ValueError, match="group_size=4"):
        gdpo_rewards(torch.zeros(6, 2), torch.ones(2), group_size=4)

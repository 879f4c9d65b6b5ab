"""rlhf.core.advantages: GRPO, RLOO, reward-to-go and GAE against slow loops, plus invariants."""

import math
import statistics

import pytest
import torch

from rlhf.core import (
    discounted_returns,
    gae,
    grpo_advantages,
    rloo_advantages,
    token_level_rewards,
)

F64 = torch.float64


def grouped_rewards(num_groups=3, group_size=4, seed=0):
    torch.manual_seed(seed)
    return torch.randn(num_groups * group_size, dtype=F64)


# Rows of a [B, T] batch: right-padded (full, one token, middle), left-padded, and one with a gap,
# so "skip masked positions" is exercised at the start, the end and in the middle of a row.
MASK = torch.tensor(
    [
        [1, 1, 1, 1, 1, 1, 1],
        [1, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0],
        [0, 0, 0, 1, 1, 1, 1],
        [1, 1, 0, 0, 1, 1, 0],
    ]
)


def token_batch(seed=0):
    torch.manual_seed(seed)
    return torch.randn(MASK.shape, dtype=F64), torch.randn(MASK.shape, dtype=F64)


def valid_positions(mask_row):
    return [t for t in range(len(mask_row)) if mask_row[t]]


# ---------------------------------------------------------------- GRPO

def ref_grpo(rewards, group_size, scale, eps):
    r = rewards.tolist()
    batch_std = statistics.stdev(r) if len(r) > 1 else 0.0
    out = []
    for g in range(0, len(r), group_size):
        group = r[g : g + group_size]
        mean = sum(group) / len(group)
        std = {"group": statistics.stdev(group) if len(group) > 1 else 0.0, "batch": batch_std, "none": None}[scale]
        out += [(x - mean) if std is None else (x - mean) / (std + eps) for x in group]
    return torch.tensor(out, dtype=F64)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("group_size", [1, 2, 4])
def test_grpo_matches_loop(scale, group_size):
    """(r - group mean) / (unbiased group std | whole-batch std | 1 + eps), group by group."""
    rewards = grouped_rewards(num_groups=3, group_size=group_size)
    out = grpo_advantages(rewards, group_size, scale=scale, eps=1e-6)
    torch.testing.assert_close(out, ref_grpo(rewards, group_size, scale, 1e-6), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_grpo_groups_sum_to_zero(scale):
    """Each group's advantages sum to zero for every scaling."""
    adv = grpo_advantages(grouped_rewards(num_groups=5, group_size=4) * 10 + 3, 4, scale=scale)
    assert adv.view(5, 4).sum(dim=1).abs().max() < 1e-10


def test_grpo_hand_case():
    """Group [1, 0, 0, 0]: mean 1/4, unbiased std sqrt((9/16 + 3/16)/3) = 1/2 -> [1.5, -0.5, -0.5, -0.5].
    Group [0, 1]: mean 1/2, std sqrt(2 * 1/4 / 1) = 1/sqrt(2) -> [-1/sqrt2, 1/sqrt2]."""
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 1.0], dtype=F64)
    torch.testing.assert_close(
        grpo_advantages(rewards[:4], 4, eps=0.0), torch.tensor([1.5, -0.5, -0.5, -0.5], dtype=F64)
    )
    s = 1 / math.sqrt(2)
    torch.testing.assert_close(grpo_advantages(rewards[4:], 2, eps=0.0), torch.tensor([-s, s, -s, s], dtype=F64))


def test_grpo_batch_scale_uses_whole_batch_std():
    """"batch" and "group" differ when groups have different spreads: a tight group keeps small advantages."""
    rewards = torch.tensor([0.0, 0.01, 0.0, 10.0], dtype=F64)  # groups of 2: tight, wide
    batch = grpo_advantages(rewards, 2, scale="batch")
    group = grpo_advantages(rewards, 2, scale="group")
    std = statistics.stdev(rewards.tolist())
    assert batch[1].item() == pytest.approx(0.005 / (std + 1e-6), rel=1e-9)
    assert group[1].item() == pytest.approx(0.005 / (statistics.stdev([0.0, 0.01]) + 1e-6), rel=1e-9)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_grpo_identical_rewards_and_singleton_groups_are_finite(scale, dtype):
    """Zero-std groups (0.1 is not exact in binary) and group_size=1 give finite, ~zero advantages."""
    same = torch.tensor([0.1] * 4 + [0.7] * 4 + [3.0] * 4, dtype=dtype)
    adv = grpo_advantages(same, 4, scale=scale)
    assert torch.isfinite(adv).all() and adv.abs().max() < 1e-6
    single = grpo_advantages(torch.tensor([0.3, -1.0, 2.0], dtype=dtype), 1, scale=scale)
    assert torch.equal(single, torch.zeros_like(single))


@pytest.mark.parametrize("shape", [(7,), (2, 4)])
def test_grpo_wrong_shape_raises(shape):
    """A length not divisible by group_size, or a 2-D tensor, is an error (never a silent broadcast)."""
    with pytest.raises(ValueError):
        grpo_advantages(torch.zeros(shape), 4)


def test_grpo_unknown_scale_raises():
    with pytest.raises(ValueError):
        grpo_advantages(torch.zeros(4), 2, scale="std")


# ---------------------------------------------------------------- RLOO

@pytest.mark.parametrize("group_size", [2, 3, 5])
def test_rloo_matches_loop(group_size):
    """A_i = r_i - mean of the other G-1 rewards of its group; also == G/(G-1) * (r_i - group mean)."""
    rewards = grouped_rewards(num_groups=3, group_size=group_size, seed=1)
    r = rewards.tolist()
    ref = []
    for g in range(0, len(r), group_size):
        group = r[g : g + group_size]
        ref += [group[i] - sum(group[:i] + group[i + 1 :]) / (group_size - 1) for i in range(group_size)]
    out = rloo_advantages(rewards, group_size)
    torch.testing.assert_close(out, torch.tensor(ref, dtype=F64), rtol=1e-12, atol=1e-12)
    centred = rewards.view(-1, group_size) - rewards.view(-1, group_size).mean(dim=1, keepdim=True)
    torch.testing.assert_close(out, (group_size / (group_size - 1) * centred).reshape(-1), rtol=1e-12, atol=1e-12)


def test_rloo_hand_case():
    """[1, 0, 0, 0]: 1 - 0 = 1; 0 - (1 + 0 + 0)/3 = -1/3."""
    out = rloo_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=F64), 4)
    torch.testing.assert_close(out, torch.tensor([1.0, -1 / 3, -1 / 3, -1 / 3], dtype=F64))


@pytest.mark.parametrize("group_size", [0, 1])
def test_rloo_needs_two_per_group(group_size):
    with pytest.raises(ValueError):
        rloo_advantages(torch.zeros(4), group_size)


def test_rloo_wrong_length_raises():
    with pytest.raises(ValueError):
        rloo_advantages(torch.zeros(5), 2)


# ---------------------------------------------------------------- reward-to-go

def ref_returns(rewards, mask, gamma):
    out = torch.zeros_like(rewards)
    for i in range(rewards.shape[0]):
        pos = valid_positions(mask[i])
        for j, t in enumerate(pos):
            out[i, t] = sum(gamma ** (k - j) * rewards[i, pos[k]].item() for k in range(j, len(pos)))
    return out


@pytest.mark.parametrize("gamma", [1.0, 0.9, 0.0])
def test_discounted_returns_match_loop(gamma):
    """G_t = sum_{k>=t} gamma^(k-t) r_k over valid tokens only (masked ones are not discount steps)."""
    rewards, _ = token_batch()
    torch.testing.assert_close(
        discounted_returns(rewards, MASK, gamma), ref_returns(rewards, MASK, gamma), rtol=1e-12, atol=1e-12
    )


def test_discounted_returns_hand_case():
    """r = [1, 2, _, 3] with a gap: gamma=1 gives suffix sums [6, 5, 0, 3];
    gamma=0.5 gives [1 + 0.5*2 + 0.25*3, 2 + 0.5*3, 0, 3] = [2.75, 3.5, 0, 3] (the gap is not a step)."""
    r = torch.tensor([[1.0, 2.0, 99.0, 3.0]], dtype=F64)
    m = torch.tensor([[1, 1, 0, 1]])
    assert discounted_returns(r, m, 1.0).tolist() == [[6.0, 5.0, 0.0, 3.0]]
    assert discounted_returns(r, m, 0.5).tolist() == [[2.75, 3.5, 0.0, 3.0]]


@pytest.mark.parametrize("junk", [1e6, float("nan"), float("inf")])
def test_discounted_returns_ignore_padding(junk):
    """Values in padded positions do not change valid outputs, and padded outputs are 0."""
    rewards, _ = token_batch(1)
    clean = discounted_returns(rewards, MASK, 0.95)
    dirty = discounted_returns(torch.where(MASK.bool(), rewards, junk), MASK, 0.95)
    assert torch.equal(clean, dirty)
    assert (clean[MASK == 0] == 0).all()


# ---------------------------------------------------------------- GAE

def ref_gae(rewards, values, mask, gamma, lam):
    adv, ret = torch.zeros_like(rewards), torch.zeros_like(rewards)
    for i in range(rewards.shape[0]):
        pos = valid_positions(mask[i])
        running = 0.0
        for j in reversed(range(len(pos))):
            t = pos[j]
            next_v = values[i, pos[j + 1]].item() if j + 1 < len(pos) else 0.0
            delta = rewards[i, t].item() + gamma * next_v - values[i, t].item()
            running = delta + gamma * lam * running
            adv[i, t] = running
            ret[i, t] = running + values[i, t].item()
    return adv, ret


@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (0.99, 0.95), (0.9, 0.0), (1.0, 0.5)])
def test_gae_matches_loop(gamma, lam):
    """Per row over valid tokens only, V after the last valid token = 0; masked outputs are 0."""
    rewards, values = token_batch(2)
    adv, ret = gae(rewards, values, MASK, gamma, lam)
    ref_adv, ref_ret = ref_gae(rewards, values, MASK, gamma, lam)
    torch.testing.assert_close(adv, ref_adv, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ret, ref_ret, rtol=1e-12, atol=1e-12)


def test_gae_hand_case():
    """r = [0, 1], V = [0.2, 0.4], gamma 0.9, lam 0.95:
    delta_1 = 1 + 0 - 0.4 = 0.6, delta_0 = 0 + 0.9*0.4 - 0.2 = 0.16;
    A = [0.16 + 0.9*0.95*0.6, 0.6] = [0.673, 0.6]; returns = A + V = [0.873, 1.0]."""
    rewards, values = torch.tensor([[0.0, 1.0]], dtype=F64), torch.tensor([[0.2, 0.4]], dtype=F64)
    adv, ret = gae(rewards, values, torch.ones(1, 2), 0.9, 0.95)
    torch.testing.assert_close(adv, torch.tensor([[0.673, 0.6]], dtype=F64))
    torch.testing.assert_close(ret, torch.tensor([[0.873, 1.0]], dtype=F64))


@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_gae_lam1_is_returns_minus_values(gamma):
    """lam = 1: A = discounted_returns(r) - V on valid tokens (Monte-Carlo advantage)."""
    rewards, values = token_batch(3)
    adv, _ = gae(rewards, values, MASK, gamma, 1.0)
    expected = torch.where(MASK.bool(), discounted_returns(rewards, MASK, gamma) - values, 0.0)
    torch.testing.assert_close(adv, expected, rtol=1e-10, atol=1e-10)


def test_gae_lam0_is_td_residual():
    """lam = 0: A_t = r_t + gamma * V_next_valid - V_t (V after the last valid token = 0)."""
    rewards, values = token_batch(4)
    adv, _ = gae(rewards, values, MASK, 0.9, 0.0)
    expected = torch.zeros_like(rewards)
    for i in range(MASK.shape[0]):
        pos = valid_positions(MASK[i])
        for j, t in enumerate(pos):
            v_next = values[i, pos[j + 1]] if j + 1 < len(pos) else 0.0
            expected[i, t] = rewards[i, t] + 0.9 * v_next - values[i, t]
    torch.testing.assert_close(adv, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("junk", [1e6, float("nan"), float("inf")])
def test_gae_ignores_values_and_rewards_at_masked_positions(junk):
    """Changing values or rewards at masked positions changes neither output."""
    rewards, values = token_batch(5)
    clean = gae(rewards, values, MASK, 0.99, 0.95)
    pad = ~MASK.bool()
    for dirty in (
        gae(rewards, values.masked_fill(pad, junk), MASK, 0.99, 0.95),
        gae(rewards.masked_fill(pad, junk), values, MASK, 0.99, 0.95),
    ):
        assert torch.equal(clean[0], dirty[0]) and torch.equal(clean[1], dirty[1])


def test_gae_returns_are_advantages_plus_values():
    """returns == advantages + values on valid tokens; both are 0 on masked ones."""
    rewards, values = token_batch(6)
    adv, ret = gae(rewards, values, MASK, 0.97, 0.9)
    valid = MASK.bool()
    assert torch.equal(ret[valid], adv[valid] + values[valid])
    assert (adv[~valid] == 0).all() and (ret[~valid] == 0).all()


# ---------------------------------------------------------------- token_level_rewards

def test_sequence_reward_lands_on_the_last_valid_token():
    """EOS-terminated, truncated (no EOS) and pad == eos rows, with masks from the rollout code."""
    from rlhf.rollout import completion_mask

    eos, pad_is_eos, a = 2, 2, 20
    ids = torch.tensor([[a, a, eos, 0, 0], [a, a, a, a, a], [a, pad_is_eos, pad_is_eos, pad_is_eos, pad_is_eos]])
    mask, truncated = completion_mask(ids, [eos])
    rewards = torch.tensor([1.0, 2.0, 3.0])
    token_rewards = token_level_rewards(rewards, mask)
    expected = torch.zeros(3, 5)
    expected[0, 2], expected[1, 4], expected[2, 1] = 1.0, 2.0, 3.0  # the EOS, the last token, the first EOS
    assert torch.equal(token_rewards, expected) and truncated.tolist() == [False, True, False]


def test_token_rewards_subtract_the_kl_on_valid_tokens_only():
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]])
    kl = torch.arange(12, dtype=torch.float32).view(3, 4) / 10
    out = token_level_rewards(torch.tensor([5.0, 7.0, 9.0]), mask, kl, kl_coef=0.5)
    expected = torch.tensor([[-0.0, -0.05, -0.1 + 5.0, 0.0], [-0.2 + 7.0, 0, 0, 0], [0.0, 0, 0, 0]])
    torch.testing.assert_close(out, expected)

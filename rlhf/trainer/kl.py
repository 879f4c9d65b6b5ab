"""Where the KL to the reference enters, decided in one place: ``KLPenalty``.

- ``kl_in="reward"`` (the PPO and REINFORCE default, as in InstructGPT): before advantages are computed,
  every completion token's reward is reduced by ``kl_coef * KL`` at that token, the KL of the sampling
  policy to the reference (no gradient). GAE and reward-to-go then carry it.
- ``kl_in="loss"`` (the GRPO default, as in DeepSeekMath): the loss adds ``kl_coef * KL`` of the current
  policy to the reference, aggregated like the policy loss, with gradient.
- ``kl_in=None`` or ``kl_coef=0``: no KL, and no reference model is loaded.

``kl_target`` makes ``kl_coef`` adaptive (Ziegler et al. 2019) in either place. It follows the rollout's KL to the
reference, measured once per step: ``KLPenalty.measure`` when the rollout has the sampling policy's log-probs, else
(on-policy, KL in the loss) the update's pass, which has not moved the policy yet (``UpdateResult.rollout_kl``).

``sync_ref_model`` (TR-DPO) moves the reference itself towards the policy every ``ref_model_sync_steps`` steps
(``sync_reference``), as TRL's ``SyncRefModelCallback``.
"""

import torch

from rlhf.core import aggregate_loss, kl_penalty, masked_sum


class AdaptiveKLController:
    """kl_coef <- kl_coef * (1 + clip(KL / target - 1, -0.2, 0.2) * n / horizon), after each step with
    n samples whose mean KL per sequence was KL."""

    def __init__(self, target: float, horizon: int):
        self.target = target
        self.horizon = horizon

    def update(self, kl_coef: float, kl: float, num_samples: int) -> float:
        error = min(max(kl / self.target - 1.0, -0.2), 0.2)
        return kl_coef * (1.0 + error * num_samples / self.horizon)


def kl_placement(kl_in: str | None, kl_coef: float) -> str | None:
    """"reward", "loss", or None when there is no KL term."""
    return kl_in if kl_coef > 0 else None


class KLPenalty:
    """The KL term of one run: its placement, its (possibly adaptive) coefficient and its estimator."""

    def __init__(self, placement: str | None, coef: float, estimator: str, target: float | None = None,
                 horizon: int = 10000):
        self.placement = placement
        self.coef = coef
        self.estimator = estimator
        self.controller = AdaptiveKLController(target, horizon) if target else None

    def rollout_kl(self, rollout) -> torch.Tensor | None:
        """The rollout's KL to the reference per token [B, T] (no gradient), from the sampling policy's and the
        reference's log-probs when the rollout has both; else None (on-policy with the KL in the loss, the update's
        pass measures it)."""
        if rollout.ref_logprobs is None or rollout.old_logprobs is None:
            return None
        return kl_penalty(rollout.old_logprobs, rollout.ref_logprobs, self.estimator)

    def measure(self, rollout, accelerator, metrics) -> float | None:
        """The rollout's mean KL per sequence to the reference over every process (logged as ``kl/sequence``),
        when the rollout has both log-probs; else None."""
        kl = self.rollout_kl(rollout)
        return None if kl is None else rollout_mean_kl(sequence_kl(kl, rollout.policy_tokens), accelerator, metrics)

    def in_reward(self, token_rewards: torch.Tensor, rollout, metrics) -> torch.Tensor:
        """``token_rewards`` [B, T] minus ``coef * KL`` per valid token when the KL sits in the reward (the rollout's
        KL); else unchanged."""
        kl = self.rollout_kl(rollout) if self.placement == "reward" else None
        if kl is None:
            return token_rewards
        mask, sequences = rollout.policy_tokens, rollout.size
        metrics.add("kl", masked_sum(kl, mask) / mask.sum().clamp(min=1), mask.sum())
        metrics.add("kl/reward_penalty", -self.coef * masked_sum(kl, mask) / sequences, sequences)
        return token_rewards - self.coef * torch.where(mask.bool(), kl.to(token_rewards.dtype), 0.0)

    def in_loss(self, logprobs: torch.Tensor, ref_logprobs: torch.Tensor | None, mask: torch.Tensor, agg: str,
                denominators: dict) -> tuple[torch.Tensor | float, torch.Tensor | None]:
        """(``coef * aggregate(KL)`` with gradient, and the KL per token, detached) when the KL sits in the loss;
        (0, None) otherwise."""
        if self.placement != "loss":
            return 0.0, None
        kl = kl_penalty(logprobs, ref_logprobs, self.estimator)
        return self.coef * aggregate_loss(kl, mask, agg, **denominators), kl.detach()

    def update_coef(self, kl_per_sequence: float | None, num_samples: int) -> None:
        """After a step: move an adaptive coefficient towards its target, given the rollout's mean KL per sequence
        (None when the step measured none: the coefficient stays)."""
        if self.controller is not None and kl_per_sequence is not None:
            self.coef = self.controller.update(self.coef, kl_per_sequence, num_samples)


def sequence_kl(token_kl: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(sum over rows of each row's KL, number of rows) as a float64 pair: pairs add over micro-batches and processes,
    and their ratio is the mean KL per sequence."""
    per_row = masked_sum(token_kl.double(), mask, dim=1)
    return torch.stack([per_row.sum(), torch.tensor(float(per_row.numel()), dtype=torch.float64, device=per_row.device)])


def rollout_mean_kl(total: torch.Tensor, accelerator, metrics=None) -> float:
    """The mean KL per sequence over every process's rows, from this process's (sum, rows) pair; logged as
    ``kl/sequence`` when ``metrics`` is given."""
    if accelerator.num_processes > 1:
        total = accelerator.reduce(total, reduction="sum")
    mean = (total[0] / total[1].clamp(min=1)).item()
    if metrics is not None:
        metrics.add("kl/sequence", mean)  # already global: every process adds the same value
    return mean


def sync_reference(ref_model, policy, args, steps_done: int, accelerator) -> bool:
    """TR-DPO's reference update (Gorbatovski et al. 2024), TRL's ``sync_ref_model``: after step ``steps_done``, when
    it is a multiple of ``ref_model_sync_steps``, ref <- alpha * policy + (1 - alpha) * ref for every weight, alpha =
    ``ref_model_mixup_alpha``. Every process mixes its own full copy from the same policy weights, so the copies stay
    equal. Returns whether it synced. The synced reference is saved in checkpoints (``checkpointing``)."""
    if not args.sync_ref_model or ref_model is None:
        return False
    if steps_done % args.ref_model_sync_steps:
        return False
    mix_into_reference(ref_model, accelerator.unwrap_model(policy), args.ref_model_mixup_alpha)
    return True


@torch.no_grad()
def mix_into_reference(reference: torch.nn.Module, policy: torch.nn.Module, alpha: float) -> None:
    """reference <- alpha * policy + (1 - alpha) * reference, in place, weight by weight (matched by name), computed
    in the reference's dtype and on its device as TRL does (``mul_(1 - alpha).add_(policy, alpha=alpha)``)."""
    targets, sources = dict(reference.named_parameters()), dict(policy.named_parameters())
    if targets.keys() != sources.keys():
        raise ValueError(f"sync_ref_model: the reference's weights do not match the policy's (only in the reference: "
                         f"{sorted(targets.keys() - sources.keys())[:3]}, only in the policy: "
                         f"{sorted(sources.keys() - targets.keys())[:3]}).")
    for name, target in targets.items():
        target.mul_(1.0 - alpha).add_(sources[name].to(target.device), alpha=alpha)

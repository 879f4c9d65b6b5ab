"""The update half of a step: ``num_epochs`` passes over the rollout batch in shuffled mini-batches, each
one optimizer step, accumulated over micro-batches; and the loss of one micro-batch.

Loss normalisation is global: the denominators of a mini-batch (its valid tokens and sequences, summed
over processes) are counted before the first backward, so the gradient does not depend on how the
mini-batch is split into micro-batches or processes (pitfall 6 in tests/README.md). The one exception is asked
for by name: ``loss_agg="micro-batch-token-mean"`` (TRL's bnpo) takes each micro-batch's own token mean and
weighs micro-batches equally, so its gradient depends on ``micro_batch_size`` by definition.
"""

import logging
import os
from dataclasses import dataclass, field

import torch

from rlhf.configs import RLConfig
from rlhf.core import aggregate_loss, logprob_mismatch, masked_mean, policy_loss, value_loss
from rlhf.critic import completion_values
from rlhf.forward import completion_logprobs
from rlhf.metrics import StepMetrics
from rlhf.rollout import Rollout
from rlhf.trainer.kl import KLPenalty

logger = logging.getLogger(__name__)


class NonFiniteError(RuntimeError):
    """Too many consecutive updates had a non-finite loss or gradient."""


@dataclass(frozen=True)
class StepPlan:
    """How a step's rollout batch divides on this process and which passes it needs, derived once from the
    config and the number of processes (``plan_step``)."""

    num_processes: int
    mini_batch: int  # completions per optimizer step, on this process
    micro_batch: int  # completions per forward/backward, on this process
    inference_batch: int  # completions per no-grad forward (reference, old log-probs, values)
    share_group: int  # G when every micro-batch holds whole groups whose prompt runs once, else 1
    on_policy: bool  # one optimizer step per rollout: the old log-probs are the current ones, detached
    kl_in: str | None  # "reward", "loss" or None (rlhf/trainer/kl.py)
    needs_old_logprobs: bool  # a no-grad pass of the sampling policy (see plan_step)


def plan_step(args: RLConfig, num_processes: int, sharded: bool, distilling: bool = False) -> StepPlan:
    from rlhf.trainer.kl import kl_placement

    mini = args.effective_mini_batch_size // num_processes
    micro = args.local_micro_batch_size(num_processes)
    inference = args.inference_batch_size or 2 * micro
    group = args.num_generations
    # Prompt sharing needs every micro-batch to hold whole groups, and an unsharded model whose forward keeps a
    # cache (gradient checkpointing recomputes without one).
    shares = (args.share_prompt_prefix and not sharded and group > 1 and not args.gradient_checkpointing
              and mini % group == 0 and micro % group == 0 and inference % group == 0)
    on_policy = args.optimizer_steps_per_step == 1
    kl_in = kl_placement(args.kl_in, args.kl_coef)
    # The sampling policy's log-probs: for the ratio off-policy; with a reference, for the KL in the reward
    # and for an adaptive coefficient, which both measure the rollout's KL; before any update, for the rollout
    # correction, the entropies that select tokens, and the distillation signal.
    needs_old = (not on_policy or (kl_in is not None and (kl_in == "reward" or args.kl_target is not None))
                 or args.rollout_correction is not None or args.top_entropy_quantile < 1 or distilling)
    return StepPlan(num_processes, mini, micro, inference, group if shares else 1, on_policy, kl_in, needs_old)


@dataclass
class TrainedModel:
    """A model the update steps: the actor, or PPO's critic."""

    name: str  # metric prefix: "" for the actor, "critic/" for the critic
    model: torch.nn.Module  # as Accelerate prepared it
    optimizer: torch.optim.Optimizer
    scheduler: object
    unwrapped: torch.nn.Module
    directory: str  # in a checkpoint: "model" for the actor, "critic" for the critic


@dataclass
class LossStats:
    """What one micro-batch's loss reports: its share of each mini-batch loss, per-token means over its valid
    tokens, per-sequence means over its sequences with a valid token, and maxima."""

    tokens: torch.Tensor
    sequences: torch.Tensor
    losses: dict[str, torch.Tensor] = field(default_factory=dict)
    token_means: dict[str, torch.Tensor] = field(default_factory=dict)
    sequence_means: dict[str, torch.Tensor] = field(default_factory=dict)
    maxima: dict[str, torch.Tensor] = field(default_factory=dict)


def length_order(rollout: Rollout, group: int) -> torch.Tensor:
    """Rows ordered by length, longest first (whole groups when ``group`` > 1). Micro-batches cut from this
    order hold sequences of similar length, so trimming leaves little padding; the loss is normalised over
    the whole mini-batch, so the order does not change the gradient."""
    lengths = rollout.prompt_mask.sum(dim=1) + rollout.completion_mask.sum(dim=1)
    if group == 1:
        return torch.argsort(lengths, descending=True, stable=True)
    groups = torch.argsort(lengths.view(-1, group).amax(dim=1), descending=True, stable=True)
    return (groups.unsqueeze(1) * group + torch.arange(group, device=groups.device)).reshape(-1)


def shuffled_rows(rows: int, generator: torch.Generator, group: int) -> torch.Tensor:
    """A random order of the rows; whole groups move together when ``group`` > 1."""
    if group == 1:
        return torch.randperm(rows, generator=generator)
    groups = torch.randperm(rows // group, generator=generator)
    return (groups.unsqueeze(1) * group + torch.arange(group)).reshape(-1)


@torch.no_grad()
def no_grad_pass(score, rollout: Rollout, plan: StepPlan) -> torch.Tensor:
    """``score(micro)`` -> [b, t] (or [b, ..., t]) for every micro-batch of ``rollout`` (by length, trimmed),
    reassembled to [B, T] (or [B, ..., T]) in the rollout's row order."""
    order = length_order(rollout, plan.share_group)
    ordered = rollout.rows(order)
    pieces = [score(ordered.rows(slice(start, start + plan.inference_batch)).trimmed())
              for start in range(0, rollout.size, plan.inference_batch)]
    width = rollout.completion_ids.shape[1]
    scores = torch.cat([torch.nn.functional.pad(p, (0, width - p.shape[-1])) for p in pieces])
    return scores[torch.argsort(order)]


def loss_denominators(mini: Rollout, args: RLConfig, accelerator) -> dict:
    """Global token and sequence counts of a mini-batch (summed over processes)."""
    mask = mini.loss_mask
    counts = torch.stack([mask.sum(), (mask.sum(dim=1) > 0).sum()]).double()
    counts = accelerator.reduce(counts, reduction="sum") if accelerator.num_processes > 1 else counts
    # Dr. GRPO's constant: the longest completion (multi-turn: the trajectory's token budget).
    seq_len = args.max_new_tokens if mini.policy_mask is None else args.trajectory_tokens
    return {"num_tokens": counts[0], "num_seqs": counts[1], "seq_len": seq_len}


def micro_batch_loss(actor: TrainedModel | None, critic: TrainedModel | None, micro: Rollout, args: RLConfig,
                     plan: StepPlan, kl: KLPenalty, denominators: dict) -> tuple[torch.Tensor, LossStats]:
    """The loss of one micro-batch, normalised with its mini-batch's global ``denominators``:

        policy loss (actor: PPO's clip or CISPO, per token or per sequence, weighted by the rollout correction)
        + KL, when it sits in the loss + entropy bonus + vf_coef x value loss (critic)

    ``actor`` is None while only the critic trains (PPO's critic warm-up)."""
    mask = micro.loss_mask
    stats = LossStats(tokens=mask.sum(), sequences=(mask.sum(dim=1) > 0).sum())
    loss = torch.zeros((), device=mask.device)
    agg = "token-mean" if args.loss_agg == "micro-batch-token-mean" else args.loss_agg  # its denominators are per micro
    if critic is not None:
        values = completion_values(critic.model, micro.prompt_ids, micro.prompt_mask, micro.completion_ids,
                                   micro.completion_mask, plan.share_group, critic.unwrapped)
        loss_v, v_stats = value_loss(values, micro.old_values, micro.returns, mask, args.value_clip_eps, "token-mean",
                                     num_tokens=denominators["num_tokens"])
        loss = loss + args.vf_coef * loss_v
        stats.losses["loss/value"] = loss_v.detach()
        stats.token_means["critic/value_clip_frac"] = v_stats["value_clip_frac"]
    if actor is None:
        return loss, stats
    logprobs, entropy = completion_logprobs(
        actor.model, micro.prompt_ids, micro.prompt_mask, micro.completion_ids, micro.completion_mask,
        args.temperature, with_entropy=True, entropy_grad=args.entropy_coef > 0, group_size=plan.share_group,
        prefix_model=actor.unwrapped,
    )
    old_logprobs = logprobs.detach() if plan.on_policy else micro.old_logprobs
    loss_pg, pg = policy_loss(logprobs, old_logprobs, micro.advantages, mask, args.clip_eps_low, args.clip_eps_high,
                              args.dual_clip, agg, level=args.importance_sampling_level,
                              loss_type=args.policy_loss_type, weights=micro.correction_weights, **denominators)
    if micro.old_logprobs is None and micro.sampler_logprobs is not None:
        # On-policy without a scoring pass: these log-probs are the trainer's view of the sampling policy, so the
        # sampler's mismatch is measured here (else in make_rollout, on the scoring pass).
        mismatch = logprob_mismatch(logprobs, micro.sampler_logprobs, mask, args.rollout_correction_cap)
        stats.token_means.update({f"rollout/{k}": mismatch[k] for k in ("abs_log_ratio", "k3", "truncated_frac")})
        stats.sequence_means["rollout/masked_frac"] = mismatch["masked_frac"]
        stats.maxima["rollout/max_abs_log_ratio"] = mismatch["max_abs_log_ratio"]
    loss = loss + loss_pg
    stats.losses["loss/policy"] = loss_pg.detach()
    kl_loss, kl_stats = kl.in_loss(logprobs, micro.ref_logprobs, mask, agg, denominators)
    loss = loss + kl_loss
    if args.entropy_coef > 0:
        loss = loss - args.entropy_coef * aggregate_loss(entropy, mask, agg, **denominators)
    stats.token_means.update(kl_stats)
    stats.token_means.update({
        "entropy": masked_mean(entropy.detach(), mask),
        "clip/low_frac": pg["clip_frac_low"], "clip/high_frac": pg["clip_frac_high"],
        "clip/dual_frac": pg["dual_clip_frac"], "policy/approx_kl": pg["approx_kl"],
        "policy/ratio_mean": pg["ratio_mean"],
    })
    stats.maxima["policy/ratio_max"] = pg["ratio_max"]
    return loss, stats


def accumulate_gradients(actor, critic, mini: Rollout, args, plan: StepPlan, kl: KLPenalty, accelerator,
                         metrics: StepMetrics) -> torch.Tensor:
    """Forward and backward every micro-batch of ``mini``; gradients add up to the mini-batch's. Returns the
    approximate KL of the mini-batch's policy to the sampling policy, as a (sum, tokens) pair on this process."""
    denominators = loss_denominators(mini, args, accelerator)
    mini = mini.rows(length_order(mini, plan.share_group))  # similar lengths share a micro-batch: less padding
    starts = range(0, mini.size, plan.micro_batch)
    share = 1.0 / (len(starts) * plan.num_processes)  # of the mini-batch loss, summed over processes
    approx_kl = torch.zeros(2, device=accelerator.device)
    # Accelerate divides each loss by gradient_accumulation_steps (DeepSpeed does the same) and DDP averages
    # gradients over processes; the denominators are already global, so undo both.
    scale = plan.num_processes * accelerator.gradient_accumulation_steps
    trained = [m.model for m in (actor, critic) if m is not None]
    for start in starts:
        # accumulate() skips the gradient all-reduce (DDP) or the engine step (DeepSpeed) until the last
        # micro-batch of the mini-batch.
        micro = mini.rows(slice(start, start + plan.micro_batch)).trimmed()
        if args.loss_agg == "micro-batch-token-mean":  # TRL's bnpo: this micro-batch's tokens, micro-batches equal
            denominators = {**denominators, "num_tokens": micro.loss_mask.sum().double() / share}
        with accelerator.accumulate(*trained):
            loss, stats = micro_batch_loss(actor, critic, micro, args, plan, kl, denominators)
            accelerator.backward(loss * scale)
        for name, value in stats.losses.items():  # logged: the mini-batch loss, averaged over mini-batches
            metrics.add(name, value / share, share)
        for name, value in stats.token_means.items():
            metrics.add(name, value, stats.tokens)
        for name, value in stats.sequence_means.items():
            metrics.add(name, value, stats.sequences)
        for name, value in stats.maxima.items():
            metrics.add_max(name, value)
        if "policy/approx_kl" in stats.token_means:
            approx_kl += torch.stack([stats.token_means["policy/approx_kl"] * stats.tokens,
                                      stats.tokens.to(approx_kl.dtype)])
    return approx_kl


def optimizer_step(trained: list[TrainedModel], accelerator, max_grad_norm: float | None,
                   metrics: StepMetrics) -> bool:
    """Clip and step every trained model, or skip them all if any gradient norm is not finite (a NaN or inf
    loss leaves one). Returns whether the update was applied."""
    max_norm = max_grad_norm if max_grad_norm is not None else float("inf")
    # DeepSpeed clips inside its engine and returns no norm here (None); it also skips overflowing steps.
    norms = [accelerator.clip_grad_norm_(m.model.parameters(), max_norm) for m in trained]
    known = [torch.as_tensor(n, dtype=torch.float32) for n in norms if n is not None]
    finite = not known or bool(torch.isfinite(torch.stack(known)).all())
    for m, norm in zip(trained, norms):
        if finite:
            m.optimizer.step()
            m.scheduler.step()
            if norm is not None:
                metrics.add(f"{m.name}grad_norm", norm)
        m.optimizer.zero_grad(set_to_none=True)
    return finite


class NonFiniteGuard:
    """Counts updates skipped for a non-finite loss or gradient; ``max_in_a_row`` of them in a row save the
    mini-batch and stop the run."""

    def __init__(self, max_in_a_row: int, output_dir: str, newest_checkpoint=lambda: None):
        self.max_in_a_row = max_in_a_row
        self.output_dir = output_dir
        self.newest_checkpoint = newest_checkpoint  # () -> this run's newest checkpoint on disk, for the message
        self.consecutive = 0

    def record(self, applied: bool, step: int, mini: Rollout, texts, accelerator, metrics: StepMetrics) -> None:
        if applied:
            self.consecutive = 0
            return
        self.consecutive += 1
        # Summed over processes: divide by the process count (every process skips the same update).
        metrics.add_sum("guard/skipped_updates", 1.0 / accelerator.num_processes)
        logger.warning("Step %d: non-finite loss or gradient; update skipped (%d in a row).", step, self.consecutive)
        if self.consecutive < self.max_in_a_row:
            return
        path = os.path.join(self.output_dir, f"nonfinite-step{step}-rank{accelerator.process_index}.pt")
        torch.save({"step": step, "tensors": {k: v.detach().cpu() for k, v in mini.tensors().items()},
                    "prompts": texts.prompts, "completions": texts.completions}, path)
        newest = self.newest_checkpoint()
        raise NonFiniteError(
            f"{self.consecutive} updates in a row had a non-finite loss or gradient (step {step}); the last "
            f"mini-batch is saved in {path} (torch.load(path, weights_only=True)). Check the rewards, lower "
            "learning_rate, or set max_grad_norm. No checkpoint is written after a step with a skipped update: "
            + (f"the last good one is {newest}." if newest else "this run has written no checkpoint.")
        )


def update(actor: TrainedModel | None, critic: TrainedModel | None, rollout: Rollout, texts, args: RLConfig,
           plan: StepPlan, kl: KLPenalty, accelerator, step: int, guard: NonFiniteGuard, metrics: StepMetrics,
           target_kl: float | None = None) -> None:
    """``num_epochs`` passes over ``rollout`` in shuffled mini-batches (whole groups when prompts are shared), one
    optimizer step each; with ``target_kl``, the step's remaining mini-batches are dropped once one ends
    with an approximate KL to the sampling policy above it."""
    trained = [m for m in (actor, critic) if m is not None]
    for m in trained:
        m.model.train()
    generator = torch.Generator().manual_seed(args.seed * 7919 + step)
    metrics.add_sum("guard/skipped_updates", 0.0)
    for _ in range(args.num_epochs):
        order = shuffled_rows(rollout.size, generator, plan.share_group).to(accelerator.device)
        for start in range(0, rollout.size, plan.mini_batch):
            mini = rollout.rows(order[start:start + plan.mini_batch])
            approx_kl = accumulate_gradients(actor, critic, mini, args, plan, kl, accelerator, metrics)
            guard.record(optimizer_step(trained, accelerator, args.max_grad_norm, metrics), step, mini, texts,
                         accelerator, metrics)
            if target_kl is not None and actor is not None:
                if accelerator.num_processes > 1:
                    approx_kl = accelerator.reduce(approx_kl, reduction="sum")
                if (approx_kl[0] / approx_kl[1].clamp(min=1)).item() > target_kl:
                    metrics.add("policy/early_stopped", 1.0)
                    return

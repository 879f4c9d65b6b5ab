"""The update half of a step: ``num_epochs`` passes over the rollout batch in shuffled mini-batches, each
one optimizer step, accumulated over micro-batches; and the loss of one micro-batch.

Loss normalisation is global: the denominators of a mini-batch (its valid tokens and sequences, summed
over processes) are counted before the first backward, so the gradient does not depend on how the
mini-batch is split into micro-batches or processes (pitfall 6 in tests/README.md). The one exception is asked
for by name: ``loss_agg="micro-batch-token-mean"`` (TRL's bnpo) takes each micro-batch's own token mean and
weighs micro-batches equally, so its gradient depends on ``micro_batch_size`` by definition.
"""

import logging
import math
import os
from dataclasses import dataclass, field

import torch

from rlhf import checkpoint as ckpt
from rlhf.configs import RLConfig
from rlhf.core import aggregate_loss, logprob_mismatch, masked_mean, policy_loss, value_loss
from rlhf.critic import completion_values
from rlhf.forward import completion_logprobs
from rlhf.metrics import StepMetrics
from rlhf.rollout import Rollout
from rlhf.trainer.kl import KLPenalty, rollout_mean_kl, sequence_kl
from rlhf.trainer.plan import StepPlan, length_order, shuffled_rows

logger = logging.getLogger(__name__)


class NonFiniteError(RuntimeError):
    """Too many consecutive updates had a non-finite loss or gradient."""


class WeightsBlownUpError(NonFiniteError):
    """An optimizer step blew a model's weights up: their norm grew more than ``MAX_WEIGHT_GROWTH`` times, or is
    not finite."""


# Training moves a model's weight norm by a few percent; an optimizer step that multiplies it by more than this (a
# learning rate far too large, gradients of absurd size) has destroyed the weights, finite or not.
MAX_WEIGHT_GROWTH = 10.0


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
    minima: dict[str, torch.Tensor] = field(default_factory=dict)
    approx_kl: torch.Tensor | None = None  # the actor's per-token KL to the sampling policy (mean over valid tokens)
    rollout_kl: torch.Tensor | None = None  # on-policy with the KL in the loss: (sum, rows) of the KL to the reference


@dataclass
class UpdateResult:
    """What ``update`` did, for the decisions after it (the adaptive KL, saving), read as fields, not metric names."""

    optimizer_steps: int = 0  # mini-batches whose update was applied
    skipped_updates: int = 0  # mini-batches skipped for a non-finite loss or gradient
    early_stopped: bool = False  # target_kl ended the step before its last mini-batch
    rollout_kl: float | None = None  # on-policy, KL in the loss: the rollout's mean KL per sequence, all processes


@dataclass
class StepResult:
    """One step: its global metrics (what is logged), what the update did, and the rollout's mean KL per sequence
    to the reference (None without a reference), which the adaptive KL coefficient follows."""

    metrics: dict[str, float]
    update: UpdateResult
    rollout_kl: float | None


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

        policy loss (actor: PPO's clip, CISPO or SAPO, per token or per sequence, weighted by the rollout correction)
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
        stats.losses["loss/total"] = loss.detach()
        return loss, stats
    logprobs, entropy = completion_logprobs(
        actor.model, micro.prompt_ids, micro.prompt_mask, micro.completion_ids, micro.completion_mask,
        args.temperature, with_entropy=True, entropy_grad=args.entropy_coef > 0, group_size=plan.share_group,
        prefix_model=actor.unwrapped,
    )
    old_logprobs = logprobs.detach() if plan.on_policy else micro.old_logprobs
    loss_pg, pg = policy_loss(logprobs, old_logprobs, micro.advantages, mask, args.clip_eps_low, args.clip_eps_high,
                              args.dual_clip, agg, level=args.importance_sampling_level,
                              loss_type=args.policy_loss_type, weights=micro.loss_weights,
                              ratio_mask=micro.policy_tokens,
                              sapo_temperatures=(args.sapo_temperature_pos, args.sapo_temperature_neg), **denominators)
    if micro.old_logprobs is None and micro.sampler_logprobs is not None:
        # On-policy without a scoring pass: these log-probs are the trainer's view of the sampling policy, so the
        # sampler's mismatch is measured here (else in make_rollout, on the scoring pass).
        mismatch = logprob_mismatch(logprobs, micro.sampler_logprobs, mask, args.rollout_correction_cap)
        stats.token_means.update({f"rollout/{k}": mismatch[k] for k in ("abs_log_ratio", "k3", "truncated_frac")})
        stats.sequence_means["rollout/masked_frac"] = mismatch["masked_frac"]
        stats.maxima["rollout/max_abs_log_ratio"] = mismatch["max_abs_log_ratio"]
    loss = loss + loss_pg
    stats.losses["loss/policy"] = loss_pg.detach()
    kl_loss, token_kl = kl.in_loss(logprobs, micro.ref_logprobs, mask, agg, denominators)
    loss = loss + kl_loss
    if args.entropy_coef > 0:  # on the tokens whose policy loss counts (entropy-token selection)
        bonus = entropy if micro.selected_tokens is None else entropy * micro.selected_tokens
        loss = loss - args.entropy_coef * aggregate_loss(bonus, mask, agg, **denominators)
    if token_kl is not None:
        stats.token_means["kl"] = masked_mean(token_kl, mask)
        if plan.on_policy and micro.old_logprobs is None:  # not measured on the rollout (KLPenalty.measure), and the
            # policy has not moved yet: this is the rollout's KL, at no extra pass
            stats.rollout_kl = sequence_kl(token_kl, micro.policy_tokens)
    stats.approx_kl = pg["approx_kl"]
    stats.token_means.update({
        "entropy": masked_mean(entropy.detach(), mask),
        "clip/low_frac": pg["clip_frac_low"], "clip/high_frac": pg["clip_frac_high"],
        "clip/dual_frac": pg["dual_clip_frac"], "policy/approx_kl": pg["approx_kl"],
        "policy/ratio_mean": pg["ratio_mean"],
    })
    stats.maxima["policy/ratio_max"] = pg["ratio_max"]
    # TRL's clip_ratio/region_mean, low_min and high_max: over the sequences with a trained token (a micro-batch
    # without one adds 1 to the minimum and 0 to the maximum, which never decide them)
    stats.token_means["clip/region_frac"] = pg["clip_frac_low"] + pg["clip_frac_high"]
    rows = mask.sum(dim=1) > 0
    stats.minima["clip/low_min"] = torch.where(rows, pg["clip_frac_low_rows"], 1.0).min()
    stats.maxima["clip/high_max"] = torch.where(rows, pg["clip_frac_high_rows"], 0.0).max()
    stats.losses["loss/total"] = loss.detach()  # what is trained: TRL's loss
    return loss, stats


def accumulate_gradients(actor, critic, mini: Rollout, args, plan: StepPlan, kl: KLPenalty, accelerator,
                         metrics: StepMetrics) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Forward and backward every micro-batch of ``mini``; gradients add up to the mini-batch's. Returns, on this
    process, the approximate KL of the mini-batch's policy to the sampling policy as a (sum, tokens) pair, and
    the KL to the reference as a (sum, rows) pair when the loss measured the rollout's (else None)."""
    denominators = loss_denominators(mini, args, accelerator)
    mini = mini.rows(length_order(mini, plan.share_group))  # similar lengths share a micro-batch: less padding
    starts = range(0, mini.size, plan.micro_batch)
    share = 1.0 / (len(starts) * plan.num_processes)  # of the mini-batch loss, summed over processes
    approx_kl, rollout_kl = torch.zeros(2, device=accelerator.device), None
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
        for name, value in stats.minima.items():
            metrics.add_min(name, value)
        if stats.approx_kl is not None:
            approx_kl += torch.stack([stats.approx_kl * stats.tokens, stats.tokens.to(approx_kl.dtype)])
        if stats.rollout_kl is not None:
            rollout_kl = stats.rollout_kl if rollout_kl is None else rollout_kl + stats.rollout_kl
    return approx_kl, rollout_kl


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


def weight_norms(trained: list[TrainedModel], accelerator) -> dict[str, float]:
    """The L2 norm of each trained model's parameters (all processes' shards), keyed by its checkpoint directory."""
    from rlhf.distributed import fsdp_version, shards_parameters

    sharded = accelerator.num_processes > 1 and shards_parameters(accelerator)
    fsdp1 = sharded and fsdp_version(accelerator) == 1  # its parameters are plain tensors holding this process's shard

    def squares(norms: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack(norms).square().sum() if norms else torch.zeros((), device=accelerator.device)

    result = {}
    for m in trained:
        shards, replicated = [], []  # a shard's square adds up over processes; a replicated parameter's is counted once
        for p in m.model.parameters():
            local, is_shard = _local_part(p, fsdp1)
            (shards if is_shard else replicated).append(
                torch.linalg.vector_norm(local, dtype=torch.float32).to(accelerator.device))
        total = accelerator.reduce(squares(shards), reduction="sum") if sharded else squares(shards)
        result[m.directory] = (total + squares(replicated)).sqrt().item()
    return result


def _local_part(parameter: torch.Tensor, fsdp1: bool) -> tuple[torch.Tensor, bool]:
    """What this process holds of ``parameter``, and whether it is a shard (else the whole, on every process)."""
    if hasattr(parameter, "to_local"):  # a DTensor (FSDP2)
        return parameter.detach().to_local(), True
    if hasattr(parameter, "ds_tensor"):  # DeepSpeed ZeRO-3 keeps this process's partition there
        return parameter.ds_tensor.detach(), True
    return parameter.detach(), fsdp1


def healthy_norm(norm: float, reference: float) -> bool:
    """Whether a weight norm is finite and within ``MAX_WEIGHT_GROWTH`` times ``reference`` (0: no reference)."""
    return math.isfinite(norm) and not (reference > 0 and norm > MAX_WEIGHT_GROWTH * reference)


class NonFiniteGuard:
    """Stops a run whose updates go wrong: ``max_in_a_row`` updates in a row skipped for a non-finite loss or
    gradient save the mini-batch and stop it; one applied update that blows the weights up stops it at once, before
    they are saved. Both errors name this run's newest checkpoint whose weights are healthy."""

    def __init__(self, max_in_a_row: int, output_dir: str, checkpoints=lambda: []):
        self.max_in_a_row = max_in_a_row
        self.output_dir = output_dir
        self.checkpoints = checkpoints  # () -> this run's checkpoints on disk, oldest first, for the messages
        self.consecutive = 0
        self.norms: dict[str, float] = {}  # each trained model's weight norm, as last measured
        self.initial: dict[str, float] = {}  # ... at this process's first update: what a checkpoint's are held to

    def measure(self, trained: list[TrainedModel], accelerator) -> None:
        """Before a step's update: the weight norms that its first optimizer step is compared with."""
        self.norms = weight_norms(trained, accelerator)
        for name, norm in self.norms.items():
            self.initial.setdefault(name, norm)

    def check_weights(self, trained: list[TrainedModel], step: int, accelerator) -> None:
        """After an applied optimizer step: raise ``WeightsBlownUpError`` if it blew a model's weights up."""
        norms = weight_norms(trained, accelerator)
        for name, after in norms.items():
            before = self.norms[name]
            if not healthy_norm(after, before):
                which, rate = ("actor", "learning_rate") if name == "model" else ("critic", "critic_learning_rate")
                raise WeightsBlownUpError(
                    f"step {step + 1}: an optimizer step blew up the {which}'s weights: their norm went from "
                    f"{before:.4g} to {after:.4g} in one update (more than {MAX_WEIGHT_GROWTH:g}x, or not finite). The "
                    f"run stops before they are saved: lower {rate}, or set max_grad_norm, and check the rewards; "
                    + self.last_good_message())
        self.norms = norms

    def last_good(self) -> str | None:
        """This run's newest checkpoint whose weights were healthy: the norms its ``trainer_state.json`` records are
        finite and within ``MAX_WEIGHT_GROWTH`` times this process's first (a checkpoint without them is not vouched
        for)."""
        for path in reversed(self.checkpoints()):
            try:
                norms = ckpt.read_state(path).get("weight_norms")
            except ValueError:  # a damaged checkpoint (CheckpointError)
                continue
            if isinstance(norms, dict) and norms and all(
                    isinstance(norm, (int, float)) and healthy_norm(norm, self.initial.get(name, 0.0))
                    for name, norm in norms.items()):
                return path
        return None

    def last_good_message(self) -> str:
        good = self.last_good()
        return f"the last good one is {good}." if good else "this run has written no checkpoint with healthy weights."

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
        raise NonFiniteError(
            f"{self.consecutive} updates in a row had a non-finite loss or gradient (step {step}); the last "
            f"mini-batch is saved in {path} (torch.load(path, weights_only=True)). Check the rewards, lower "
            "learning_rate, or set max_grad_norm. No checkpoint is written after a step with a skipped update: "
            + self.last_good_message()
        )


def update(actor: TrainedModel | None, critic: TrainedModel | None, rollout: Rollout, texts, args: RLConfig,
           plan: StepPlan, kl: KLPenalty, accelerator, step: int, guard: NonFiniteGuard, metrics: StepMetrics,
           target_kl: float | None = None) -> UpdateResult:
    """``num_epochs`` passes over ``rollout`` in shuffled mini-batches (whole groups when prompts are shared), one
    optimizer step each; with ``target_kl``, the step's remaining mini-batches are dropped once one ends
    with an approximate KL to the sampling policy above it. Returns what it did."""
    trained = [m for m in (actor, critic) if m is not None]
    for m in trained:
        m.model.train()
    generator = torch.Generator().manual_seed(args.seed * 7919 + step)
    metrics.add_sum("guard/skipped_updates", 0.0)
    guard.measure(trained, accelerator)
    result, rollout_kl = UpdateResult(), None
    for _ in range(args.num_epochs):
        order = shuffled_rows(rollout.size, generator, plan.share_group).to(accelerator.device)
        for start in range(0, rollout.size, plan.mini_batch):
            mini = rollout.rows(order[start:start + plan.mini_batch])
            approx_kl, mini_kl = accumulate_gradients(actor, critic, mini, args, plan, kl, accelerator, metrics)
            if mini_kl is not None:
                rollout_kl = mini_kl if rollout_kl is None else rollout_kl + mini_kl
            applied = optimizer_step(trained, accelerator, args.max_grad_norm, metrics)
            if applied:
                guard.check_weights(trained, step, accelerator)
            result.optimizer_steps += applied
            result.skipped_updates += not applied
            guard.record(applied, step, mini, texts, accelerator, metrics)
            if target_kl is not None and actor is not None:
                if accelerator.num_processes > 1:
                    approx_kl = accelerator.reduce(approx_kl, reduction="sum")
                if (approx_kl[0] / approx_kl[1].clamp(min=1)).item() > target_kl:
                    metrics.add("policy/early_stopped", 1.0)
                    result.early_stopped = True
                    break
        if result.early_stopped:
            break
    if rollout_kl is not None:
        result.rollout_kl = rollout_mean_kl(rollout_kl, accelerator, metrics)
    return result


"""How a step's rollout batch divides on this process and which no-grad passes it needs (``plan_step``, derived
once from the config), and the row orders that cut it into micro-batches."""

from dataclasses import dataclass

import torch

from rlhf.configs import RLConfig
from rlhf.rollout import Rollout
from rlhf.trainer.kl import kl_placement


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
    mini = args.effective_mini_batch_size // num_processes
    micro = args.local_micro_batch_size(num_processes)
    inference = args.inference_batch_size or 2 * micro
    group = args.num_generations
    # Prompt sharing needs every micro-batch to hold whole groups and an unsharded model. Under gradient checkpointing
    # the forward keeps no cache: packed trees still share the prompt, the plain layout then runs every row whole
    # (rlhf.forward.keeps_cache).
    shares = (args.share_prompt_prefix and not sharded and group > 1
              and mini % group == 0 and micro % group == 0 and inference % group == 0)
    on_policy = args.optimizer_steps_per_step == 1
    kl_in = kl_placement(args.kl_in, args.kl_coef)
    # The sampling policy's log-probs: for the ratio off-policy; for the KL in the reward, which measures the
    # rollout's KL; before any update, for the rollout correction, the entropies that select tokens, and the
    # distillation signal. (On-policy with the KL in the loss, the update's own pass measures the rollout's KL.)
    needs_old = (not on_policy or kl_in == "reward" or args.rollout_correction is not None
                 or args.top_entropy_quantile < 1 or distilling)
    return StepPlan(num_processes, mini, micro, inference, group if shares else 1, on_policy, kl_in, needs_old)


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

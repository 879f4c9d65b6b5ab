"""The generate-and-score half of a step, and DAPO's dynamic sampling with refill (Yu et al. 2025).

One round: this process's share of the step's prompts, ``num_generations`` completions each, scored over the
whole batch. With ``filter_zero_std_groups`` and ``max_sampling_rounds`` > 1, a group whose completions all scored
the same carries no signal, so rounds of prompts the step has not used are sampled (``PromptSampler.refill_indices``:
a pure function of seed, step and round; once the dataset is used up, the least used prompts repeat) until
``prompts_per_step`` informative groups are collected or the rounds run out.
The decision is taken on the gathered rewards, so every process runs the same rounds. The chosen groups are then
dealt out so that each process holds its share: informative groups first, in (round, process, group) order, topped
up with uninformative ones (which the filter then leaves out of the loss) when too few were found.
"""

import logging

import torch
from accelerate.utils import gather_object

from rlhf.rewards import score_rollout
from rlhf.rollout import Rollout, RolloutTexts, concat_rollouts, concat_texts, generate_rollout

logger = logging.getLogger(__name__)


def informative_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """[num_groups] bool: the groups whose rewards differ (a zero-std group has zero advantage everywhere)."""
    return rewards.view(-1, group_size).std(dim=1) != 0


def informative_rows(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """[B_global] 1.0 for the completions of groups whose rewards differ, 0.0 for groups whose completions all
    scored the same: they carry no signal, and DAPO drops them so they do not dilute the token-mean."""
    return informative_groups(rewards, group_size).repeat_interleave(group_size).float()


def sample_groups(policy, dataset, sampler, step: int, sampling, args, reward_functions, reward_weights, accelerator,
                  metrics, timer, context=None, rollout_fn=generate_rollout
                  ) -> tuple[Rollout, RolloutTexts, torch.Tensor]:
    """(this process's rollout, its texts, the rewards of the whole batch [B_global]) for ``step``: one round, or
    with dynamic sampling as many as it takes (module docstring). ``context``: the reward functions'
    ``trainer_state`` / ``log_metric`` / ``log_extra`` (rlhf.reward_calls.RewardContext). ``rollout_fn``: how
    completions are made (``generate_rollout``, or ``rlhf.agent.AgentLoop.rollout`` for multi-turn trajectories)."""
    group = args.num_generations
    aggregation = getattr(args, "multi_objective_aggregation", "sum_then_normalize")  # a GRPOConfig field
    rounds = args.max_sampling_rounds if args.filter_zero_std_groups else 1
    pieces = []
    for round_index in range(rounds):
        with timer("generate"):
            rollout, texts = rollout_fn(policy, sampler.rows(dataset, step, round_index), sampling, group)
        with timer("score"):
            rewards = score_rollout(reward_functions, reward_weights, texts, accelerator, group, metrics, context,
                                    rollout.turn_rewards, aggregation)
        if rounds == 1:
            return rollout, texts, rewards
        pieces.append((rollout, texts, rewards))
        found = sum(int(informative_groups(r, group).sum()) for _, _, r in pieces)
        if found >= args.prompts_per_step:
            break
    metrics.add("sampling/rounds", len(pieces))
    metrics.add("sampling/informative_frac", min(found, args.prompts_per_step) / args.prompts_per_step)
    if found < args.prompts_per_step and accelerator.is_main_process:
        logger.warning("Step %d: %d of %d groups with differing rewards after max_sampling_rounds=%d; training on "
                       "those.", step, found, args.prompts_per_step, len(pieces))
    with timer("generate"):
        return deal_groups(pieces, args.prompts_per_step, group, accelerator)


def deal_groups(pieces: list[tuple[Rollout, RolloutTexts, torch.Tensor]], prompts_per_step: int, group: int,
                accelerator) -> tuple[Rollout, RolloutTexts, torch.Tensor]:
    """Choose ``prompts_per_step`` groups from the rounds in ``pieces`` (each: this process's rollout and texts, and
    the whole round's rewards) and give each process its share: (rollout, texts, rewards [B_global])."""
    num_processes, rank = accelerator.num_processes, accelerator.process_index
    local_groups = pieces[0][0].size // group  # per process and round
    num_rounds = len(pieces)
    everything = gather_rollout(concat_rollouts([rollout for rollout, _, _ in pieces]), accelerator)
    texts = [concat_texts([t for _, t, _ in pieces])]
    all_texts = gather_object(texts) if num_processes > 1 else texts
    # Groups in (round, process, group) order: a round's rewards are in process order.
    order = [(r, j) for r in range(num_rounds) for j in range(num_processes * local_groups)]
    informative = torch.cat([informative_groups(rewards, group) for _, _, rewards in pieces]).tolist()
    chosen = ([key for key, useful in zip(order, informative) if useful]
              + [key for key, useful in zip(order, informative) if not useful])[:prompts_per_step]
    share = prompts_per_step // num_processes
    rows, text_rows = [], []
    for r, j in chosen[rank * share:(rank + 1) * share]:
        process, g = divmod(j, local_groups)
        first = (r * local_groups + g) * group  # within the process's concatenated rounds
        rows += [process * num_rounds * local_groups * group + first + i for i in range(group)]
        text_rows.append((process, first))
    rollout = everything.rows(torch.tensor(rows, device=everything.completion_ids.device)).trimmed()
    mine = concat_texts([all_texts[p].rows(list(range(first, first + group))) for p, first in text_rows])
    rewards = torch.cat([pieces[r][2].view(-1, group)[j] for r, j in chosen])
    return rollout, mine, rewards


def gather_rollout(rollout: Rollout, accelerator) -> Rollout:
    """Every process's rows, in process order, widened to the widest prompt and completion (on one process: as is)."""
    if accelerator.num_processes == 1:
        return rollout
    fields = {}
    for name, value in rollout.tensors().items():
        if value.dim() == 2:
            value = accelerator.pad_across_processes(value, dim=1, pad_index=0, pad_first=name.startswith("prompt_"))
        fields[name] = accelerator.gather(value)
    return Rollout(**fields)

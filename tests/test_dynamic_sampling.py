"""DAPO's dynamic sampling with refill: groups whose rewards are all equal are replaced by groups of fresh prompts,
the prompt stream stays a pure function of (seed, step, round), and a resumed run equals an uninterrupted one.
The two-process behaviour (same rounds everywhere, each process its share) is in test_variants_multiprocess.py."""

import torch
from helpers import make_trainer

from rlhf.data import PromptSampler
from rlhf.metrics import StepMetrics
from rlhf.trainer.sampling import informative_groups

G = 4


def half_informative(prompts, completions, **kwargs):
    """Prompts whose first operand is odd score 1.0 whatever the completion (a zero-variance group); the others
    score by completion (groups that differ, almost always)."""
    return [1.0 if int(p[0]) % 2 else float(sum(map(ord, c)) % 5) for p, c in zip(prompts, completions)]


def rarely_informative(prompts, completions, **kwargs):
    """Only prompts "8+..." give differing rewards: most rounds find none."""
    return [float(sum(map(ord, c)) % 5) if p.startswith("8+") else 0.0 for p, c in zip(prompts, completions)]


def batch_rewards(trainer, batch, texts, reward):
    """Rewards recomputed from the batch's own tokens, and a check that its texts are those tokens."""
    lengths = batch.completion_mask.sum(dim=1).tolist()
    completions = trainer.tokenizer.batch_decode([r[:n] for r, n in zip(batch.completion_ids.tolist(), lengths)],
                                                 skip_special_tokens=True)
    prompts = trainer.tokenizer.batch_decode([r[m.bool()] for r, m in zip(batch.prompt_ids, batch.prompt_mask)],
                                             skip_special_tokens=True)
    assert completions == texts.completions and prompts == texts.prompts  # the groups kept their texts
    return torch.tensor(reward(prompts, completions), dtype=torch.float64)


def test_refill_never_trains_on_a_zero_variance_group(tmp_path):
    trainer = make_trainer(tmp_path, reward=half_informative, filter_zero_std_groups=True, max_sampling_rounds=8)
    for step in range(3):
        metrics = StepMetrics()
        batch, texts = trainer.make_rollout(step, metrics)
        stats = metrics.reduce()
        rewards = batch_rewards(trainer, batch, texts, half_informative)
        assert batch.size == 16 and informative_groups(rewards, G).all()
        assert (batch.loss_mask.view(4, -1).sum(dim=1) > 0).all()  # every group trains
        assert stats["sampling/informative_frac"] == 1.0
        rounds = stats["sampling/rounds"]
        assert rounds >= 1
    assert rounds > 1 or stats["reward/zero_std_group_frac"] > 0  # a refill happened in these steps


def test_without_refill_the_zero_variance_groups_are_only_dropped(tmp_path):
    """The control: the same first round without refill keeps its zero-variance groups, out of the loss."""
    trainer = make_trainer(tmp_path, reward=half_informative, filter_zero_std_groups=True)
    batch, texts = trainer.make_rollout(0)
    rewards = batch_rewards(trainer, batch, texts, half_informative)
    useless = ~informative_groups(rewards, G)
    assert useless.any()
    assert (batch.loss_mask.view(4, -1)[useless] == 0).all()


def test_short_of_groups_after_the_last_round_it_trains_on_what_it_found(tmp_path):
    trainer = make_trainer(tmp_path, reward=rarely_informative, filter_zero_std_groups=True, max_sampling_rounds=2)
    metrics = StepMetrics()
    batch, texts = trainer.make_rollout(0, metrics)
    stats = metrics.reduce()
    rewards = batch_rewards(trainer, batch, texts, rarely_informative)
    useful = informative_groups(rewards, G)
    assert stats["sampling/rounds"] == 2 and stats["sampling/informative_frac"] == useful.float().mean().item() < 1
    assert batch.size == 16  # the batch keeps its size: topped up with groups the filter leaves out of the loss
    assert (batch.loss_mask.view(4, -1)[~useful] == 0).all() and (batch.loss_mask.view(4, -1)[useful].sum(1) > 0).all()
    trainer.training_step()  # trains on what there is


def test_refill_prompts_are_a_pure_function_of_seed_step_and_round():
    sampler = PromptSampler(30, 4, seed=5, num_processes=2, process_index=1)
    again = PromptSampler(30, 4, seed=5, num_processes=2, process_index=1)
    assert [sampler.indices(s, r) for s in (3, 0) for r in (2, 0, 1)] == \
        [again.indices(s, r) for s in (3, 0) for r in (2, 0, 1)]
    assert sampler.indices(3, 0) == sampler.global_indices(3)[2:]  # round 0 is the epoch order
    draws = {tuple(sampler.refill_indices(3, r)) for r in range(1, 6)}
    assert len(draws) == 5 and all(len(set(d)) == 4 for d in draws)  # fresh, distinct prompts each round
    assert PromptSampler(3, 4, seed=5).refill_indices(0, 1) != []  # a dataset smaller than a step repeats


def check_refills_draw_the_least_used_prompts(sampler, step, rounds):
    """Replays round 0 and the refill rounds of ``step`` prompt by prompt, counting how often the step has used each
    prompt: every refill draw must be one of the least used so far (so no prompt repeats while one is unused).
    Returns the counts."""
    counts = [0] * sampler.dataset_size
    for index in sampler.global_indices(step):
        counts[index] += 1
    for round_index in range(1, rounds + 1):
        for index in sampler.refill_indices(step, round_index):
            assert counts[index] == min(counts), (step, round_index, index, counts)
            counts[index] += 1
    return counts


def test_refills_never_repeat_a_prompt_of_the_step_while_the_dataset_has_unused_ones():
    """30 prompts, 4 a round: round 0 and six refill rounds use 28 distinct prompts, at every step."""
    sampler = PromptSampler(30, 4, seed=5)
    for step in range(20):
        counts = check_refills_draw_the_least_used_prompts(sampler, step, rounds=6)
        assert max(counts) == 1 or step * 4 % 30 > 26  # round 0 itself may straddle two epochs


def test_once_the_dataset_is_used_up_refills_take_the_least_used_prompts():
    """10 prompts, 4 a round: after 10 every prompt is used once, and a prompt is drawn a third time only after every
    prompt was drawn twice. A dataset smaller than a step (3 prompts, 4 a round) repeats, as evenly as it can."""
    for size in (10, 3):
        sampler = PromptSampler(size, 4, seed=1)
        for step in range(5):
            counts = check_refills_draw_the_least_used_prompts(sampler, step, rounds=6)
            assert max(counts) - min(counts) <= 2 and sum(counts) == 28


def test_every_process_takes_its_share_of_the_same_refill():
    processes = [PromptSampler(30, 4, seed=5, num_processes=2, process_index=rank) for rank in (0, 1)]
    for round_index in (1, 2):
        assert processes[0].indices(3, round_index) + processes[1].indices(3, round_index) == \
            processes[0].refill_indices(3, round_index)


def test_resume_with_dynamic_sampling_equals_an_uninterrupted_run(tmp_path):
    common = dict(max_steps=2, save_steps=1, reward=half_informative, filter_zero_std_groups=True,
                  max_sampling_rounds=6, num_epochs=2, mini_batch_size=8, micro_batch_size=8)
    straight = make_trainer(tmp_path / "straight", **common)
    straight.train()
    make_trainer(tmp_path / "resumed", **{**common, "max_steps": 1}).train()
    resumed = make_trainer(tmp_path / "resumed", resume_from_checkpoint="latest", **common)
    resumed.train()
    for (name, a), b in zip(straight.unwrapped_model.named_parameters(), resumed.unwrapped_model.parameters()):
        assert torch.equal(a, b), name

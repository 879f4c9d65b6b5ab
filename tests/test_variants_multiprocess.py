"""Every new loss and estimator on two CPU processes under `accelerate launch` (gloo), against one process on the
same gathered batch: the same gradient within 1e-5, global token selection, global whitening, and dynamic sampling
that runs the same rounds on both processes and leaves each with its share. One launch for all variants."""

import pytest
import torch
from helpers import gradient, relative_error, varied_reward
from launching import run_two_process_worker
from test_dynamic_sampling import half_informative
from test_policy_variants import perturb
from variants_worker import VARIANTS, build

from rlhf.core import top_fraction_mask
from rlhf.metrics import StepMetrics
from rlhf.rollout import Rollout
from rlhf.trainer.sampling import informative_groups
from rlhf.trainer.passes import rollout_logprobs


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    out = tmp_path_factory.mktemp("variants")
    run_two_process_worker("variants_worker.py", str(out), timeout=600)
    saved = torch.load(out / "variants.pt", weights_only=True)
    assert saved["world_size"] == 2
    return saved["results"], out


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_two_processes_give_one_process_gradient(two_processes, tmp_path, name):
    results, _ = two_processes
    out = results[name]
    assert out["rows"] == [8, 8]  # each process holds its share of the groups
    trainer = build(str(tmp_path), name)
    batch = Rollout(**out["batch"])
    perturb(trainer.model)
    grad = gradient(trainer, batch)
    assert grad.norm() > 0 and relative_error(out["grad"], grad) < 1e-5


def test_entropy_selection_is_global_over_processes(two_processes, tmp_path):
    """The gathered selection is the one over the whole batch, recomputed here on one process; selecting within
    each process's half (the naive way) keeps other tokens."""
    results, _ = two_processes
    batch = Rollout(**results["entropy"]["batch"])
    trainer = build(str(tmp_path), "entropy")
    _, entropy = rollout_logprobs(trainer.model, batch, trainer.plan, 1.0, with_entropy=True)
    mask = batch.completion_mask
    assert torch.equal(batch.selected_tokens.bool(), top_fraction_mask(entropy, mask, 0.3).bool())
    halves = torch.cat([top_fraction_mask(entropy[rows], mask[rows], 0.3) for rows in (slice(0, 8), slice(8, 16))])
    assert not torch.equal(halves.bool(), batch.selected_tokens.bool())


def test_reinforce_pp_baseline_whitens_over_both_processes(two_processes, tmp_path):
    results, _ = two_processes
    out = results["reinforce_pp_baseline"]
    batch = Rollout(**out["batch"])
    rewards = torch.tensor(varied_reward(None, [c for _, c in out["texts"]]), dtype=torch.float64)
    trainer = build(str(tmp_path), "reinforce_pp_baseline")
    advantages, _ = trainer.algorithm.advantages(rewards, batch, trainer.kl, trainer.reduce, StepMetrics())
    valid = batch.completion_mask.bool()
    torch.testing.assert_close(batch.advantages[valid], advantages[valid], atol=1e-5, rtol=0)
    assert abs(batch.advantages[valid].mean()) < 1e-5 and abs(batch.advantages[valid].std() - 1) < 1e-3


def test_dynamic_sampling_runs_the_same_rounds_and_trains_no_zero_variance_group(two_processes):
    results, _ = two_processes
    out = results["dynamic"]
    prompts, completions = zip(*out["texts"])
    rewards = torch.tensor(half_informative(prompts, completions), dtype=torch.float64)
    assert informative_groups(rewards, 4).all() and out["metrics"]["sampling/informative_frac"] == 1.0
    assert out["metrics"]["sampling/rounds"] > 1  # refilled; a hang would have shown unequal rounds
    assert (Rollout(**out["batch"]).loss_mask.view(4, -1).sum(dim=1) > 0).all()

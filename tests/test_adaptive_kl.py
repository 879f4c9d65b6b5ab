"""The adaptive KL coefficient (``kl_target``) in every placement: it follows the rollout's KL to the reference,
measured once per step and read as a field (``StepResult.rollout_kl``), never from a logged metric's name."""

import pytest
import torch

from helpers import make_trainer
from rlhf.forward import completion_logprobs
from rlhf.trainer.kl import AdaptiveKLController

CASES = {
    # GRPO on-policy: the KL sits in the loss and no pass of the sampling policy runs; the update's pass measures it
    "grpo-loss-on-policy": dict(algo="grpo", kl_in="loss"),
    # GRPO with two optimizer steps per rollout: the no-grad pass of the sampling policy measures it
    "grpo-loss-off-policy": dict(algo="grpo", kl_in="loss", num_epochs=2, mini_batch_size=8, micro_batch_size=8),
    "ppo-reward": dict(algo="ppo", kl_in="reward"),
    "reinforce-loss": dict(algo="reinforce", kl_in="loss"),
    "reinforce-reward": dict(algo="reinforce", kl_in="reward"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_kl_coef_follows_the_rollout_kl_in_every_placement(tmp_path, case):
    """kl_coef after each step is the controller's update of the step's coefficient with that step's KL per
    sequence; the KL is above the (tiny) target once the policy has moved, so the coefficient rises."""
    trainer = make_trainer(tmp_path, kl_coef=0.05, kl_target=1e-6, kl_horizon=10, kl_estimator="k3", max_steps=4,
                           logging_steps=1, **CASES[case])
    records = trainer.train().records
    controller, samples = AdaptiveKLController(1e-6, 10), trainer.args.rollout_batch_size
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert records[0]["kl_coef"] == 0.05
    for before, after in zip(records, records[1:]):
        assert after["kl_coef"] == pytest.approx(controller.update(before["kl_coef"], before["kl/sequence"], samples),
                                                 rel=1e-12)
    assert all(r["kl/sequence"] > 1e-5 for r in records[1:])  # the policy moved away from the reference
    assert records[-1]["kl_coef"] > records[1]["kl_coef"]  # above target: the coefficient grows
    assert trainer.kl_coef == pytest.approx(controller.update(records[-1]["kl_coef"], records[-1]["kl/sequence"],
                                                              samples), rel=1e-12)


def test_on_policy_grpo_measures_the_rollout_kl_without_an_extra_pass(tmp_path):
    """On-policy GRPO with kl_target plans no pass of the sampling policy, and the KL its update measures equals the
    KL per sequence computed here from separate forward passes of the actor and the reference (k3 written out)."""
    def perturbed(path):
        trainer = make_trainer(path, kl_coef=0.1, kl_target=0.01, kl_estimator="k3")
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():  # the actor differs from its reference, so the KL is not 0
            for p in trainer.model.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=generator))
        return trainer

    trainer = perturbed(tmp_path / "a")
    assert not trainer.plan.needs_old_logprobs
    result = trainer.run_step()
    assert result.update.optimizer_steps == 1 and result.update.skipped_updates == 0

    probe = perturbed(tmp_path / "b")
    rollout, _ = probe.make_rollout(0)
    with torch.no_grad():
        args = (rollout.prompt_ids, rollout.prompt_mask, rollout.completion_ids, rollout.completion_mask)
        actor, _ = completion_logprobs(probe.model, *args)
        reference, _ = completion_logprobs(probe.ref_model, *args)
    d = (actor - reference).double()
    per_sequence = ((torch.exp(-d) - 1 + d) * rollout.completion_mask).sum(dim=1)
    assert per_sequence.mean().item() > 1e-3
    assert result.rollout_kl == pytest.approx(per_sequence.mean().item(), rel=1e-4)
    assert result.metrics["kl/sequence"] == pytest.approx(result.rollout_kl, rel=1e-9)


def test_a_step_without_a_reference_measures_no_kl(tmp_path):
    result = make_trainer(tmp_path, kl_coef=0.0).run_step()
    assert result.rollout_kl is None and "kl/sequence" not in result.metrics and "kl_coef" not in result.metrics

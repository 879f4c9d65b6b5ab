"""Mixed precision (Accelerate's bf16 autocast, on the CPU): the reference pass runs in the same autocast as
the actor's passes, so a reference identical to the actor gives exactly the actor's log-probs (KL exactly 0)."""

import pytest
import torch
from accelerate.state import AcceleratorState
from helpers import make_trainer

from rlhf.forward import completion_logprobs


@pytest.fixture
def bf16_autocast(monkeypatch):
    """Accelerate keeps one state per process: reset it so the next Accelerator reads bf16, and again after."""
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION")
    AcceleratorState._reset_state(reset_partial_state=True)


def test_identical_reference_under_bf16_autocast_gives_zero_kl(tmp_path, bf16_autocast):
    trainer = make_trainer(tmp_path, algo="reinforce", kl_coef=0.1, kl_in="reward")
    assert trainer.accelerator.mixed_precision == "bf16"
    batch, _ = trainer.make_rollout(0)
    mask = batch.completion_mask.bool()
    assert torch.equal(batch.old_logprobs[mask], batch.ref_logprobs[mask])
    # Negative control: the same reference pass outside autocast differs (bf16 vs fp32 matmuls), which is the
    # spurious KL floor the autocast removes.
    with torch.no_grad():
        plain, _ = completion_logprobs(trainer.ref_model, batch.prompt_ids, batch.prompt_mask, batch.completion_ids,
                                       batch.completion_mask)
    assert (plain - batch.old_logprobs)[mask].abs().max() > 1e-4
    metrics = trainer.training_step()
    assert metrics["kl/sequence"] == 0.0


def test_autocast_generation_false_samples_in_float32_under_bf16_autocast(tmp_path, bf16_autocast, monkeypatch):
    """autocast_generation=False: the same tokens and sampler log-probs as a float32 run of the same seed, while the
    scoring pass still runs in the autocast (it differs from float32), and the actor's autocast forward is back in
    place after sampling."""
    trainer = make_trainer(tmp_path / "bf16", kl_coef=0.1, top_entropy_quantile=0.5,  # a scoring pass of the actor
                           autocast_generation=False)
    assert trainer.accelerator.mixed_precision == "bf16" and not trainer.policy.autocast
    batch, _ = trainer.make_rollout(0)
    assert "_original_forward" in trainer.model.__dict__ and "forward" in trainer.model.__dict__
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    AcceleratorState._reset_state(reset_partial_state=True)
    plain = make_trainer(tmp_path / "fp32", kl_coef=0.1, top_entropy_quantile=0.5)
    assert plain.accelerator.mixed_precision == "no"
    expected, _ = plain.make_rollout(0)
    assert torch.equal(batch.completion_ids, expected.completion_ids)
    assert torch.equal(batch.sampler_logprobs, expected.sampler_logprobs)
    mask = batch.completion_mask.bool()
    assert (batch.old_logprobs - expected.old_logprobs)[mask].abs().max() > 1e-4  # scored in bf16 autocast


@pytest.mark.parametrize("autocast_generation", [None, True])
def test_autocast_generation_samples_in_the_autocast(tmp_path, bf16_autocast, autocast_generation):
    """autocast_generation None (the default, on a CPU too) or True: the sampler's log-probs are the bf16 autocast's,
    not float32's (negative control of the test above: the switch is what makes the difference)."""
    sampled = make_trainer(tmp_path / "bf16", autocast_generation=autocast_generation)
    assert sampled.policy.autocast
    batch, _ = sampled.make_rollout(0)
    float32 = make_trainer(tmp_path / "fp32", autocast_generation=False)
    reference, _ = float32.make_rollout(0)
    mask = batch.completion_mask.bool() & reference.completion_mask.bool()
    differs = (batch.completion_ids != reference.completion_ids).any() or \
        (batch.sampler_logprobs - reference.sampler_logprobs)[mask].abs().max() > 1e-4
    assert differs

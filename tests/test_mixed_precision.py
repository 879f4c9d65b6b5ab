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

"""TR-DPO reference updates (``sync_ref_model``, rlhf/trainer/kl.py): the reference after k steps is the alpha-mix
of the policies at the sync steps, worked out here by hand; a resumed run keeps the synced reference, bit for bit;
misuse is refused naming the field."""

import pytest
import torch
from peft import LoraConfig

from rlhf import GRPOConfig
from rlhf.extras.tiny import tiny_model
from rlhf.models import frozen_copy
from rlhf.trainer.kl import mix_into_reference
from tests.helpers import make_trainer

SYNC = dict(kl_coef=0.1, sync_ref_model=True, ref_model_mixup_alpha=0.3, ref_model_sync_steps=2, learning_rate=1e-2)


def weights(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def test_reference_is_the_alpha_mix_of_the_policy_at_each_sync_step(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=4, **SYNC)
    expected = weights(trainer.ref_model)  # the initial model
    for step in range(1, 5):
        trainer.run_step()
        trainer.step += 1
        policy = weights(trainer.unwrapped_model)
        if step % 2 == 0:  # ref <- 0.3 * policy + 0.7 * ref, after steps 2 and 4 only
            expected = {name: 0.7 * ref + 0.3 * policy[name] for name, ref in expected.items()}
        for name, ref in trainer.ref_model.named_parameters():
            torch.testing.assert_close(ref, expected[name], rtol=1e-6, atol=1e-7)  # float32 rounding
    moved = [name for name, p in trainer.ref_model.named_parameters() if not torch.equal(p, policy[name])]
    assert moved  # the reference lags the policy: a mix, not a copy


def test_without_sync_the_reference_stays_the_initial_model(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=2, **{**SYNC, "sync_ref_model": False})
    initial = weights(trainer.ref_model)
    trainer.train()
    assert all(torch.equal(p, initial[name]) for name, p in trainer.ref_model.named_parameters())


def test_resume_keeps_the_synced_reference_bit_for_bit(tmp_path):
    common = dict(max_steps=3, save_steps=2, **{**SYNC, "ref_model_sync_steps": 1})
    straight = make_trainer(tmp_path / "straight", **common)
    straight.train()
    make_trainer(tmp_path / "resumed", **{**common, "max_steps": 2}).train()
    fresh = make_trainer(tmp_path / "fresh", **common)  # built first: building a trainer seeds the global RNG
    resumed = make_trainer(tmp_path / "resumed", resume_from_checkpoint="latest", **common)
    assert any(not torch.equal(a, b) for a, b in zip(resumed.ref_model.parameters(), fresh.ref_model.parameters()))
    resumed.train()
    for model in ("ref_model", "unwrapped_model"):
        for (name, a), b in zip(getattr(straight, model).named_parameters(), getattr(resumed, model).parameters()):
            assert torch.equal(a, b), f"{model}: {name}"


def test_resume_refuses_to_drop_the_sync(tmp_path):
    make_trainer(tmp_path, max_steps=1, save_steps=1, **SYNC).train()
    with pytest.raises(ValueError, match="sync_ref_model: checkpoint True, now False"):
        make_trainer(tmp_path, resume_from_checkpoint="latest", **{**SYNC, "sync_ref_model": False})


def test_sync_with_a_lora_actor_is_refused(tmp_path):
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    with pytest.raises(ValueError, match="sync_ref_model=True with a LoRA actor"):
        make_trainer(tmp_path, trainer_kwargs={"peft_config": lora}, **SYNC)


@pytest.mark.parametrize("settings, message", [
    (dict(sync_ref_model=True), "sync_ref_model=True with kl_coef=0.0"),
    (dict(ref_model_mixup_alpha=1.5), "ref_model_mixup_alpha=1.5 must be in [0, 1]"),
    (dict(ref_model_sync_steps=0), "ref_model_sync_steps=0 must be >= 1"),
    (dict(sapo_temperature_neg=0.0), "sapo_temperature_neg=0.0 must be > 0"),
    (dict(sapo_temperature_pos=-1.0), "sapo_temperature_pos=-1.0 must be > 0"),
    (dict(loss_type="sapo", delta=3.0), "policy_loss_type='sapo' has no such term: set dual_clip=None"),
])
def test_invalid_settings_name_the_field(settings, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        GRPOConfig(**settings).validate()


def test_mixing_matches_weights_by_name_and_refuses_other_models():
    model = tiny_model("llama", hidden_size=32, num_layers=2, num_heads=2, seed=0)
    reference = frozen_copy(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    before = weights(reference)
    mix_into_reference(reference, model, 0.25)
    for name, p in reference.named_parameters():
        torch.testing.assert_close(p, 0.75 * before[name] + 0.25 * dict(model.named_parameters())[name].detach())
    with pytest.raises(ValueError, match="the reference's weights do not match the policy's"):
        mix_into_reference(reference, tiny_model("gpt2", hidden_size=32, num_layers=2, num_heads=2, seed=0), 0.5)

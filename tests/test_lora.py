"""LoRA actors: only the adapter trains, the reference is the base with the adapter disabled, gradient
checkpointing still gives the adapter gradients, and saved adapters reproduce the trained model."""

import copy

import torch
from helpers import accumulate, make_trainer
from peft import LoraConfig, PeftModel
from transformers import AutoModelForCausalLM

from rlhf.forward import completion_logprobs
from rlhf.extras.tiny import tiny_model

LORA = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], lora_dropout=0.1,
                  task_type="CAUSAL_LM")


def lora_trainer(tmp_path, **overrides):
    base = tiny_model("llama", hidden_size=32, num_layers=2, num_heads=2, seed=0)
    pristine = copy.deepcopy(base).eval()
    trainer = make_trainer(tmp_path, model=base, trainer_kwargs={"peft_config": copy.deepcopy(LORA)},
                           learning_rate=5e-2, **overrides)
    return trainer, pristine


def score(model, batch):
    with torch.no_grad():
        return completion_logprobs(model, batch.prompt_ids, batch.prompt_mask, batch.completion_ids,
                                   batch.completion_mask)[0]


def test_only_adapter_weights_train_and_the_reference_is_the_base(tmp_path):
    trainer, pristine = lora_trainer(tmp_path, kl_coef=0.1, max_steps=2)
    assert trainer.ref_model is None  # no second copy of the base model
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    changed = {n for n, p in trainer.model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_" in n for n in changed)
    batch, _ = trainer.make_rollout(2)
    mask = batch.completion_mask.bool()
    # ref_logprobs came from the adapter-disabled actor: they equal the untouched base model's.
    assert (batch.ref_logprobs - score(pristine, batch))[mask].abs().max() < 1e-5
    assert (score(trainer.model, batch) - batch.ref_logprobs)[mask].abs().max() > 1e-3  # the adapter matters
    metrics = trainer.training_step()
    assert metrics["kl"] > 0


def test_gradient_checkpointing_gives_adapter_gradients(tmp_path):
    """The same adapter gradients with and without checkpointing, nonzero for every lora_B (lora_A's are 0
    at the first step because lora_B starts at 0), none for the frozen base."""
    grads = {}
    for checkpointing in (False, True):
        trainer, _ = lora_trainer(tmp_path / str(checkpointing), gradient_checkpointing=checkpointing)
        batch, _ = trainer.make_rollout(0)
        accumulate(trainer, batch)
        grads[checkpointing] = {n: p.grad for n, p in trainer.model.named_parameters() if p.grad is not None}
        assert all("lora_" in n for n in grads[checkpointing])
        assert all(g.abs().sum() > 0 for n, g in grads[checkpointing].items() if "lora_B" in n)
    assert trainer.unwrapped_model.is_gradient_checkpointing
    assert grads[True].keys() == grads[False].keys() and any("lora_B" in n for n in grads[True])
    for name in grads[True]:
        torch.testing.assert_close(grads[True][name], grads[False][name], atol=1e-7, rtol=1e-5)


def test_saved_adapter_and_merged_model_reproduce_the_trained_log_probs(tmp_path):
    trainer, pristine = lora_trainer(tmp_path, max_steps=2)
    trainer.train()
    batch, _ = trainer.make_rollout(2)
    mask = batch.completion_mask.bool()
    trained = score(trainer.unwrapped_model.eval(), batch)
    adapter = PeftModel.from_pretrained(pristine, trainer.save_model(str(tmp_path / "adapter"))).eval()
    assert torch.equal(score(adapter, batch)[mask], trained[mask])
    trainer.args.save_merged_lora = True
    merged = AutoModelForCausalLM.from_pretrained(trainer.save_model(str(tmp_path / "merged"))).eval()
    assert (score(merged, batch) - trained)[mask].abs().max() < 1e-5


def test_lora_checkpoint_resumes_exactly(tmp_path):
    common = dict(max_steps=4, save_steps=2, num_epochs=2, mini_batch_size=8, micro_batch_size=4, kl_coef=0.05)
    straight, _ = lora_trainer(tmp_path / "straight", **common)
    straight.train()
    lora_trainer(tmp_path / "resumed", **{**common, "max_steps": 2})[0].train()
    resumed, _ = lora_trainer(tmp_path / "resumed", resume_from_checkpoint="latest", **common)
    resumed.train()
    for (name, a), b in zip(straight.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(a, b), name


def test_ppo_with_a_lora_actor_trains_a_lora_critic(tmp_path):
    base = tiny_model("llama", hidden_size=32, num_layers=2, num_heads=2, seed=0)
    trainer = make_trainer(tmp_path, algo="ppo", model=base, trainer_kwargs={"peft_config": copy.deepcopy(LORA)})
    critic_before = {n: p.detach().clone() for n, p in trainer.critic.named_parameters()}
    trainer.training_step()
    changed = {n for n, p in trainer.critic.named_parameters() if not torch.equal(p, critic_before[n])}
    assert changed and all("lora_" in n or n.startswith("value_head") for n in changed)
    assert any(n.startswith("value_head") for n in changed)


def test_reference_in_lower_precision(tmp_path):
    trainer = make_trainer(tmp_path, kl_coef=0.1, ref_model_dtype="bfloat16", offload_reference=True)
    assert next(trainer.ref_model.parameters()).dtype == torch.bfloat16
    batch, _ = trainer.make_rollout(0)
    mask = batch.completion_mask.bool()
    exact = score(trainer.model, batch)
    assert batch.ref_logprobs.dtype == torch.float32
    assert 0 < (batch.ref_logprobs - exact)[mask].abs().max() < 0.1  # bf16 rounding, nothing worse

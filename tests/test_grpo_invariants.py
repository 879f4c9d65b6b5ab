"""GRPO trainer invariants (pitfalls 2, 5, 6, 7, 8 and 10 in tests/README.md): each checked against an independent path."""

import pytest
import torch
from helpers import (
    flat_grad,
    gradient,
    make_trainer,
    policy_gradient_reference,
    relative_error,
    with_varied_lengths,
)

import rlhf.trainer.trainer as trainer_module
from rlhf.core import policy_loss
from rlhf.metrics import StepMetrics
from rlhf.forward import completion_logprobs
from rlhf.extras.tiny import char_tokenizer, tiny_model


def test_first_on_policy_pass_is_the_plain_policy_gradient(tmp_path):
    """Ratio == 1 exactly, and the gradient equals -sum(A * grad log p) / N computed sequence by sequence
    without padding. The tokenizer pads with its EOS id, so a dropped EOS would show up here."""
    tokenizer = char_tokenizer()
    tokenizer.pad_token = tokenizer.eos_token
    # 32 completions of up to 12 tokens from a near-uniform policy over 102 tokens: some end with an EOS.
    trainer = make_trainer(tmp_path, tokenizer=tokenizer, prompts_per_step=8, max_new_tokens=12, micro_batch_size=32)
    batch, _ = trainer.make_rollout(0)
    assert batch.old_logprobs is None  # one epoch, one mini-batch: exactly on-policy
    metrics = StepMetrics()
    grad = gradient(trainer, batch, metrics)
    stats = metrics.reduce()
    assert stats["policy/ratio_mean"] == 1.0 and stats["policy/ratio_max"] == 1.0
    assert stats["clip/low_frac"] == 0.0 and stats["clip/high_frac"] == 0.0

    reference, lengths = policy_gradient_reference(trainer.model, batch)
    assert any(n < batch.completion_ids.shape[1] for n in lengths)  # some rows end with an EOS
    assert relative_error(grad, reference) < 1e-5


@pytest.mark.parametrize("loss_agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum",
                                      "seq-mean-token-sum-norm"])
def test_gradient_does_not_depend_on_micro_batch_size(tmp_path, loss_agg):
    """Off-policy (ratios away from 1, some clipped), with KL and entropy terms: micro-batches of 1, 2 and
    the whole mini-batch give the same gradient."""
    trainer = make_trainer(tmp_path, loss_agg=loss_agg, num_epochs=2, kl_coef=0.1, entropy_coef=0.01,
                           clip_eps_low=0.05, clip_eps_high=0.05)
    batch, _ = trainer.make_rollout(0)
    with torch.no_grad():  # move the policy away from the one that sampled
        for p in trainer.model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    grads = {}
    for size in (1, 2, batch.size):
        trainer.args.micro_batch_size = size
        metrics = StepMetrics()
        grads[size] = gradient(trainer, batch, metrics)
    stats = metrics.reduce()
    assert stats["clip/low_frac"] + stats["clip/high_frac"] > 0  # clipping is active
    assert relative_error(grads[1], grads[batch.size]) < 1e-6
    assert relative_error(grads[2], grads[batch.size]) < 1e-6


def test_naive_per_micro_batch_normalisation_differs(tmp_path):
    """Negative control for the test above: token-mean per micro-batch, averaged, is a different gradient."""
    trainer = make_trainer(tmp_path, prompts_per_step=8, max_new_tokens=12, micro_batch_size=32)
    batch, _ = trainer.make_rollout(0)
    assert batch.completion_mask.sum(dim=1).unique().numel() > 1  # micro-batches hold different token counts
    whole = gradient(trainer, batch)
    model = trainer.model
    model.zero_grad(set_to_none=True)
    micro_batches = [batch.rows(slice(i, i + 2)).trimmed() for i in range(0, batch.size, 2)]
    for micro in micro_batches:
        logprobs, _ = completion_logprobs(model, micro.prompt_ids, micro.prompt_mask, micro.completion_ids,
                                          micro.completion_mask)
        loss, _ = policy_loss(logprobs, logprobs.detach(), micro.advantages, micro.loss_mask, 0.2, 0.2)
        (loss / len(micro_batches)).backward()
    assert relative_error(flat_grad(model), whole) > 1e-2


def test_bnpo_is_the_mean_of_each_micro_batchs_token_mean(tmp_path):
    """TRL's loss_type="bnpo" (loss_agg micro-batch-token-mean): every micro-batch (TRL: per-device batch) is
    normalised by its own tokens and micro-batches weigh the same (TRL divides by gradient_accumulation_steps). The
    reference scores each micro-batch's sequences one by one; with one micro-batch it is the token mean."""
    from rlhf.trainer.plan import length_order

    trainer = make_trainer(tmp_path, loss_type="bnpo")
    batch = with_varied_lengths(trainer.make_rollout(0)[0])
    trainer.args.micro_batch_size = 2
    grad = gradient(trainer, batch)
    order = length_order(batch, 1)  # how the update forms micro-batches: by length (rows of similar length)
    parts = [batch.rows(order[i:i + 2]) for i in range(0, batch.size, 2)]
    references = [policy_gradient_reference(trainer.model, part)[0] for part in parts]
    assert relative_error(grad, torch.stack(references).mean(dim=0)) < 1e-5
    token_mean, _ = policy_gradient_reference(trainer.model, batch)
    assert relative_error(grad, token_mean) > 1e-2  # it is not the token mean of the whole mini-batch
    trainer.args.micro_batch_size = batch.size
    assert relative_error(gradient(trainer, batch), token_mean) < 1e-5


def test_old_logprobs_are_computed_once_before_any_update(tmp_path, monkeypatch):
    trainer = make_trainer(tmp_path, num_epochs=3, mini_batch_size=8, micro_batch_size=4)
    calls = []
    original = trainer_module.rollout_logprobs

    def spy(*args, **kwargs):
        calls.append(trainer.optimizer.state_dict()["state"] != {})  # has any optimizer step happened yet?
        return original(*args, **kwargs)

    monkeypatch.setattr(trainer_module, "rollout_logprobs", spy)
    metrics = trainer.training_step()
    assert calls == [False]  # one pass, before the first update
    assert metrics["policy/ratio_mean"] != 1.0  # later mini-batches do see the updated policy


def test_old_logprobs_match_the_policy_that_sampled(tmp_path):
    trainer = make_trainer(tmp_path, num_epochs=2)
    batch, _ = trainer.make_rollout(0)
    mask = batch.completion_mask.bool()
    with torch.no_grad():
        fresh, _ = completion_logprobs(trainer.model, batch.prompt_ids, batch.prompt_mask,
                                       batch.completion_ids, batch.completion_mask)
    assert (batch.old_logprobs - fresh)[mask].abs().max() < 1e-5


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kl_to_an_identical_reference_is_exactly_zero(tmp_path, estimator):
    trainer = make_trainer(tmp_path, kl_coef=0.1, kl_estimator=estimator, max_steps=1)
    assert trainer.ref_model is not None
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert not any(id(p) in optimized for p in trainer.ref_model.parameters())
    reference = [p.detach().clone() for p in trainer.ref_model.parameters()]
    metrics = trainer.training_step()
    assert metrics["kl"] == 0.0
    assert all(p.grad is None and torch.equal(p, q) for p, q in zip(trainer.ref_model.parameters(), reference))
    # After an update the logged KL is the trained one, and k3 is positive.
    metrics = trainer.training_step()
    assert metrics["kl"] != 0.0 and (estimator == "k1" or metrics["kl"] > 0)


def test_reference_model_is_loaded_only_with_a_kl_term(tmp_path):
    assert make_trainer(tmp_path).ref_model is None


def test_dropout_in_the_config_does_not_break_the_first_ratio(tmp_path):
    model = tiny_model("gpt2", hidden_size=32, num_layers=2, num_heads=2, resid_pdrop=0.3, attn_pdrop=0.3,
                       embd_pdrop=0.3)
    metrics = make_trainer(tmp_path, model=model).training_step()
    assert metrics["policy/ratio_mean"] == 1.0 and metrics["policy/ratio_max"] == 1.0


@pytest.mark.parametrize("reward", [lambda prompts, completions, **kw: [1.0] * len(completions),
                                    lambda prompts, completions, **kw: [None] * len(completions)])
def test_equal_or_missing_rewards_give_zero_finite_advantages(tmp_path, reward):
    trainer = make_trainer(tmp_path, reward=reward)
    batch, _ = trainer.make_rollout(0)
    assert torch.equal(batch.advantages, torch.zeros_like(batch.advantages))
    metrics = trainer.training_step()
    assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values())
    assert metrics["reward/zero_std_group_frac"] == 1.0


def test_truncated_completions_can_be_left_out_of_the_loss(tmp_path):
    trainer = make_trainer(tmp_path, mask_truncated_completions=True, max_new_tokens=3)
    batch, _ = trainer.make_rollout(0)
    assert batch.truncated.any()
    assert batch.loss_mask[batch.truncated].sum() == 0
    assert torch.equal(batch.loss_mask[~batch.truncated], batch.completion_mask[~batch.truncated])


def test_zero_std_groups_can_be_filtered(tmp_path):
    def first_group_equal(prompts, completions, **kwargs):
        return [0.0 if i < 4 else float(len(c)) + i % 2 for i, c in enumerate(completions)]

    trainer = make_trainer(tmp_path, reward=first_group_equal, filter_zero_std_groups=True)
    batch, _ = trainer.make_rollout(0)
    assert batch.loss_mask[:4].sum() == 0 and batch.loss_mask[4:].sum() > 0

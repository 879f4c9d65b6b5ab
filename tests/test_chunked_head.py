"""The chunked LM head in the trainer: every pass scores through it, with the values and gradients of the full
logits path, and a training step never builds a [batch, tokens, vocab] tensor."""

import copy
import logging

import pytest
import torch
from core.test_logprobs import LargestFloat32
from helpers import gradient, make_trainer, relative_error

from rlhf.core import lm_head
from rlhf.extras.tiny import tiny_model
from rlhf.forward import completion_logprobs, enable_token_scoring, scores_tokens

VOCAB = 4096  # the character tokenizer uses ids < 102; a wide head makes [B, T, V] stand out


def wide_model(arch="llama", seed=0):
    return tiny_model(arch, vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=2, seed=seed,
                      tie_word_embeddings=False)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("group_size", [1, 4])
def test_scored_logprobs_and_gradients_equal_the_logits_path(arch, group_size):
    plain = wide_model(arch).eval()  # no dropout: both passes must see the same network
    scored = copy.deepcopy(plain)
    assert enable_token_scoring(scored) and scores_tokens(scored) and not scores_tokens(plain)
    torch.manual_seed(1)
    prompt_ids = torch.randint(3, 100, (2, 5)).repeat_interleave(4, dim=0)
    prompt_mask = torch.ones_like(prompt_ids)
    prompt_mask[4:, :2] = 0  # the second prompt is left-padded
    completion_ids = torch.randint(3, 100, (8, 6))
    completion_mask = torch.ones_like(completion_ids)
    completion_mask[1, 4:] = 0
    results = []
    for model in (plain, scored):
        model.zero_grad()
        logprobs, entropy = completion_logprobs(model, prompt_ids, prompt_mask, completion_ids, completion_mask, 0.7,
                                                with_entropy=True, entropy_grad=True, group_size=group_size)
        weights = torch.randn(8, 6, generator=torch.Generator().manual_seed(2))
        ((logprobs * weights * completion_mask).sum() + 0.1 * entropy.sum()).backward()
        grads = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
        results.append((logprobs.detach(), entropy.detach(), grads))
    (lp_a, h_a, g_a), (lp_b, h_b, g_b) = results
    torch.testing.assert_close(lp_b, lp_a, atol=1e-5, rtol=0)
    torch.testing.assert_close(h_b, h_a, atol=1e-5, rtol=0)
    assert relative_error(g_b, g_a) < 1e-5


def test_trainer_gradient_equals_the_logits_path_and_the_reference_inherits_the_head(tmp_path):
    common = dict(num_epochs=2, kl_coef=0.1, entropy_coef=0.01, clip_eps_low=0.05, clip_eps_high=0.05)
    chunked = make_trainer(tmp_path / "a", model=wide_model(), **common)
    batch, _ = chunked.make_rollout(0)
    full = make_trainer(tmp_path / "b", model=wide_model(), chunked_lm_head=False, **common)  # reseeds the RNG
    other, _ = full.make_rollout(0)
    assert scores_tokens(chunked.model) and scores_tokens(chunked.ref_model) and not scores_tokens(full.model)
    mask = batch.completion_mask.bool()
    assert torch.equal(batch.completion_ids, other.completion_ids)  # same samples: generation is unchanged
    torch.testing.assert_close(batch.old_logprobs[mask], other.old_logprobs[mask], atol=1e-5, rtol=0)
    torch.testing.assert_close(batch.ref_logprobs[mask], other.ref_logprobs[mask], atol=1e-5, rtol=0)
    with torch.no_grad():  # off-policy, so the ratio, its clipping and the KL all enter the gradient
        for a, b in zip(chunked.model.parameters(), full.model.parameters()):
            noise = torch.randn_like(a) * 0.05
            a.add_(noise)
            b.add_(noise)
    assert relative_error(gradient(chunked, batch), gradient(full, batch)) < 1e-5


def test_a_training_step_never_builds_batch_by_vocab_logits(tmp_path, monkeypatch):
    """With tiles of 16 tokens x 512 vocabulary entries (the defaults cover this whole toy batch in one tile), the
    largest fp32 tensor of a step (generation, reference, old log-probs, update) stays far below [B, T, V]."""
    monkeypatch.setattr(lm_head, "TOKEN_CHUNK", 16)
    monkeypatch.setattr(lm_head, "VOCAB_CHUNK", 512)
    trainer = make_trainer(tmp_path, model=wide_model(), kl_coef=0.1, num_epochs=2, micro_batch_size=16)
    batch, _ = trainer.make_rollout(0)
    positions = batch.completion_ids.numel()
    with LargestFloat32() as probe:
        trainer.training_step()
    assert probe.largest < positions * VOCAB / 2, (probe.largest, positions * VOCAB)
    full = make_trainer(tmp_path / "full", model=wide_model(), kl_coef=0.1, num_epochs=2, micro_batch_size=16,
                        chunked_lm_head=False)
    with LargestFloat32() as naive:  # negative control: the logits path builds them
        full.training_step()
    assert naive.largest >= positions * VOCAB / 2


def test_a_head_that_post_processes_its_logits_keeps_the_logits_path(caplog):
    model = tiny_model("llama", hidden_size=32, num_layers=1, num_heads=2)
    model.config.final_logit_softcapping = 30.0
    with caplog.at_level(logging.INFO, logger="rlhf.forward"):
        assert not enable_token_scoring(model)
    assert "post-processes its logits" in caplog.text and not scores_tokens(model)

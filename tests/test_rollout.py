"""Sampling and completion masks: EOS handling, truncation, and the distribution that is sampled."""

import pytest
import torch

from rlhf.data import left_pad
from rlhf.forward import completion_logprobs
from rlhf.rollout import (
    Rollout,
    SamplingParams,
    completion_mask,
    generation_config,
    sample_completions,
)
from rlhf.extras.tiny import EOS_ID, PAD_ID, tiny_model

A, B = 20, 21  # two ordinary tokens


def test_mask_keeps_first_eos_and_drops_the_rest():
    ids = torch.tensor([[A, B, EOS_ID, PAD_ID, PAD_ID], [EOS_ID, PAD_ID, PAD_ID, PAD_ID, PAD_ID],
                        [A, A, A, A, A]])
    mask, truncated = completion_mask(ids, [EOS_ID])
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]]
    assert truncated.tolist() == [False, False, True]


def test_mask_is_right_when_pad_is_eos():
    """After an EOS, generate pads with the pad id; when that id is the EOS id the first EOS must stay in."""
    ids = torch.tensor([[A, EOS_ID, EOS_ID, EOS_ID], [A, B, A, EOS_ID]])
    mask, truncated = completion_mask(ids, [EOS_ID])
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    assert truncated.tolist() == [False, False]


def test_mask_cuts_at_any_eos_id():
    second_eos = 77
    ids = torch.tensor([[A, second_eos, B, EOS_ID], [A, B, EOS_ID, second_eos]])
    mask, _ = completion_mask(ids, [EOS_ID, second_eos])
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 0]]


def _peaky_model(seed=0, sharpness=20.0):
    """A tiny model with a sharp next-token distribution, so sampling statistics are measurable."""
    model = tiny_model("llama", hidden_size=32, num_layers=1, num_heads=2, seed=seed).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(sharpness)
    return model


def test_generation_stops_at_every_eos_id_of_the_list():
    """Half the vocabulary declared EOS: rows stop at many different ids, each where it first appears."""
    model = tiny_model("llama", hidden_size=32, num_layers=1, num_heads=2, seed=0).eval()
    prompt = torch.tensor([[1, 30, 31]] * 64)
    eos_ids = list(range(EOS_ID, model.config.vocab_size, 2))
    ids, mask, truncated = sample_completions(model, prompt, torch.ones_like(prompt),
                                              SamplingParams(max_new_tokens=12), eos_ids, PAD_ID)
    lengths = mask.sum(dim=1)
    last_kept = ids.gather(1, (lengths - 1).unsqueeze(1)).squeeze(1)
    ended = ~truncated
    assert ended.sum() > 56 and ids.shape[1] < 12  # generation stopped once every row had ended
    assert len(set(last_kept[ended].tolist())) >= 5 and torch.isin(last_kept[ended], torch.tensor(eos_ids)).all()
    for row, n in zip(ids.tolist(), lengths.tolist()):  # no EOS id before the end of a kept span
        assert all(t not in eos_ids for t in row[: n - 1])


def test_sampled_distribution_is_the_scored_distribution():
    """Samples at temperature T follow softmax(logits / T), the distribution the ratio is computed from,
    even though the model's own generation_config asks for top_k=1 and a repetition penalty."""
    model = _peaky_model(seed=3)
    model.generation_config.top_k = 1
    model.generation_config.repetition_penalty = 3.0
    temperature, n = 2.0, 4000
    prompt = torch.tensor([[1, 40, 41, 42]])
    torch.manual_seed(0)
    ids, mask, _ = sample_completions(model, prompt.repeat(n, 1), torch.ones(n, 4, dtype=torch.long),
                                      SamplingParams(max_new_tokens=1, temperature=temperature), [EOS_ID], PAD_ID)
    empirical = torch.bincount(ids[:, 0], minlength=model.config.vocab_size).double() / n
    with torch.no_grad():
        candidates = torch.arange(model.config.vocab_size).unsqueeze(1)
        scored, _ = completion_logprobs(model, prompt.repeat(len(candidates), 1), torch.ones(len(candidates), 4,
                                        dtype=torch.long), candidates, torch.ones_like(candidates), temperature)
    expected = scored[:, 0].double().exp()
    assert expected.max() < 0.9  # the check below is not trivial
    total_variation = 0.5 * (empirical - expected).abs().sum()
    assert total_variation < 0.06
    at_t1 = torch.softmax(model(input_ids=prompt).logits[0, -1].double(), -1).detach()
    assert 0.5 * (empirical - at_t1).abs().sum() > 3 * total_variation  # temperature matters here


def test_generation_config_sets_every_sampling_knob():
    config = generation_config(SamplingParams(max_new_tokens=5, temperature=0.7, top_p=0.9, top_k=0), [2, 7], 0)
    assert (config.temperature, config.top_p, config.top_k, config.repetition_penalty) == (0.7, 0.9, 0, 1.0)
    assert config.eos_token_id == [2, 7] and config.do_sample


def test_left_padded_generation_matches_unpadded():
    """Greedy completions of a prompt are the same alone and inside a left-padded batch."""
    model = tiny_model("gpt2", hidden_size=32, num_layers=2, num_heads=2, seed=5).eval()
    prompts = [[1, 10, 11, 12, 13, 14, 15], [1, 16]]
    ids, mask = left_pad(prompts, PAD_ID)
    greedy = SamplingParams(max_new_tokens=6, do_sample=False)
    batched, _, _ = sample_completions(model, ids, mask, greedy, [EOS_ID], PAD_ID)
    alone, _, _ = sample_completions(model, torch.tensor([prompts[1]]), torch.ones(1, 2, dtype=torch.long), greedy,
                                     [EOS_ID], PAD_ID)
    assert batched[1, : alone.shape[1]].tolist() == alone[0].tolist()


def test_batch_trimming_drops_only_all_padding_columns():
    completion_mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0]])
    batch = Rollout(prompt_ids=torch.tensor([[0, 0, 5], [0, 6, 7]]), prompt_mask=torch.tensor([[0, 0, 1], [0, 1, 1]]),
                    completion_ids=torch.tensor([[8, 2, 0, 0], [9, 9, 2, 0]]), completion_mask=completion_mask,
                    truncated=torch.tensor([False, False]), loss_mask=completion_mask.clone(),
                    advantages=torch.tensor([1.0, 2.0]))
    trimmed = batch.trimmed()
    assert trimmed.prompt_ids.tolist() == [[0, 5], [6, 7]]
    assert trimmed.completion_ids.tolist() == [[8, 2, 0], [9, 9, 2]]
    assert trimmed.advantages.tolist() == [1.0, 2.0]
    assert batch.rows(torch.tensor([1])).completion_mask.tolist() == [[1, 1, 1, 0]]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_prefilling_each_prompt_once_per_group_changes_no_completion(arch):
    model = tiny_model(arch, hidden_size=32, num_layers=2, num_heads=2, seed=5).eval()
    ids, mask = left_pad([[1, 10, 11, 12, 13, 14, 15], [1, 16], [1, 17, 18, 19]], PAD_ID)
    ids, mask = ids.repeat_interleave(3, dim=0), mask.repeat_interleave(3, dim=0)
    greedy = SamplingParams(max_new_tokens=8, do_sample=False)
    plain = sample_completions(model, ids, mask, greedy, [EOS_ID], PAD_ID)
    shared = sample_completions(model, ids, mask, greedy, [EOS_ID], PAD_ID, group_size=3)
    for a, b in zip(plain, shared):
        assert torch.equal(a, b)


@pytest.mark.parametrize("do_sample", [False, True])
def test_static_kv_cache_generates_the_same_completions(do_sample, monkeypatch):
    """The fast decode path (a static cache, compiled on GPUs; transformers' ``generate``) samples exactly what the
    dynamic cache does, from the same RNG state, left padding included, when our loop draws as ``generate`` does
    (``DRAW = "multinomial"``; with the default inverse-CDF draw the two are the same distribution on two random
    streams)."""
    import rlhf.decode

    monkeypatch.setattr(rlhf.decode, "DRAW", "multinomial")
    model = tiny_model("llama", hidden_size=32, num_layers=2, num_heads=2, seed=6).eval()
    ids, mask = left_pad([[1, 10, 11, 12, 13, 14, 15], [1, 16], [1, 17, 18, 19]], PAD_ID)
    outputs = []
    for static in (False, True):
        torch.manual_seed(3)
        params = SamplingParams(max_new_tokens=8, do_sample=do_sample, static_kv_cache=static)
        outputs.append(sample_completions(model, ids, mask, params, [EOS_ID], PAD_ID))
    for a, b in zip(*outputs):
        assert torch.equal(a, b)
    assert generation_config(SamplingParams(4, static_kv_cache=True), [EOS_ID], PAD_ID).cache_implementation == "static"


# ---------------------------------------------------------------------------------------------------- TRL's options
def _one_token_samples(model, prompt, params, n=4000):
    torch.manual_seed(0)
    ids, _, _ = sample_completions(model, prompt.repeat(n, 1), torch.ones(n, prompt.shape[1], dtype=torch.long),
                                   params, [EOS_ID], PAD_ID)
    return torch.bincount(ids[:, 0], minlength=model.config.vocab_size).double() / n


def _scored(model, prompt, temperature):
    """exp(log p) of every candidate first token, as the trainer scores it (the tempered distribution)."""
    candidates = torch.arange(model.config.vocab_size).unsqueeze(1)
    with torch.no_grad():
        scored, _ = completion_logprobs(model, prompt.repeat(len(candidates), 1),
                                        torch.ones(len(candidates), prompt.shape[1], dtype=torch.long), candidates,
                                        torch.ones_like(candidates), temperature)
    return scored[:, 0].double().exp()


def test_min_p_samples_the_scored_distribution_on_its_kept_tokens():
    """min_p keeps the tokens at least min_p times as likely as the most likely one (as TRL and transformers define
    it) and samples them in proportion to the scored tempered probabilities: the same distribution the log-probs
    describe, up to the mass of the dropped tail (the same truncation as top_p and top_k)."""
    model = _peaky_model(seed=3)
    prompt, temperature, min_p = torch.tensor([[1, 40, 41, 42]]), 2.0, 0.05
    p = _scored(model, prompt, temperature)
    kept = p >= min_p * p.max()
    assert 2 <= kept.sum() < len(p) and p[~kept].sum() > 0.05  # the truncation matters here
    empirical = _one_token_samples(model, prompt, SamplingParams(max_new_tokens=1, temperature=temperature,
                                                                 min_p=min_p))
    assert empirical[~kept].sum() == 0
    expected = torch.where(kept, p, 0) / p[kept].sum()
    total_variation = 0.5 * (empirical - expected).abs().sum()
    assert total_variation < 0.05
    assert 0.5 * (empirical - p).abs().sum() > 2 * total_variation  # min_p did change what was sampled


def test_repetition_penalty_would_sample_another_distribution_than_the_scored_one():
    """Why repetition_penalty is refused: transformers lowers the logits of every token already in the context,
    so what is sampled is not what the log-probs (and so the ratio and the KL) describe."""
    from rlhf import GRPOConfig
    from rlhf.trl_names import ConfigNameError

    model = _peaky_model(seed=3)
    prompt, temperature = torch.tensor([[1, 40, 41, 42]]), 2.0
    p = _scored(model, prompt, temperature)
    seen = torch.tensor([1, 40, 41, 42])
    assert p[seen].sum() > 0.1  # the prompt's own tokens are likely here, so the penalty bites
    config = generation_config(SamplingParams(max_new_tokens=1, temperature=temperature), [EOS_ID], PAD_ID)
    config.repetition_penalty = 3.0
    torch.manual_seed(0)
    n = 4000
    with torch.no_grad():
        ids = model.generate(input_ids=prompt.repeat(n, 1), attention_mask=torch.ones(n, 4, dtype=torch.long),
                             generation_config=config)[:, -1]
    penalised = torch.bincount(ids, minlength=len(p)).double() / n
    assert 0.5 * (penalised - p).abs().sum() > 0.1
    with pytest.raises(ConfigNameError, match=r"repetition_penalty=1.2: it rescales the logits .*"
                                              r"make_repetition_penalty"):
        GRPOConfig(repetition_penalty=1.2)
    with pytest.raises(ConfigNameError, match="repetition_penalty=1.2"):
        GRPOConfig(generation_kwargs={"repetition_penalty": 1.2})
    assert GRPOConfig(repetition_penalty=1.0) == GRPOConfig()


def test_generation_kwargs_reach_both_the_sampler_and_the_scorer(tmp_path):
    """generation_kwargs' sampling options become the config's fields, which both generation and every log-prob
    pass read: the old log-probs the update uses equal a direct scoring at the generation_kwargs temperature."""
    from helpers import make_trainer

    trainer = make_trainer(tmp_path, generation_kwargs={"temperature": 1.7, "top_k": 7, "min_p": 0.05,
                                                        "use_cache": True}, num_epochs=2, max_new_tokens=4)
    assert (trainer.sampling.temperature, trainer.sampling.top_k, trainer.sampling.min_p) == (1.7, 7, 0.05)
    assert trainer.args.temperature == 1.7
    config = generation_config(trainer.sampling, [EOS_ID], PAD_ID)
    assert (config.temperature, config.top_k, config.min_p, config.repetition_penalty) == (1.7, 7, 0.05, 1.0)
    rollout, _ = trainer.make_rollout(0)
    with torch.no_grad():
        direct, _ = completion_logprobs(trainer.model, rollout.prompt_ids, rollout.prompt_mask,
                                        rollout.completion_ids, rollout.completion_mask, 1.7)
    mask = rollout.completion_mask.bool()
    assert torch.allclose(rollout.old_logprobs[mask], direct[mask], atol=1e-5)

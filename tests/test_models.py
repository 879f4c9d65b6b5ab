"""Scoring completions: positions under left padding, temperature, dropout, logits only where needed."""

import pytest
import torch

from rlhf.forward import completion_logprobs, position_ids_from_mask
from rlhf.models import disable_dropout, eos_token_ids
from rlhf.extras.tiny import EOS_ID, tiny_model
from helpers import padded_batch


def _reference_logprobs(model, prompt: list[int], completion: list[int], temperature: float = 1.0):
    """Score one sequence alone (no padding at all) with a full log-softmax over the vocabulary."""
    ids = torch.tensor([prompt + completion])
    logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].double() / temperature
    return torch.log_softmax(logits, dim=-1).gather(-1, torch.tensor(completion).unsqueeze(-1)).squeeze(-1)


PROMPTS = [[1, 10, 11, 12, 13, 14, 15, 16], [1, 20], [1, 30, 31, 32, 33]]
COMPLETIONS = [[40, 41, 2], [42, 43, 44, 45, 46], [47]]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])  # RoPE and absolute positions
def test_left_padding_does_not_change_logprobs(arch):
    model = tiny_model(arch, hidden_size=32, num_layers=2, num_heads=2, seed=1).eval()
    batch = padded_batch(PROMPTS, COMPLETIONS)
    with torch.no_grad():
        logprobs, _ = completion_logprobs(model, *batch)
        for i, (prompt, completion) in enumerate(zip(PROMPTS, COMPLETIONS)):
            alone = _reference_logprobs(model, prompt, completion)
            torch.testing.assert_close(logprobs[i, : len(completion)].double(), alone, atol=1e-5, rtol=0)


def test_absolute_positions_need_position_ids():
    """Negative control: without position ids from the mask, a left-padded GPT-2 row is scored wrongly."""
    model = tiny_model("gpt2", hidden_size=32, num_layers=2, num_heads=2, seed=1).eval()
    prompt_ids, prompt_mask, completion_ids, completion_mask = padded_batch(PROMPTS, COMPLETIONS)
    ids = torch.cat([prompt_ids, completion_ids], 1)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=torch.cat([prompt_mask, completion_mask], 1)).logits
        naive = torch.log_softmax(logits[1, prompt_ids.shape[1] - 1 : -1], -1)
        naive = naive.gather(-1, completion_ids[1].unsqueeze(-1)).squeeze(-1)[: len(COMPLETIONS[1])]
    alone = _reference_logprobs(model, PROMPTS[1], COMPLETIONS[1])
    assert (naive.double() - alone).abs().max() > 1e-3


def test_position_ids_match_generate():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert position_ids_from_mask(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]


@pytest.mark.parametrize("temperature", [0.7, 1.0, 2.5])
def test_logprobs_use_the_sampling_temperature(llama, temperature):
    batch = padded_batch(PROMPTS, COMPLETIONS)
    with torch.no_grad():
        logprobs, _ = completion_logprobs(llama, *batch, temperature=temperature)
    for i, (prompt, completion) in enumerate(zip(PROMPTS, COMPLETIONS)):
        expected = _reference_logprobs(llama, prompt, completion, temperature)
        torch.testing.assert_close(logprobs[i, : len(completion)].double(), expected, atol=1e-5, rtol=0)


def test_entropy_matches_full_softmax(llama):
    batch = padded_batch(PROMPTS, COMPLETIONS)
    with torch.no_grad():
        _, entropy = completion_logprobs(llama, *batch, temperature=1.3, with_entropy=True)
        prompt, completion = PROMPTS[0], COMPLETIONS[0]
        logits = llama(input_ids=torch.tensor([prompt + completion])).logits[0, len(prompt) - 1 : -1] / 1.3
    expected = -(torch.softmax(logits, -1) * torch.log_softmax(logits, -1)).sum(-1)
    offset = 0  # row 0's completion starts at column 0
    torch.testing.assert_close(entropy[0, offset : len(completion)], expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_disable_dropout_makes_train_mode_deterministic(arch):
    overrides = {"attention_dropout": 0.5} if arch == "llama" else {"resid_pdrop": 0.5, "attn_pdrop": 0.5,
                                                                    "embd_pdrop": 0.5}
    model = tiny_model(arch, hidden_size=32, num_layers=2, num_heads=2, **overrides).train()
    ids = torch.tensor([[1, 5, 6, 7, 8, 9]])
    assert not torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)  # dropout really was on
    disable_dropout(model)
    assert torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)


def test_eos_ids_union_of_model_and_tokenizer(llama, tokenizer):
    llama.generation_config.eos_token_id = [EOS_ID, 77]
    assert eos_token_ids(llama, tokenizer) == [EOS_ID, 77]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_shared_prompt_pass_gives_the_same_logprobs_and_gradients(arch):
    """Each prompt run once for its group of completions (KV cache repeated) == every row run in full."""
    from rlhf import ValueModel
    from rlhf.critic import completion_values

    group = 3
    prompts = [p for p in PROMPTS for _ in range(group)]
    completions = [[40 + i, 41, 42 + i % 3, 2][: 1 + i % 4] for i in range(len(prompts))]
    batch = padded_batch(prompts, completions)
    results = {}
    for size in (1, group):
        model = tiny_model(arch, hidden_size=32, num_layers=2, num_heads=2, seed=3).eval()  # GPT-2 has dropout
        logprobs, entropy = completion_logprobs(model, *batch, temperature=0.8, with_entropy=True, group_size=size)
        mask = batch[3].bool()
        logprobs[mask].sum().backward()
        critic = ValueModel.from_causal_lm(tiny_model(arch, hidden_size=32, num_layers=2, num_heads=2, seed=3)).eval()
        values = completion_values(critic, *batch, group_size=size)
        results[size] = (logprobs[mask], entropy[mask], values[mask],
                         torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    for full, shared in zip(results[1], results[group]):
        torch.testing.assert_close(shared, full, atol=1e-5, rtol=1e-5)


def test_rows_of_different_prompts_are_not_shared(llama):
    batch = padded_batch(PROMPTS, COMPLETIONS)  # three different prompts, "group size" 3
    with torch.no_grad():
        full, _ = completion_logprobs(llama, *batch)
        guarded, _ = completion_logprobs(llama, *batch, group_size=3)
    assert torch.equal(full, guarded)

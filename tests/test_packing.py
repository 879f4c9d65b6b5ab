"""Packed prompt trees (rlhf/packing.py) give the outputs and gradients of the plain layout, and compute no padding."""

import pytest
import torch

from rlhf import ValueModel, packing
from rlhf.critic import completion_values
from rlhf.extras.tiny import tiny_model
from rlhf.forward import completion_logprobs, packed_batch
from helpers import padded_batch

GROUP = 3
PROMPTS = [[1, 10, 11, 12, 13, 14, 15, 16], [1, 20], [1, 30, 31, 32, 33]]


def _grouped_batch():
    """Three prompts x GROUP completions of lengths 1 to 9: the plain layout pads most rows."""
    prompts = [p for p in PROMPTS for _ in range(GROUP)]
    lengths = [1, 9, 4, 6, 2, 9, 3, 5, 7]
    completions = [[(40 + 7 * i + t) % 60 + 4 for t in range(n)] for i, n in enumerate(lengths)]
    return padded_batch(prompts, completions)


def _outputs(arch, attention, batch, group, enabled, monkeypatch):
    """Log-probs, entropies and values on the valid tokens, and the actor's and critic's gradients."""
    monkeypatch.setattr(packing, "ENABLED", enabled)
    model = tiny_model(arch, hidden_size=32, num_layers=2, num_heads=2, seed=3, attn_implementation=attention).eval()
    critic = ValueModel.from_causal_lm(tiny_model(arch, hidden_size=32, num_layers=2, num_heads=2, seed=4,
                                                  attn_implementation=attention)).eval()
    assert (packed_batch(model, *batch, group) is not None) == enabled  # the lever really is on or off
    logprobs, entropy = completion_logprobs(model, *batch, temperature=0.8, with_entropy=True, group_size=group)
    values = completion_values(critic, *batch, group_size=group)
    mask = batch[3].bool()
    (logprobs[mask].sum() + (entropy[mask] * 0.3).sum()).backward()
    (values[mask] ** 2).sum().backward()
    grads = [torch.cat([p.grad.flatten() for p in m.parameters() if p.grad is not None]) for m in (model, critic)]
    return [logprobs[mask], entropy[mask], values[mask], *grads]


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2"])
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("group", [1, GROUP])
def test_packed_trees_give_the_plain_layouts_outputs_and_gradients(arch, attention, group, monkeypatch):
    batch = _grouped_batch()
    plain = _outputs(arch, attention, batch, group, False, monkeypatch)
    packed = _outputs(arch, attention, batch, group, True, monkeypatch)
    for name, a, b in zip(["logprobs", "entropy", "values", "actor grad", "critic grad"], packed, plain):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5), (name, float((a - b).abs().max()))


def test_trees_split_when_longer_than_a_row_give_the_same_outputs(monkeypatch):
    """A group whose tree exceeds ROW_TOKENS is split into sub-trees, each with its own copy of the prompt."""
    batch = _grouped_batch()
    whole = _outputs("llama", "sdpa", batch, GROUP, True, monkeypatch)
    monkeypatch.setattr(packing, "ROW_TOKENS", 1)  # capacity: the plain layout's width (8 + 9 = 17 tokens)
    packed = packing.pack_rows(*batch, GROUP)
    assert int(packed.tree.max() + 1) > len(PROMPTS)  # the 7 + 1 + 9 + 4 = 21-token tree was split
    assert packed.input_ids.shape[1] <= batch[0].shape[1] + batch[2].shape[1]
    split = _outputs("llama", "sdpa", batch, GROUP, True, monkeypatch)
    for a, b in zip(split, whole):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_a_tree_holds_the_prompt_once_and_each_branch_sees_only_the_prompt_and_itself():
    """The layout written out by hand for one prompt [1, 5, 6] and completions [7, 8] and [9]."""
    batch = padded_batch([[1, 5, 6], [1, 5, 6]], [[7, 8], [9]])
    packed = packing.pack_rows(*batch, 2)
    assert packed.input_ids.tolist() == [[1, 5, 6, 7, 6]]  # trunk [1, 5]; branch [6, 7]; branch [6]
    assert packed.position_ids.tolist() == [[0, 1, 2, 3, 2]]
    assert packed.targets.tolist() == [[-1, -1, 7, 8, 9]]
    assert packed.index.tolist() == [[2, 3], [4, 0]]  # (row 1, column 1) is past the completion's end
    expected = torch.tensor([[1, 0, 0, 0, 0],
                             [1, 1, 0, 0, 0],
                             [1, 1, 1, 0, 0],
                             [1, 1, 1, 1, 0],
                             [1, 1, 0, 0, 1]], dtype=torch.bool)
    assert torch.equal(packed.attention_mask("sdpa", torch.float32)[0, 0], expected)
    additive = packed.attention_mask("eager", torch.float32)[0, 0]
    assert torch.equal(additive == 0, expected) and bool((additive[~expected] == torch.finfo(torch.float32).min).all())


def test_packing_computes_no_padding_and_keeps_each_tree_in_one_row():
    batch = _grouped_batch()
    packed = packing.pack_rows(*batch, GROUP)
    real_tokens = sum(len(p) - 1 for p in PROMPTS) + int(batch[3].sum())  # each prompt once (its last token once
    computed = int((packed.tree >= 0).sum())  # per branch, counted with the branch)
    assert computed == real_tokens
    plain = len(PROMPTS) * batch[0].shape[1] + batch[2].numel()
    assert packed.input_ids.numel() <= packing.MAX_FRACTION * plain
    for tree in range(int(packed.tree.max()) + 1):
        assert len(set((packed.tree == tree).nonzero()[:, 0].tolist())) == 1


def test_padding_rows_attend_to_themselves_only():
    batch = _grouped_batch()
    packed = packing.pack_rows(*batch, GROUP)
    mask = packed.attention_mask("sdpa", torch.float32)[:, 0]
    pad = packed.tree < 0
    assert bool(pad.any())  # the rows are not all the same length
    assert torch.equal(mask[pad].sum(dim=-1), torch.ones(int(pad.sum()), dtype=torch.long))
    assert not bool(mask.transpose(1, 2)[pad][:, :].logical_and(~torch.eye(mask.shape[1], dtype=torch.bool)
                                                                 .expand_as(mask)[pad]).any())


def test_masks_with_holes_and_equal_lengths_keep_the_plain_layout():
    prompt_ids, prompt_mask, completion_ids, completion_mask = _grouped_batch()
    holed = completion_mask.clone()
    holed[1, 2] = 0  # a hole inside a completion
    assert packing.pack_rows(prompt_ids, prompt_mask, completion_ids, holed, GROUP) is None
    full = torch.ones_like(completion_mask)  # every completion as long as the longest: packing saves nothing
    assert packing.pack_rows(prompt_ids, prompt_mask, completion_ids, full, GROUP) is None


def test_attention_without_custom_masks_keeps_the_plain_layout():
    model = tiny_model("llama", hidden_size=32, num_layers=2, num_heads=2)
    assert packing.packable(model, 64)
    model.config._attn_implementation = "flash_attention_2"
    assert not packing.packable(model, 64)
    assert packed_batch(model, *_grouped_batch(), GROUP) is None


def test_models_with_other_mixing_layers_or_a_short_window_keep_the_plain_layout():
    """A recurrent or convolutional layer would carry state across packed trees, and the custom mask would drop a
    sliding window: such models are not packed (a window at least as long as the plain layout cuts nothing)."""
    model = tiny_model("qwen2", hidden_size=32, num_layers=2, num_heads=2)
    config = model.config
    assert packing.packable(model, 64)
    config.model_type = "mamba"
    assert not packing.packable(model, 64)
    config.model_type = "qwen2"
    config.layer_types = ["full_attention", "linear_attention"]
    assert not packing.packable(model, 64)
    config.layer_types = ["full_attention", "sliding_attention"]
    config.use_sliding_window, config.sliding_window = True, 32
    assert not packing.packable(model, 64) and packing.packable(model, 32)
    config.use_sliding_window = False  # Qwen2's default: the window is not applied
    assert packing.packable(model, 64)


@pytest.mark.parametrize("lengths", ["varied", "equal"])
def test_gradient_checkpointing_shares_prompts_through_packing_and_falls_back_without_a_cache(lengths, monkeypatch):
    """Training under gradient checkpointing keeps no KV cache: packed trees still run each prompt once; a batch that
    is not packed (equal lengths) runs every row whole instead of failing on the missing cache. Both equal the plain
    layout without checkpointing."""
    batch = list(_grouped_batch())
    if lengths == "equal":
        batch[3] = torch.ones_like(batch[3])
    results = []
    for checkpointing in (False, True):
        model = tiny_model("llama", hidden_size=32, num_layers=2, num_heads=2, seed=3).train()
        if checkpointing:
            model.gradient_checkpointing_enable()
        logprobs, _ = completion_logprobs(model, *batch, group_size=GROUP)
        logprobs[batch[3].bool()].sum().backward()
        grad = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        results.append((logprobs[batch[3].bool()].detach(), grad))
    assert (packed_batch(model, *batch, GROUP) is not None) == (lengths == "varied")
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)

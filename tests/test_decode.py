"""Our decode loop (rlhf/decode.py) against transformers' ``generate`` with the same settings and random state: the
same tokens (with ``generate``'s draw, ``DRAW = "multinomial"``), the same log-probs of the drawn tokens, whatever the
sampling knobs, padding, prompt sharing, EOS ids or early stop; and the default inverse-CDF draw against a slow
reference and the distribution it must sample."""

import pytest
import torch

import rlhf.decode
from rlhf.data import left_pad
from rlhf.extras.tiny import EOS_ID, PAD_ID, tiny_model
from rlhf.forward import groups_share_prompts, run_shared_prompts
from rlhf.rollout import SamplingParams, _generate, sample_completions

# A random init with tied embeddings tends to repeat the last token: greedy rows whose prompt ends in an EOS id stop
# at once, the others run to the limit.
PROMPTS = [[1, 10, 11, 12, 13, 14, 15], [1, 16], [1, 18, 19, 20], [1, 21, 22]]
SETTINGS = {
    "greedy": SamplingParams(max_new_tokens=10, do_sample=False),
    "sampled": SamplingParams(max_new_tokens=10),
    "warpers": SamplingParams(max_new_tokens=10, temperature=0.7, top_k=12, top_p=0.9, min_new_tokens=3),
    "min_p": SamplingParams(max_new_tokens=10, temperature=1.3, min_p=0.05),
}


# A third of the vocabulary declared EOS: rows end at different steps (padding after EOS is exercised), greedy too.
EOS_IDS = (EOS_ID, *range(EOS_ID + 3, 102, 3))


def model_of(arch: str):
    return tiny_model(arch, hidden_size=32, num_layers=2, num_heads=2, seed=11).eval()


@pytest.fixture
def generate_draw(monkeypatch):
    """``generate``'s own ``multinomial`` draw, so that the same seed gives the same tokens."""
    monkeypatch.setattr(rlhf.decode, "DRAW", "multinomial")


def both_paths(model, params, group_size=1, eos_ids=EOS_IDS):
    ids, mask = left_pad(PROMPTS, PAD_ID)
    ids, mask = ids.repeat_interleave(6, dim=0), mask.repeat_interleave(6, dim=0)
    sampled = params.do_sample
    torch.manual_seed(7)
    ours = sample_completions(model, ids, mask, params, list(eos_ids), PAD_ID, group_size=group_size,
                              with_logprobs=sampled)
    torch.manual_seed(7)
    cache = None
    if group_size > 1 and groups_share_prompts(ids, mask, group_size):
        _, cache = run_shared_prompts(model, ids[:, :-1], mask[:, :-1], group_size)
    reference, logprobs = _generate(model, ids, mask, params, list(eos_ids), PAD_ID, False, cache, sampled)
    return ours, reference, logprobs


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("setting", sorted(SETTINGS))
@pytest.mark.parametrize("group_size", [1, 6])
def test_decode_draws_what_generate_draws(arch, setting, group_size, generate_draw):
    model = model_of(arch)
    ours, reference, logprobs = both_paths(model, SETTINGS[setting], group_size)
    completion_ids, mask = ours[0], ours[1]
    assert torch.equal(completion_ids, reference)
    lengths = mask.sum(dim=1)
    assert 1 <= lengths.min() < lengths.max()  # rows end at different steps: padding after EOS is exercised
    if setting == "warpers":
        assert lengths.min() >= 3  # min_new_tokens
    if SETTINGS[setting].do_sample:
        assert torch.allclose(ours[3], torch.where(mask.bool(), logprobs, 0.0), atol=1e-5)
        assert (ours[3][mask.bool()] <= 0).all() and (ours[3][~mask.bool()] == 0).all()


def test_decode_stops_when_every_row_has_ended_and_at_any_eos_id(generate_draw):
    model = model_of("llama")
    eos_ids = (EOS_ID, *range(EOS_ID + 1, 102, 2))
    ours, reference, _ = both_paths(model, SamplingParams(max_new_tokens=30), eos_ids=eos_ids)
    assert torch.equal(ours[0], reference)
    assert ours[0].shape[1] < 30 and not ours[2].any()  # an early stop: every row has ended, none truncated
    ended_at = ours[0].gather(1, (ours[1].sum(dim=1) - 1)[:, None]).squeeze(1)
    assert torch.isin(ended_at, torch.tensor(eos_ids)).all()


@pytest.mark.parametrize("draw", ["inverse_cdf", "multinomial"])
def test_decode_draws_from_the_tempered_distribution(draw, monkeypatch):
    """One step from one prompt, many rows: the frequencies match softmax(logits / T) and each drawn token's
    log-prob is that distribution's."""
    monkeypatch.setattr(rlhf.decode, "DRAW", draw)
    model = tiny_model("llama", hidden_size=32, num_layers=1, num_heads=2, seed=0).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    n, temperature = 6000, 0.8
    prompt = torch.tensor([[1, 30, 31]])
    torch.manual_seed(0)
    ids, mask, _, logprobs = sample_completions(model, prompt.repeat(n, 1), torch.ones(n, 3, dtype=torch.long),
                                                SamplingParams(max_new_tokens=1, temperature=temperature), [EOS_ID],
                                                PAD_ID, with_logprobs=True)
    with torch.no_grad():
        expected = torch.log_softmax(model(prompt).logits[0, -1] / temperature, dim=-1)
    assert torch.allclose(logprobs[:, 0], expected[ids[:, 0]], atol=1e-5)
    frequency = torch.bincount(ids[:, 0], minlength=expected.numel()).double() / n
    assert (frequency - expected.exp().double()).abs().max() < 4 * (0.25 / n) ** 0.5


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_reserved_cache_changes_no_bit(arch, monkeypatch):
    """The in-place KV buffer is a speed change only: with it and with DynamicLayer's concatenation the same tokens
    and bit-identical log-probs."""
    model = model_of(arch)
    ids, mask = left_pad(PROMPTS, PAD_ID)
    runs = []
    for reserve in (True, False):
        if not reserve:
            monkeypatch.setattr(rlhf.decode, "_reserve_cache", lambda cache, capacity: None)
        torch.manual_seed(3)
        runs.append(rlhf.decode.decode(model, ids, mask, SETTINGS["sampled"], [EOS_ID], PAD_ID, with_logprobs=True))
    (tokens, logprobs), (plain_tokens, plain_logprobs) = runs
    assert tokens.shape[1] == 10 and torch.equal(tokens, plain_tokens)
    assert torch.equal(logprobs, plain_logprobs)


def test_growing_layer_matches_dynamic_layer():
    """_GrowingLayer against DynamicLayer under the same edits: appends within and past the reserved room, crop,
    batch repeat and select, reset."""
    from transformers.cache_utils import DynamicLayer

    from rlhf.decode import _GrowingLayer

    def chunk(length, batch=2):
        return torch.randn(batch, 2, length, 4), torch.randn(batch, 2, length, 4)

    torch.manual_seed(0)
    plain = DynamicLayer()
    plain.update(*chunk(3))
    growing = _GrowingLayer(plain, capacity=5)
    plain = DynamicLayer()
    plain.update(growing.keys.clone(), growing.values.clone())

    def same():
        assert torch.equal(growing.keys, plain.keys) and torch.equal(growing.values, plain.values)
        assert growing.get_seq_length() == plain.get_seq_length()

    buffer = growing._keys.data_ptr()
    for length in (1, 1, 4, 1):  # 3 -> 4 -> 5 (the room is full) -> 9 (past it: the buffer grows) -> 10
        new = chunk(length)
        assert all(torch.equal(a, b) for a, b in zip(growing.update(*new), plain.update(*new)))
        same()
        if growing.get_seq_length() <= 5:
            assert growing._keys.data_ptr() == buffer  # written in place, not copied
    assert growing._keys.data_ptr() != buffer and growing._keys.shape[-2] >= 9
    growing.crop(-2), plain.crop(-2)
    same()
    growing.batch_repeat_interleave(3), plain.batch_repeat_interleave(3)
    same()
    index = torch.tensor([0, 4, 5])
    growing.batch_select_indices(index), plain.batch_select_indices(index)
    same()
    new = chunk(1, batch=3)
    growing.update(*new), plain.update(*new)
    same()
    growing.reset(), plain.reset()
    growing.crop(-1), plain.crop(-1)  # on an emptied layer: nothing to do
    new = chunk(2, batch=1)
    growing.update(*new), plain.update(*new)
    same()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("setting", ["sampled", "greedy", "warpers"])
@pytest.mark.parametrize("draw", ["inverse_cdf", "multinomial"])
def test_finished_rows_leave_the_batch_and_change_no_bit(arch, setting, draw, monkeypatch):
    """Rows that have ended leave the model's batch (the forward passes shrink): the same tokens as keeping every row
    to the end, and the same log-probs of every token up to each row's EOS up to float rounding (a matmul over fewer
    rows may round differently: 1e-6 here; bit-identical on the Llama)."""
    monkeypatch.setattr(rlhf.decode, "DRAW", draw)
    model = model_of(arch)
    ids, mask = left_pad(PROMPTS, PAD_ID)
    ids, mask = ids.repeat_interleave(6, dim=0), mask.repeat_interleave(6, dim=0)
    sampled = SETTINGS[setting].do_sample
    runs = []
    for fraction in (rlhf.decode.LEAVE_FRACTION, float("inf")):
        monkeypatch.setattr(rlhf.decode, "LEAVE_FRACTION", fraction)
        batch_sizes = []
        hook = model.register_forward_pre_hook(lambda module, args, kwargs: batch_sizes.append(
            kwargs["input_ids"].shape[0]), with_kwargs=True)
        torch.manual_seed(5)
        tokens, logprobs = rlhf.decode.decode(model, ids, mask, SETTINGS[setting], list(EOS_IDS), PAD_ID,
                                              with_logprobs=sampled)
        hook.remove()
        runs.append((tokens, logprobs, batch_sizes))
    (tokens, logprobs, sizes), (kept_tokens, kept_logprobs, kept_sizes) = runs
    assert set(kept_sizes) == {len(ids)} and sizes[0] == len(ids) and min(sizes) < len(ids)  # rows did leave
    assert sizes == sorted(sizes, reverse=True)
    assert torch.equal(tokens, kept_tokens)
    ended = torch.isin(tokens, torch.tensor(EOS_IDS))
    valid = (ended.cumsum(dim=1) - ended.long()) == 0  # every position up to and including the first EOS
    assert 1 <= valid.sum(dim=1).min() < valid.sum(dim=1).max()
    if sampled:
        assert (logprobs[valid] - kept_logprobs[valid]).abs().max() <= 1e-5


def test_inverse_cdf_draw_matches_a_slow_reference():
    """Probabilities in multiples of 1/1024 (every running sum exact in any order), zeros among them, rows that do not
    sum to 1, and uniform numbers at the ends of [0, 1): the first token whose running sum exceeds u x total."""
    generator = torch.Generator().manual_seed(0)
    probs = torch.randint(0, 6, (40, 37), generator=generator).float() / 1024
    probs[:, ::4] = 0  # tokens that must never be drawn
    probs[:3, :-1] = 0  # all the mass on the last token
    probs[:3, -1] = 3 / 1024
    uniform = torch.rand(40, generator=generator, dtype=torch.float64)
    uniform[3], uniform[4] = 0.0, 1.0 - 2**-53
    drawn = rlhf.decode.inverse_cdf_draw(probs, uniform)
    for row in range(40):
        total, target = float(probs[row].double().sum()), float(uniform[row]) * float(probs[row].double().sum())
        running, expected = 0.0, None
        for token, p in enumerate(probs[row].tolist()):
            running += p
            if running > target:
                expected = token
                break
        assert int(drawn[row]) == expected, row
        assert probs[row, drawn[row]] > 0 and total > 0
    assert drawn[:3].tolist() == [36, 36, 36]


def test_inverse_cdf_draw_keeps_tokens_of_tiny_probability():
    """A token of probability 1e-9 beside one of nearly 1: drawn for exactly its share of [0, 1) (float32 running
    sums would round its interval to nothing)."""
    probs = torch.tensor([[1.0 - 1e-9, 1e-9]])
    assert int(rlhf.decode.inverse_cdf_draw(probs, torch.tensor([1.0 - 5e-10], dtype=torch.float64))) == 1
    assert int(rlhf.decode.inverse_cdf_draw(probs, torch.tensor([1.0 - 2e-9], dtype=torch.float64))) == 0


def test_the_default_draw_takes_one_random_number_per_row_and_step():
    """B uniform numbers a step, whichever rows are still running: the stream after decoding is that of B x steps
    draws, so the same seed gives the same tokens with and without rows leaving (test above) and after a resume."""
    assert rlhf.decode.DRAW == "inverse_cdf"
    model = model_of("llama")
    ids, mask = left_pad(PROMPTS, PAD_ID)
    torch.manual_seed(9)
    tokens, _ = rlhf.decode.decode(model, ids, mask, SamplingParams(max_new_tokens=5, min_new_tokens=5), [EOS_ID],
                                   PAD_ID)
    after_decode = torch.rand(3)
    torch.manual_seed(9)
    torch.rand(len(PROMPTS) * tokens.shape[1], dtype=torch.float64)
    assert torch.equal(after_decode, torch.rand(3))


def test_inverse_cdf_draw_refuses_a_row_with_no_mass():
    """All-zero or NaN probabilities (every score -inf, or NaN logits) raise naming the row, as torch.multinomial
    does, instead of drawing a token of probability 0."""
    probs = torch.tensor([[0.5, 0.5], [0.0, 0.0], [float("nan"), float("nan")]])
    with pytest.raises(ValueError, match=r"rows \[1, 2\].*no mass"):
        rlhf.decode.inverse_cdf_draw(probs, torch.tensor([0.3, 0.3, 0.3], dtype=torch.float64))

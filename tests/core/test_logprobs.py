"""rlhf.core.logprobs: chunked token log-probs and entropies against the full log-softmax."""

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from rlhf.core import entropy_from_logits, token_logprobs, token_logprobs_and_entropy

B, L, V = 3, 5, 11  # 15 rows of logits
CHUNKS = [None, 1, 3, 4, 100]  # default, one row, divides 15, does not divide 15, more than 15


def batch(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    logits = (torch.randn(B, L, V) * 3).to(dtype)
    return logits, torch.randint(0, V, (B, L))


def ref_logprobs(logits, tokens):
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, tokens[..., None]).squeeze(-1)


def ref_entropy(logits):
    x = logits.float()
    return -(torch.softmax(x, dim=-1) * torch.log_softmax(x, dim=-1)).sum(-1)


@pytest.mark.parametrize("chunk_rows", CHUNKS)
def test_token_logprobs_match_log_softmax(chunk_rows):
    """[B, T, V] and [N, V] inputs: equal to log_softmax(...).gather within 1e-5, fp32 out, same shape."""
    logits, tokens = batch()
    for lg, tk in ((logits, tokens), (logits.reshape(-1, V), tokens.reshape(-1))):
        out = token_logprobs(lg, tk, chunk_rows=chunk_rows)
        assert out.shape == tk.shape and out.dtype == torch.float32
        torch.testing.assert_close(out, ref_logprobs(lg, tk), atol=1e-5, rtol=0)


@pytest.mark.parametrize("chunk_rows", CHUNKS)
def test_token_logprobs_bf16(chunk_rows):
    """bf16 logits give fp32 log-probs equal to the fp32 reference of the same bf16 values."""
    logits, tokens = batch(1, torch.bfloat16)
    out = token_logprobs(logits, tokens, chunk_rows=chunk_rows)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref_logprobs(logits, tokens), atol=1e-5, rtol=0)


def test_token_logprobs_non_contiguous_shifted_logits():
    """The usual causal shift (logits[:, :-1] scoring tokens[:, 1:]) is a non-contiguous view."""
    torch.manual_seed(2)
    logits, ids = torch.randn(B, L + 1, V), torch.randint(0, V, (B, L + 1))
    shifted = logits[:, :-1]
    assert not shifted.is_contiguous()
    torch.testing.assert_close(
        token_logprobs(shifted, ids[:, 1:], chunk_rows=4), ref_logprobs(shifted, ids[:, 1:]), atol=1e-5, rtol=0
    )


def test_token_logprobs_hand_case():
    """logits [0, log 3]: p = [1/4, 3/4], so log p(1) = log 0.75 and log p(0) = log 0.25."""
    logits = torch.tensor([[0.0, math.log(3.0)], [0.0, math.log(3.0)]])
    out = token_logprobs(logits, torch.tensor([1, 0]), chunk_rows=1)
    torch.testing.assert_close(out, torch.tensor([math.log(0.75), math.log(0.25)]))


@pytest.mark.parametrize("chunk_rows", CHUNKS)
def test_token_logprobs_gradient(chunk_rows):
    """Gradient w.r.t. the logits equals the reference's (one-hot - softmax, weighted) within 1e-5."""
    logits, tokens = batch(3)
    weights = torch.randn(B, L)
    grads = []
    for fn in (lambda x: token_logprobs(x, tokens, chunk_rows=chunk_rows), lambda x: ref_logprobs(x, tokens)):
        x = logits.clone().requires_grad_(True)
        (fn(x) * weights).sum().backward()
        grads.append(x.grad)
    torch.testing.assert_close(grads[0], grads[1], atol=1e-5, rtol=0)


def test_token_logprobs_large_input_one_row_at_a_time():
    """chunk_rows=1 on a larger input (512 rows x 1000 vocab) still equals the reference."""
    torch.manual_seed(4)
    logits, tokens = torch.randn(8, 64, 1000) * 4, torch.randint(0, 1000, (8, 64))
    out = token_logprobs(logits, tokens, chunk_rows=1)
    torch.testing.assert_close(out, ref_logprobs(logits, tokens), atol=1e-5, rtol=0)


class LargestFloat32(TorchDispatchMode):
    """Records the largest fp32 tensor any aten op produces (observes only; changes nothing)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.dtype == torch.float32:
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("fn", ["token_logprobs", "entropy_from_logits"])
def test_no_full_fp32_copy_of_the_logits(fn):
    """With bf16 logits and chunk_rows=2, no fp32 tensor larger than 2 rows x V is ever created;
    the naive full log-softmax (negative control) creates one of all B*T*V elements."""
    torch.manual_seed(5)
    vocab = 64
    logits, tokens = torch.randn(4, 8, vocab).bfloat16(), torch.randint(0, vocab, (4, 8))
    call = {
        "token_logprobs": lambda: token_logprobs(logits, tokens, chunk_rows=2),
        "entropy_from_logits": lambda: entropy_from_logits(logits, chunk_rows=2),
    }[fn]
    with torch.no_grad(), LargestFloat32() as probe:
        call()
    assert probe.largest <= 2 * vocab
    with torch.no_grad(), LargestFloat32() as naive:
        ref_logprobs(logits, tokens)
    assert naive.largest == logits.numel()


@pytest.mark.parametrize("chunk_rows", CHUNKS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_entropy_matches_reference(chunk_rows, dtype):
    """H = -(softmax * log_softmax).sum(-1) within 1e-5, chunked or not, fp32 out."""
    logits, _ = batch(6, dtype)
    out = entropy_from_logits(logits, chunk_rows=chunk_rows)
    assert out.shape == (B, L) and out.dtype == torch.float32
    torch.testing.assert_close(out, ref_entropy(logits), atol=1e-5, rtol=0)


@pytest.mark.parametrize("fn", ["token_logprobs", "entropy_from_logits"])
def test_large_common_logit_offset(fn):
    """Real LM logits can sit far from 0 (GPT-2's are around -100). Both functions still match the
    reference within 1e-5 there; softmax is shift-invariant, so the exact answer is unchanged."""
    torch.manual_seed(8)
    logits, tokens = torch.randn(4, 8, 1000) * 3 - 100, torch.randint(0, 1000, (4, 8))
    if fn == "token_logprobs":
        out, ref = token_logprobs(logits, tokens, chunk_rows=5), ref_logprobs(logits, tokens)
    else:
        out, ref = entropy_from_logits(logits, chunk_rows=5), ref_entropy(logits)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


def test_entropy_hand_cases():
    """Uniform logits over V: H = log V. One dominant logit (+100): H ~ 0."""
    peaked = torch.zeros(V)
    peaked[3] = 100.0
    out = entropy_from_logits(torch.stack([torch.zeros(V), peaked]), chunk_rows=1)
    torch.testing.assert_close(out, torch.tensor([math.log(V), 0.0]), atol=1e-5, rtol=0)


def test_entropy_gradient():
    """Gradient of the entropy w.r.t. the logits equals the reference's within 1e-5."""
    logits, _ = batch(7)
    grads = []
    for fn in (lambda x: entropy_from_logits(x, chunk_rows=4), ref_entropy):
        x = logits.clone().requires_grad_(True)
        fn(x).sum().backward()
        grads.append(x.grad)
    torch.testing.assert_close(grads[0], grads[1], atol=1e-5, rtol=0)


@pytest.mark.parametrize("chunk_rows", [None, 1, 5])
@pytest.mark.parametrize("offset", [0.0, -100.0])
def test_fused_logprobs_and_entropy_match_the_separate_functions(chunk_rows, offset):
    """One pass gives what token_logprobs and the full-softmax entropy give, gradients included."""
    torch.manual_seed(0)
    logits = (torch.randn(3, 7, 50) * 3 + offset).requires_grad_(True)
    tokens = torch.randint(0, 50, (3, 7))
    logprobs, entropy = token_logprobs_and_entropy(logits, tokens, chunk_rows=chunk_rows, entropy_grad=True)
    reference = torch.log_softmax(logits.double(), -1)
    expected_logprobs = reference.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    expected_entropy = -(reference.exp() * reference).sum(-1)
    torch.testing.assert_close(logprobs.double(), expected_logprobs, atol=1e-5, rtol=0)
    torch.testing.assert_close(entropy.double(), expected_entropy, atol=1e-5, rtol=0)
    (grad,) = torch.autograd.grad((logprobs.sum() + entropy.sum()), logits)
    (expected_grad,) = torch.autograd.grad((expected_logprobs.sum() + expected_entropy.sum()), logits)
    torch.testing.assert_close(grad, expected_grad, atol=1e-5, rtol=0)
    _, detached = token_logprobs_and_entropy(logits, tokens, chunk_rows=chunk_rows)
    assert not detached.requires_grad and torch.allclose(detached, entropy.detach())

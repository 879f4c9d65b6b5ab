"""rlhf.core.lm_head: log-probs and entropies from hidden states in tiles, forward and backward, against the full
logits path (log-softmax of hidden @ W.T + b), and the memory it never uses."""

import pytest
import torch
from test_logprobs import LargestFloat32, ref_entropy, ref_logprobs

from rlhf.core import token_logprobs_and_entropy
from rlhf.core.lm_head import linear_token_logprobs

N, H, V = 37, 16, 103  # tiles below do not divide N or V


def inputs(dtype=torch.float32, bias=True, seed=0):
    torch.manual_seed(seed)
    hidden = torch.randn(N, H, dtype=dtype, requires_grad=True)
    weight = (torch.randn(V, H, dtype=dtype) * 0.5).requires_grad_()
    b = torch.randn(V, dtype=dtype, requires_grad=True) if bias else None
    return hidden, weight, b, torch.randint(0, V, (N,))


def full_path(hidden, weight, bias, tokens, temperature):
    logits = hidden @ weight.T + (bias if bias is not None else 0)
    return token_logprobs_and_entropy(logits / temperature, tokens, entropy_grad=True)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("tiles", [(5, 17), (64, 1000), (1, 1)])
@pytest.mark.parametrize("bias", [True, False])
def test_values_and_gradients_equal_the_full_logits_path(dtype, tol, temperature, tiles, bias):
    hidden, weight, b, tokens = inputs(dtype, bias)
    g_lp, g_h = torch.randn(N, dtype=dtype), torch.randn(N, dtype=dtype)
    params = [p for p in (hidden, weight, b) if p is not None]
    logprobs, entropy = linear_token_logprobs(hidden, weight, b, tokens, temperature, entropy_grad=True,
                                              token_chunk=tiles[0], vocab_chunk=tiles[1])
    grads = torch.autograd.grad((logprobs * g_lp).sum() + (entropy * g_h).sum(), params)
    ref_lp, ref_h = full_path(hidden, weight, b, tokens, temperature)
    ref_grads = torch.autograd.grad((ref_lp * g_lp).sum() + (ref_h * g_h).sum(), params)
    torch.testing.assert_close(logprobs, ref_lp, atol=tol, rtol=0)
    torch.testing.assert_close(entropy, ref_h, atol=tol, rtol=0)
    for got, expected in zip(grads, ref_grads):  # relative to the gradient's norm: tiles sum in another order
        assert ((got - expected).norm() / expected.norm()).item() < tol


def test_matches_the_two_reference_functions_of_the_logits_path():
    """A second reference: core's own log-softmax / entropy formulas written out."""
    hidden, weight, b, tokens = inputs()
    logits = (hidden @ weight.T + b).detach()
    logprobs, entropy = linear_token_logprobs(hidden.detach(), weight.detach(), b.detach(), tokens)
    torch.testing.assert_close(logprobs, ref_logprobs(logits, tokens), atol=1e-5, rtol=0)
    torch.testing.assert_close(entropy, ref_entropy(logits), atol=1e-5, rtol=0)


def test_entropy_has_no_gradient_unless_asked():
    hidden, weight, b, tokens = inputs()
    logprobs, entropy = linear_token_logprobs(hidden, weight, b, tokens)
    assert logprobs.requires_grad and not entropy.requires_grad


def test_bf16_matmul_fp32_softmax():
    """bf16 hidden states and weight: the matmul runs in bf16 (as the model's own head would), the softmax in fp32."""
    hidden, weight, b, tokens = inputs()
    hidden16, weight16 = hidden.detach().bfloat16(), weight.detach().bfloat16()
    logprobs, _ = linear_token_logprobs(hidden16, weight16, None, tokens)
    assert logprobs.dtype == torch.float32
    expected = torch.log_softmax((hidden16 @ weight16.T).float(), -1).gather(-1, tokens[:, None]).squeeze(-1)
    torch.testing.assert_close(logprobs, expected, atol=1e-5, rtol=0)


def test_no_tensor_of_all_logits_forward_or_backward():
    """With tiles of 8 tokens x 16 vocabulary entries, the largest fp32 tensor of the forward and the backward is
    the weight's gradient ([V, H]) or the hidden states' ([N, H]), never [N, V]; the full path (negative control)
    makes [N, V] tensors."""
    hidden, weight, b, tokens = inputs()
    with LargestFloat32() as probe:
        logprobs, entropy = linear_token_logprobs(hidden, weight, b, tokens, entropy_grad=True, token_chunk=8,
                                                  vocab_chunk=16)
        (logprobs.sum() + entropy.sum()).backward()
    assert probe.largest <= max(V * H, N * H) < N * V
    with LargestFloat32() as naive:
        ref_lp, ref_h = full_path(hidden, weight, b, tokens, 1.0)
        (ref_lp.sum() + ref_h.sum()).backward()
    assert naive.largest >= N * V


@pytest.mark.parametrize("bad", [V, V + 40, -1])
def test_a_token_id_outside_the_vocabulary_raises_as_the_logits_path_does(bad):
    """The logits path cannot gather an id outside [0, V); the tiles would otherwise give it -logsumexp, the log-prob
    of a token with logit 0, silently. The error names the id and V."""
    hidden, weight, b, tokens = inputs()
    tokens[5] = bad
    with pytest.raises((IndexError, RuntimeError)):
        full_path(hidden, weight, b, tokens, 1.0)
    with pytest.raises(IndexError, match=rf"token id {bad} .*vocabulary of {V}"):
        linear_token_logprobs(hidden, weight, b, tokens)

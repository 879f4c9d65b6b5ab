"""Log-probs and entropies of chosen tokens straight from final hidden states and the LM head, in token x
vocabulary tiles, forward and backward: the [N, V] logits never exist whole.

At a real vocabulary the logits, not the model, are what runs out of memory: 256 completions x 512 tokens x
151,936 x 4 bytes is 80 GB, and autograd would keep them for the backward pass. Here each tile of logits
is computed, reduced and dropped; the forward keeps the log-normaliser and the mean logit per token, and the
backward recomputes each tile to form its gradient. Peak extra memory is one tile (``token_chunk`` x
``vocab_chunk`` floats) plus the fp32 gradient of the head's weight.

With x = (h W^T + b) / temperature (computed as (h / T) W^T + b / T: no pass over the logits for T),
p = softmax(x) and E = sum(p * x):
    log p(y) = x_y - logsumexp(x),   H = logsumexp(x) - E,
    d log p(y) / dx = onehot(y) - p,   dH / dx = -p * (x - E).
"""

import torch

TOKEN_CHUNK = 1024
VOCAB_CHUNK = 8192  # a tile: 8M fp32 values, 32 MiB; the forward and the backward each hold two


def _reduced(dtype: torch.dtype) -> torch.dtype:
    """The dtype softmax statistics are kept in: fp64 for fp64, fp32 for everything else."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _tile(hidden, weight, bias, v0, v1, compute_dtype):
    """Logits of one tile, [n, v1 - v0], in fp32 (fp64 for fp64). The temperature is already in ``hidden`` and
    ``bias`` (x / T = (h / T) W^T + b / T): no pass over the tile for it."""
    logits = (hidden.to(compute_dtype) @ weight[v0:v1].to(compute_dtype).T).to(_reduced(compute_dtype))
    return logits.add_(bias[v0:v1]) if bias is not None else logits


class _LinearTokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, tokens, temperature, compute_dtype, token_chunk, vocab_chunk,
                entropy_grad):
        n, vocab = hidden.shape[0], weight.shape[0]
        acc = _reduced(compute_dtype)
        scaled = hidden.to(acc) / temperature  # [n, H]: the temperature folded into the hidden states
        scaled_bias = bias.to(acc) / temperature if bias is not None else None
        logprobs = torch.empty(n, dtype=acc, device=hidden.device)
        normaliser = torch.empty_like(logprobs)  # logsumexp(x)
        mean_logit = torch.empty_like(logprobs)  # E = sum(p * x)
        with torch.autocast(hidden.device.type, enabled=False):
            for r0 in range(0, n, token_chunk):
                h, y = scaled[r0:r0 + token_chunk], tokens[r0:r0 + token_chunk]
                peak = torch.full((h.shape[0],), float("-inf"), dtype=acc, device=h.device)
                total = torch.zeros_like(peak)  # sum exp(x - peak)
                weighted = torch.zeros_like(peak)  # sum exp(x - peak) * x
                target = torch.zeros_like(peak)
                for v0 in range(0, vocab, vocab_chunk):
                    v1 = min(v0 + vocab_chunk, vocab)
                    x = _tile(h, weight, scaled_bias, v0, v1, compute_dtype)
                    inside = (y >= v0) & (y < v1)
                    picked = x.gather(1, (y - v0).clamp(0, v1 - v0 - 1).unsqueeze(1)).squeeze(1)
                    target = torch.where(inside, picked, target)
                    new_peak = torch.maximum(peak, x.amax(dim=-1))
                    rescale = torch.exp(peak - new_peak)
                    shifted = x.sub_(new_peak.unsqueeze(1))  # x - peak, in place
                    e = torch.exp(shifted)
                    # sum e * x = sum e * (x - peak) + peak * sum e; einsum makes no [n, v] product
                    tile_total = e.sum(dim=-1)
                    tile_weighted = torch.einsum("ij,ij->i", e, shifted) + new_peak * tile_total
                    total = total * rescale + tile_total
                    weighted = weighted * rescale + tile_weighted
                    peak = new_peak
                lse = peak + torch.log(total)
                normaliser[r0:r0 + token_chunk] = lse
                mean_logit[r0:r0 + token_chunk] = weighted / total
                logprobs[r0:r0 + token_chunk] = target - lse
        entropy = normaliser - mean_logit
        ctx.save_for_backward(hidden, weight, bias, tokens, normaliser, mean_logit)
        ctx.settings = (temperature, compute_dtype, token_chunk, vocab_chunk)
        if not entropy_grad:
            ctx.mark_non_differentiable(entropy)
        return logprobs, entropy

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy):
        hidden, weight, bias, tokens, normaliser, mean_logit = ctx.saved_tensors
        temperature, compute_dtype, token_chunk, vocab_chunk = ctx.settings
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        n, vocab = hidden.shape[0], weight.shape[0]
        acc = _reduced(compute_dtype)
        scaled = hidden.to(acc) / temperature
        scaled_bias = bias.to(acc) / temperature if bias is not None else None
        # Gradients with respect to the scaled inputs (h / T, W, b / T); the 1 / T is applied once at the end.
        grad_scaled = torch.zeros(hidden.shape, dtype=acc, device=hidden.device) if need_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_weight else None
        grad_bias = torch.zeros(vocab, dtype=acc, device=weight.device) if need_bias else None
        with torch.autocast(hidden.device.type, enabled=False):
            for r0 in range(0, n, token_chunk):
                rows = slice(r0, r0 + token_chunk)
                h, y = scaled[rows], tokens[rows]
                lse, mean = normaliser[rows].unsqueeze(1), mean_logit[rows].unsqueeze(1)
                g_lp = grad_logprobs[rows].to(acc).unsqueeze(1) if grad_logprobs is not None else None
                g_h = grad_entropy[rows].to(acc).unsqueeze(1) if grad_entropy is not None else None
                for v0 in range(0, vocab, vocab_chunk):
                    v1 = min(v0 + vocab_chunk, vocab)
                    x = _tile(h, weight, scaled_bias, v0, v1, compute_dtype)
                    grad_x = (x - lse).exp_()  # p; becomes the gradient in place: two tile-sized buffers in all
                    entropy_term = x.sub_(mean).mul_(grad_x).mul_(-g_h) if g_h is not None else None
                    if g_lp is not None:
                        grad_x.mul_(-g_lp)  # -p * g
                        inside = ((y >= v0) & (y < v1)).nonzero().squeeze(1)
                        grad_x[inside, y[inside] - v0] += g_lp[inside, 0]  # + onehot(y) * g
                    else:
                        grad_x.zero_()
                    if entropy_term is not None:
                        grad_x.add_(entropy_term)
                    if need_hidden:
                        grad_scaled[rows] += grad_x @ weight[v0:v1].to(acc)
                    if need_weight:
                        grad_weight[v0:v1] += grad_x.T @ h
                    if need_bias:
                        grad_bias[v0:v1] += grad_x.sum(dim=0)
        return (grad_scaled.div_(temperature).to(hidden.dtype) if need_hidden else None,
                grad_weight.to(weight.dtype) if need_weight else None,
                grad_bias.div_(temperature).to(bias.dtype) if need_bias else None, None, None, None, None, None, None)


def linear_token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, tokens: torch.Tensor,
                          temperature: float = 1.0, entropy_grad: bool = False, compute_dtype: torch.dtype | None = None,
                          token_chunk: int | None = None, vocab_chunk: int | None = None,
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p(token), entropy), both fp32 (fp64 for fp64) and shaped like ``tokens``, of the distribution
    softmax((hidden @ weight.T + bias) / temperature) at every position. ``hidden`` [..., H], ``weight`` [V, H],
    ``tokens`` [...]. Equal to ``token_logprobs_and_entropy`` on the full logits, without building them in the
    forward or keeping them for the backward. The matmuls run in ``compute_dtype`` (default: the weight's), the
    softmax in fp32. The entropy has a gradient only with ``entropy_grad``. Tiles: ``token_chunk`` x
    ``vocab_chunk`` (default ``TOKEN_CHUNK`` x ``VOCAB_CHUNK``, 64 MiB of fp32). A token id outside [0, V) raises
    IndexError, as the logits path's gather does (the tiles would silently give it the log-prob of a zero logit)."""
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    flat_tokens = tokens.reshape(-1)
    if flat_tokens.numel():
        low, high = torch.stack(torch.aminmax(flat_tokens)).tolist()  # one reduction, one sync
        if low < 0 or high >= weight.shape[0]:
            raise IndexError(f"token id {low if low < 0 else high} is outside the LM head's vocabulary of "
                             f"{weight.shape[0]} ids (0 .. {weight.shape[0] - 1}): the tokens come from another "
                             "vocabulary than the model's.")
    logprobs, entropy = _LinearTokenLogprobs.apply(
        flat_hidden, weight, bias, flat_tokens, float(temperature), compute_dtype or weight.dtype,
        token_chunk or TOKEN_CHUNK, vocab_chunk or VOCAB_CHUNK, entropy_grad)
    return logprobs.view(tokens.shape), entropy.view(tokens.shape)

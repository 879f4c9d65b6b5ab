"""Per-token log-probabilities and entropies from logits, in chunks.

A batch of 64 completions x 1024 tokens over a 150k vocabulary is 40 GB as fp32 log-softmax;
computing it a chunk of rows at a time keeps one chunk's fp32 copy alive instead.
"""

import torch

# About 64 MiB of fp32 per chunk, whatever the vocabulary size.
_CHUNK_ELEMENTS = 1 << 24


def _upcast(chunk: torch.Tensor) -> torch.Tensor:
    """Half-precision logits are reduced in fp32; fp32 and fp64 stay as they are."""
    return chunk if chunk.dtype in (torch.float32, torch.float64) else chunk.float()


def _row_chunks(flat: torch.Tensor, chunk_rows: int | None):
    rows = chunk_rows or max(1, _CHUNK_ELEMENTS // flat.shape[-1])
    return range(0, flat.shape[0], rows), rows


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, chunk_rows: int | None = None) -> torch.Tensor:
    """log p(token) = logit[token] - logsumexp(logits), in at least fp32. logits [..., V], tokens [...].

    Equal to ``log_softmax(logits.float(), -1).gather(-1, tokens[..., None])`` without building the
    full log-softmax: at most ``chunk_rows`` rows (default: ~16M elements' worth) are upcast at once.
    """
    flat_logits = logits.reshape(-1, logits.shape[-1])
    flat_tokens = tokens.reshape(-1, 1)
    starts, rows = _row_chunks(flat_logits, chunk_rows)
    pieces = []
    for start in starts:
        chunk = _upcast(flat_logits[start : start + rows])
        picked = chunk.gather(-1, flat_tokens[start : start + rows]).squeeze(-1)
        pieces.append(picked - torch.logsumexp(chunk, dim=-1))
    return torch.cat(pieces).view(tokens.shape)


def entropy_from_logits(logits: torch.Tensor, chunk_rows: int | None = None) -> torch.Tensor:
    """Entropy of softmax(logits) per position, in at least fp32: H = logsumexp(x) - sum(softmax(x) * x). [...]

    Each row is shifted by its max first (H does not change), so large common offsets in the logits
    do not cost precision."""
    flat_logits = logits.reshape(-1, logits.shape[-1])
    starts, rows = _row_chunks(flat_logits, chunk_rows)
    pieces = []
    for start in starts:
        chunk = _upcast(flat_logits[start : start + rows])
        chunk = chunk - chunk.max(dim=-1, keepdim=True).values.detach()
        probs = torch.softmax(chunk, dim=-1)
        pieces.append(torch.logsumexp(chunk, dim=-1) - (probs * chunk).sum(dim=-1))
    return torch.cat(pieces).view(logits.shape[:-1])


def token_logprobs_and_entropy(
    logits: torch.Tensor, tokens: torch.Tensor, chunk_rows: int | None = None, entropy_grad: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """``token_logprobs`` and ``entropy_from_logits`` in one pass over the logits (one upcast and one
    logsumexp per chunk). H = -sum(p * log p) with log p = x - logsumexp(x), which keeps its precision
    when the logits share a large offset. The entropy has a gradient only with ``entropy_grad``."""
    flat_logits = logits.reshape(-1, logits.shape[-1])
    flat_tokens = tokens.reshape(-1, 1)
    starts, rows = _row_chunks(flat_logits, chunk_rows)
    logprob_pieces, entropy_pieces = [], []
    for start in starts:
        chunk = _upcast(flat_logits[start : start + rows])
        normaliser = torch.logsumexp(chunk, dim=-1, keepdim=True)
        logprob_pieces.append((chunk.gather(-1, flat_tokens[start : start + rows]) - normaliser).squeeze(-1))
        with torch.enable_grad() if entropy_grad else torch.no_grad():
            if not entropy_grad:
                chunk, normaliser = chunk.detach(), normaliser.detach()
            log_probs = chunk - normaliser
            entropy_pieces.append(-(log_probs.exp() * log_probs).sum(dim=-1))
    return torch.cat(logprob_pieces).view(tokens.shape), torch.cat(entropy_pieces).view(tokens.shape)

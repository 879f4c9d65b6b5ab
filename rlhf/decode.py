"""The sampling decode loop: what ``generate`` does for our sampling settings, with at most two [B, V] tensors
alive per step instead of about seven.

At a real vocabulary the per-step logits, not the model, set generation's peak memory: 256 rows x 151,936 tokens x
4 bytes = 155 MB for each [B, V] copy, and transformers' ``generate`` makes several (the model's output, its fp32
copy, each warper's result, the softmax; and our recorder's log-softmax). Here: the model's last-position logits
(``logits_to_keep=1``), the EOS mask of ``min_new_tokens`` applied in place, the warpers (temperature, top-k, top-p,
min-p; only those set make a tensor), the softmax, one draw. The sampled token's log-prob is ``log`` of its softmax
probability, so no log-softmax is built.

It is ``generate``'s algorithm, step for step: the same processors in the same order, the same softmax, pad after a
row's EOS, stop when every row has ended. The draw (``DRAW``) is where it differs by default:

- ``"inverse_cdf"`` (default): one uniform number per row, in float64, and the first token whose cumulative
  probability exceeds it (``inverse_cdf_draw``): exact sampling from the same distribution, B random numbers a step.
- ``"multinomial"``: ``generate``'s own ``torch.multinomial`` call, which draws B x V exponential numbers a step
  (28 ms of a 140 ms decode step at 32 rows x 49,152 tokens on a 2-core Xeon, a fifth of generation); with the same
  seed it draws ``generate``'s tokens, token for token (tests/test_decode.py checks it, greedy and sampled, with left
  padding, a shared prompt cache, min_new_tokens and the warpers).

Either way the random stream a step consumes does not depend on which rows are still running, so rows leaving the
batch changes no token, and a resumed run draws what an uninterrupted one draws. ``generate`` stays in use where this
loop does not apply: a static KV cache (compiled decoding on a GPU) and sharded models that must step in lock-step
across processes.

After the prompt's forward, each layer's KV cache gets room for every token the loop can add (``_GrowingLayer``): a
step writes its position in place where transformers' ``DynamicLayer`` concatenates and so copies the whole cache
(generation 0.74 -> 0.55 s at the CPU benchmark's shape); attention reads the same values, and the drawn tokens and
log-probs are bit-identical (tests/test_decode.py).
"""

from dataclasses import dataclass

import torch
from torch import nn
from transformers.cache_utils import DynamicLayer
from transformers.generation import (
    LogitsProcessor,
    MinPLogitsWarper,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from rlhf.forward import accepts_logits_to_keep, cache_argument, model_cache, position_ids_from_mask


@dataclass
class SamplingParams:
    """How completions are drawn; every knob ``generate`` would otherwise take from the model's saved config."""

    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    do_sample: bool = True
    min_new_tokens: int = 0
    min_p: float | None = None
    static_kv_cache: bool = False


def sampling_processors(params: SamplingParams) -> list[LogitsProcessor]:
    """Temperature, top-k, top-p and min-p as ``generate`` builds them, in its order, for a list that must end after
    them."""
    processors = []
    if params.temperature != 1.0:
        processors.append(TemperatureLogitsWarper(params.temperature))
    if params.top_k:
        processors.append(TopKLogitsWarper(top_k=params.top_k, min_tokens_to_keep=1))
    if params.top_p < 1.0:
        processors.append(TopPLogitsWarper(top_p=params.top_p, min_tokens_to_keep=1))
    if params.min_p is not None:
        processors.append(MinPLogitsWarper(min_p=params.min_p, min_tokens_to_keep=1))
    return processors


class _GrowingLayer(DynamicLayer):
    """A ``DynamicLayer`` whose keys and values are views of a buffer with room for ``capacity`` positions: a decode
    step writes its one position in place where ``DynamicLayer`` concatenates, which copies the whole cache every
    step (27% of generation at the CPU benchmark's shape). Attention reads the same values in the same shapes."""

    def __init__(self, layer: DynamicLayer, capacity: int):
        super().__init__()
        self.__dict__.update(layer.__dict__)
        self._capacity = capacity
        self._rebuffer()

    def _rebuffer(self) -> None:
        """Copy ``keys`` and ``values`` into fresh buffers of the reserved capacity (or more)."""
        keys, values = self.keys, self.values
        if not self.is_initialized or keys is None:
            self._keys = self._values = None
            return
        length = keys.shape[-2]
        capacity = max(self._capacity, length)
        self._keys = keys.new_empty(*keys.shape[:-2], capacity, keys.shape[-1])
        self._values = values.new_empty(*values.shape[:-2], capacity, values.shape[-1])
        self._keys[..., :length, :] = keys
        self._values[..., :length, :] = values
        self.keys, self.values = self._keys[..., :length, :], self._values[..., :length, :]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if self._keys is None:  # after reset(): start over as DynamicLayer does, then buffer
            super().update(key_states, value_states, *args, **kwargs)
            self._rebuffer()
            return self.keys, self.values
        start = self.keys.shape[-2]  # the positions held: keys is a view of the buffer's first ones
        end = start + key_states.shape[-2]
        if end > self._keys.shape[-2]:  # past the reserved room: double it
            self._capacity = max(end, 2 * self._keys.shape[-2])
            self._rebuffer()
        self._keys[..., start:end, :] = key_states
        self._values[..., start:end, :] = value_states
        self.keys, self.values = self._keys[..., :end, :], self._values[..., :end, :]
        return self.keys, self.values

    def reset(self) -> None:
        super().reset()
        self._rebuffer()

    # DynamicLayer's other edits replace ``keys`` and ``values``: redo the buffers after them.
    def crop(self, tokens_to_remove: int) -> None:
        super().crop(tokens_to_remove)
        self._rebuffer()

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self._rebuffer()

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self._rebuffer()


def _reserve_cache(cache, capacity: int) -> bool:
    """Give each plain ``DynamicLayer`` of ``cache`` room for ``capacity`` positions, in place (other layer kinds,
    e.g. sliding-window ones, offloaded caches and caches without ``layers`` are left as they are). Returns whether
    every layer is now such a buffer, i.e. whether rows can leave the cache (``batch_select_indices``)."""
    layers = [] if getattr(cache, "offloading", False) else (getattr(cache, "layers", None) or [])
    for i, layer in enumerate(layers):
        if type(layer) is DynamicLayer and layer.is_initialized and layer.keys.dim() == 4:
            cache.layers[i] = _GrowingLayer(layer, capacity)
    return bool(layers) and all(type(layer) is _GrowingLayer for layer in layers)


LEAVE_FRACTION = 0.25
"""Finished rows leave the decode batch once they are at least this fraction of the rows still in it: each removal
copies the KV cache, so they go in batches rather than one at a time."""

DRAW = "inverse_cdf"
"""How a sampled step draws its tokens: ``"inverse_cdf"`` or ``"multinomial"`` (``generate``'s random stream; see the
module docstring)."""


def inverse_cdf_draw(probs: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """For each row of ``probs`` [b, V] (non-negative, any total) and its ``uniform`` [b] number in [0, 1), the first
    token whose cumulative probability exceeds ``uniform`` x the row's total: a token is drawn with probability
    p / total. The running sum is float64 (float32's would round tokens of probability below ~1e-7 to 0 or double
    them), and a token of probability 0 is never drawn. A row with no mass (all zero, or NaN: every score -inf or
    NaN) raises, as ``torch.multinomial`` does, rather than drawing a token it gives probability 0."""
    cumulative = probs.double().cumsum(dim=-1)
    totals = cumulative[:, -1]
    if not bool((totals > 0).all() and torch.isfinite(totals).all()):
        bad = (~((totals > 0) & torch.isfinite(totals))).nonzero().flatten().tolist()
        raise ValueError(f"cannot sample rows {bad[:8]}: their next-token distribution has no mass (every score -inf "
                         "or NaN). The model's logits are NaN or inf, or a logits processor masked every token.")
    target = (uniform.double() * totals).unsqueeze(1)
    return torch.searchsorted(cumulative, target, right=True).squeeze(1).clamp_(max=probs.shape[-1] - 1)


@torch.no_grad()
def decode(model: nn.Module, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, params: SamplingParams,
           eos_ids: list[int], pad_id: int, cache=None, with_logprobs: bool = False
           ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Completions of left-padded ``prompt_ids`` [B, P]: (token ids [B, T], T <= max_new_tokens, pad after each
    row's EOS; and with ``with_logprobs`` the log-prob [B, T] of each drawn token under the distribution it was drawn
    from, else None; after a row's EOS its log-probs mean nothing). ``cache`` holds the first positions of the prompts
    already (a shared prefill); the rest of the prompt is run first.

    Rows that have ended leave the model's batch (``LEAVE_FRACTION``), so with natural EOS the forward passes shrink as
    completions end. The random stream stays that of the full batch: the inverse-CDF draw takes B uniform numbers a
    step and uses those of the rows present; ``multinomial`` gets the scores of the rows still running written into a
    [B, V] buffer and draws for all B rows (its draw does not depend on the values of the rows that have ended, whose
    tokens become pad)."""
    rows, device = prompt_ids.shape[0], prompt_ids.device
    cached = cache.get_seq_length() if cache is not None else 0
    input_ids, mask = prompt_ids[:, cached:], prompt_mask
    positions = position_ids_from_mask(prompt_mask)[:, cached:]
    eos = torch.tensor(eos_ids, device=device)
    keep = {"logits_to_keep": 1} if accepts_logits_to_keep(model) else {}
    cache_key = cache_argument(model)
    processors = sampling_processors(params)
    unfinished = torch.ones(rows, dtype=torch.bool, device=device)
    present = torch.arange(rows, device=device)  # the rows in the model's batch, in the order the cache holds them
    compactable, buffer = False, None
    inverse_cdf = params.do_sample and DRAW == "inverse_cdf"
    tokens, logprobs = [], []
    for step in range(params.max_new_tokens):
        outputs = model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True,
                        **{cache_key: cache}, **keep)
        cache = model_cache(outputs)
        if step == 0 and cache is not None:  # the prompt is in: reserve room for every token this loop can add
            compactable = _reserve_cache(cache, cache.get_seq_length() + params.max_new_tokens - 1)
        scores = outputs.logits[:, -1, :].float()  # no copy in fp32: the model's own output, modified in place
        del outputs
        if len(present) < rows and not inverse_cdf:  # rows have left: back to [B, V], the ended rows' scores stale
            buffer = scores.new_zeros(rows, scores.shape[1]) if buffer is None else buffer
            scores = buffer.index_copy_(0, present, scores)
        if step < params.min_new_tokens:
            scores[:, eos] = -float("inf")
        if params.do_sample:
            for processor in processors:  # the warpers read only the scores
                scores = processor(prompt_ids, scores)
            probs = torch.softmax(scores, dim=-1)
            del scores
            if inverse_cdf:  # [present, V]: the tokens of the rows present, the others pad
                drawn = inverse_cdf_draw(probs, torch.rand(rows, dtype=torch.float64, device=device)[present])
                next_tokens = torch.full((rows,), pad_id, dtype=drawn.dtype, device=device).index_copy_(0, present,
                                                                                                        drawn)
                if with_logprobs:
                    drawn_logprobs = probs.gather(1, drawn[:, None]).squeeze(1).log()
                    logprobs.append(drawn_logprobs.new_zeros(rows).index_copy_(0, present, drawn_logprobs))
            else:
                next_tokens = torch.multinomial(probs, num_samples=1).squeeze(1)
                if with_logprobs:
                    logprobs.append(probs.gather(1, next_tokens[:, None]).squeeze(1).log())
            del probs
        else:
            next_tokens = scores.argmax(dim=-1)
            del scores
        next_tokens = torch.where(unfinished, next_tokens, pad_id)
        tokens.append(next_tokens)
        unfinished &= ~torch.isin(next_tokens, eos)
        running = int(unfinished.sum())  # every running row is present: the others present have ended
        if running == 0:
            break
        if compactable and len(present) - running >= LEAVE_FRACTION * len(present):
            stay = unfinished[present].nonzero().squeeze(1)
            cache.batch_select_indices(stay)
            present, mask, positions = present[stay], mask[stay], positions[stay]
        input_ids = (next_tokens if len(present) == rows else next_tokens[present])[:, None]
        mask = torch.cat([mask, mask.new_ones(len(present), 1)], dim=1)
        positions = positions[:, -1:] + 1
    completion_ids = torch.stack(tokens, dim=1) if tokens else prompt_ids.new_zeros(rows, 0)
    return completion_ids, (torch.stack(logprobs, dim=1) if with_logprobs else None)

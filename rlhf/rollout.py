"""Sampling completions and turning them into masks.

The completion mask keeps every token up to and including the first EOS (any id of the model's
EOS list) and nothing after it. It is computed from positions, never by comparing ids with the
pad id, so it stays right when the pad token is the EOS token.
"""

import contextlib
from dataclasses import dataclass

import torch
from transformers import GenerationConfig

from rlhf.models import (
    _accepts_logits_to_keep,
    _cache_argument,
    _groups_share_prompts,
    position_ids_from_mask,
)


def completion_mask(completion_ids: torch.Tensor, eos_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask [B, T], truncated [B]): mask is 1 up to and including the first EOS; a row without an EOS
    keeps all its tokens and is marked truncated."""
    is_eos = torch.isin(completion_ids, torch.tensor(eos_ids, device=completion_ids.device))
    has_eos = is_eos.any(dim=1)
    width = completion_ids.shape[1]
    first_eos = torch.where(has_eos, is_eos.int().argmax(dim=1), torch.full_like(has_eos, width, dtype=torch.long))
    positions = torch.arange(width, device=completion_ids.device)
    mask = positions.unsqueeze(0) <= first_eos.unsqueeze(1)
    return mask.long(), ~has_eos


@dataclass
class SamplingParams:
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    do_sample: bool = True
    min_new_tokens: int = 0


def generation_config(params: SamplingParams, eos_ids: list[int], pad_id: int) -> GenerationConfig:
    """Every sampling knob set explicitly. Anything left unset would be filled from the model's own
    generation_config (a repetition penalty, a top-k of 20...) and the sampled distribution would no
    longer be the one the log-probs are computed from."""
    sampling = dict(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k) if params.do_sample else {}
    return GenerationConfig(
        max_new_tokens=params.max_new_tokens,
        min_new_tokens=params.min_new_tokens,
        do_sample=params.do_sample,
        **sampling,
        min_p=None,
        typical_p=1.0,
        epsilon_cutoff=0.0,
        eta_cutoff=0.0,
        repetition_penalty=1.0,
        no_repeat_ngram_size=0,
        num_beams=1,
        num_return_sequences=1,
        eos_token_id=list(eos_ids),
        pad_token_id=pad_id,
        use_cache=True,
    )


@contextlib.contextmanager
def _only_our_generation_config(model):
    """Hide the model's saved generation_config during ``generate`` so none of its values leak in."""
    saved = model.generation_config
    model.generation_config = GenerationConfig()
    try:
        yield
    finally:
        model.generation_config = saved


@torch.no_grad()
def sample_completions(
    model,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    params: SamplingParams,
    eos_ids: list[int],
    pad_id: int,
    synced_gpus: bool = False,
    group_size: int = 1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Generate one completion per prompt row. Returns (completion_ids, completion_mask, truncated).

    Rows are left-padded prompts; ``generate`` derives position ids from ``prompt_mask``.
    ``synced_gpus`` keeps this process stepping until every process has finished (sharded models).
    With ``group_size`` G, when each run of G rows repeats one prompt, the prompt (but its last token)
    is prefilled once per group and the KV cache repeated G times before ``generate`` continues.
    """
    config = generation_config(params, eos_ids, pad_id)
    was_training = model.training
    model.eval()
    kwargs = {}
    if prompt_ids.shape[1] > 1 and _groups_share_prompts(prompt_ids, prompt_mask, group_size):
        unique_ids, unique_mask = prompt_ids[::group_size, :-1], prompt_mask[::group_size, :-1]
        keep = {"logits_to_keep": 1} if _accepts_logits_to_keep(model) else {}
        prefill = model(input_ids=unique_ids, attention_mask=unique_mask, use_cache=True,
                        position_ids=position_ids_from_mask(unique_mask), **keep)
        cache = prefill.cache if getattr(prefill, "cache", None) is not None else prefill.past_key_values
        cache.batch_repeat_interleave(group_size)
        kwargs[_cache_argument(model)] = cache
    with _only_our_generation_config(model):
        sequences = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, generation_config=config,
                                   synced_gpus=synced_gpus, **kwargs)
    model.train(was_training)
    completion_ids = sequences[:, prompt_ids.shape[1]:]
    mask, truncated = completion_mask(completion_ids, eos_ids)
    return completion_ids, mask, truncated


class Batch(dict):
    """Named tensors sharing a first (row) dimension; slicing picks rows from all of them.

    Naming convention: ``prompt_*`` 2-D tensors are left-padded prompt columns, every other 2-D
    tensor is per completion token ([B, T]), 1-D tensors are per sequence.
    """

    def rows(self, index) -> "Batch":
        return Batch({key: value[index] for key, value in self.items()})

    @property
    def size(self) -> int:
        return next(iter(self.values())).shape[0]

    def trimmed(self) -> "Batch":
        """Drop prompt columns that are padding in every row (left) and completion columns past every
        row's end (right): a micro-batch only pays for its own longest sequence."""
        keep_prompt = self["prompt_mask"].any(dim=0).nonzero()
        first = int(keep_prompt[0]) if keep_prompt.numel() else self["prompt_mask"].shape[1]
        keep_completion = self["completion_mask"].any(dim=0).nonzero()
        last = int(keep_completion[-1]) + 1 if keep_completion.numel() else 0
        out = Batch()
        for key, value in self.items():
            if key.startswith("prompt_") and value.dim() == 2:
                out[key] = value[:, first:]
            elif value.dim() == 2:
                out[key] = value[:, :last]
            else:
                out[key] = value
        return out

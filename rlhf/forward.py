"""The forward passes behind every log-prob, entropy and value, and prompt-prefix sharing.

Sequences are left-padded prompts followed by right-padded completions. Position ids always come
from the attention mask, so padding never shifts a position (pitfall 1 in tests/README.md). Outputs are read only at
the T positions that predict the completion's tokens.

Prompt-prefix sharing: the ``num_generations`` completions of one prompt sit in contiguous rows. When
a run of G rows repeats one prompt, the prompt is run once with a KV cache and the cache repeated G
times; the completions then attend to it. The outputs and gradients are those of running every row
whole (tests pin both), for G times less prompt compute. Generation (``rlhf.rollout``) prefills the
same way. Everything about it lives here: ``groups_share_prompts`` decides whether rows may share,
``run_shared_prompts`` runs and repeats.
"""

import inspect

import torch
from torch import nn

from rlhf.core import token_logprobs, token_logprobs_and_entropy


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that count only attended tokens, as ``generate`` computes them: left padding gets 0."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def sequence_inputs(prompt_ids, prompt_mask, completion_ids, completion_mask) -> dict[str, torch.Tensor]:
    """Model inputs for left-padded prompts followed by right-padded completions."""
    attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
    return {"input_ids": torch.cat([prompt_ids, completion_ids], dim=1), "attention_mask": attention_mask,
            "position_ids": position_ids_from_mask(attention_mask)}


def causal_lm(model: nn.Module) -> nn.Module:
    """The causal LM inside Accelerate's and PEFT's wrappers."""
    base = getattr(model, "module", model)  # DistributedDataParallel
    return base.get_base_model() if hasattr(base, "get_base_model") else base


def _forward_parameters(model: nn.Module):
    return inspect.signature(causal_lm(model).forward).parameters


def accepts_logits_to_keep(model: nn.Module) -> bool:
    return "logits_to_keep" in _forward_parameters(model)


def cache_argument(model: nn.Module) -> str:
    """The keyword under which the model's forward takes a KV cache (``cache`` since transformers 5.x)."""
    return "cache" if "cache" in _forward_parameters(model) else "past_key_values"


def groups_share_prompts(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, group_size: int) -> bool:
    """Whether every run of ``group_size`` rows holds one prompt (ids and padding)."""
    rows, width = prompt_ids.shape
    if group_size <= 1 or rows % group_size:
        return False
    grouped_mask = prompt_mask.view(-1, group_size, width)
    grouped = (prompt_ids * prompt_mask).view(-1, group_size, width)
    return bool((grouped == grouped[:, :1]).all()) and bool((grouped_mask == grouped_mask[:, :1]).all())


def run_shared_prompts(model: nn.Module, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, group_size: int):
    """Run the prompt of each group of ``group_size`` rows once, with a KV cache, and repeat the cache for the
    group's rows. Returns (outputs of the unique prompts, with logits only at the last position; the cache
    for all rows)."""
    unique = slice(None, None, group_size)
    keep = {"logits_to_keep": 1} if accepts_logits_to_keep(model) else {}
    outputs = model(input_ids=prompt_ids[unique], attention_mask=prompt_mask[unique],
                    position_ids=position_ids_from_mask(prompt_mask[unique]), use_cache=True, **keep)
    cache = outputs.cache if getattr(outputs, "cache", None) is not None else outputs.past_key_values
    cache.batch_repeat_interleave(group_size)
    return outputs, cache


def predicting_outputs(model: nn.Module, prompt_ids, prompt_mask, completion_ids, completion_mask, read,
                       group_size: int = 1, prefix_model: nn.Module | None = None) -> torch.Tensor:
    """``read(model outputs)`` at the T positions that predict the completion's tokens: the last prompt
    position, then completion positions 0 .. T-2. [B, T, ...].

    With ``group_size`` G > 1 and rows that share their prompt in runs of G, the prompt runs once per group
    (see the module docstring). ``prefix_model`` runs that prompt pass: the unwrapped model under DDP, so
    that the one DDP forward of the micro-batch is the completion pass (gradients of both passes meet in
    one backward).
    """
    num_completion = completion_ids.shape[1]
    if not groups_share_prompts(prompt_ids, prompt_mask, group_size):
        keep = {"logits_to_keep": num_completion + 1} if accepts_logits_to_keep(model) else {}
        outputs = model(**sequence_inputs(prompt_ids, prompt_mask, completion_ids, completion_mask), use_cache=False,
                        **keep)
        return read(outputs)[:, -(num_completion + 1) : -1]
    head, cache = run_shared_prompts(prefix_model if prefix_model is not None else model, prompt_ids, prompt_mask,
                                     group_size)
    first = read(head)[:, -1:].repeat_interleave(group_size, dim=0)
    if num_completion == 1:
        return first
    attention_mask = torch.cat([prompt_mask, completion_mask[:, :-1]], dim=1)
    rest = model(input_ids=completion_ids[:, :-1], attention_mask=attention_mask,
                 position_ids=position_ids_from_mask(attention_mask)[:, prompt_ids.shape[1]:], use_cache=True,
                 **{cache_argument(model): cache})
    return torch.cat([first, read(rest)], dim=1)


def completion_logprobs(
    model: nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    temperature: float = 1.0,
    with_entropy: bool = False,
    entropy_grad: bool = False,
    group_size: int = 1,
    prefix_model: nn.Module | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log p(completion token | prefix) at ``temperature``, and optionally the entropy, both [B, T].

    The one computation behind every ratio and KL: actor, old policy and reference all go through it, so
    positions, masks and temperature are handled the same way (pitfall 4). The entropy is a metric,
    without gradient, unless ``entropy_grad``.
    """
    logits = predicting_outputs(model, prompt_ids, prompt_mask, completion_ids, completion_mask,
                                lambda outputs: outputs.logits, group_size, prefix_model)  # [B, T, V]
    if temperature != 1.0:
        logits = logits / temperature
    if not with_entropy:
        return token_logprobs(logits, completion_ids), None
    return token_logprobs_and_entropy(logits, completion_ids, entropy_grad=entropy_grad)

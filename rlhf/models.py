"""Loading the actor and its tokenizer, switching dropout off, and scoring completions.

``completion_logprobs`` is the one forward pass behind every ratio and KL: actor, old policy and
reference all go through it, so positions, masks and temperature are handled the same way.
"""

import copy
import inspect
import logging

import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from rlhf.core import token_logprobs, token_logprobs_and_entropy

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}


def resolve_dtype(name: str):
    """A config's dtype name as ``from_pretrained`` takes it ("auto" stays "auto")."""
    return _DTYPES[name]


def load_causal_lm(model: str | PreTrainedModel, dtype: str = "float32", trust_remote_code: bool = False):
    """A causal LM from a path or hub id (safetensors only), or the model object itself."""
    if isinstance(model, nn.Module):
        return model
    return AutoModelForCausalLM.from_pretrained(
        model, dtype=resolve_dtype(dtype), trust_remote_code=trust_remote_code, use_safetensors=True
    )


def load_tokenizer(
    model: str | PreTrainedModel,
    processing_class: PreTrainedTokenizerBase | None = None,
    trust_remote_code: bool = False,
) -> PreTrainedTokenizerBase:
    """The given tokenizer, else the one saved with the model. Ensures a pad token (see below)."""
    if processing_class is not None:
        tokenizer = processing_class
    else:
        source = model if isinstance(model, str) else getattr(model, "name_or_path", None)
        if not source:
            raise ValueError(
                "processing_class is required when the model is passed as an object without a saved path: "
                "pass the tokenizer, e.g. processing_class=AutoTokenizer.from_pretrained(...)."
            )
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise ValueError(
                "The tokenizer has neither a pad token nor an EOS token; set one, e.g. "
                "tokenizer.add_special_tokens({'pad_token': '<pad>'}) and resize the model's embeddings."
            )
        # Safe here: completion masks come from positions, never from comparing ids with the pad id.
        logger.warning("The tokenizer has no pad token; using its EOS token %r for padding.", tokenizer.eos_token)
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def eos_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Every id that ends a completion: the tokenizer's EOS and all of the model's generation EOS ids."""
    ids = set()
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (configured, tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif value is not None:
            ids.update(int(v) for v in value)
    if not ids:
        raise ValueError("Neither the model's generation_config nor the tokenizer defines an EOS token id.")
    return sorted(ids)


def disable_dropout(model: nn.Module) -> None:
    """Set every dropout probability to 0, so that forward passes are deterministic in train mode too.

    Train mode is still needed for gradient checkpointing, and a ratio computed with dropout on is
    not 1 on the first on-policy pass.
    """
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        for attr in ("attention_dropout", "dropout", "attn_dropout"):
            if isinstance(getattr(module, attr, None), float):
                setattr(module, attr, 0.0)
    config = getattr(model, "config", None)
    if config is not None:
        for attr in ("attention_dropout", "hidden_dropout", "dropout", "attn_pdrop", "resid_pdrop", "embd_pdrop"):
            if isinstance(getattr(config, attr, None), float):
                setattr(config, attr, 0.0)


def frozen_copy(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """A deep copy in eval mode (the reference policy), optionally in ``dtype``, only ever run under
    ``torch.no_grad`` and never optimised.

    Its parameters keep ``requires_grad=True`` on purpose: with a KV cache (the shared-prompt path) some
    CPU kernels dispatch on that flag, and the reference must compute exactly as the actor does, so that
    the KL of identical models is exactly 0.
    """
    reference = copy.deepcopy(model)
    if dtype is not None:
        reference.to(dtype)
    return reference.eval()


def apply_lora(model: PreTrainedModel, peft_config, gradient_checkpointing: bool = False):
    """Wrap ``model`` in a PEFT adapter; only the adapter's weights train. With gradient checkpointing
    the inputs are made to require grad, so a checkpointed block's adapter weights always get gradients."""
    from peft import get_peft_model

    if gradient_checkpointing:
        model.enable_input_require_grads()
    return get_peft_model(model, peft_config)


def is_peft_model(model: nn.Module) -> bool:
    return hasattr(getattr(model, "module", model), "disable_adapter")


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that count only attended tokens, as ``generate`` computes them: left padding gets 0."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def _inner_forward_parameters(model: nn.Module):
    base = getattr(model, "module", model)  # DistributedDataParallel
    base = base.get_base_model() if hasattr(base, "get_base_model") else base
    return inspect.signature(base.forward).parameters


def _accepts_logits_to_keep(model: nn.Module) -> bool:
    return "logits_to_keep" in _inner_forward_parameters(model)


def _cache_argument(model: nn.Module) -> str:
    """The keyword under which the model's forward takes a KV cache (``cache`` since transformers 5.x)."""
    return "cache" if "cache" in _inner_forward_parameters(model) else "past_key_values"


def sequence_inputs(prompt_ids, prompt_mask, completion_ids, completion_mask) -> dict[str, torch.Tensor]:
    """Model inputs for left-padded prompts followed by right-padded completions; position ids come
    from the attention mask so that padding never shifts a position."""
    attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
    return {"input_ids": torch.cat([prompt_ids, completion_ids], dim=1), "attention_mask": attention_mask,
            "position_ids": position_ids_from_mask(attention_mask)}


def _groups_share_prompts(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, group_size: int) -> bool:
    rows, width = prompt_ids.shape
    if group_size <= 1 or rows % group_size:
        return False
    grouped = (prompt_ids * prompt_mask).view(-1, group_size, width)
    return bool((grouped == grouped[:, :1]).all()) and bool(
        (prompt_mask.view(-1, group_size, width) == prompt_mask.view(-1, group_size, width)[:, :1]).all())


def predicting_outputs(model: nn.Module, prompt_ids, prompt_mask, completion_ids, completion_mask, read,
                       group_size: int = 1, prefix_model: nn.Module | None = None) -> torch.Tensor:
    """``read(model outputs)`` at the T positions that predict the completion's tokens: the last prompt
    position, then completion positions 0 .. T-2. [B, T, ...].

    With ``group_size`` G > 1, when each run of G rows shares one prompt (the completions of one
    prompt), the prompt is run once per group and its KV cache repeated for the G completions, which
    then attend to it: the same outputs and gradients, without computing each prompt G times.
    ``prefix_model`` runs that prompt pass: the unwrapped model under DDP, so that the one DDP forward
    of the micro-batch is the completion pass (gradients of both passes meet in one backward).
    """
    num_completion = completion_ids.shape[1]
    if not _groups_share_prompts(prompt_ids, prompt_mask, group_size):
        keep = {"logits_to_keep": num_completion + 1} if _accepts_logits_to_keep(model) else {}
        outputs = model(**sequence_inputs(prompt_ids, prompt_mask, completion_ids, completion_mask), use_cache=False,
                        **keep)
        return read(outputs)[:, -(num_completion + 1) : -1]
    prefix_model = prefix_model if prefix_model is not None else model
    unique = slice(None, None, group_size)
    keep = {"logits_to_keep": 1} if _accepts_logits_to_keep(prefix_model) else {}
    head = prefix_model(input_ids=prompt_ids[unique], attention_mask=prompt_mask[unique],
                        position_ids=position_ids_from_mask(prompt_mask[unique]), use_cache=True, **keep)
    first = read(head)[:, -1:].repeat_interleave(group_size, dim=0)
    if num_completion == 1:
        return first
    cache = head.cache if getattr(head, "cache", None) is not None else head.past_key_values
    cache.batch_repeat_interleave(group_size)
    attention_mask = torch.cat([prompt_mask, completion_mask[:, :-1]], dim=1)
    rest = model(input_ids=completion_ids[:, :-1], attention_mask=attention_mask,
                 position_ids=position_ids_from_mask(attention_mask)[:, prompt_ids.shape[1]:], use_cache=True,
                 **{_cache_argument(model): cache})
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

    The prompt is left-padded and the completion right-padded; position ids are computed from the
    attention mask so that padding never shifts a position. Logits are computed only at the positions
    that predict completion tokens; ``group_size`` shares each prompt's pass between the rows that
    repeat it (see ``predicting_outputs``). The entropy is a metric, without gradient, unless
    ``entropy_grad``.
    """
    logits = predicting_outputs(model, prompt_ids, prompt_mask, completion_ids, completion_mask,
                                lambda outputs: outputs.logits, group_size, prefix_model)  # [B, T, V]
    if temperature != 1.0:
        logits = logits / temperature
    if not with_entropy:
        return token_logprobs(logits, completion_ids), None
    return token_logprobs_and_entropy(logits, completion_ids, entropy_grad=entropy_grad)

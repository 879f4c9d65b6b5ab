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

Packed trees: when the model's attention takes a custom 4D mask and completion lengths differ, the passes here run
each group as a tree (the prompt once, each completion a branch) packed into rows without padding
(``rlhf.packing``), the same outputs for less work; otherwise the layouts above.
"""

import functools
import inspect
import logging
import types
from dataclasses import dataclass

import torch
from torch import nn

from rlhf.core import token_logprobs, token_logprobs_and_entropy
from rlhf.core.lm_head import linear_token_logprobs
from rlhf.packing import PackedRows, pack_rows, packable

logger = logging.getLogger(__name__)

# Config fields of models whose logits are not the plain head applied to the last hidden state.
_LOGIT_POSTPROCESSING = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier",
                         "lm_head_multiplier")


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


def model_cache(outputs):
    """The KV cache a forward returned (``cache`` since transformers 5.x, ``past_key_values`` before); None when
    it returned none."""
    cache = getattr(outputs, "cache", None)
    return cache if cache is not None else getattr(outputs, "past_key_values", None)


def keeps_cache(model: nn.Module) -> bool:
    """Whether a forward of ``model`` returns the KV cache the prompt-sharing pass needs: not while it trains under
    gradient checkpointing (transformers then turns the cache off). Packed trees need no cache."""
    lm = causal_lm(model)
    backbone = getattr(lm, "backbone", lm)  # a ValueModel's
    checkpointing = getattr(lm, "is_gradient_checkpointing", False) or getattr(backbone, "is_gradient_checkpointing",
                                                                                  False)
    return not (checkpointing and lm.training)


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
    cache = model_cache(outputs)
    cache.batch_repeat_interleave(group_size)
    return outputs, cache


@dataclass
class TokenScores:
    """What a forward with ``score_tokens`` returns: per-position log-probs and entropies ([B, L], 0 where not
    scored) and the backbone's KV cache."""

    logprobs: torch.Tensor
    entropy: torch.Tensor
    cache: object = None


def _scoring_forward(self, *args, score_tokens=None, score_temperature=1.0, score_entropy_grad=False, **kwargs):
    """The model's own forward, or, with ``score_tokens`` ([B, L], the token each position predicts; negative:
    not scored), the log-probs and entropies of those tokens from the backbone's last hidden state through the
    chunked LM head: no [B, L, V] logits, forward or backward. Runs inside the model's forward, so wrappers
    that gather parameters for it (DDP, FSDP) see one forward as usual."""
    if score_tokens is None:
        return type(self).forward(self, *args, **kwargs)
    kwargs.pop("logits_to_keep", None)
    outputs = getattr(self, self.base_model_prefix)(*args, **kwargs)
    hidden = outputs.last_hidden_state  # [B, L, H]
    head = self.get_output_embeddings()
    scored = score_tokens >= 0
    device_type = hidden.device.type
    compute_dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
    if hasattr(head.weight, "ds_id"):  # DeepSpeed ZeRO-3: the weight is whole only inside the head's own forward
        logprobs, entropy = _scores_through_head(head, hidden[scored], score_tokens[scored], score_temperature,
                                                 score_entropy_grad)
    else:
        logprobs, entropy = linear_token_logprobs(hidden[scored], head.weight, head.bias, score_tokens[scored],
                                                  score_temperature, entropy_grad=score_entropy_grad,
                                                  compute_dtype=compute_dtype)
    full = torch.zeros(score_tokens.shape, dtype=logprobs.dtype, device=logprobs.device)
    return TokenScores(full.masked_scatter(scored, logprobs), full.masked_scatter(scored, entropy),
                       model_cache(outputs))


def _scores_through_head(head: nn.Module, hidden: torch.Tensor, tokens: torch.Tensor, temperature: float,
                         entropy_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The chunked scores by calling the head module on a few tokens at a time, each call under activation
    checkpointing: a partitioned weight (ZeRO-3) is gathered by the head's own hooks in the forward and again in
    the backward's recompute, and one chunk's [tokens, vocab] logits live at a time, never all of them."""
    from torch.utils.checkpoint import checkpoint

    from rlhf.core import lm_head

    vocab = head.out_features
    rows = max(1, lm_head.TOKEN_CHUNK * lm_head.VOCAB_CHUNK // vocab)

    def score(h, y):
        return token_logprobs_and_entropy(head(h).float() / temperature, y, entropy_grad=entropy_grad)

    pieces = [checkpoint(score, hidden[start:start + rows], tokens[start:start + rows], use_reentrant=False)
              for start in range(0, hidden.shape[0], rows)]
    return torch.cat([p[0] for p in pieces]), torch.cat([p[1] for p in pieces])


def enable_token_scoring(model: nn.Module) -> bool:
    """Let ``model(..., score_tokens=...)`` return ``TokenScores`` computed with the chunked LM head
    (``rlhf.core.lm_head``); calls without it run the model's own forward unchanged (generation included).

    Only for a plain linear head on the backbone's last hidden state, checked on the model's own weights: a
    head with logit soft-capping or scaling, a LoRA adapter on the head, or a forward whose logits differ
    from head(last hidden state) keeps the full-logits path (returns False and says why in the log). Call it
    on the bare causal LM, before PEFT and Accelerate wrap it; copies (the reference) keep it."""
    if getattr(model, "_rlhf_scores_tokens", False):
        return True
    config = model.config.get_text_config()
    reason = None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    backbone = getattr(model, getattr(model, "base_model_prefix", ""), None)
    if type(head) is not nn.Linear or backbone is None or backbone is model:
        reason = f"its output layer is {type(head).__name__}, not a plain nn.Linear on a backbone"
    elif any(getattr(config, name, None) not in (None, 1.0) for name in _LOGIT_POSTPROCESSING):
        reason = "it post-processes its logits (soft-capping or scaling)"
    else:
        ids = torch.arange(1, 5, device=head.weight.device).clamp(max=config.vocab_size - 1).unsqueeze(0)
        training = model.training
        model.eval()  # dropout would make the two passes differ
        with torch.no_grad():
            logits = model(input_ids=ids).logits
            direct = head(backbone(input_ids=ids).last_hidden_state)
        model.train(training)
        if not torch.allclose(logits.float(), direct.float(), atol=1e-4, rtol=1e-4):
            reason = "its logits differ from the head applied to its last hidden state"
    if reason is not None:
        logger.info("Scoring %s through its full logits: %s.", type(model).__name__, reason)
        return False
    forward = functools.wraps(type(model).forward)(_scoring_forward)  # keeps the signature generate() reads
    model.forward = types.MethodType(forward, model)
    model._rlhf_scores_tokens = True
    return True


def scores_tokens(model: nn.Module) -> bool:
    """Whether ``enable_token_scoring`` was applied to the causal LM inside ``model``'s wrappers."""
    return getattr(causal_lm(model), "_rlhf_scores_tokens", False)


def batch_layout(model: nn.Module, prompt_ids, prompt_mask, completion_ids, completion_mask,
                 group_size: int) -> tuple[PackedRows | None, bool]:
    """How a pass lays the batch out: packed trees (``rlhf.packing``; the prompt once per group of ``group_size``
    rows when they share it), else None and whether the prompt runs once per group through a KV cache
    (``run_shared_prompts``; False: every row whole)."""
    shares = groups_share_prompts(prompt_ids, prompt_mask, group_size)
    if packable(causal_lm(model), prompt_ids.shape[1] + completion_ids.shape[1]):
        packed = pack_rows(prompt_ids, prompt_mask, completion_ids, completion_mask, group_size if shares else 1)
        if packed is not None:
            return packed, shares
    return None, shares and keeps_cache(model)


def packed_batch(model: nn.Module, prompt_ids, prompt_mask, completion_ids, completion_mask,
                 group_size: int) -> PackedRows | None:
    """The batch as packed trees, or None when the model's attention cannot take the mask or packing would not save
    work (``batch_layout``)."""
    return batch_layout(model, prompt_ids, prompt_mask, completion_ids, completion_mask, group_size)[0]


def packed_inputs(model: nn.Module, packed: PackedRows) -> dict[str, torch.Tensor]:
    """Model inputs for ``packed``, with the attention mask in the form the model's attention takes."""
    lm = causal_lm(model)
    mask = packed.attention_mask(lm.config._attn_implementation, next(lm.parameters()).dtype)
    return {"input_ids": packed.input_ids, "attention_mask": mask, "position_ids": packed.position_ids,
            "use_cache": False}


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
    packed, shared_prompts = batch_layout(model, prompt_ids, prompt_mask, completion_ids, completion_mask, group_size)
    if packed is not None:
        return packed.unpack(read(model(**packed_inputs(model, packed))))
    if not shared_prompts:
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
    positions, masks and temperature are handled the same way (pitfall 4). A model prepared with
    ``enable_token_scoring`` never builds the [B, T, V] logits (forward or backward); others score their
    logits in row chunks. The entropy is a metric, without gradient, unless ``entropy_grad``.
    """
    if scores_tokens(model):
        logprobs, entropy = _scored_logprobs(model, prompt_ids, prompt_mask, completion_ids, completion_mask,
                                             temperature, entropy_grad, group_size, prefix_model)
        return logprobs, (entropy if with_entropy else None)
    logits = predicting_outputs(model, prompt_ids, prompt_mask, completion_ids, completion_mask,
                                lambda outputs: outputs.logits, group_size, prefix_model)  # [B, T, V]
    if temperature != 1.0:
        logits = logits / temperature
    if not with_entropy:
        return token_logprobs(logits, completion_ids), None
    return token_logprobs_and_entropy(logits, completion_ids, entropy_grad=entropy_grad)


def _scored_logprobs(model, prompt_ids, prompt_mask, completion_ids, completion_mask, temperature, entropy_grad,
                     group_size, prefix_model):
    """``completion_logprobs`` through the chunked LM head (``enable_token_scoring``). [B, T] each."""
    scoring = {"score_temperature": temperature, "score_entropy_grad": entropy_grad}
    width, num_completion = prompt_ids.shape[1], completion_ids.shape[1]
    packed, shared_prompts = batch_layout(model, prompt_ids, prompt_mask, completion_ids, completion_mask, group_size)
    if packed is not None:
        out = model(**packed_inputs(model, packed), score_tokens=packed.targets, **scoring)
        return packed.unpack(out.logprobs), packed.unpack(out.entropy)
    if not shared_prompts:
        targets = torch.full((prompt_ids.shape[0], width + num_completion), -1, dtype=completion_ids.dtype,
                             device=completion_ids.device)
        targets[:, width - 1: width + num_completion - 1] = completion_ids  # position t predicts token t + 1
        out = model(**sequence_inputs(prompt_ids, prompt_mask, completion_ids, completion_mask), use_cache=False,
                    score_tokens=targets, **scoring)
        window = slice(width - 1, width + num_completion - 1)
        return out.logprobs[:, window], out.entropy[:, window]
    # Shared prompts: the prompt pass gives the first completion token's logits for each group (small: one
    # position per group); the completion pass scores the rest through the chunked head.
    head, cache = run_shared_prompts(prefix_model if prefix_model is not None else model, prompt_ids, prompt_mask,
                                     group_size)
    first_logits = head.logits[:, -1:].repeat_interleave(group_size, dim=0) / temperature  # [B, 1, V]
    first, first_entropy = token_logprobs_and_entropy(first_logits, completion_ids[:, :1], entropy_grad=entropy_grad)
    if num_completion == 1:
        return first, first_entropy
    attention_mask = torch.cat([prompt_mask, completion_mask[:, :-1]], dim=1)
    rest = model(input_ids=completion_ids[:, :-1], attention_mask=attention_mask,
                 position_ids=position_ids_from_mask(attention_mask)[:, width:], use_cache=True,
                 score_tokens=completion_ids[:, 1:], **{cache_argument(model): cache}, **scoring)
    return torch.cat([first, rest.logprobs], dim=1), torch.cat([first_entropy, rest.entropy], dim=1)

"""Sampling completions: the ``Rollout`` record a step works on, and ``generate_rollout``, the one
function that turns prompts into it.

The completion mask keeps every token up to and including the first EOS (any id of the model's
EOS list) and nothing after it. It is computed from positions, never by comparing ids with the
pad id, so it stays right when the pad token is the EOS token (pitfalls 2 and 3 in tests/README.md).
"""

import contextlib
import dataclasses
from dataclasses import dataclass

import torch
from torch import nn
from transformers import GenerationConfig, PreTrainedTokenizerBase
from transformers.generation import LogitsProcessor, LogitsProcessorList

from rlhf.data import left_pad, render_prompts, tokenize_prompts
from rlhf.decode import SamplingParams, decode, sampling_processors
from rlhf.distributed import model_for_generation, needs_synced_generation, without_autocast
from rlhf.forward import cache_argument, groups_share_prompts, run_shared_prompts


@dataclass
class Rollout:
    """One step's experience on this process. Rows: B completions, the ``num_generations`` completions of one
    prompt in contiguous rows. Prompts are left-padded to P columns, completions right-padded to T.

    The sampler fills the first six fields and ``sampler_logprobs``; the no-grad passes and the advantage
    estimator fill the rest, once per rollout batch and before any update."""

    prompt_ids: torch.Tensor  # [B, P] long
    prompt_mask: torch.Tensor  # [B, P] 1 on prompt tokens
    completion_ids: torch.Tensor  # [B, T] long
    completion_mask: torch.Tensor  # [B, T] 1 up to and including the first EOS
    truncated: torch.Tensor  # [B] bool: no EOS within max_new_tokens
    loss_mask: torch.Tensor  # [B, T] the tokens the loss counts: policy_tokens minus rows left out
    sampler_logprobs: torch.Tensor | None = None  # [B, T] the sampler's own, from generation (0 past the end)
    correction_weights: torch.Tensor | None = None  # [B, T] rollout correction pi_old / pi_sampler, truncated
    selected_tokens: torch.Tensor | None = None  # [B, T] 1 where the policy loss counts (top_entropy_quantile)
    teacher_logprobs: torch.Tensor | None = None  # [B, T] the teacher's (on-policy distillation)
    old_logprobs: torch.Tensor | None = None  # [B, T] the sampling policy's, when the update needs them
    ref_logprobs: torch.Tensor | None = None  # [B, T] the reference's, when there is a KL term
    old_values: torch.Tensor | None = None  # [B, T] the critic's, before any update (PPO)
    advantages: torch.Tensor | None = None  # [B] per sequence, or [B, T] per token
    returns: torch.Tensor | None = None  # [B, T] value targets (PPO)
    # Multi-turn rollouts (rlhf.agent): the completion holds environment turns too.
    policy_mask: torch.Tensor | None = None  # [B, T] 1 on the tokens the policy sampled; None: one turn, all of them
    turn_rewards: torch.Tensor | None = None  # [B, T] an environment's per-turn rewards, on each turn's last policy token

    @property
    def size(self) -> int:
        return self.completion_ids.shape[0]

    @property
    def policy_tokens(self) -> torch.Tensor:
        """[B, T] 1 on the tokens the policy sampled: the mask of every advantage, KL, loss and token count
        (``completion_mask``, which the forward passes attend with, also holds environment tokens)."""
        return self.completion_mask if self.policy_mask is None else self.policy_mask

    @property
    def loss_weights(self) -> torch.Tensor | None:
        """[B, T] what multiplies each token's policy loss: the rollout correction's weights times the entropy
        selection (None: both off). Unlike ``loss_mask`` it leaves the loss's token and sequence counts alone."""
        if self.selected_tokens is None:
            return self.correction_weights
        if self.correction_weights is None:
            return self.selected_tokens
        return self.correction_weights * self.selected_tokens

    def tensors(self) -> dict[str, torch.Tensor]:
        """The fields that are set, by name."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) is not None}

    def rows(self, index) -> "Rollout":
        """The rows ``index`` (a slice, or a tensor of row indices) of every field."""
        return Rollout(**{name: value[index] for name, value in self.tensors().items()})

    def trimmed(self) -> "Rollout":
        """Drop prompt columns that are padding in every row (left) and completion columns past every row's
        end (right): a micro-batch only pays for its own longest sequence."""
        keep_prompt = self.prompt_mask.any(dim=0).nonzero()
        first = int(keep_prompt[0]) if keep_prompt.numel() else self.prompt_mask.shape[1]
        keep_completion = self.completion_mask.any(dim=0).nonzero()
        last = int(keep_completion[-1]) + 1 if keep_completion.numel() else 0
        out = {}
        for name, value in self.tensors().items():
            if name.startswith("prompt_"):
                out[name] = value[:, first:]
            elif value.dim() == 2:
                out[name] = value[:, :last]
            else:
                out[name] = value
        return Rollout(**out)


def pad_columns(name: str, value: torch.Tensor, prompt_width: int, width: int) -> torch.Tensor:
    """A field of a ``Rollout`` widened with 0: prompt fields on the left to ``prompt_width``, other [B, T] fields on
    the right to ``width``; [B] fields unchanged. The masks say what is valid, so the pad value never matters."""
    if value.dim() != 2:
        return value
    if name.startswith("prompt_"):
        return torch.nn.functional.pad(value, (prompt_width - value.shape[1], 0))
    return torch.nn.functional.pad(value, (0, width - value.shape[1]))


def concat_rollouts(rollouts: list[Rollout]) -> Rollout:
    """The rows of ``rollouts`` in order, each widened to the widest prompt and completion (``pad_columns``)."""
    prompt_width = max(r.prompt_ids.shape[1] for r in rollouts)
    width = max(r.completion_ids.shape[1] for r in rollouts)
    return Rollout(**{name: torch.cat([pad_columns(name, getattr(r, name), prompt_width, width) for r in rollouts])
                      for name in rollouts[0].tensors()})


@dataclass
class RolloutTexts:
    """What reward functions see, one entry per completion (prompts repeated G times), and, once they have run
    (``rlhf.rewards.score_rollout``), what each returned and what they gave ``log_extra``."""

    prompts: list
    completions: list
    completion_ids: list[list[int]]
    columns: dict[str, list]
    rewards: dict[str, list] = dataclasses.field(default_factory=dict)  # function name -> value per completion
    extra: dict[str, list] = dataclasses.field(default_factory=dict)  # log_extra column -> value per completion
    episode_stats: dict[str, list[float]] = dataclasses.field(default_factory=dict)  # multi-turn: per trajectory
    # Multi-turn with an environment: each completion's instance, which reward functions receive as ``environments``
    # (TRL's keyword). Only the rollout's own scoring reads them: ``rows`` and ``concat_texts`` leave them out.
    environments: list | None = None

    def rows(self, index: list[int]) -> "RolloutTexts":
        return RolloutTexts([self.prompts[i] for i in index], [self.completions[i] for i in index],
                            [self.completion_ids[i] for i in index],
                            {k: [v[i] for i in index] for k, v in self.columns.items()},
                            {k: [v[i] for i in index] for k, v in self.rewards.items()},
                            {k: [v[i] for i in index] for k, v in self.extra.items()},
                            {k: [v[i] for i in index] for k, v in self.episode_stats.items()})


def concat_texts(texts: list[RolloutTexts]) -> RolloutTexts:
    def joined(name: str) -> dict[str, list]:
        keys = dict.fromkeys(k for t in texts for k in getattr(t, name))  # a log_extra column one round lacks: None
        return {k: [v for t in texts for v in getattr(t, name).get(k, [None] * len(t.prompts))] for k in keys}

    return RolloutTexts([p for t in texts for p in t.prompts], [c for t in texts for c in t.completions],
                        [ids for t in texts for ids in t.completion_ids], joined("columns"), joined("rewards"),
                        joined("extra"), joined("episode_stats"))


@dataclass
class Policy:
    """The actor as generation uses it: the model as Accelerate prepared it, its tokenizer and EOS ids, and
    how prompts are cut to length."""

    model: nn.Module
    accelerator: object
    tokenizer: PreTrainedTokenizerBase
    eos_ids: list[int]
    max_prompt_length: int | None = None
    truncate_prompts: bool = False
    prefill_group: bool = True  # prefill each group's prompt once (off under ZeRO-3 / FSDP)
    autocast: bool = True  # sample in the mixed-precision autocast (autocast_generation; else in the weights' dtype)

    @property
    def unwrapped(self) -> nn.Module:
        return self.accelerator.unwrap_model(self.model)


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


def generation_config(params: SamplingParams, eos_ids: list[int], pad_id: int, warpers: bool = True,
                      ) -> GenerationConfig:
    """Every sampling knob set explicitly. Anything left unset would be filled from the model's own
    generation_config (a repetition penalty, a top-k of 20...) and the sampled distribution would no
    longer be the one the log-probs are computed from. ``warpers=False`` leaves temperature, top-k, top-p and
    min-p to the caller's own processors (``sampling_processors``)."""
    sampling = {"min_p": None}
    if params.do_sample:
        sampling = dict(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k,
                        min_p=params.min_p) if warpers else dict(temperature=1.0, top_p=1.0, top_k=0, min_p=None)
    return GenerationConfig(
        max_new_tokens=params.max_new_tokens,
        min_new_tokens=params.min_new_tokens,
        do_sample=params.do_sample,
        **sampling,
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
        cache_implementation="static" if params.static_kv_cache else None,
    )


class SampledLogprobs(LogitsProcessor):
    """The last logits processor of a sampling ``generate``: it sees the scores the next token is drawn from
    (after temperature, top-k and top-p, so log-softmax renormalises over the tokens they keep) and keeps the
    log-prob of the token drawn from each step. One step's [B, V] log-softmax is alive at a time."""

    def __init__(self):
        self.steps: list[torch.Tensor] = []  # [B] per step, gathered once the next call shows the drawn token
        self.pending: torch.Tensor | None = None  # [B, V] the last step's log-softmax

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.pending is not None:
            self.steps.append(self.pending.gather(1, input_ids[:, -1:]).squeeze(1))
            self.pending = None  # freed before the next one is built: one [B, V] less at the peak
        self.pending = torch.log_softmax(scores.float(), dim=-1)
        return scores

    def logprobs(self, completion_ids: torch.Tensor) -> torch.Tensor:
        """[B, T] for the ``completion_ids`` that ``generate`` returned (it may have run, then undone, extra steps)."""
        width = completion_ids.shape[1]
        steps = self.steps[:width]
        if len(steps) < width:
            steps.append(self.pending.gather(1, completion_ids[:, width - 1:width]).squeeze(1))
        return torch.stack(steps, dim=1)


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
    with_logprobs: bool = False,
) -> tuple[torch.Tensor, ...]:
    """Generate one completion per prompt row. Returns (completion_ids, completion_mask, truncated), and with
    ``with_logprobs`` (sampling only) the sampler's log-prob of each token [B, T] as fourth element: from the
    scores the token was drawn from, after temperature, top-k and top-p (renormalised over the kept tokens),
    in fp32; 0 past each completion's end.

    Rows are left-padded prompts; position ids come from ``prompt_mask``. Decoding is ``rlhf.decode.decode``
    (generate's algorithm with two [B, V] tensors per step), or transformers' ``generate`` with a static KV cache
    or ``synced_gpus``, which keeps this process stepping until every process has finished (sharded models).
    With ``group_size`` G, when each run of G rows repeats one prompt, the prompt (but its last token)
    is prefilled once per group and the KV cache repeated G times before decoding continues.
    """
    if with_logprobs and not params.do_sample:
        raise ValueError("with_logprobs needs sampling (do_sample=True).")
    was_training = model.training
    model.eval()
    cache = None
    shared = not params.static_kv_cache  # a static cache is generate's own: no prefilled cache can be passed in
    if shared and prompt_ids.shape[1] > 1 and groups_share_prompts(prompt_ids, prompt_mask, group_size):
        _, cache = run_shared_prompts(model, prompt_ids[:, :-1], prompt_mask[:, :-1], group_size)
    if params.static_kv_cache or synced_gpus:
        completion_ids, logprobs = _generate(model, prompt_ids, prompt_mask, params, eos_ids, pad_id, synced_gpus,
                                             cache, with_logprobs)
    else:
        completion_ids, logprobs = decode(model, prompt_ids, prompt_mask, params, eos_ids, pad_id, cache=cache,
                                          with_logprobs=with_logprobs)
    model.train(was_training)
    mask, truncated = completion_mask(completion_ids, eos_ids)
    if not with_logprobs:
        return completion_ids, mask, truncated
    return completion_ids, mask, truncated, torch.where(mask.bool(), logprobs, 0.0)


def _generate(model, prompt_ids, prompt_mask, params, eos_ids, pad_id, synced_gpus, cache, with_logprobs):
    """``decode``'s contract through transformers' ``generate`` (static KV cache; sharded models in lock-step)."""
    recorder = SampledLogprobs() if with_logprobs else None
    # generate() puts a caller's processors before its own temperature / top-k / top-p; to see the final scores
    # the recorder runs the same warpers itself, in generate's order, and generate adds none.
    config = generation_config(params, eos_ids, pad_id, warpers=recorder is None)
    processors = LogitsProcessorList([*sampling_processors(params), recorder]) if recorder is not None else None
    kwargs = {cache_argument(model): cache} if cache is not None else {}
    with _only_our_generation_config(model):
        sequences = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, generation_config=config,
                                   synced_gpus=synced_gpus, logits_processor=processors, **kwargs)
    completion_ids = sequences[:, prompt_ids.shape[1]:]
    return completion_ids, (recorder.logprobs(completion_ids) if recorder is not None else None)


def encode_prompts(policy: Policy, prompts: list) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Left-padded prompt ids and mask on the policy's device, and whether the prompts were chat messages."""
    texts, is_chat = render_prompts(prompts, policy.tokenizer)
    ids = tokenize_prompts(texts, policy.tokenizer, is_chat, policy.max_prompt_length, policy.truncate_prompts)
    prompt_ids, prompt_mask = left_pad(ids, policy.tokenizer.pad_token_id)
    device = policy.accelerator.device
    return prompt_ids.to(device), prompt_mask.to(device), is_chat


def decode_completions(tokenizer, completion_ids: torch.Tensor, mask: torch.Tensor, is_chat: bool):
    """(completion texts, or assistant messages for chat prompts; the token ids of each, up to its end)."""
    lengths = mask.sum(dim=1).tolist()
    id_lists = [row[:n] for row, n in zip(completion_ids.tolist(), lengths)]
    texts = tokenizer.batch_decode(id_lists, skip_special_tokens=True)
    completions = [[{"role": "assistant", "content": t}] for t in texts] if is_chat else texts
    return completions, id_lists


def generate(policy: Policy, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, params: SamplingParams,
             group_size: int = 1):
    """Completions from the actor (gathered from its shards if need be), in Accelerate's autocast unless
    ``policy.autocast`` is off: (completion_ids, completion_mask, truncated, sampler_logprobs); no log-probs (None)
    when greedy."""
    accelerator = policy.accelerator
    with model_for_generation(accelerator, policy.model) as model, \
            (accelerator.autocast() if policy.autocast else without_autocast(model)):
        out = sample_completions(model, prompt_ids, prompt_mask, params, policy.eos_ids, policy.tokenizer.pad_token_id,
                                 synced_gpus=needs_synced_generation(accelerator),
                                 group_size=group_size if policy.prefill_group else 1, with_logprobs=params.do_sample)
    return out if params.do_sample else (*out, None)


def generate_rollout(policy: Policy, rows: dict, params: SamplingParams, num_generations: int,
                     ) -> tuple[Rollout, RolloutTexts]:
    """``num_generations`` completions for each prompt of ``rows`` (a dataset slice), the completions of one
    prompt in contiguous rows: the tensors, and the texts reward functions see."""
    n = num_generations
    prompt_ids, prompt_mask, is_chat = encode_prompts(policy, rows["prompt"])
    prompt_ids = prompt_ids.repeat_interleave(n, dim=0)
    prompt_mask = prompt_mask.repeat_interleave(n, dim=0)
    completion_ids, mask, truncated, sampler_logprobs = generate(policy, prompt_ids, prompt_mask, params, group_size=n)
    completions, id_lists = decode_completions(policy.tokenizer, completion_ids, mask, is_chat)
    repeat = lambda values: [v for v in values for _ in range(n)]  # noqa: E731
    texts = RolloutTexts(prompts=repeat(rows["prompt"]), completions=completions, completion_ids=id_lists,
                         columns={k: repeat(v) for k, v in rows.items() if k != "prompt"})
    rollout = Rollout(prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=completion_ids,
                      completion_mask=mask, truncated=truncated, loss_mask=mask.clone(),
                      sampler_logprobs=sampler_logprobs)
    return rollout, texts

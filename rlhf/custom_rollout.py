"""TRL's ``rollout_func``: the user's function makes the completions; the trainer scores them and trains on them.

TRL 1.16 calls ``rollout_func(prompts, trainer)`` with this process's prompts, one per completion (each prompt
``num_generations`` times in a row; chat prompts as messages: templating is the function's job) and reads a dict::

    prompt_ids, completion_ids   one token-id list per prompt given
    logprobs                     the sampler's log-prob of each completion token (same lengths as completion_ids)
    env_mask                     optional: per completion token, 1 where the policy sampled it, 0 for the
                                 environment's tokens (those get no loss)
    logprob_token_ids            optional (TRL's top-k candidates): accepted, unused
    anything else                a keyword of the reward functions: a list (one value per completion) or one value

Here the function receives this trainer: its ``processing_class``, ``args``, ``model`` and ``accelerator`` are there,
TRL's vLLM machinery (``trainer.vllm_generation``, ``use_vllm``, ...) is not, and reaching for it is an error that
says so (generate with ``trainer.model.generate`` instead). ``rollout_func`` cannot be combined with ``tools`` or an
``environment_factory``: TRL would run its tool loop on the function's completions, here the function owns the whole
rollout. A completion is truncated when its last token is not an EOS; ``logprobs`` are the sampler's log-probs (with
``rollout_correction``, importance weights correct for a sampler that is not the trained policy). Reward functions
that require an extra field by name must give it a default (the dataset is checked before any rollout); ``**kwargs``
receives it either way.
"""

import copy
import weakref

import torch

from rlhf.data import is_conversational, left_pad
from rlhf.rollout import Policy, Rollout, RolloutTexts, SamplingParams, decode_completions

REQUIRED = ("prompt_ids", "completion_ids", "logprobs")
UNUSED = ("logprob_token_ids",)


class CustomRollout:
    """``rollout_func`` as the trainer's ``rollout_fn(policy, rows, params, num_generations)``."""

    def __init__(self, rollout_func, trainer, tools=None, environment_factory=None):
        if not callable(rollout_func):
            raise TypeError(f"rollout_func must be a function (prompts, trainer) -> dict, got {rollout_func!r}.")
        if tools or environment_factory is not None:
            raise ValueError("rollout_func with tools or an environment_factory: here rollout_func owns the whole "
                             "rollout, so there is no tool loop to run on its completions. Call the tools inside "
                             "rollout_func (and mark their tokens with env_mask), or drop rollout_func.")
        self.fn = rollout_func
        self.trainer = weakref.ref(trainer)  # the trainer keeps this object: no cycle

    def __call__(self, policy: Policy, rows: dict, params: SamplingParams, num_generations: int,
                 ) -> tuple[Rollout, RolloutTexts]:
        prompts = [copy.deepcopy(p) for p in rows["prompt"] for _ in range(num_generations)]
        try:
            out = self.fn(prompts, self.trainer())
        except AttributeError as error:
            if "vllm" not in str(error).lower():
                raise
            raise AttributeError(f"rollout_func used TRL's vLLM machinery ({error}); this trainer generates with "
                                 "the model itself and has no vLLM engine. Generate with trainer.model.generate (or "
                                 "your own server) inside rollout_func.") from error
        return self._assemble(policy, out, rows, prompts, num_generations)

    def _assemble(self, policy: Policy, out, rows: dict, prompts: list, n: int) -> tuple[Rollout, RolloutTexts]:
        k = len(prompts)
        if not isinstance(out, dict):
            raise TypeError(f"rollout_func must return a dict with keys {list(REQUIRED)}, got {type(out).__name__}.")
        missing = sorted(set(REQUIRED) - set(out))
        if missing:
            raise ValueError(f"rollout_func must return keys {missing} in its output dict (one entry per prompt it "
                             f"was given, {k} here).")
        masks = ("env_mask",) if "env_mask" in out else ()
        for key in (*REQUIRED, *masks):
            if not isinstance(out[key], (list, tuple)) or len(out[key]) != k:
                raise ValueError(f"rollout_func returned {key} with {_count(out[key])} entries for the {k} prompts it "
                                 "was given; return one per prompt (each prompt comes num_generations times).")
        completion_lists = [list(ids) for ids in out["completion_ids"]]
        for key in ("logprobs", *masks):
            bad = next((i for i, (v, c) in enumerate(zip(out[key], completion_lists)) if len(v) != len(c)), None)
            if bad is not None:
                raise ValueError(f"rollout_func returned {len(out[key][bad])} {key} for completion {bad}, which has "
                                 f"{len(completion_lists[bad])} tokens; give one per completion token.")
        device, pad = policy.accelerator.device, policy.tokenizer.pad_token_id
        prompt_ids, prompt_mask = left_pad([list(ids) for ids in out["prompt_ids"]], pad)
        shape = (k, max(1, max(len(c) for c in completion_lists)))
        completion_ids = torch.full(shape, pad, dtype=torch.long)
        completion_mask = torch.zeros(shape, dtype=torch.long)
        sampler_logprobs = torch.zeros(shape, dtype=torch.float32)
        policy_mask = torch.zeros(shape, dtype=torch.long) if masks else None
        for i, ids in enumerate(completion_lists):
            completion_ids[i, :len(ids)], completion_mask[i, :len(ids)] = torch.tensor(ids, dtype=torch.long), 1
            sampler_logprobs[i, :len(ids)] = torch.tensor([float(x) for x in out["logprobs"][i]])
            if policy_mask is not None:
                policy_mask[i, :len(ids)] = torch.tensor([int(x) for x in out["env_mask"][i]], dtype=torch.long)
        truncated = torch.tensor([not ids or ids[-1] not in policy.eos_ids for ids in completion_lists])
        completions, id_lists = decode_completions(policy.tokenizer, completion_ids, completion_mask,
                                                   is_conversational(prompts[0]))
        extra = {key: value if isinstance(value, list) else [value] * k
                 for key, value in out.items() if key not in (*REQUIRED, *masks, *UNUSED)}
        short = [key for key, value in extra.items() if len(value) != k]
        if short:
            raise ValueError(f"rollout_func returned the field {short[0]!r} with {len(extra[short[0]])} values for {k} "
                             "completions; give a list with one per completion, or a single value for all.")
        columns = {key: [v for v in values for _ in range(n)] for key, values in rows.items() if key != "prompt"}
        loss_mask = (completion_mask if policy_mask is None else policy_mask).clone()
        rollout = Rollout(prompt_ids=prompt_ids.to(device), prompt_mask=prompt_mask.to(device),
                          completion_ids=completion_ids.to(device), completion_mask=completion_mask.to(device),
                          truncated=truncated.to(device), loss_mask=loss_mask.to(device),
                          sampler_logprobs=sampler_logprobs.to(device),
                          policy_mask=policy_mask.to(device) if policy_mask is not None else None)
        return rollout, RolloutTexts(prompts=prompts, completions=completions, completion_ids=id_lists,
                                     columns={**columns, **extra})


def _count(value) -> str:
    return str(len(value)) if hasattr(value, "__len__") else f"no list ({type(value).__name__})"

"""A reward model as a reward function: what trainers call when an entry of ``reward_funcs`` is a path
or a model object.

The completion text is re-tokenised with the reward model's own tokenizer (which may differ from
the policy's), with its chat template when the prompts are conversational; scoring is batched, without
gradient, on the trainer's device.
"""

import os

import torch

from reward_models.modeling import encode, load_reward_model, sequence_scores


class RewardModelFunction:
    """Callable with the standard reward signature; ``normalize`` asks the trainer to whiten its
    scores over the rollout batch (all processes)."""

    def __init__(self, model, tokenizer=None, device=None, batch_size: int = 32, max_length: int | None = None,
                 normalize: bool = False, dtype: str = "float32", trust_remote_code: bool = False):
        source = model if isinstance(model, str) else getattr(model.config, "_name_or_path", "") or "model"
        self.model, self.tokenizer = load_reward_model(model, tokenizer, dtype, trust_remote_code)
        self.model.requires_grad_(False).eval()
        if device is not None:
            self.model.to(device)
        self.batch_size = batch_size
        self.max_length = max_length
        self.normalize = normalize
        self.__name__ = f"reward_model:{os.path.basename(os.path.normpath(source))}"

    @property
    def device(self):
        return next(self.model.parameters()).device

    @torch.no_grad()
    def __call__(self, prompts, completions, **kwargs) -> list[float]:
        scores = []
        for start in range(0, len(completions), self.batch_size):
            inputs = encode(self.tokenizer, prompts[start:start + self.batch_size],
                            completions[start:start + self.batch_size], self.max_length, self.device)
            scores += sequence_scores(self.model, **inputs).tolist()
        return scores

"""Reward models as rewards: loading, turning (prompt, completion) into the model's own input, scoring,
and ``RewardModelFunction``, what trainers call when an entry of ``reward_funcs`` is a reward model.

A reward model is an ``AutoModelForSequenceClassification`` with one label. Its score for a sequence
is the head's output at the last attended token, read from the attention mask: never from comparing
ids with the pad id, which would skip a final EOS when the pad token is the EOS token.
"""

import os

import torch
from torch import nn
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
)

from rlhf.data import is_conversational
from rlhf.forward import position_ids_from_mask
from rlhf.models import quiet_progress_bars, resolve_dtype

_HEAD_NAMES = ("score", "classifier")


def load_reward_model(model: str | PreTrainedModel, tokenizer=None, dtype: str = "float32",
                      trust_remote_code: bool = False):
    """(model, tokenizer) from a path or objects; a causal-LM checkpoint gets a new one-output head."""
    if isinstance(model, str):
        tokenizer = tokenizer or AutoTokenizer.from_pretrained(model, trust_remote_code=trust_remote_code)
        with quiet_progress_bars():
            model = AutoModelForSequenceClassification.from_pretrained(
                model, num_labels=1, dtype=resolve_dtype(dtype), trust_remote_code=trust_remote_code,
                use_safetensors=True)
    elif tokenizer is None:
        source = getattr(model.config, "_name_or_path", "")
        if not source:
            raise ValueError("A reward model given as an object needs its tokenizer: pass the tokenizer too.")
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    if getattr(model.config, "num_labels", 1) != 1:
        raise ValueError(f"A reward model has one output; this one has num_labels={model.config.num_labels}.")
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise ValueError("The reward model's tokenizer has neither a pad nor an EOS token; set a pad token.")
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def render(tokenizer, prompt, completion) -> tuple[str, bool]:
    """The text a reward model reads for ``prompt`` + ``completion``, and whether it came from the chat
    template (its special tokens are then already in the text). ``prompt`` may be None when the
    completion holds the whole conversation."""
    chat = is_conversational(completion) or (prompt is not None and is_conversational(prompt))
    if not chat:
        return (prompt or "") + completion, False
    if tokenizer.chat_template is None:
        raise ValueError("Chat-formatted data needs a reward-model tokenizer with a chat template.")
    messages = list(prompt or [])
    messages += completion if is_conversational(completion) else [{"role": "assistant", "content": completion}]
    return tokenizer.apply_chat_template(messages, tokenize=False), True


def encode(tokenizer, prompts, completions, max_length: int | None = None, device=None) -> dict[str, torch.Tensor]:
    """Right-padded input ids and attention mask for a batch of (prompt, completion) pairs. Texts longer
    than ``max_length`` keep their end (where the answer is)."""
    rows = []
    for prompt, completion in zip(prompts, completions):
        text, chat = render(tokenizer, prompt, completion)
        ids = tokenizer(text, add_special_tokens=not chat)["input_ids"]
        rows.append(ids[-max_length:] if max_length else ids)
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, ids in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[i, : len(ids)] = 1
    return {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device)}


class LastTokenScorer(nn.Module):
    """Wraps a sequence-classification model: ``forward`` gives each right-padded row's reward, the head's
    output at its last attended token ([B], fp32). Wrap this module (not the model) in DDP for training,
    so that its forward is the one whose gradients are synchronised."""

    def __init__(self, model: PreTrainedModel):
        super().__init__()
        self.model = model
        # The head's name, not the module: registering it twice would duplicate it in the state dict.
        self.head_name = next((name for name in _HEAD_NAMES if hasattr(model, name)), None)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.head_name is None:  # an unusual architecture: trust its own pooling
            return self.model(input_ids=input_ids, attention_mask=attention_mask).logits[:, 0].float()
        hidden = self.model.base_model(input_ids=input_ids, attention_mask=attention_mask,
                                       position_ids=position_ids_from_mask(attention_mask),
                                       use_cache=False).last_hidden_state
        last = attention_mask.sum(dim=1) - 1
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)
        return getattr(self.model, self.head_name)(hidden[rows, last]).squeeze(-1).float()


def sequence_scores(model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The reward of each right-padded row (see ``LastTokenScorer``). [B], fp32."""
    return LastTokenScorer(model)(input_ids, attention_mask)


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

"""Reward models as rewards: loading, turning (prompt, completion) into the model's own input, scoring,
and ``RewardModelFunction``, what trainers call when an entry of ``reward_funcs`` is a reward model.

A reward model is an ``AutoModelForSequenceClassification`` with one label. Its score for a sequence
is the head's output at the last attended token, read from the attention mask: never from comparing
ids with the pad id, which would skip a final EOS when the pad token is the EOS token.
"""

import logging
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
from rlhf.gguf import is_gguf, resolve_model_source
from rlhf.integrity import check_safetensors_files
from rlhf.models import quiet_progress_bars, resolve_dtype

logger = logging.getLogger(__name__)

_HEAD_NAMES = ("score", "classifier")


def _looks_like_hub_id(path: str) -> bool:
    """``name`` or ``org/name``: what the hub accepts; anything else can only be a local path."""
    parts = path.split("/")
    return len(parts) <= 2 and all(parts) and not path.startswith((".", "~")) and os.sep == "/"


def check_reward_model_path(path: str) -> None:
    """A reward model named by a string must be a directory (or a hub id); its weight files must be whole."""
    if os.path.isdir(path):
        check_safetensors_files(path, "reward model")
        return
    if os.path.exists(path) or not _looks_like_hub_id(path):
        raise FileNotFoundError(
            f"reward model {path!r}: no such directory. Give the directory a reward model was saved to (e.g. "
            "<output_dir>/model of recipes/train_reward_model.py); a reward function is written "
            "package.module:function.")


def load_reward_model(model: str | PreTrainedModel, tokenizer=None, dtype: str = "float32",
                      trust_remote_code: bool = False, trained: bool = False):
    """(model, tokenizer) from a path or objects. A causal-LM checkpoint gets a new one-output head (the start of
    reward-model training); with ``trained`` (a reward model used as a reward) that is refused: its head would
    be random."""
    if isinstance(model, str):
        if trained and is_gguf(model):
            raise ValueError(f"reward model {model!r}: a GGUF file holds a causal LM, not a trained reward model (its "
                             "scoring head would be random). Train one from it (recipes/train_reward_model.py takes "
                             "the .gguf as model_name_or_path) and give the trained model's directory.")
        path = model = resolve_model_source(model)  # a .gguf causal LM: the start of reward-model training
        check_reward_model_path(path)
        try:
            tokenizer = tokenizer or AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
            with quiet_progress_bars():
                model, info = AutoModelForSequenceClassification.from_pretrained(
                    path, num_labels=1, dtype=resolve_dtype(dtype), trust_remote_code=trust_remote_code,
                    use_safetensors=True, output_loading_info=True)
        except OSError as error:
            raise OSError(f"reward model {path!r} could not be loaded: neither a complete local model directory nor "
                          f"a model on the hub ({str(error)[:300]}). A reward function is written "
                          "package.module:function.") from error
        missing_head = [k for k in info["missing_keys"] if k.split(".")[0] in _HEAD_NAMES]
        if trained and missing_head:
            kinds = getattr(model.config, "architectures", None) or ["?"]
            raise ValueError(f"reward model {path!r} holds a {kinds[0]}, not a trained reward model: its scoring head "
                             f"({', '.join(missing_head)}) is not in the weights and would be random. Train one "
                             "(recipes/train_reward_model.py), or give a sequence-classification model directory.")
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


def token_rows(tokenizer, prompts, completions) -> list[list[int]]:
    """The reward model's token ids of each (prompt, completion) pair, whole."""
    rows = []
    for prompt, completion in zip(prompts, completions):
        text, chat = render(tokenizer, prompt, completion)
        rows.append(tokenizer(text, add_special_tokens=not chat)["input_ids"])
    return rows


def encode(tokenizer, prompts, completions, max_length: int | None = None, device=None,
           rows: list[list[int]] | None = None) -> dict[str, torch.Tensor]:
    """Right-padded input ids and attention mask for a batch of (prompt, completion) pairs (or their ``rows`` of
    ids). Texts longer than ``max_length`` keep their end (where the answer is)."""
    rows = [ids[-max_length:] if max_length else ids
            for ids in (rows if rows is not None else token_rows(tokenizer, prompts, completions))]
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
        self.model, self.tokenizer = load_reward_model(model, tokenizer, dtype, trust_remote_code, trained=True)
        self.model.requires_grad_(False).eval()
        if device is not None:
            self.model.to(device)
        self.batch_size = batch_size
        # Longer inputs than the model's positions would index past its position table (or leave its trained
        # range): keep their end, where the completion is, with a warning (``encode``).
        positions = getattr(self.model.config.get_text_config(), "max_position_embeddings", None)
        self.max_length = min(filter(None, (max_length, positions)), default=None)
        self.normalize = normalize
        self.warned = False
        self.__name__ = f"reward_model:{os.path.basename(os.path.normpath(source))}"

    @property
    def device(self):
        return next(self.model.parameters()).device

    @torch.no_grad()
    def __call__(self, prompts, completions, **kwargs) -> list[float]:
        scores = []
        for start in range(0, len(completions), self.batch_size):
            rows = token_rows(self.tokenizer, prompts[start:start + self.batch_size],
                              completions[start:start + self.batch_size])
            too_long = sum(len(ids) > self.max_length for ids in rows) if self.max_length else 0
            if too_long and not self.warned:
                logger.warning("%s: %d input(s) are longer than its context of %d tokens; their beginnings are cut "
                               "(the end of each completion is kept). Shorten max_prompt_length + max_new_tokens, or "
                               "use a reward model with a longer context.", self.__name__, too_long, self.max_length)
                self.warned = True
            scores += sequence_scores(self.model, **encode(self.tokenizer, None, None, self.max_length, self.device,
                                                           rows=rows)).tolist()
        return scores

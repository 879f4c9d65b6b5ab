"""Prompts: which ones each step uses, how they become token ids, and what reward functions see.

The order of prompts is a pure function of (seed, step): a per-epoch permutation of the dataset,
cut into steps of ``prompts_per_step`` and then into one contiguous slice per process. No loader
state exists, so resuming at step k only needs k, and every process agrees on the order.
"""

import logging
from collections.abc import Sequence

import torch
from datasets import Dataset
from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)


def as_dataset(data, name: str = "train_dataset") -> Dataset:
    """A datasets.Dataset from a Dataset or a list of dicts, with a ``prompt`` column checked."""
    if isinstance(data, list):
        data = Dataset.from_list(data)
    if not isinstance(data, Dataset):
        raise TypeError(f"{name} must be a datasets.Dataset or a list of dicts, got {type(data).__name__}.")
    if "prompt" not in data.column_names:
        raise ValueError(
            f"{name} has no 'prompt' column (columns: {data.column_names}); rename the column that holds "
            "the prompts, e.g. dataset.rename_column('question', 'prompt')."
        )
    if len(data) == 0:
        raise ValueError(f"{name} is empty.")
    return data


def is_conversational(prompt) -> bool:
    """A prompt is conversational when it is a list of {"role": ..., "content": ...} messages."""
    return isinstance(prompt, list) and all(isinstance(m, dict) and "role" in m for m in prompt)


class PromptSampler:
    """Indices of the prompts that ``process_index`` uses at ``step``."""

    def __init__(self, dataset_size: int, prompts_per_step: int, seed: int, num_processes: int = 1,
                 process_index: int = 0, shuffle: bool = True):
        self.dataset_size = dataset_size
        self.prompts_per_step = prompts_per_step
        self.seed = seed
        self.num_processes = num_processes
        self.process_index = process_index
        self.shuffle = shuffle
        self._epoch, self._order = None, None

    def _epoch_order(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            if self.shuffle:
                generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
                self._order = torch.randperm(self.dataset_size, generator=generator)
            else:
                self._order = torch.arange(self.dataset_size)
            self._epoch = epoch
        return self._order

    def global_indices(self, step: int) -> list[int]:
        """All processes' prompts at ``step``, in process order."""
        start = step * self.prompts_per_step
        out = []
        for position in range(start, start + self.prompts_per_step):
            epoch, offset = divmod(position, self.dataset_size)
            out.append(int(self._epoch_order(epoch)[offset]))
        return out

    def indices(self, step: int) -> list[int]:
        per_process = self.prompts_per_step // self.num_processes
        start = self.process_index * per_process
        return self.global_indices(step)[start : start + per_process]


def render_prompts(prompts: Sequence, tokenizer: PreTrainedTokenizerBase) -> tuple[list[str], bool]:
    """Prompt texts, applying the chat template to conversational prompts. Returns (texts, is_chat)."""
    chat = [is_conversational(p) for p in prompts]
    if any(chat) and not all(chat):
        raise ValueError("A batch mixes plain-string prompts and chat-message prompts; use one kind per dataset.")
    if not any(chat):
        for i, p in enumerate(prompts):
            if not isinstance(p, str):
                raise TypeError(f"prompt {i} is a {type(p).__name__}; prompts must be strings or lists of messages.")
        return list(prompts), False
    if tokenizer.chat_template is None:
        raise ValueError(
            "The prompts are chat messages but the tokenizer has no chat template; set "
            "tokenizer.chat_template, or give plain-string prompts."
        )
    texts = [tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=False) for p in prompts]
    return texts, True


def tokenize_prompts(
    texts: list[str],
    tokenizer: PreTrainedTokenizerBase,
    is_chat: bool,
    max_length: int | None = None,
    truncate: bool = False,
) -> list[list[int]]:
    """Token ids per prompt. A chat template already holds its special tokens, so none are added.

    Prompts longer than ``max_length`` raise an error naming the sample, or with ``truncate`` keep
    their last ``max_length`` tokens (the end of a prompt is what the completion continues).
    """
    ids = tokenizer(texts, add_special_tokens=not is_chat)["input_ids"]
    if max_length is None:
        return ids
    for i, row in enumerate(ids):
        if len(row) > max_length:
            if not truncate:
                raise ValueError(
                    f"prompt {i} has {len(row)} tokens, more than max_prompt_length={max_length} "
                    f"(starts {texts[i][:60]!r}); raise max_prompt_length, or set truncate_prompts=True "
                    "to keep its last tokens."
                )
            ids[i] = row[-max_length:]  # the trainer warned about these prompts at construction
    return ids


def left_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad to the longest sequence. Returns (ids, mask), both [B, L]."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, s in enumerate(sequences):
        if s:
            ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
            mask[i, width - len(s):] = 1
    return ids, mask


def check_prompts(dataset: Dataset, name: str, tokenizer: PreTrainedTokenizerBase, max_prompt_length: int | None,
                  truncate: bool = False, render=render_prompts) -> None:
    """Before any training: chat prompts need a chat template, and no prompt may exceed ``max_prompt_length``
    (unless ``truncate``, which keeps each prompt's end, with a warning). ``render`` makes the prompt texts (with
    tools, ``rlhf.agent.AgentLoop.render_prompts``)."""
    render(dataset[:1]["prompt"], tokenizer)  # raises on chat prompts without a template
    if max_prompt_length is None:
        return
    too_long = []
    for start in range(0, len(dataset), 1024):
        texts, is_chat = render(dataset[start:start + 1024]["prompt"], tokenizer)
        lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=not is_chat)["input_ids"]]
        too_long += [(start + i, n) for i, n in enumerate(lengths) if n > max_prompt_length]
    if not too_long:
        return
    examples = ", ".join(f"#{i} ({n} tokens)" for i, n in too_long[:5])
    if not truncate:
        raise ValueError(
            f"{len(too_long)} prompt(s) of {name} are longer than max_prompt_length={max_prompt_length}: {examples}. "
            "Raise max_prompt_length, filter those prompts out, or set truncate_prompts=True to keep their last tokens."
        )
    logger.warning("%d prompt(s) of %s are longer than max_prompt_length=%d (%s); their beginnings will be cut.",
                   len(too_long), name, max_prompt_length, examples)

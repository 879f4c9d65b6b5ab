"""Prompts: which ones each step uses, how they become token ids, and what reward functions see.

The order of prompts is a pure function of (seed, step): a per-epoch permutation of the dataset,
cut into steps of ``prompts_per_step`` and then into one contiguous slice per process. No loader
state exists, so resuming at step k only needs k, and every process agrees on the order. The refill
rounds of dynamic sampling draw their prompts as a pure function of (seed, step, round). A streamed
``IterableDataset`` is read in its own order (shuffle it with ``dataset.shuffle(seed=...)`` if it should be),
step k taking rows k x prompts_per_step onwards; every process reads the stream and keeps its slice.
"""

import hashlib
import itertools
import logging
from collections.abc import Sequence

import pyarrow
import torch
from datasets import Dataset, IterableDataset
from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)


def as_dataset(data, name: str = "train_dataset", streaming: bool = False) -> Dataset | IterableDataset:
    """A datasets.Dataset from a Dataset or a list of dicts, with a ``prompt`` column checked; with ``streaming``
    an IterableDataset is accepted too."""
    if isinstance(data, list):
        data = _from_rows(data, name)
    if streaming and isinstance(data, IterableDataset):
        first = next(iter(data), None)
        if first is None:
            raise ValueError(f"{name} is empty.")
        if "prompt" not in first:
            raise ValueError(f"{name} has no 'prompt' column (columns: {list(first)}); rename the column that holds "
                             "the prompts, e.g. dataset.rename_column('question', 'prompt').")
        return data
    if not isinstance(data, Dataset):
        kinds = "a datasets.Dataset, an IterableDataset" if streaming else "a datasets.Dataset"
        raise TypeError(f"{name} must be {kinds} or a list of dicts, got {type(data).__name__}.")
    if "prompt" not in data.column_names:
        raise ValueError(
            f"{name} has no 'prompt' column (columns: {data.column_names}); rename the column that holds "
            "the prompts, e.g. dataset.rename_column('question', 'prompt')."
        )
    if len(data) == 0:
        raise ValueError(f"{name} is empty.")
    return data


def _kind(value) -> str:
    return ("number" if isinstance(value, (int, float)) and not isinstance(value, bool) else
            "list" if isinstance(value, tuple) else type(value).__name__)


def _from_rows(rows: list, name: str) -> Dataset:
    """``Dataset.from_list``, with Arrow's error for a column whose rows differ in kind (strings in some, chat messages
    in others) named by the column, the rows and the kinds."""
    try:
        return Dataset.from_list(rows)
    except (pyarrow.ArrowInvalid, pyarrow.ArrowTypeError) as error:
        first: dict[str, tuple[int, str]] = {}
        for i, row in enumerate(rows):
            for column, value in (row.items() if isinstance(row, dict) else ()):
                if value is None:
                    continue
                j, kind = first.setdefault(column, (i, _kind(value)))
                if _kind(value) != kind:
                    raise ValueError(f"{name}: column {column!r} of row {i} is a {_kind(value)}, but of row {j} a "
                                     f"{kind}; give every row the same kind (e.g. prompts: all strings, or all lists of "
                                     "chat messages).") from error
        raise ValueError(f"{name}: the rows do not make a dataset ({error}).") from error


# Roles a chat message may have (those of the common chat templates).
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool", "function", "ipython")


def _prompt_problem(prompt) -> str | None:
    """Why ``prompt`` is neither a string nor a list of well-formed chat messages (None when it is one)."""
    if isinstance(prompt, str):
        return None
    if not isinstance(prompt, list):
        return f"is a {type(prompt).__name__} ({str(prompt)[:60]!r}), not a string or a list of chat messages"
    if not prompt:
        return "is an empty list of messages"
    for j, message in enumerate(prompt):
        if not isinstance(message, dict):
            return f"message {j} is a {type(message).__name__}, not a {{'role': ..., 'content': ...}} mapping"
        role, content = message.get("role"), message.get("content")
        if role not in CHAT_ROLES:
            return f"message {j} has role {role!r}; use one of {list(CHAT_ROLES)}"
        if content is None:
            return f"message {j} ({role}) has {'no content' if 'content' not in message else 'content None'}"
        if not isinstance(content, (str, list)):
            return f"message {j} ({role}) has content of type {type(content).__name__}; give a string"
    return None


def check_rows(dataset: Dataset, name: str) -> None:
    """Every prompt of ``dataset`` is a string, or a list of chat messages with a known role and content, and all
    are of one kind. Errors name the dataset, the row and the fix."""
    problems, kinds = [], {}
    for start in range(0, len(dataset), 1024):
        for i, prompt in enumerate(dataset[start:start + 1024]["prompt"], start):
            problem = _prompt_problem(prompt)
            if problem:
                problems.append(f"row {i}: the prompt {problem}")
            else:
                kinds.setdefault("chat messages" if isinstance(prompt, list) else "strings", i)
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise ValueError(f"{name} has {len(problems)} bad prompt(s): " + "; ".join(problems[:5]) + more
                         + ". Fix or drop those rows: a prompt is a string, or a list of {'role', 'content'} messages.")
    if len(kinds) > 1:
        raise ValueError(f"{name} mixes prompt kinds: row {kinds['strings']} is a string, row {kinds['chat messages']} "
                         "is a list of chat messages; use one kind for the whole dataset.")


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
        if dataset_size < prompts_per_step:
            logger.warning("The training dataset has %d prompt(s), fewer than prompts_per_step=%d: every step uses "
                           "some prompts more than once.", dataset_size, prompts_per_step)

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

    def refill_indices(self, step: int, round_index: int) -> list[int]:
        """All processes' prompts for refill round ``round_index`` >= 1 of ``step`` (dynamic sampling), in process
        order. Each draw is a prompt the step has used least so far (round 0 and the earlier refills counted), ties
        broken by one random order of the dataset per step: no prompt repeats within a step while the dataset has
        one the step has not used; past that, prompts repeat as evenly as they can. A pure function of (seed, step,
        round), so the epoch order of later steps does not depend on how many rounds earlier steps needed."""
        key = hashlib.sha256(f"{self.seed}/{step}/refill".encode()).digest()
        generator = torch.Generator().manual_seed(int.from_bytes(key[:8], "little") >> 1)
        order = torch.randperm(self.dataset_size, generator=generator)
        used = torch.bincount(torch.tensor(self.global_indices(step)), minlength=self.dataset_size)[order]
        # Least used first, draw after draw: level L = 0, 1, ... lists, in `order`, the prompts that round 0 used at
        # most L times; each has then been used exactly L times, and every other prompt more.
        end = round_index * self.prompts_per_step
        draws, level = [], 0
        while len(draws) < end:
            draws += order[used <= level][: end - len(draws)].tolist()
            level += 1
        return draws[end - self.prompts_per_step:]

    def indices(self, step: int, round_index: int = 0) -> list[int]:
        """This process's prompts at ``step``: the epoch order in round 0, a refill draw in later rounds."""
        per_process = self.prompts_per_step // self.num_processes
        start = self.process_index * per_process
        prompts = self.global_indices(step) if round_index == 0 else self.refill_indices(step, round_index)
        return prompts[start : start + per_process]

    def rows(self, dataset: Dataset, step: int, round_index: int = 0) -> dict[str, list]:
        """This process's prompts at ``step`` (in refill round ``round_index``), as columns."""
        return dataset[self.indices(step, round_index)]


class StreamSampler:
    """The prompts of each step from an IterableDataset, in the stream's order, over as many passes as the run
    needs (``set_epoch`` before each, so a shuffled stream reshuffles). Reading step k after any other step
    restarts the stream and skips to it: resuming at step k only needs k."""

    def __init__(self, prompts_per_step: int, num_processes: int = 1, process_index: int = 0):
        self.prompts_per_step = prompts_per_step
        self.num_processes = num_processes
        self.process_index = process_index
        self._stream, self._next_step = None, None

    @staticmethod
    def _passes(dataset: IterableDataset):
        for epoch in itertools.count():
            if hasattr(dataset, "set_epoch"):
                dataset.set_epoch(epoch)
            yield from dataset

    def rows(self, dataset: IterableDataset, step: int, round_index: int = 0) -> dict[str, list]:
        if round_index:  # the trainer refuses dynamic sampling's refill on a stream at construction
            raise ValueError("a streamed dataset has no refill rounds (max_sampling_rounds=1).")
        if self._stream is None or self._next_step != step:
            self._stream = itertools.islice(self._passes(dataset), step * self.prompts_per_step, None)
        batch = list(itertools.islice(self._stream, self.prompts_per_step))
        self._next_step = step + 1
        per_process = self.prompts_per_step // self.num_processes
        mine = batch[self.process_index * per_process:(self.process_index + 1) * per_process]
        return {key: [row[key] for row in mine] for key in mine[0]}


def dataset_columns(dataset: Dataset | IterableDataset) -> list[str]:
    """The column names of a dataset (of a stream: those of its first row)."""
    if isinstance(dataset, IterableDataset):
        return list(next(iter(dataset)))
    return list(dataset.column_names)


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


_VOCAB_FIX = ("The tokenizer does not fit the model: pass the model's own tokenizer (processing_class), or grow the "
              "embedding first: model.resize_token_embeddings(len(tokenizer)) (the new rows start untrained).")


def check_prompts(dataset: Dataset, name: str, tokenizer: PreTrainedTokenizerBase, max_prompt_length: int | None,
                  truncate: bool = False, render=render_prompts, vocab_size: int | None = None,
                  schemas_of=None) -> int:
    """Before any training, every row: each prompt well-formed (``check_rows``), chat prompts need a chat template,
    every prompt has at least one token, each below ``vocab_size`` (the model's embedding rows), and none may exceed
    ``max_prompt_length`` (unless ``truncate``, which keeps each prompt's end, with a warning). Of a stream, the first
    1024 rows are checked here; every later prompt when its step tokenises it. ``render`` makes the prompt texts (with
    tools, ``rlhf.agent.AgentLoop.render_prompts``); ``schemas_of(rows)``, when given, the tools each row is shown
    (``AgentLoop.row_schemas``). Returns the longest prompt's tokens (after truncation)."""
    if isinstance(dataset, IterableDataset):
        dataset = Dataset.from_list(list(itertools.islice(dataset, 1024)))
    check_rows(dataset, name)
    render(dataset[:1]["prompt"], tokenizer)  # raises on chat prompts without a template
    if vocab_size is not None and tokenizer.pad_token_id >= vocab_size:
        raise ValueError(f"The tokenizer's pad token {tokenizer.pad_token!r} has id {tokenizer.pad_token_id}, past the "
                         f"model's input embedding ({vocab_size} rows); padding is embedded too. {_VOCAB_FIX}")
    lengths = []
    for start in range(0, len(dataset), 1024):
        batch = dataset[start:start + 1024]
        schemas = schemas_of(batch) if schemas_of is not None else None
        texts, is_chat = render(batch["prompt"], tokenizer, **({"schemas": schemas} if schemas is not None else {}))
        chunk = tokenizer(texts, add_special_tokens=not is_chat)["input_ids"]
        lengths += [len(ids) for ids in chunk]
        for i, ids in enumerate(chunk, start):  # each a reshape or an IndexError in the middle of step 1
            if not ids:
                raise ValueError(f"{name} row {i}: the prompt {dataset[i]['prompt']!r} has no tokens (the tokenizer "
                                 "adds no BOS token); drop the row, or give it text.")
            if vocab_size is not None and max(ids) >= vocab_size:
                raise ValueError(f"{name} row {i}: the prompt {texts[i - start][:60]!r} has token id {max(ids)} "
                                 f"({tokenizer.convert_ids_to_tokens(max(ids))!r}), past the model's input embedding "
                                 f"({vocab_size} rows). {_VOCAB_FIX}")
    longest = max(lengths)
    too_long = [(i, n) for i, n in enumerate(lengths) if max_prompt_length is not None and n > max_prompt_length]
    if not too_long:
        return longest
    examples = ", ".join(f"#{i} ({n} tokens)" for i, n in too_long[:5])
    if not truncate:
        raise ValueError(
            f"{len(too_long)} prompt(s) of {name} are longer than max_prompt_length={max_prompt_length}: {examples}. "
            "Raise max_prompt_length, filter those prompts out, or set truncate_prompts=True to keep their last tokens."
        )
    logger.warning("%d prompt(s) of %s are longer than max_prompt_length=%d (%s); their beginnings will be cut.",
                   len(too_long), name, max_prompt_length, examples)
    return max_prompt_length

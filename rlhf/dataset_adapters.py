"""Datasets from wherever they live, mapped to what the trainers read.

A recipe names a dataset (a hub id, a local directory, a JSONL / JSON / Parquet / CSV file, or a
``module:function`` that returns one) and declares, in a small mapping, how its columns become the
``prompt`` column and the columns reward functions need. For GSM8K::

    dataset_mapping:
      prompt: question              # the column "question", renamed
      answer: answer|gsm8k_answer   # the number after "####" in the column "answer"

Each value is ``source_column`` or ``source_column|transform``; a transform is one of
:data:`TRANSFORMS` or a ``module:function`` import path. Columns the mapping does not name are kept.
Prompts can then be wrapped in a template, and turned into chat messages (with an optional system
prompt) so the model's chat template applies.
"""

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import datasets
from datasets import Dataset

from rlhf.imports import import_object

DATA_FILE_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


def gsm8k_answer(text: str) -> str:
    """The final answer of a GSM8K solution: what follows the last ``####``, without thousands separators.

    >>> gsm8k_answer("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\\n#### 1,072")
    '1072'
    """
    if "####" not in text:
        raise ValueError("no '####' marks the final answer")
    answer = text.rsplit("####", 1)[1].strip().replace(",", "")
    if not answer:
        raise ValueError("nothing follows '####'")
    return answer


def boxed_answer(text: str) -> str:
    r"""The content of the last ``\boxed{...}`` (nested braces allowed), as in MATH solutions.

    >>> boxed_answer(r"so the answer is $\boxed{\frac{1}{2}}$.")
    '\\frac{1}{2}'
    """
    from rlhf.answers import boxed

    found = boxed(text)
    if found is None:
        raise ValueError(r"no \boxed{...} answer")
    return found


def last_number(text: str) -> str:
    """The last number in the text, as written (thousands separators removed).

    >>> last_number("She has 3 apples and buys 1,200 more.")
    '1200'
    """
    from rlhf.answers import last_number_text

    found = last_number_text(text)
    if found is None:
        raise ValueError("no number")
    return found.replace(",", "")


TRANSFORMS: dict[str, Callable[[str], object]] = {
    "gsm8k_answer": gsm8k_answer,
    "boxed": boxed_answer,
    "last_number": last_number,
    "strip": str.strip,
}


def _transform(name: str) -> Callable:
    if name in TRANSFORMS:
        return TRANSFORMS[name]
    if ":" in name:
        return import_object(name)
    raise ValueError(f"unknown transform {name!r}; use one of {sorted(TRANSFORMS)} or a module:function path.")


def parse_mapping(mapping: dict[str, str] | None) -> dict[str, tuple[str, str | None]]:
    """``{target: "source" | "source|transform"}`` -> ``{target: (source, transform name or None)}``."""
    parsed = {}
    for target, spec in (mapping or {}).items():
        if not isinstance(spec, str) or not spec.strip():
            raise ValueError(f"dataset_mapping[{target!r}]={spec!r} must be 'column' or 'column|transform'.")
        source, _, transform = (part.strip() for part in spec.partition("|"))
        if transform:
            _transform(transform)  # fail now on an unknown name, not on the first row
        parsed[target] = (source, transform or None)
    return parsed


def load_dataset_spec(spec: str, split: str = "train", config_name: str | None = None) -> Dataset:
    """A ``datasets.Dataset`` from a data file, a ``save_to_disk`` directory, a directory of data files
    (e.g. a downloaded hub repository), a hub id, or ``module:function``."""
    if ":" in spec and not os.path.exists(spec):
        return import_object(spec)()
    extension = os.path.splitext(spec)[1].lower()
    if extension in DATA_FILE_FORMATS and not os.path.exists(spec):  # not a hub id: never looked up there
        raise FileNotFoundError(f"data file {spec!r} does not exist ({os.path.abspath(spec)}); fix the path in "
                                "dataset_name / eval_dataset_name.")
    if os.path.isfile(spec):
        if extension not in DATA_FILE_FORMATS:
            raise ValueError(f"{spec}: unsupported data file type {extension!r}; use one of {sorted(DATA_FILE_FORMATS)}.")
        check_data_file(spec)
        try:
            return datasets.load_dataset(DATA_FILE_FORMATS[extension], data_files=spec, split="train")
        except Exception as error:  # noqa: BLE001 - the loader's errors do not name the file
            cause = error.__cause__ or error.__context__ or error
            raise ValueError(f"cannot read {spec} as {DATA_FILE_FORMATS[extension]}: {type(cause).__name__}: "
                             f"{str(cause)[:300]}") from error
    if os.path.isdir(spec) and os.path.exists(os.path.join(spec, "dataset_info.json")):
        loaded = datasets.load_from_disk(spec)
        return loaded[split] if isinstance(loaded, datasets.DatasetDict) else loaded
    # A hub id, or a local directory of data files (the hub's layout, read without the network).
    return datasets.load_dataset(spec, config_name, split=split)


def check_data_file(path: str) -> None:
    """A data file holds rows, in UTF-8, and (JSON lines) one JSON object per line; errors name the file and the
    line. Parquet is binary and checked by its reader."""
    extension = os.path.splitext(path)[1].lower()
    if os.path.getsize(path) == 0:
        raise ValueError(f"{path} is empty: a data file needs at least one row.")
    if extension == ".parquet":
        return
    if extension == ".json" and _whole_json(path):
        return
    rows = 0
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise ValueError(f"{path}, line {number}: not UTF-8 (byte {raw[error.start]:#04x} at column "
                                 f"{error.start + 1}); save the file as UTF-8.") from None
            if not line.strip() or extension == ".csv":
                rows += bool(line.strip())
                continue
            try:
                row = json.loads(line.rstrip("\r\n"))
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}, line {number}: not valid JSON ({error.msg} at column {error.colno}): "
                                 f"{line.strip()[:80]!r}. A JSON-lines file holds one JSON object per line.") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}, line {number}: a {type(row).__name__}, not a JSON object; each line is one "
                                 'row, e.g. {"prompt": "..."}.')
            rows += 1
    if rows <= (1 if extension == ".csv" else 0):
        raise ValueError(f"{path} has no rows" + (" (only a header line)." if rows else "."))


def _whole_json(path: str) -> bool:
    """Whether ``path`` is one JSON document with rows (a list of objects, or an object of columns). False for
    anything else, which is then checked as JSON lines."""
    try:
        with open(path, encoding="utf-8") as f:
            document = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return False
    if document in ([], {}):
        raise ValueError(f"{path} holds an empty JSON {type(document).__name__}: no rows.")
    return isinstance(document, (list, dict))


def prepare_dataset(
    dataset: Dataset,
    mapping: dict[str, str] | None = None,
    prompt_template: str | None = None,
    system_prompt: str | None = None,
    conversational: bool = False,
    max_samples: int | None = None,
    name: str = "dataset",
    require_prompt: bool = True,
) -> Dataset:
    """Apply the column ``mapping``, then ``prompt_template`` (``str.format`` over the mapped row, e.g.
    ``"{prompt}\\nGive the final answer after ####."``), then wrap each prompt as chat messages
    (``system_prompt`` first) when ``conversational``. Keeps the first ``max_samples`` rows. Preference
    data (``require_prompt=False``) may have no prompt column.

    Errors name the field, the row and the column, and say how to fix them.
    """
    parsed = parse_mapping(mapping)
    missing = sorted({source for source, _ in parsed.values()} - set(dataset.column_names))
    if missing:
        raise ValueError(f"dataset_mapping of {name} reads column(s) {missing}, which it lacks "
                         f"(columns: {dataset.column_names}); fix the source names in dataset_mapping.")
    if system_prompt is not None and not conversational:
        raise ValueError("system_prompt needs conversational: true (a system prompt is a chat message); set it, "
                         "or put the instruction in prompt_template.")
    if max_samples is not None:
        if max_samples < 1:
            raise ValueError(f"max samples of {name} = {max_samples} must be >= 1 (or None for all rows).")
        dataset = dataset.select(range(min(max_samples, len(dataset))))
    transforms = {target: (source, _transform(t) if t else None) for target, (source, t) in parsed.items()}
    if not transforms and prompt_template is None and not conversational:
        return dataset

    def convert(row: dict, index: int) -> dict:
        out = dict(row)
        for target, (source, transform) in transforms.items():
            value = row[source]
            if transform is not None:
                try:
                    value = transform(value)
                except Exception as error:
                    raise ValueError(f"{name} row {index}: cannot map column {source!r} to {target!r} "
                                     f"({error}); the value is {str(value)[:120]!r}.") from None
            out[target] = value
        if "prompt" not in out:
            if not require_prompt:
                return out
            raise ValueError(f"{name} has no 'prompt' column after dataset_mapping (columns: {sorted(out)}); "
                             "map one, e.g. dataset_mapping: {prompt: question}.")
        if prompt_template is not None:
            try:
                out["prompt"] = prompt_template.format(**out)
            except (KeyError, IndexError) as error:
                raise ValueError(f"prompt_template names {error} which {name} row {index} lacks "
                                 f"(columns: {sorted(out)}).") from None
        if conversational and isinstance(out["prompt"], str):
            messages = [{"role": "system", "content": system_prompt}] if system_prompt is not None else []
            out["prompt"] = messages + [{"role": "user", "content": out["prompt"]}]
        return out

    return dataset.map(convert, with_indices=True, load_from_cache_file=False, keep_in_memory=True,
                       desc=f"mapping {name}")


@dataclass
class DataArguments:
    """Where a recipe's data comes from and how its columns map to what the trainer reads."""

    dataset_name: str = ""
    """Training data: a hub id, a local directory (saved with save_to_disk, or holding data files), a
    .jsonl/.json/.parquet/.csv file, or "package.module:function" returning a datasets.Dataset."""
    dataset_config: str | None = None
    """Configuration name of a hub dataset, e.g. "main" for openai/gsm8k (used for the eval dataset too)."""
    dataset_split: str = "train"
    """Split to use when the dataset is a hub id or a directory."""
    eval_dataset_name: str | None = None
    """Evaluation data, in any form ``dataset_name`` accepts (None: no evaluation)."""
    eval_dataset_split: str = "test"
    """Split to use for the evaluation dataset."""
    dataset_mapping: dict[str, str] = field(default_factory=dict)
    """Columns to create, as {target: "source"} or {target: "source|transform"}; transforms: gsm8k_answer (the
    number after ####), boxed, last_number, strip, or a module:function. E.g. {prompt: question,
    answer: "answer|gsm8k_answer"}. Other columns are kept as they are."""
    max_train_samples: int | None = None
    """Use only the first N training rows (None: all)."""
    max_eval_samples: int | None = None
    """Use only the first N evaluation rows (None: all)."""

    def load_datasets(self, **prompt_options):
        """(train, eval or None), loaded and mapped; ``prompt_options`` go to ``prepare_dataset``."""
        train = self._load(self.dataset_name, self.dataset_split, self.max_train_samples, "train_dataset",
                           prompt_options)
        return train, (self.load_eval_dataset(**prompt_options) if self.eval_dataset_name else None)

    def load_eval_dataset(self, **prompt_options):
        """The evaluation dataset, loaded and mapped."""
        return self._load(self.eval_dataset_name, self.eval_dataset_split, self.max_eval_samples, "eval_dataset",
                          prompt_options)

    def _load(self, spec: str, split: str, max_samples: int | None, name: str, prompt_options: dict):
        return prepare_dataset(load_dataset_spec(spec, split, self.dataset_config), self.dataset_mapping,
                               max_samples=max_samples, name=name, **prompt_options)

"""The TRL documentation cannot call unsupported what the configs accept: every row of the generated TRL table
(README.md or docs/, wherever it is written) that says "only ..." or "not supported", and every name the "Coming from
TRL" prose lists as not supported, is tried in a config and must be refused (or must not be a config field)."""

import dataclasses
import glob
import os
import re

import pytest

from rlhf import GRPOConfig, PPOConfig, ReinforceConfig, RLOOConfig
from rlhf.trl_names import ConfigNameError
from rlhf.trl_table import TRL_TYPES

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FIELDS = {f.name for cls in (GRPOConfig, PPOConfig, ReinforceConfig, RLOOConfig) for f in dataclasses.fields(cls)}
LIMITED = re.compile(r"not supported|unsupported|^only ", re.IGNORECASE)
# A value of TRL's type for the name, other than the one value it may have here.
OTHER = {bool | None: True, int | None: 3, float | None: 0.5, dict[str, object] | str | None: {"key": 1},
         list[str] | None: ["x"], str: "other"}


def documents() -> list[str]:
    return [path for path in [os.path.join(ROOT, "README.md"), *sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))]
            if "trl" in os.path.basename(path).lower() or path.endswith("README.md")]


def table_rows() -> list[tuple[list[str], str]]:
    """(TRL names, what they become) of every row of the generated TRL table, wherever it is written."""
    texts = [open(path).read() for path in documents()]
    table = [text for text in texts if "| TRL name | here |" in text]
    assert table, "no file holds the generated TRL table (| TRL name | here |)"
    rows = []
    for line in table[0].split("| TRL name | here |", 1)[1].splitlines()[2:]:
        if not line.startswith("|"):
            break
        names, becomes = line.strip("|").split(" | ", 1)
        rows.append((re.findall(r"`([^`]+)`", names), becomes.strip(" |")))
    return rows


def limited_rows():
    return [(name, becomes) for names, becomes in table_rows() for name in names if LIMITED.search(becomes)]


def other_value(name: str, becomes: str):
    """A value the row says is not taken: the opposite of a true/false default, else a value of TRL's type."""
    allowed = becomes.split(":", 1)[0] if becomes.startswith("only ") else ""
    if "False" in allowed or "True" in allowed:
        return "True" not in allowed
    if re.search(r"\d", allowed):
        return 0.5
    if "'" in allowed:
        return "other"
    return OTHER[TRL_TYPES.get(name, str)]


@pytest.mark.parametrize("name, becomes", limited_rows(), ids=lambda v: v if "`" not in v and len(v) < 40 else None)
def test_table_rows_marked_unsupported_are_refused(name, becomes):
    assert name not in FIELDS, f"{name}: the table says {becomes!r}, but it is a config field"
    if becomes.startswith("only "):
        value = other_value(name, becomes)
        with pytest.raises(ConfigNameError, match=name):
            GRPOConfig(**{name: value})


def test_prose_lists_as_unsupported_only_what_is_refused():
    checked = 0
    for path in documents():
        for paragraph in open(path).read().split("\n\n"):
            if "| TRL name |" in paragraph or not re.search(r"not supported|unsupported", paragraph, re.IGNORECASE):
                continue
            tail = re.split(r"not supported|unsupported", paragraph, maxsplit=1, flags=re.IGNORECASE)[1]
            for token in re.findall(r"`([^`]+)`", tail):
                name, _, value = (part.strip() for part in token.partition(":"))
                if value:  # `save_strategy: epoch`: that setting is refused
                    with pytest.raises(ConfigNameError):
                        GRPOConfig(**{name: value})
                else:  # a bare name: not a field, and not a loss type we take
                    assert name not in FIELDS, f"{path}: {name} is called unsupported but is a config field"
                    with pytest.raises(ConfigNameError):
                        GRPOConfig(loss_type=name)
                checked += 1
    assert checked

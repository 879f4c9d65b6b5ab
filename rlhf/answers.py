"""Reading answers out of text: the last number, the last \\boxed{...}, the text of a completion. Shared by
the dataset transforms (``rlhf.dataset_adapters``) and the rule rewards (``reward_models.rules``)."""

import re

NUMBER_PATTERN = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def completion_text(completion) -> str:
    """The text of a completion: the string itself, or the content of the last chat message."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        return str(completion[-1].get("content", ""))
    return str(completion)


def to_number(text: str) -> float | None:
    try:
        return float(text.replace(",", "").strip())
    except ValueError:
        return None


def last_number_text(text: str) -> str | None:
    """The last number in ``text`` as written (thousands separators included), or None.

    >>> last_number_text("3 apples and 1,250.5 pears")
    '1,250.5'
    """
    found = NUMBER_PATTERN.findall(text)
    return found[-1] if found else None


def last_number(text: str) -> float | None:
    """The last number in ``text`` (thousands separators allowed), or None.

    >>> last_number("3 apples and 1,250.5 pears")
    1250.5
    >>> last_number("no digits here") is None
    True
    """
    found = last_number_text(text)
    return to_number(found) if found is not None else None


def boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` (nested braces allowed), or None.

    >>> boxed(r"so \\boxed{\\frac{1}{2}} it is")
    '\\\\frac{1}{2}'
    >>> boxed("no box") is None
    True
    """
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 0, start + len("\\boxed{")
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            if depth == 0:
                return text[i:j].strip()
            depth -= 1
    return None  # unbalanced

"""What a run shows on the console: one line per logging step with the main numbers and what reward functions gave
``log_metric``, one per evaluation, and (with ``log_completions``) a table of sampled training completions with their
rewards. Lines go through the progress bar's ``write`` when there is one, so the bar stays whole; without a bar they
are printed. The table uses ``rich`` when it is installed, plain text otherwise."""

import io
import json
import math
import sys

from rlhf.trl_metrics import is_trainer_metric

# (label, metric key, format) of the training line, in order; a metric the run does not log is left out.
TRAIN_FIELDS = (("reward", "reward/mean", ".3f"), ("±", "reward/std", ".3f"), ("kl", "kl", ".4f"),
                ("entropy", "entropy", ".3f"), ("length", "completions/mean_length", ".1f"),
                ("truncated", "completions/truncated_frac", ".2f"), ("clip", "clip/high_frac", ".3f"),
                ("loss", "loss/policy", ".4f"), ("grad", "grad_norm", ".3f"), ("lr", "learning_rate", ".2e"))
EVAL_FIELDS = (("reward", "eval/reward_mean", ".3f"), ("accuracy", "eval/accuracy", ".3f"),
               ("length", "eval/mean_length", ".1f"))
MAX_CELL = 200


def _number(value, spec: str) -> str | None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        return None
    return format(value, spec)


def logged_metrics(record: dict, kind: str = "train") -> list[str]:
    """``name value`` of each metric in ``record`` the trainer does not log itself: what reward functions gave
    ``log_metric`` (``eval/<name>`` in an evaluation), in the record's order."""
    parts = []
    for key, value in record.items():
        if not is_trainer_metric(key, kind) and (shown := _number(value, ".4g")) is not None:
            parts.append(f"{key.removeprefix('eval/') if kind == 'eval' else key} {shown}")
    return parts


def train_line(step: int, max_steps: int, record: dict, reward_names: list[str]) -> str:
    """``step 10/100 | reward 0.531 ± 0.210 | correct 0.45 | kl 0.0021 | ... | answer_rate 0.25 | 3.2 s/step``: the
    main numbers, then what reward functions gave ``log_metric``."""
    parts = [f"step {step}/{max_steps}"]
    for label, key, spec in TRAIN_FIELDS:
        shown = _number(record.get(key), spec)
        if shown is not None and label == "±":
            parts[-1] += f" ± {shown}"
        elif shown is not None:
            parts.append(f"{label} {shown}")
        if key == "reward/std" and len(reward_names) > 1:  # each function's mean after the total
            parts += [f"{name} {value}" for name in reward_names
                      if (value := _number(record.get(f"reward/{name}/mean"), ".3f")) is not None]
    parts += logged_metrics(record)
    seconds = _number(record.get("time/step"), ".2f")
    if seconds is not None:
        parts.append(f"{seconds} s/step")
    return " | ".join(parts)


def eval_line(step: int, record: dict) -> str:
    """``eval @ step 25 | reward 0.400 | accuracy 0.420 | pass@8 0.700 | length 5.1``, then what reward functions gave
    ``log_metric`` on the greedy completions."""
    parts = [f"eval @ step {step}"]
    for label, key, spec in EVAL_FIELDS:
        if (shown := _number(record.get(key), spec)) is not None:
            parts.append(f"{label} {shown}")
    for key in sorted(k for k in record if k.startswith("eval/pass@")):
        if (shown := _number(record[key], ".3f")) is not None:
            parts.append(f"{key.removeprefix('eval/')} {shown}")
    parts += logged_metrics(record, "eval")
    return " | ".join(parts)


def _text(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    if value is None:
        return "-"
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= MAX_CELL else text[:MAX_CELL] + "..."


def completions_table(rows: list[dict], step: int, width: int = 120) -> str:
    """The rows (prompt, completion, one column per reward function, advantage, logged extras) as a table."""
    if not rows:
        return ""
    columns = [c for c in rows[0] if c != "step"]
    cells = [[_text(row.get(c)) for c in columns] for row in rows]
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        return _plain_table(columns, cells, step)
    table = Table(title=f"Training completions, step {step}", show_lines=True)
    for column in columns:
        table.add_column(column, overflow="fold", ratio=3 if column in ("prompt", "completion") else 1)
    for row in cells:
        table.add_row(*row)
    buffer = io.StringIO()
    Console(file=buffer, width=width, force_terminal=False, color_system=None).print(table)
    return buffer.getvalue().rstrip()


def _plain_table(columns: list[str], cells: list[list[str]], step: int) -> str:
    lines = [f"Training completions, step {step}"]
    for row in cells:
        lines.append("  " + " | ".join(f"{c}: {v}" for c, v in zip(columns, row)))
    return "\n".join(lines)


def emit(text: str, bar=None) -> None:
    """Print ``text`` above the progress bar when there is one."""
    if not text:
        return
    if bar is not None:
        bar.write(text, file=sys.stdout)
    else:
        print(text, flush=True)

"""A self-contained HTML training report from a run's output directory.

Reads ``<output_dir>/metrics.jsonl`` (and, when present, the latest training completions in ``completions.jsonl``,
the latest eval ``samples-<step>.jsonl`` and ``config.json``) and writes ``<output_dir>/report.html``: a summary
table of key metrics, one PNG chart per panel embedded as base64 (each titled with what it plots, its y axis with
the unit), and tables of sample completions. The file needs no network and no JavaScript.

    python -m rlhf.report <output_dir> [--title T]
"""

import argparse
import base64
import html
import io
import json
import math
import os
import re
from dataclasses import dataclass

from rlhf.checkpoint import atomic_write_text

SAMPLE_ROWS = 8
"""Sample completions shown in the report."""
MAX_TEXT_CHARS = 600
"""Prompts and completions longer than this are truncated."""


@dataclass(frozen=True)
class Panel:
    """One chart: every metric key that fully matches one of ``patterns`` (regular expressions), in pattern order;
    ``unit`` labels the y axis."""

    title: str
    patterns: tuple[str, ...]
    unit: str


PANELS = [
    Panel("Reward", (r"reward/mean", r"reward/[^/]+/mean"), "reward"),
    Panel("Evaluation", (r"eval/reward_mean", r"eval/accuracy", r"eval/pass@\d+"), "reward, or fraction correct"),
    Panel("KL to the reference model", (r"kl",), "nats per token"),
    Panel("KL of the updated policy to the rollout policy", (r"policy/approx_kl",), "nats per token"),
    Panel("Entropy", (r"entropy",), "nats per token"),
    Panel("Completion length", (r"completions/mean_length", r"eval/mean_length"), "tokens"),
    Panel("Clip fraction", (r"clip/low_frac", r"clip/high_frac"), "fraction of tokens"),
    Panel("Critic loss", (r"loss/value",), "squared error"),  # PPO only
    Panel("Critic explained variance", (r"critic/explained_variance",), "fraction of the returns' variance"),
    Panel("Tools and turns", (r"agent/tool_call_rate", r"eval/agent/tool_call_rate", r"agent/turns",
                              r"agent/tool_(errors|timeouts|bad_calls)"), "rate, or turns per trajectory"),
    Panel("Speed", (r"time/step",), "seconds per step"),
]
BUILTIN = (r"(reward|advantages|completions|clip|policy|time|guard|critic|kl|loss|eval)/.*", r"kl", r"entropy",
           r"grad_norm", r"learning_rate", r"tokens_per_second", r"kl_coef", r"num_tokens")
"""What the trainer logs itself; anything else (log_metric of a reward function, a callback's) gets its own panel."""
OTHER = Panel("Logged by reward functions and callbacks", (), "as logged")

SUMMARY_PATTERNS = (
    r"reward/mean", r"reward/[^/]+/mean", r"eval/reward_mean", r"eval/reward/[^/]+/mean", r"eval/accuracy",
    r"eval/pass@\d+", r"kl", r"entropy", r"completions/mean_length", r"completions/truncated_frac",
    r"eval/mean_length", r"agent/tool_call_rate", r"eval/agent/tool_call_rate", r"agent/turns", r"loss/policy",
    r"loss/value", r"critic/explained_variance", r"grad_norm", r"time/step",
    r"tokens_per_second",
)
"""Metrics listed in the summary table, in this order."""

HIGHER_IS_BETTER = (r"reward/mean", r"reward/[^/]+/mean", r"eval/reward_mean", r"eval/reward/[^/]+/mean",
                    r"eval/accuracy", r"eval/pass@\d+", r"(eval/)?agent/tool_call_rate")
"""Metrics whose best value (their maximum) the summary table shows."""


# ---------------------------------------------------------------------------------------------------- data
def load_records(path: str) -> list[dict]:
    """The records of a metrics.jsonl file. Lines that are not JSON objects (a line torn by a killed run) are
    skipped. Raises FileNotFoundError naming ``path`` when it does not exist."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no metrics file at {path}")
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and isinstance(record.get("step"), (int, float)):
                records.append(record)
    return records


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def series(records: list[dict], key: str) -> list[tuple[int, float]]:
    """(step, value) of ``key``, sorted by step, NaN and infinite values skipped. When a step was logged twice (a
    resumed run), the later line wins."""
    by_step = {}
    for record in records:
        if _is_number(record.get(key)):
            by_step[int(record["step"])] = float(record[key])
    return sorted(by_step.items())


def _natural(key: str) -> list:
    """Sort key that orders eval/pass@4 before eval/pass@16."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", key)]


def matching_keys(keys, patterns) -> list[str]:
    """The keys that fully match any of ``patterns``, grouped by the first pattern they match, in pattern order."""
    chosen = []
    for pattern in patterns:
        chosen += sorted((k for k in keys if re.fullmatch(pattern, k) and k not in chosen), key=_natural)
    return chosen


def all_keys(records: list[dict]) -> set[str]:
    return {key for record in records for key in record if key != "step"}


# ---------------------------------------------------------------------------------------------------- summary
def format_value(value: float | None) -> str:
    """How the report prints a number: 4 significant digits, an em dash for no value."""
    return "\u2014" if value is None else f"{value:.4g}"


def summarize(records: list[dict]) -> list[dict]:
    """One row per summary metric that has a value: key, first, last, best and best_step (None unless the
    metric is one where higher is better)."""
    rows = []
    for key in matching_keys(all_keys(records), SUMMARY_PATTERNS):
        points = series(records, key)
        if not points:
            continue
        best_step, best = max(points, key=lambda p: p[1]) if _higher_is_better(key) else (None, None)
        rows.append({"key": key, "first": points[0][1], "last": points[-1][1], "best": best, "best_step": best_step})
    return rows


def _higher_is_better(key: str) -> bool:
    return any(re.fullmatch(pattern, key) for pattern in HIGHER_IS_BETTER)


# ---------------------------------------------------------------------------------------------------- charts
def panel_series(records: list[dict], panel: Panel) -> dict[str, list[tuple[int, float]]]:
    """The panel's keys that have at least one finite value, with their points."""
    keys = all_keys(records)
    if panel is OTHER:
        chosen = sorted(k for k in keys if not any(re.fullmatch(p, k) for p in BUILTIN))
    else:
        chosen = matching_keys(keys, panel.patterns)
    found = {key: series(records, key) for key in chosen}
    return {key: points for key, points in found.items() if points}


def render_png(title: str, lines: dict[str, list[tuple[int, float]]], unit: str = "") -> bytes:
    """A PNG line chart of ``lines`` (label -> points) against the step, with a legend when there are several and
    ``unit`` on the y axis."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 3.6))
    FigureCanvasAgg(fig)  # draws with Agg, without pyplot or its global state
    ax = fig.add_subplot()
    for label, points in lines.items():
        steps, values = zip(*points)
        ax.plot(steps, values, label=label, marker="o" if len(points) < 30 else None, markersize=3)
    ax.set_title(title)
    ax.set_xlabel("step (one rollout batch each)")
    ax.set_ylabel(unit)
    ax.grid(alpha=0.3)
    if len(lines) > 1:
        ax.legend(fontsize="small")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def charts(records: list[dict]) -> list[tuple[str, bytes]]:
    """(panel title, PNG) for every panel with data, in PANELS order."""
    out = []
    for panel in [*PANELS, OTHER]:
        lines = panel_series(records, panel)
        if lines:
            out.append((panel.title, render_png(panel.title, lines, panel.unit)))
    return out


# ---------------------------------------------------------------------------------------------------- samples
def latest_samples_path(output_dir: str) -> str | None:
    """The samples-<step>.jsonl file with the highest step, or None."""
    steps = {}
    for name in os.listdir(output_dir):
        match = re.fullmatch(r"samples-(\d+)\.jsonl", name)
        if match:
            steps[int(match.group(1))] = os.path.join(output_dir, name)
    return steps[max(steps)] if steps else None


def read_samples(path: str, limit: int = SAMPLE_ROWS) -> list[dict]:
    """Up to ``limit`` sample records of a samples file (unparsable lines skipped)."""
    samples = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if len(samples) == limit:
                break
            try:
                sample = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(sample, dict):
                samples.append(sample)
    return samples


def _text(value, limit: int = MAX_TEXT_CHARS) -> str:
    """``value`` as escaped HTML text (chat messages and other structures as JSON), truncated to ``limit`` chars."""
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
    if len(text) > limit:
        text = text[:limit] + "\u2026"
    return html.escape(text)


def conversation_text(messages: list[dict]) -> str:
    """A multi-turn completion, one turn per line, each marked with its role; tool turns name their tool.

    >>> print(conversation_text([{"role": "assistant", "content": "<tool_call>...</tool_call>"},
    ...                          {"role": "tool", "name": "calc", "content": "42"}]))
    [assistant] <tool_call>...</tool_call>
    [tool: calc] 42
    """
    lines = []
    for m in messages:
        role = f"tool: {m['name']}" if m.get("role") == "tool" and m.get("name") else m.get("role", "?")
        lines.append(f"[{role}] {m.get('content', '')}")
    return "\n".join(lines)


def _completion_html(completion) -> str:
    """A completion's text; a multi-turn one turn by turn, the environment's turns marked."""
    if not (isinstance(completion, list) and len(completion) > 1 and all(isinstance(m, dict) for m in completion)):
        return _text(completion)
    turns = []
    for m in completion:
        body = _text(conversation_text([m]), MAX_TEXT_CHARS // 2)
        turns.append(body if m.get("role") == "assistant" else f'<span class="env">{body}</span>')
    return "\n".join(turns)


def _rewards_text(rewards) -> str:
    if not isinstance(rewards, dict):
        return _text(rewards)
    return "<br>".join(f"{html.escape(str(name))}: {_reward_text(v)}" for name, v in rewards.items())


def _reward_text(value) -> str:
    """A reward: a number, an em dash for none (samples files write a NaN reward as null), else its text."""
    if value is None or _is_number(value):
        return format_value(value)
    return _text(value)


# ---------------------------------------------------------------------------------------------------- html
STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 4px 8px; vertical-align: top; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.text { white-space: pre-wrap; overflow-wrap: anywhere; font-family: ui-monospace, monospace; font-size: 0.85em;
          max-width: 480px; }
.charts img { width: 520px; margin: 4px; border: 1px solid #eee; }
pre { background: #f6f6f6; padding: 1em; overflow-x: auto; }
.env { background: #eef4ff; color: #2a4a8a; display: inline-block; }
"""


def _summary_html(rows: list[dict]) -> str:
    if not rows:
        return "<p>No metrics recorded yet.</p>"
    body = "".join(
        f"<tr><td>{html.escape(r['key'])}</td><td class=\"num\">{format_value(r['first'])}</td>"
        f"<td class=\"num\">{format_value(r['last'])}</td><td class=\"num\">{format_value(r['best'])}</td>"
        f"<td class=\"num\">{'' if r['best_step'] is None else r['best_step']}</td></tr>"
        for r in rows)
    return ("<table><tr><th>metric</th><th>first</th><th>last</th><th>best</th><th>best step</th></tr>"
            f"{body}</table>")


def _charts_html(images: list[tuple[str, bytes]]) -> str:
    units = {panel.title: panel.unit for panel in [*PANELS, OTHER]}
    described = [(title, f"{title} ({units.get(title, '')})", png) for title, png in images]
    return "".join(f'<img alt="{html.escape(title)}" title="{html.escape(hover)}" '
                   f'src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">'
                   for title, hover, png in described)


def _samples_html(path: str | None) -> str:
    if path is None:
        return ""
    samples = read_samples(path)
    rows = "".join(f"<tr><td class=\"text\">{_text(s.get('prompt', ''))}</td>"
                   f"<td class=\"text\">{_completion_html(s.get('completion', ''))}</td>"
                   f"<td>{_rewards_text(s.get('rewards', {}))}</td></tr>" for s in samples)
    return (f"<h2>Samples ({html.escape(os.path.basename(path))})</h2>"
            f"<table><tr><th>prompt</th><th>completion</th><th>rewards</th></tr>{rows}</table>")


def _health_html(records: list[dict]) -> str:
    """The training-health monitor's alarms (rlhf.monitor), or a line saying there were none."""
    alarms = [r for r in records if isinstance(r.get("alarm"), str)]
    if not alarms:
        return "<h2>Training health</h2>\n<p>No alarm from the training-health monitor.</p>"
    rows = "".join(f"<tr><td>{int(a['step'])}</td><td>{html.escape(a['alarm'])}</td>"
                   f"<td class=\"text\">{html.escape(str(a.get('message', '')))}<br><b>likely causes:</b> "
                   f"{html.escape(str(a.get('causes', '')))}<br><b>try:</b> {html.escape(str(a.get('remedies', '')))}"
                   "</td></tr>" for a in alarms)
    return (f"<h2>Training health: {len(alarms)} alarm(s)</h2>\n"
            f"<table><tr><th>step</th><th>alarm</th><th>what, why, what to try</th></tr>{rows}</table>")


def latest_training_completions(output_dir: str, limit: int = SAMPLE_ROWS) -> list[dict]:
    """The rows of the last step in ``completions.jsonl`` (what the trainer kept of each logged step), at most
    ``limit``."""
    path = os.path.join(output_dir, "completions.jsonl")
    if not os.path.isfile(path):
        return []
    rows = [row for row in read_samples(path, limit=10 ** 9) if isinstance(row.get("step"), int)]
    last = max((row["step"] for row in rows), default=None)
    return [row for row in rows if row["step"] == last][:limit]


def _training_html(output_dir: str) -> str:
    rows = latest_training_completions(output_dir)
    if not rows:
        return ""
    body = "".join(f"<tr><td class=\"text\">{_text(r.get('prompt', ''))}</td>"
                   f"<td class=\"text\">{_text(r.get('completion', ''))}</td>"
                   f"<td>{_rewards_text(r.get('rewards', {}))}</td>"
                   f"<td class=\"num\">{_reward_text(r.get('advantage'))}</td>"
                   f"<td>{_rewards_text(r.get('extra', {}))}</td></tr>" for r in rows)
    return (f"<h2>Training completions (step {rows[0]['step']})</h2>"
            "<table><tr><th>prompt</th><th>completion</th><th>rewards</th><th>advantage</th><th>logged by reward "
            f"functions</th></tr>{body}</table>")


def _config_html(output_dir: str) -> str:
    path = os.path.join(output_dir, "config.json")
    if not os.path.isfile(path):
        return ""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        text = json.dumps(json.loads(text), indent=2, sort_keys=True, default=str)
    except json.JSONDecodeError:
        pass
    return f"<details><summary>config.json</summary><pre>{html.escape(text)}</pre></details>"


def build_html(output_dir: str, records: list[dict], title: str) -> str:
    """The report's HTML text."""
    steps = max((int(r["step"]) for r in records), default=0)
    images = charts(records)
    return (
        f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
        f"<style>{STYLE}</style></head><body>\n"
        f"<h1>{html.escape(title)}</h1>\n<p>Steps: {steps} &middot; metric records: {len(records)}</p>\n"
        f"{_config_html(output_dir)}\n"
        f"{_health_html(records)}\n"
        f"<h2>Summary</h2>\n{_summary_html(summarize(records))}\n"
        f"<h2>Charts</h2>\n<div class=\"charts\">{_charts_html(images)}</div>\n"
        f"{_training_html(output_dir)}\n"
        f"{_samples_html(latest_samples_path(output_dir))}\n"
        "</body></html>\n"
    )


def write_report(output_dir: str, title: str | None = None) -> str:
    """Write ``<output_dir>/report.html`` from the run's metrics.jsonl (atomically) and return its path. ``title``
    defaults to the directory's name. Raises FileNotFoundError when there is no metrics.jsonl."""
    records = load_records(os.path.join(output_dir, "metrics.jsonl"))
    alarms_path = os.path.join(output_dir, "alarms.jsonl")
    if os.path.exists(alarms_path):
        records += load_records(alarms_path)
    title = title or os.path.basename(os.path.normpath(os.path.abspath(output_dir)))
    path = os.path.join(output_dir, "report.html")
    atomic_write_text(path, build_html(output_dir, records, title))
    return path


def main(argv: list[str] | None = None) -> None:
    """``python -m rlhf.report <output_dir> [--title T]``: write the report and print its path."""
    parser = argparse.ArgumentParser(prog="python -m rlhf.report", description=__doc__.splitlines()[0])
    parser.add_argument("output_dir", help="a training run's output directory (with metrics.jsonl)")
    parser.add_argument("--title", default=None, help="report title (default: the directory's name)")
    args = parser.parse_args(argv)
    try:
        path = write_report(args.output_dir, args.title)
    except FileNotFoundError as error:
        parser.error(str(error))  # exits with status 2
    print(path)


if __name__ == "__main__":
    main()

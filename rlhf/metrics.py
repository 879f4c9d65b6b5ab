"""Metrics: collected as (sum, count) pairs during a step, reduced across processes in one
collective, averaged over the logging window, and written to metrics.jsonl, trackers, the bar and a console
line; and a few of each logged step's completions with their rewards (``CompletionSamples``)."""

import json
import os
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from contextlib import contextmanager

import torch

from rlhf.console import emit


class StepMetrics:
    """Per-step metrics: ``add`` accumulates weighted means, ``add_sum`` totals, ``add_max`` maxima, ``add_min`` minima.
    ``reduce`` turns them into global values with one collective per kind (none on one process; maxima and minima
    share one). Tensors stay on their device until ``reduce``, so recording a metric never forces a GPU sync."""

    def __init__(self):
        self._sums: dict[str, list] = defaultdict(list)
        self._counts: dict[str, list] = defaultdict(list)
        self._maxima: dict[str, list] = defaultdict(list)
        self._minima: dict[str, list] = defaultdict(list)
        self._totals: dict[str, list] = defaultdict(list)

    def add(self, name: str, value, count=1.0) -> None:
        """Add ``value * count`` to the numerator and ``count`` to the denominator of ``name``."""
        value, count = _detached(value), _detached(count)
        self._sums[name].append(value * count)
        self._counts[name].append(count)

    def add_sum(self, name: str, value) -> None:
        """A total over the step (summed over calls and processes), not a mean."""
        self._totals[name].append(_detached(value))

    def add_max(self, name: str, value) -> None:
        self._maxima[name].append(_detached(value))

    def add_min(self, name: str, value) -> None:
        self._minima[name].append(_detached(value))

    def reduce(self, accelerator=None) -> dict[str, float]:
        device = accelerator.device if accelerator is not None else torch.device("cpu")

        def collapse(table: dict[str, list], names: list[str], op) -> torch.Tensor:
            values = [op(torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device) for v in table[n]]))
                      for n in names]
            return torch.stack(values) if values else torch.zeros(0, dtype=torch.float64, device=device)

        names, max_names, total_names = sorted(self._sums), sorted(self._maxima), sorted(self._totals)
        min_names = sorted(self._minima)
        sums, counts = collapse(self._sums, names, torch.sum), collapse(self._counts, names, torch.sum)
        totals = collapse(self._totals, total_names, torch.sum)
        # maxima and minima in one gather: a minimum is the negated maximum of the negated values
        extremes = torch.cat([collapse(self._maxima, max_names, torch.max),
                              -collapse(self._minima, min_names, torch.min)])
        if accelerator is not None and accelerator.num_processes > 1:
            sums, counts = accelerator.reduce(torch.stack([sums, counts]), reduction="sum")
            totals = accelerator.reduce(totals, reduction="sum") if total_names else totals
            if max_names or min_names:
                extremes = accelerator.gather(extremes.unsqueeze(0)).amax(dim=0)
        means = torch.where(counts > 0, sums / counts.clamp(min=1e-12), torch.zeros_like(sums))
        out = dict(zip(names, means.tolist()))
        out.update(zip(max_names, extremes[:len(max_names)].tolist()))
        out.update(zip(min_names, (-extremes[len(max_names):]).tolist()))
        out.update(zip(total_names, totals.tolist()))
        return out


def _detached(value):
    return value.detach().double() if isinstance(value, torch.Tensor) else float(value)


class PhaseTimer:
    """Wall time per named phase of a step."""

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)

    @contextmanager
    def __call__(self, phase: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] += time.perf_counter() - start


LATEST = frozenset({"num_tokens"})
"""Metrics that are a running total, not a per-step value: a logging window reports its last value, not the mean."""


class MetricsLogger:
    """Averages step metrics over the logging window; the main process writes them out. ``describe(step, record,
    kind)`` gives the console line of a record (kind "train" or "eval"; None: no line); ``track(step, record, kind)``,
    when given, sends a record to the trackers (default: ``accelerator.log`` of the record as it is)."""

    def __init__(self, output_dir: str, accelerator, max_steps: int, initial_step: int = 0,
                 disable_tqdm: bool = False, describe: Callable[[int, dict, str], str | None] | None = None,
                 track: Callable[[int, dict, str], None] | None = None):
        self.accelerator = accelerator
        self.path = os.path.join(output_dir, "metrics.jsonl")
        self.events_path = os.path.join(output_dir, "alarms.jsonl")
        self.describe = describe
        self.track = track
        self._window: dict[str, list[float]] = defaultdict(list)
        self._bar = None
        # A bar redraws in place on a terminal; written to a file or a pipe (a log, CI) each redraw is a line of its
        # own, hundreds per run: there the console lines of the logging steps are the progress.
        if accelerator.is_main_process and not disable_tqdm and sys.stderr.isatty():
            from tqdm.auto import tqdm

            self._bar = tqdm(total=max_steps, initial=initial_step, desc="training", dynamic_ncols=True)

    def accumulate(self, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            self._window[key].append(value)

    def log(self, step: int) -> dict[str, float]:
        """Write the window's means (``LATEST`` metrics: the last value) for ``step`` and start a new window."""
        averaged = {key: values[-1] if key in LATEST else sum(values) / len(values)
                    for key, values in self._window.items()}
        self._window.clear()
        return self.write(step, averaged, kind="train")

    def write(self, step: int, metrics: dict[str, float], kind: str = "eval") -> dict[str, float]:
        """Write one record for ``step`` (main process only); returns it."""
        record = {"step": step, **metrics}
        if self.accelerator.is_main_process:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
            if self.track is not None:
                self.track(step, record, kind)
            else:
                self.accelerator.log(metrics, step=step)
            if self._bar is not None:
                shown = {k: f"{record[k]:.3g}" for k in ("reward/mean", "kl", "entropy", "completions/mean_length")
                         if k in record}
                if shown:
                    self._bar.set_postfix(shown, refresh=False)
            if self.describe is not None:
                self.print(self.describe(step, record, kind))
        return record

    def write_event(self, record: dict) -> None:
        """Append a non-metric record (a health alarm) to alarms.jsonl (main process only). It has a file of its own
        so that metrics.jsonl stays one record per logged step, as readers (pandas, plots, TRL-style scripts) assume."""
        if self.accelerator.is_main_process:
            with open(self.events_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def print(self, text: str | None) -> None:
        """A line on the console (main process), above the progress bar."""
        if text and self.accelerator.is_main_process:
            emit(text, self._bar)

    def advance(self, steps: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(steps)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


class CompletionSamples:
    """A few completions of the latest step with their rewards per function, advantage and what reward functions gave
    ``log_extra``: the rows of the completions table. ``flush`` appends them to ``output_dir/completions.jsonl``
    (which the report reads) and returns them."""

    FILE = "completions.jsonl"

    def __init__(self, output_dir: str, limit: int | None):
        self.path = os.path.join(output_dir, self.FILE)
        self.limit = limit
        self.rows: list[dict] = []

    def record(self, step: int, texts, rollout) -> None:
        """Rows spread over this process's completions of ``step`` (so that several prompts show, with more than one
        completion each when the limit allows)."""
        n = len(texts.completions)
        k = n if self.limit is None else min(self.limit, n)
        advantages = rollout.advantages
        if advantages is not None and advantages.dim() == 2:  # per token: the mean over the completion
            mask = rollout.completion_mask.to(advantages.dtype)
            advantages = (advantages * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)
        advantages = advantages.tolist() if advantages is not None else [None] * n
        self.rows = [{"step": step, "prompt": texts.prompts[i], "completion": texts.completions[i],
                      "rewards": {name: values[i] for name, values in texts.rewards.items()},
                      "advantage": advantages[i],
                      "extra": {column: values[i] for column, values in texts.extra.items() if len(values) == n}}
                     for i in (j * n // k for j in range(k))]

    def flush(self, accelerator) -> list[dict]:
        rows, self.rows = self.rows, []
        if rows and accelerator.is_main_process:
            with open(self.path, "a", encoding="utf-8") as f:
                f.writelines(json.dumps(row, ensure_ascii=False, default=str) + "\n" for row in rows)
        return rows


def flat_row(row: dict) -> dict:
    """A completions row as table columns: prompt, completion, one per reward function, advantage, extras."""
    return {"prompt": row["prompt"], "completion": row["completion"], **row.get("rewards", {}),
            "advantage": row.get("advantage"), **row.get("extra", {})}


def read_metrics(path: str) -> list[dict]:
    """The records of a metrics.jsonl file."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]

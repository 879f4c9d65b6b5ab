"""What a run writes and shows at each logging step and evaluation, in one place: metrics.jsonl, the trackers, the
console line and the progress bar (``rlhf.metrics``), the completions table (console, trackers,
``completions.jsonl``), ``state.log_history``, and the callbacks' ``on_log`` / ``on_evaluate``.

metrics.jsonl, the console and the report use our metric names; the trackers, ``log_history`` and the callbacks' logs
also carry TRL's, in transformers' layout (``rlhf.trl_metrics``)."""

import logging
import os
from collections.abc import Callable

from rlhf import console, trackers
from rlhf.metrics import CompletionSamples, MetricsLogger, flat_row
from rlhf.trl_metrics import history_record, trl_view

logger = logging.getLogger(__name__)


class RunLog:
    def __init__(self, args, accelerator, state, reward_names: list[str], event: Callable):
        """``state``: the trainer's TrainerState (its log_history grows here); ``event(name, **kwargs)`` calls the
        callbacks."""
        self.args, self.accelerator, self.state, self.event = args, accelerator, state, event
        self.reward_names = reward_names
        if state.global_step == 0 and accelerator.is_main_process:
            start_fresh(args.output_dir)
        self.metrics = MetricsLogger(args.output_dir, accelerator, args.max_steps, state.global_step,
                                     args.disable_tqdm, describe=self.describe, track=self.track)
        self.samples = CompletionSamples(args.output_dir, args.num_completions_to_print)
        self.losses: list[float] = []  # each step's loss/total, for the end-of-train train_loss

    def describe(self, step: int, record: dict, kind: str) -> str:
        if kind == "eval":
            return console.eval_line(step, record)
        if kind == "user":  # trainer.log(): no console line of its own
            return None
        return console.train_line(step, self.args.max_steps, record, self.reward_names)

    def track(self, step: int, record: dict, kind: str) -> None:
        """A record of ours to the trackers: TRL's names, as transformers' callbacks write them (main process)."""
        trackers.log(self.accelerator, trl_view(record, kind, self.state.epoch), step)

    def history(self, record: dict, kind: str) -> dict:
        """Append a record to ``state.log_history`` with TRL's names beside ours and the epoch; returns the entry (what
        the callbacks' ``on_log`` gets, as with transformers)."""
        entry = history_record(record, kind, self.state.epoch)
        self.state.log_history.append(entry)
        return entry

    def accumulate(self, metrics: dict) -> None:
        self.metrics.accumulate(metrics)
        if isinstance(metrics.get("loss/total"), float):
            self.losses.append(metrics["loss/total"])

    def log(self, step: int) -> dict:
        """The logging window's means, and the latest step's completions table."""
        record = self.metrics.log(step)
        self.event("on_log", logs=self.history(record, "train"))
        rows = [flat_row(row) for row in self.samples.flush(self.accelerator)]
        if self.args.log_completions:
            self.metrics.print(console.completions_table(rows, step))
            trackers.log_table(self.accelerator, "completions", rows, step)
        return record

    def log_eval(self, step: int, metrics: dict, seconds: float | None = None, prompts: int | None = None) -> dict:
        """An evaluation's metrics, with the training tokens seen so far and, given the ``seconds`` it took on how
        many ``prompts``, its speed (TRL's eval_num_tokens, eval_runtime, eval_samples_per_second)."""
        metrics = {**metrics, "eval/num_tokens": float(self.state.num_input_tokens_seen)}
        if seconds is not None:
            metrics["eval/runtime"] = seconds
            if prompts:
                metrics["eval/samples_per_second"] = prompts / seconds if seconds > 0 else 0.0
        record = self.metrics.write(step, metrics)
        entry = self.history(record, "eval")
        self.event("on_evaluate", metrics=entry)
        self.event("on_log", logs=entry)
        return record

    def summary(self, step: int, seconds: float, steps_run: int, completions_per_step: int) -> dict:
        """The end of ``train()``, as transformers' Trainer logs it: runtime, speed and the mean training loss, in
        ``log_history``, the trackers and ``on_log`` (not in metrics.jsonl: one record per logged step there)."""
        record = {"step": step, "train_runtime": seconds,
                  "train_samples_per_second": steps_run * completions_per_step / seconds if seconds > 0 else 0.0,
                  "train_steps_per_second": steps_run / seconds if seconds > 0 else 0.0,
                  "train_loss": sum(self.losses) / len(self.losses) if self.losses else float("nan")}
        if self.accelerator.is_main_process:
            self.track(step, record, "summary")
        entry = self.history(record, "summary")
        self.event("on_log", logs=entry)
        return entry

    def log_values(self, step: int, logs: dict) -> dict:
        """Values a user logs with ``trainer.log``: metrics.jsonl, the trackers, state.log_history and on_log."""
        record = self.metrics.write(step, logs, kind="user")
        self.event("on_log", logs=self.history(record, "user"))
        return record

    def print(self, text: str) -> None:
        self.metrics.print(text)

    def alarm(self, alarm) -> None:
        """A training-health alarm (rlhf.monitor): on the console and in alarms.jsonl (which the report reads)."""
        if self.accelerator.is_main_process:
            logger.warning(alarm.text())
        self.metrics.write_event(alarm.record())

    def advance(self) -> None:
        self.metrics.advance()

    def close(self) -> None:
        self.metrics.close()

    def write_report(self) -> None:
        """output_dir/report.html (with ``write_report``). A failure here is logged, never raised: the run itself has
        succeeded, and the model still has to be saved."""
        if not (self.args.write_report and self.accelerator.is_main_process):
            return
        from rlhf.report import write_report

        try:
            self.accelerator.print(f"Report: {write_report(self.args.output_dir)}")
        except Exception as error:  # noqa: BLE001 - a broken plot must not cost the trained model
            logger.warning("Could not write the report (%s: %s); python -m rlhf.report %s retries.",
                           type(error).__name__, error, self.args.output_dir)


def start_fresh(output_dir: str) -> None:
    """A run from step 0 replaces the metrics and completions an earlier run left in ``output_dir``."""
    for name in ("metrics.jsonl", "alarms.jsonl", CompletionSamples.FILE):
        path = os.path.join(output_dir, name)
        if os.path.exists(path):
            if name == "metrics.jsonl":
                logger.warning("Starting a new run in %s: replacing its metrics.jsonl.", output_dir)
            os.remove(path)

"""What a run writes and shows at each logging step and evaluation, in one place: metrics.jsonl, the trackers, the
console line and the progress bar (``rlhf.metrics``), the completions table (console, trackers,
``completions.jsonl``), ``state.log_history``, and the callbacks' ``on_log`` / ``on_evaluate``."""

import logging
import os
from collections.abc import Callable

from rlhf import console, trackers
from rlhf.metrics import CompletionSamples, MetricsLogger, flat_row

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
                                     args.disable_tqdm, describe=self.describe)
        self.samples = CompletionSamples(args.output_dir, args.num_completions_to_print)

    def describe(self, step: int, record: dict, kind: str) -> str:
        if kind == "eval":
            return console.eval_line(step, record)
        return console.train_line(step, self.args.max_steps, record, self.reward_names)

    def accumulate(self, metrics: dict) -> None:
        self.metrics.accumulate(metrics)

    def log(self, step: int) -> dict:
        """The logging window's means, and the latest step's completions table."""
        record = self.metrics.log(step)
        self.state.log_history.append({**record, "epoch": self.state.epoch})
        self.event("on_log", logs=record)
        rows = [flat_row(row) for row in self.samples.flush(self.accelerator)]
        if self.args.log_completions:
            self.metrics.print(console.completions_table(rows, step))
            trackers.log_table(self.accelerator, "completions", rows, step)
        return record

    def log_eval(self, step: int, metrics: dict) -> dict:
        record = self.metrics.write(step, metrics)
        self.state.log_history.append({**record, "epoch": self.state.epoch})
        self.event("on_evaluate", metrics=record)
        self.event("on_log", logs=record)
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

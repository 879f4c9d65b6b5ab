"""Experiment trackers (``report_to``), set up so that they work: Accelerate's trackers, given a config they can
store, in the places a user looks.

- ``tensorboard`` writes event files to ``output_dir/runs/<run_name>``; the config goes in as hyperparameters
  (``add_hparams`` takes only scalars and strings: lists and mappings are written as JSON text).
- ``wandb`` logs to the project ``WANDB_PROJECT`` (default "rlhf") under the run name, its files in ``WANDB_DIR``
  when set (as with transformers), else ``output_dir``; ``WANDB_MODE=offline`` works without network.
- any other tracker Accelerate knows (trackio, mlflow, aim, comet_ml, clearml, dvclive, swanlab) by name.
- ``"all"``: every one of these that is installed; ``"none"`` or an empty list: none (metrics.jsonl is always written).

A tracker asked for but not installed is an error naming the package to install, not a silent no-op.

What the trackers get is what transformers' ``TensorBoardCallback`` / ``WandbCallback`` write for TRL's
``GRPOTrainer``: ``log`` takes a ``log_history``-style record in TRL's names (``rlhf.trl_metrics``) and writes
``train/<name>`` and ``eval/<name>`` tags; wandb also gets ``train/global_step`` (its x-axis) and keeps the end-of-train
values (``train_runtime``, ...) in the run's summary.
"""

import importlib.util
import json
import os

KNOWN = ("tensorboard", "wandb", "trackio", "mlflow", "aim", "comet_ml", "clearml", "dvclive", "swanlab")
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "trackio": "trackio", "mlflow": "mlflow", "aim": "aim",
            "comet_ml": "comet_ml", "clearml": "clearml", "dvclive": "dvclive", "swanlab": "swanlab"}


def installed(name: str) -> bool:
    return importlib.util.find_spec(PACKAGES[name]) is not None


def resolve(report_to) -> list[str]:
    """The tracker names of a ``report_to`` setting, checked: known and installed."""
    names = [report_to] if isinstance(report_to, str) else list(report_to or [])
    names = [name.strip().lower() for name in names if name and name.strip().lower() != "none"]
    if "all" in names:
        return [name for name in KNOWN if installed(name)]
    unknown = [name for name in names if name not in KNOWN]
    if unknown:
        raise ValueError(f"report_to={report_to!r}: unknown tracker(s) {unknown}; choose from {list(KNOWN)}, "
                         "'all' (every installed one) or 'none'.")
    missing = [name for name in names if not installed(name)]
    if missing:
        raise ValueError(f"report_to={report_to!r}: {missing} not installed; pip install "
                         f"{' '.join(PACKAGES[name] for name in missing)}, or remove it from report_to.")
    return list(dict.fromkeys(names))


def run_name(args) -> str:
    return args.run_name or os.path.basename(os.path.normpath(args.output_dir))


def logging_dir(args) -> str:
    """Where file-based trackers (tensorboard) write: ``output_dir/runs``."""
    return os.path.join(args.output_dir, "runs")


def build(args) -> list:
    """What ``Accelerator(log_with=...)`` takes for ``args.report_to``: tracker objects for tensorboard and wandb
    (placed and named as documented above), names for the others."""
    from accelerate.tracking import TensorBoardTracker, WandBTracker

    trackers = []
    for name in resolve(args.report_to):
        if name == "tensorboard":
            trackers.append(TensorBoardTracker(run_name(args), logging_dir(args)))
        elif name == "wandb":
            trackers.append(WandBTracker(os.environ.get("WANDB_PROJECT", "rlhf"), name=run_name(args),
                                         **wandb_dir(args)))
        else:
            trackers.append(name)
    return trackers


def wandb_dir(args) -> dict:
    """``wandb.init``'s ``dir``: ``WANDB_DIR`` when set (where wandb, and so transformers, which passes none, write),
    else ``output_dir``. Passed explicitly: wandb reads its environment once per process, at its first run."""
    return {"dir": os.environ.get("WANDB_DIR") or args.output_dir}


def flat_config(config: dict) -> dict:
    """``config`` with only values every tracker stores as hyperparameters: numbers, strings and booleans; lists and
    mappings become JSON text, None the string "None"."""
    out = {}
    for key, value in config.items():
        if isinstance(value, (bool, int, float, str)):
            out[key] = value
        elif value is None:
            out[key] = "None"
        else:
            out[key] = json.dumps(value, default=str)
    return out


def start(accelerator, args) -> None:
    """Start the trackers ``build`` gave the accelerator, with the run's config. wandb plots every metric against
    ``train/global_step``, as transformers sets it up."""
    if accelerator.log_with:
        accelerator.init_trackers(run_name(args), config=flat_config(args.to_dict()))
    for tracker in accelerator.trackers if accelerator.is_main_process else []:
        if tracker.name == "wandb":
            try:
                tracker.run.define_metric(GLOBAL_STEP)
                tracker.run.define_metric("*", step_metric=GLOBAL_STEP, step_sync=True)
            except TypeError:  # an older wandb without step_sync
                tracker.run.define_metric("*", step_metric=GLOBAL_STEP)


GLOBAL_STEP = "train/global_step"
SUMMARY_SCALARS = ("train_runtime", "train_samples_per_second", "train_steps_per_second", "train_loss", "total_flos")
"""Values of the whole run that transformers' WandbCallback keeps in the wandb run's summary, not its history."""


def log(accelerator, record: dict, step: int) -> None:
    """Send a ``log_history``-style ``record`` (TRL's names, ``eval_`` keys for an evaluation; ``step`` is ignored) to
    every tracker as transformers' callbacks do: ``train/<name>`` and ``eval/<name>`` tags at ``step``."""
    from rlhf.trl_metrics import tracker_values

    if not accelerator.is_main_process:
        return
    for tracker in accelerator.trackers:
        if tracker.name == "wandb":
            for key in SUMMARY_SCALARS:
                if key in record:
                    tracker.run.summary[key] = record[key]
            values = tracker_values({k: v for k, v in record.items() if k not in SUMMARY_SCALARS})
            if values:
                tracker.log({**values, GLOBAL_STEP: step}, step=step)
        else:
            tracker.log(tracker_values(record), step=step)


def log_table(accelerator, name: str, rows: list[dict], step: int) -> None:
    """A table of ``rows`` (same keys each) in every tracker that shows tables: wandb as a Table, tensorboard as a
    markdown text panel; others skip it (the rows are in output_dir/completions.jsonl regardless)."""
    if not rows or not accelerator.is_main_process:
        return
    columns = list(rows[0])
    for tracker in accelerator.trackers:
        if tracker.name == "wandb":
            data = [[value if isinstance(value := row.get(c), (int, float, str, type(None))) else _cell(value)
                     for c in columns] for row in rows]
            tracker.log_table(name, columns=columns, data=data, step=step)
        elif tracker.name == "tensorboard":
            header = "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns)
            lines = ["| " + " | ".join(_cell(row.get(c)).replace("|", "\\|").replace("\n", " ") for c in columns)
                     + " |" for row in rows]
            tracker.writer.add_text(name, "\n".join([header, *lines]), global_step=step)
            tracker.writer.flush()


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return value if isinstance(value, str) else json.dumps(value, default=str)


def finish(accelerator) -> None:
    """Close every tracker (not ``accelerator.end_training()``: it would also destroy the process group that
    ``save_model`` still needs)."""
    for tracker in accelerator.trackers:
        tracker.finish()

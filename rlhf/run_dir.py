"""A run owns its output directory.

Every run has an id (``run_id``), written in ``output_dir/run.json``, in every checkpoint's
``trainer_state.json`` and in its ``manifest.json``. A resumed run keeps the id of the checkpoint it
resumes from. Around that id:

- **one run at a time**: the run holds ``output_dir/run.lock`` (``rlhf.dir_lock``) from construction
  until its process exits; a second run fails at once naming the holder.
- **no new run over another run's outputs**: a fresh run in a directory that holds another run's checkpoints, or
  anything else a run writes (``RUN_OUTPUTS``: metrics, completions, alarms, eval samples, the report, the saved
  model) that is not its own, is an error, unless ``overwrite_output_dir`` (they are deleted) or the run resumes.
  The check runs when the run starts writing (``RunDirectory.start``: the first ``train()``, or a
  ``save_checkpoint()``, ``save_model()`` or ``evaluate()`` into ``output_dir`` before it), not only at
  construction: another trainer of the same process may have written there since, and TRL's
  ``trainer.train(resume_from_checkpoint=True)`` must still resume. Nothing in the directory is touched before.
- **latest** is the newest checkpoint of the run named in ``run.json`` whose manifest verifies (each one
  skipped is named, with the reason); rotation (``save_total_limit``) deletes only this run's checkpoints.
- **resuming from an older checkpoint** moves this run's newer checkpoints, and the metrics.jsonl records
  after the resumed step, to ``output_dir/abandoned/<time>-resumed-at-<step>/``: nothing is lost, and
  nothing abandoned is picked up or logged twice.

Decisions are made on the main process and broadcast, so every process raises the same error.
"""

import glob
import json
import logging
import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass

from rlhf import dir_lock
from rlhf.checkpoint import atomic_write_text, read_state
from rlhf.integrity import CheckpointError, read_manifest, verify_checkpoint

logger = logging.getLogger(__name__)

RUN_FILE = "run.json"
ABANDONED_DIR = "abandoned"
METRICS_FILE = "metrics.jsonl"
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
RUN_OUTPUTS = (METRICS_FILE, "completions.jsonl", "alarms.jsonl", "samples-*.jsonl", "report.html", "*.safetensors",
               "model/*.safetensors", "critic/*.safetensors", "nonfinite-step*.pt")
"""What a run writes in output_dir besides checkpoints and run.json (patterns; the recipes save the model in model/):
a new run would delete or overwrite them."""


class RunDirectoryError(RuntimeError):
    """The output directory belongs to another run, or holds no checkpoint this run can resume from."""


@dataclass(frozen=True)
class Checkpoint:
    step: int
    path: str
    run_id: str | None  # from its manifest; None when the manifest is missing or unreadable


def list_checkpoints(output_dir: str) -> list[Checkpoint]:
    """Every ``checkpoint-<step>`` directory of ``output_dir``, complete or not, oldest first."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        match = _CHECKPOINT_RE.match(name)
        path = os.path.join(output_dir, name)
        if match and os.path.isdir(path):
            try:
                run_id = read_manifest(path).get("run_id")
            except CheckpointError:
                run_id = None
            found.append(Checkpoint(int(match.group(1)), path, run_id))
    return sorted(found, key=lambda c: c.step)


def run_checkpoints(output_dir: str, run_id: str) -> list[str]:
    """The complete checkpoints (with a manifest; unverified) of run ``run_id`` in ``output_dir``, oldest first."""
    return [c.path for c in list_checkpoints(output_dir) if c.run_id == run_id]


def run_outputs(output_dir: str) -> list[str]:
    """The ``RUN_OUTPUTS`` files in ``output_dir``, relative to it, sorted."""
    return sorted({os.path.relpath(path, output_dir) for pattern in RUN_OUTPUTS
                   for path in glob.glob(os.path.join(glob.escape(output_dir), pattern)) if os.path.isfile(path)})


def directory_owner(output_dir: str) -> str | None:
    """The run id in ``output_dir/run.json`` (None if there is none)."""
    try:
        with open(os.path.join(output_dir, RUN_FILE), encoding="utf-8") as f:
            owner = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return owner.get("run_id") if isinstance(owner, dict) else None


def verified_state(path: str) -> dict:
    """The state of checkpoint ``path`` after its manifest verifies; ``CheckpointError`` names the bad file."""
    manifest = verify_checkpoint(path)
    state = read_state(path)
    if manifest.get("run_id") != state["run_id"]:
        raise CheckpointError(path, "trainer_state.json", f"run_id {state['run_id']!r} differs from the manifest's "
                                                          f"{manifest.get('run_id')!r}")
    return state


def find_latest(output_dir: str, run_id: str | None = None) -> tuple[str | None, list[tuple[str, str]]]:
    """(newest checkpoint of ``run_id`` (default: the run in run.json; any run if there is none) whose manifest
    verifies, or None; [(skipped checkpoint, why)] for the newer ones that did not verify)."""
    run_id = run_id if run_id is not None else directory_owner(output_dir)
    skipped = []
    for checkpoint in reversed(list_checkpoints(output_dir)):
        if run_id is not None and checkpoint.run_id not in (run_id, None):
            continue
        try:
            state = verified_state(checkpoint.path)
        except CheckpointError as error:
            skipped.append((checkpoint.path, f"{error.file}: {error.reason}"))
            continue
        if run_id is not None and state["run_id"] != run_id:
            continue
        return checkpoint.path, skipped
    return None, skipped


def latest_checkpoint(output_dir: str) -> str | None:
    """The newest checkpoint of the run in ``output_dir/run.json`` whose manifest verifies (None if none does)."""
    return find_latest(output_dir)[0]


def resolve_checkpoint(spec: str, output_dir: str) -> str:
    """The checkpoint ``spec`` names, verified: ``"latest"`` falls back past checkpoints that fail verification
    (each named in a warning); an explicit path that fails is a ``CheckpointError`` naming the file."""
    if spec != "latest":
        verified_state(spec)
        return spec
    path, skipped = find_latest(output_dir)
    for bad, why in skipped:
        logger.warning("Skipping %s: %s.", bad, why)
    if path is None:
        detail = "; ".join(f"{bad}: {why}" for bad, why in skipped)
        raise RunDirectoryError(f"resume_from_checkpoint='latest' but {output_dir!r} holds no checkpoint that "
                                f"verifies{' (' + detail + ')' if detail else ''}. Start a new run (without "
                                "resume_from_checkpoint), or name a checkpoint directory.")
    if skipped:
        logger.warning("Resuming from %s, the newest checkpoint that verifies.", path)
    return path


def rotate_checkpoints(output_dir: str, keep: int | None, run_id: str) -> list[str]:
    """Delete all but the newest ``keep`` checkpoints of ``run_id`` (other runs' are never touched)."""
    if keep is None:
        return []
    if keep < 1:
        raise ValueError(f"save_total_limit={keep} would delete every checkpoint; use >= 1 or None.")
    own = [c.path for c in list_checkpoints(output_dir) if c.run_id == run_id]
    for path in own[:-keep]:
        shutil.rmtree(path, ignore_errors=True)
    return own[:-keep]


def _on_main(accelerator, fn):
    """``fn()`` on the main process; its result, or its exception, on every process."""
    outcome = [None]
    if accelerator is None or accelerator.is_main_process:
        try:
            outcome = [(True, fn())]
        except Exception as error:  # noqa: BLE001 - re-raised on every process below
            outcome = [(False, error)]
    if accelerator is not None and accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        broadcast_object_list(outcome)
    ok, value = outcome[0]
    if not ok:
        raise value
    return value


class RunDirectory:
    """``output_dir`` held by this run: its lock, its run id and the checkpoint it resumes from (``claim``)."""

    def __init__(self, output_dir: str, run_id: str, checkpoint: str | None, lock, accelerator=None,
                 overwrite: bool = False):
        self.output_dir = output_dir
        self.run_id = run_id
        self.checkpoint = checkpoint  # the checkpoint the run resumes from, verified
        self.claimed = checkpoint  # resolved by claim(), handed out once by resolve()
        self.lock = lock  # on the main process only
        self.accelerator = accelerator
        self.overwrite = overwrite  # overwrite_output_dir: another run's outputs are deleted, not refused
        self.started = False  # start() or resume() has run

    @classmethod
    def claim(cls, output_dir: str, accelerator=None, resume_from: str | None = None,
              overwrite: bool = False) -> "RunDirectory":
        """Lock ``output_dir``; find the checkpoint to resume from (verified) or make a new run id. A directory
        holding another run's checkpoints is refused now when resuming (unless ``overwrite``: they are deleted), and
        by ``start`` for a new run."""
        holder = []

        def decide():
            os.makedirs(output_dir, exist_ok=True)
            holder.append(dir_lock.acquire(output_dir))
            checkpoint = resolve_checkpoint(resume_from, output_dir) if resume_from else None
            run_id = read_state(checkpoint)["run_id"] if checkpoint else uuid.uuid4().hex
            others = [c for c in list_checkpoints(output_dir)
                      if c.run_id != run_id and (checkpoint is None or c.run_id is not None)]
            if others and not overwrite and checkpoint is not None:
                raise RunDirectoryError(_conflict(output_dir, others, []))
            if overwrite:
                _delete([c.path for c in others], "overwrite_output_dir=True")
            return run_id, checkpoint

        try:
            run_id, checkpoint = _on_main(accelerator, decide)
        except BaseException:
            for lock in holder:
                lock.release()
            raise
        return cls(output_dir, run_id, checkpoint, holder[0] if holder else None, accelerator, overwrite)

    def _main(self, fn):
        return _on_main(self.accelerator, fn)

    def resolve(self, spec: str) -> str:
        """A checkpoint to load, verified (see ``resolve_checkpoint``); the one ``claim`` resolved is not verified twice."""
        claimed, self.claimed = self.claimed, None
        if claimed is not None and spec in ("latest", claimed):
            return claimed
        return self._main(lambda: resolve_checkpoint(spec, self.output_dir))

    def start(self, trainer: str) -> None:
        """A new run, before it writes anything: refuse (``RunDirectoryError``) a directory holding another run's
        checkpoints or outputs, as it is now (unless ``overwrite``: they are deleted); then write run.json. Once
        started (or resumed), a no-op."""
        if self.started:
            return
        self._main(lambda: self._start(trainer))
        self.started = True

    def _start(self, trainer: str) -> None:
        others = [c for c in list_checkpoints(self.output_dir) if c.run_id != self.run_id]
        files = run_outputs(self.output_dir) if directory_owner(self.output_dir) != self.run_id else []
        if (others or files) and not self.overwrite:
            raise RunDirectoryError(_conflict(self.output_dir, others, files))
        _delete([c.path for c in others] + [os.path.join(self.output_dir, name) for name in files],
                "overwrite_output_dir=True")
        self._write_owner(trainer)

    def resume(self, path: str, state: dict, trainer: str) -> None:
        """After a checkpoint has loaded: continue its run. This run's checkpoints after its step, and the
        metrics.jsonl records after it, are moved to ``abandoned/`` (all of metrics.jsonl if another run wrote it)."""
        self.run_id = state["run_id"]
        self.checkpoint = path
        self._main(lambda: self._resume(state["step"], trainer))
        self.started = True

    def _resume(self, step: int, trainer: str) -> None:
        others = [c for c in list_checkpoints(self.output_dir) if c.run_id not in (self.run_id, None)]
        if others and not self.overwrite:  # written since claim(), or resumed after construction (TRL's way)
            raise RunDirectoryError(_conflict(self.output_dir, others, []))
        _delete([c.path for c in others], "overwrite_output_dir=True")
        foreign_metrics = directory_owner(self.output_dir) not in (None, self.run_id)
        newer = [c.path for c in list_checkpoints(self.output_dir)
                 if c.step > step and c.run_id in (self.run_id, None)]
        aside = os.path.join(self.output_dir, ABANDONED_DIR, f"{time.strftime('%Y%m%d-%H%M%S')}-resumed-at-{step}")
        moved = [_move(path, aside) for path in newer]
        cut = _cut_metrics(os.path.join(self.output_dir, METRICS_FILE), None if foreign_metrics else step, aside)
        _cut_metrics(os.path.join(self.output_dir, "alarms.jsonl"), None if foreign_metrics else step, aside)
        if moved or cut:
            logger.warning("Resuming at step %d: moved %s to %s, so that nothing after step %d is resumed or "
                           "logged twice.", step, ", ".join(
                               [os.path.basename(p) for p in moved] + ([f"{cut} metrics.jsonl record(s)"] if cut
                                                                       else [])), aside, step)
        self._write_owner(trainer)

    def _write_owner(self, trainer: str) -> None:
        atomic_write_text(os.path.join(self.output_dir, RUN_FILE), json.dumps(
            {"run_id": self.run_id, "trainer": trainer, "resumed_from": self.checkpoint, "time": time.time()},
            indent=1) + "\n")

    def checkpoints(self) -> list[str]:
        """This run's complete checkpoints on disk (with a manifest; unverified), oldest first."""
        return run_checkpoints(self.output_dir, self.run_id)

    def newest_checkpoint(self) -> str | None:
        """This run's newest checkpoint on disk (by step, unverified)."""
        own = self.checkpoints()
        return own[-1] if own else None

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()


def _conflict(output_dir: str, others: list[Checkpoint], files: list[str]) -> str:
    """Why a run may not write to ``output_dir``: another run's checkpoints ``others`` and outputs ``files``."""
    held = []
    if others:
        names = ", ".join(os.path.basename(c.path) for c in others[:5]) + (", ..." if len(others) > 5 else "")
        held.append(f"{len(others)} checkpoint(s) of another run ({names})")
    if files:
        held.append(f"another run's {', '.join(files[:6])}" + (", ..." if len(files) > 6 else ""))
    resume = "Resume that run (resume_from_checkpoint='latest'), give" if others else "Give"
    return (f"output_dir {output_dir} holds {' and '.join(held)}. A new run there would delete or overwrite them"
            + (", and resume_from_checkpoint='latest' could pick the wrong run" if others else "")
            + f". {resume} this run another output_dir, or set overwrite_output_dir=True (--overwrite_output_dir on "
            "the command line) to delete them.")


def _delete(paths: list[str], why: str) -> None:
    if paths:
        logger.warning("%s: deleting %d checkpoint(s) or file(s) of another run: %s", why, len(paths),
                       ", ".join(paths))
    for path in paths:
        if os.path.isdir(path):
            shutil.rmtree(path)
        else:
            os.remove(path)


def _move(path: str, directory: str) -> str:
    os.makedirs(directory, exist_ok=True)
    target = os.path.join(directory, os.path.basename(path))
    os.rename(path, target)
    return target


def _cut_metrics(path: str, step: int | None, aside: str) -> int:
    """Keep the records of ``path`` up to ``step`` (None: none); move the others to ``aside/metrics.jsonl``.
    Returns how many moved. A line that is not a record (a write cut short by a crash) counts as a later one."""
    if not os.path.isfile(path):
        return 0
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = [line for line in f if line.strip()]
    keep, cut = [], []
    for line in lines:
        try:
            record_step = json.loads(line).get("step")
        except (json.JSONDecodeError, AttributeError):
            record_step = None
        (keep if step is not None and isinstance(record_step, int) and record_step <= step else cut).append(line)
    if cut:
        os.makedirs(aside, exist_ok=True)
        with open(os.path.join(aside, os.path.basename(path)), "a", encoding="utf-8") as f:
            f.writelines(line if line.endswith("\n") else line + "\n" for line in cut)
        atomic_write_text(path, "".join(line if line.endswith("\n") else line + "\n" for line in keep))
    return len(cut)

"""A run owns its output directory: run identity, refusing another run's checkpoints, latest and rotation per
run, the directory lock (real processes and signals), and resuming from an older checkpoint."""

import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
from helpers import PROMPTS, make_trainer

from rlhf import GRPOConfig
from rlhf.dir_lock import LOCK_FILE, DirectoryLocked
from rlhf.run_dir import RunDirectoryError, directory_owner, latest_checkpoint, list_checkpoints, rotate_checkpoints

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def checkpoints(directory) -> list[str]:
    return sorted((p for p in os.listdir(directory) if p.startswith("checkpoint-")), key=lambda p: int(p[11:]))


def steps(path) -> list[int]:
    with open(path) as f:
        return [json.loads(line)["step"] for line in f if line.strip()]


def test_a_new_run_refuses_another_runs_checkpoints_unless_told_to_overwrite(tmp_path):
    old = make_trainer(tmp_path, max_steps=4, save_steps=1, save_total_limit=2)
    old.train()
    old_id = old.run.run_id
    assert checkpoints(tmp_path) == ["checkpoint-3", "checkpoint-4"] and directory_owner(str(tmp_path)) == old_id

    with pytest.raises(RunDirectoryError, match=r"holds 2 checkpoint\(s\) of another run \(checkpoint-3, "
                                                 r"checkpoint-4\).*resume_from_checkpoint='latest'.*another "
                                                 r"output_dir.*overwrite_output_dir=True"):
        make_trainer(tmp_path, max_steps=2, save_steps=1, save_total_limit=2).train()
    assert checkpoints(tmp_path) == ["checkpoint-3", "checkpoint-4"]  # nothing touched
    # TRL's way to resume: construct, then train(resume_from_checkpoint=True); the refusal waits for train()
    resumed = make_trainer(tmp_path, max_steps=5, save_steps=1, save_total_limit=2)
    resumed.train(resume_from_checkpoint=True)
    assert resumed.run.run_id == old_id and checkpoints(tmp_path) == ["checkpoint-4", "checkpoint-5"]

    # The case: before, rotation kept the old run's higher steps and deleted the new run's checkpoints as
    # soon as they were written, and "latest" resumed the old run.
    new = make_trainer(tmp_path, max_steps=2, save_steps=1, save_total_limit=2, overwrite_output_dir=True)
    assert checkpoints(tmp_path) == []  # the old run's checkpoints are deleted by the overwrite
    new.train()
    assert new.run.run_id != old_id and directory_owner(str(tmp_path)) == new.run.run_id
    assert checkpoints(tmp_path) == ["checkpoint-1", "checkpoint-2"]
    assert make_trainer(tmp_path, max_steps=2, resume_from_checkpoint="latest").step == 2


def test_latest_and_rotation_consider_only_this_runs_checkpoints(tmp_path):
    other, mine = tmp_path / "other", tmp_path / "mine"
    make_trainer(other, max_steps=1, save_steps=1).train()
    trainer = make_trainer(mine, max_steps=2, save_steps=1)
    trainer.train()
    # Another run's checkpoint with a higher step lands in this directory (copied in by hand).
    shutil.copytree(other / "checkpoint-1", mine / "checkpoint-9")
    assert [c.run_id == trainer.run.run_id for c in list_checkpoints(str(mine))] == [True, True, False]
    assert latest_checkpoint(str(mine)) == str(mine / "checkpoint-2")
    assert rotate_checkpoints(str(mine), 1, trainer.run.run_id) == [str(mine / "checkpoint-1")]
    assert checkpoints(mine) == ["checkpoint-2", "checkpoint-9"]
    with pytest.raises(RunDirectoryError, match=r"checkpoint-9"):  # resuming next to it needs overwrite_output_dir
        make_trainer(mine, max_steps=3, resume_from_checkpoint="latest")


def snapshot(directory) -> dict[str, str]:
    """Every file under ``directory`` (but the lock) and a hash of its bytes."""
    found = {}
    for root, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(root, name)
            if name != LOCK_FILE:
                with open(path, "rb") as f:
                    found[os.path.relpath(path, directory)] = hashlib.sha256(f.read()).hexdigest()
    return found


def refusal(directory, holds: str) -> str:
    return (rf"output_dir {re.escape(str(directory))} holds {holds}\. A new run there would delete or overwrite them.*"
            r"this run another output_dir, or set overwrite_output_dir=True \(--overwrite_output_dir on the command "
            r"line\) to delete them\.")


def test_a_second_trainer_on_the_same_output_dir_is_refused_when_it_starts_writing(tmp_path):
    """Ownership is checked when a run starts writing, not only at construction: both trainers are built on an empty
    directory; before, the second overwrote the first's checkpoints and deleted its metrics."""
    first = make_trainer(tmp_path, max_steps=2, save_steps=1)
    second = make_trainer(tmp_path, max_steps=2, save_steps=1)
    first.train()
    written = snapshot(tmp_path)
    holds = r"2 checkpoint\(s\) of another run \(checkpoint-1, checkpoint-2\) and another run's completions.jsonl, " \
            r"metrics.jsonl"
    for write in (second.train, second.save_checkpoint, second.save_model):
        with pytest.raises(RunDirectoryError, match=refusal(tmp_path, holds)):
            write()
    assert snapshot(tmp_path) == written and directory_owner(str(tmp_path)) == first.run.run_id


def test_a_finished_run_without_checkpoints_keeps_its_outputs_and_model(tmp_path):
    """save_steps=0 leaves no checkpoint; before, a new run there deleted the old metrics.jsonl, completions.jsonl
    and alarms.jsonl, and save_model() overwrote the old model."""
    run = tmp_path / "run"
    old = make_trainer(run, max_steps=1)
    old.train()
    old.save_model()  # TRL's default: output_dir itself
    old.save_model(str(run / "model"))  # the recipes' place
    (run / "alarms.jsonl").write_text('{"step": 1, "alarm": "written by the old run"}\n')
    written = snapshot(run)
    new = make_trainer(run, max_steps=1)
    holds = r"another run's alarms.jsonl, completions.jsonl, metrics.jsonl, model.safetensors, model/model.safetensors"
    for write in (new.train, new.save_model, lambda: new.save_model(str(run / "model")),
                  lambda: new.evaluate(PROMPTS[:2])):
        with pytest.raises(RunDirectoryError, match=refusal(run, holds)):
            write()
    assert snapshot(run) == written
    new.save_model(str(tmp_path / "elsewhere"))  # outside output_dir: the user's to choose
    assert os.path.exists(tmp_path / "elsewhere" / "model.safetensors")

    replacing = make_trainer(run, max_steps=1, overwrite_output_dir=True)
    replacing.train()
    assert steps(run / "metrics.jsonl") == [1] and not os.path.exists(run / "model.safetensors")
    alarms = run / "alarms.jsonl"  # this run's alarms, if it had any
    assert not alarms.exists() or "the old run" not in alarms.read_text()
    assert directory_owner(str(run)) == replacing.run.run_id


@pytest.mark.parametrize("limit", [0, -1])
def test_save_total_limit_below_one_is_rejected(tmp_path, limit):
    with pytest.raises(ValueError, match=rf"save_total_limit={limit} must be >= 1 \(or None\)"):
        GRPOConfig(save_total_limit=limit).validate()
    with pytest.raises(ValueError, match="would delete every checkpoint"):
        rotate_checkpoints(str(tmp_path), limit, "run")


def test_resuming_an_older_checkpoint_sets_newer_ones_and_their_metrics_aside(tmp_path, caplog):
    make_trainer(tmp_path, max_steps=4, save_steps=1).train()
    assert steps(tmp_path / "metrics.jsonl") == [1, 2, 3, 4]
    older = str(tmp_path / "checkpoint-2")
    resumed = make_trainer(tmp_path, max_steps=4, save_steps=1, resume_from_checkpoint=older)
    (aside,) = os.listdir(tmp_path / "abandoned")
    assert aside.endswith("-resumed-at-2") and "moved checkpoint-3, checkpoint-4, 2 metrics.jsonl record(s)" in caplog.text
    assert sorted(os.listdir(tmp_path / "abandoned" / aside)) == ["checkpoint-3", "checkpoint-4", "metrics.jsonl"]
    assert steps(tmp_path / "abandoned" / aside / "metrics.jsonl") == [3, 4]
    assert checkpoints(tmp_path) == ["checkpoint-1", "checkpoint-2"]
    assert latest_checkpoint(str(tmp_path)) == older  # an abandoned checkpoint is never picked
    resumed.train()
    assert steps(tmp_path / "metrics.jsonl") == [1, 2, 3, 4]  # not 1, 2, 3, 4, 3, 4
    assert checkpoints(tmp_path) == ["checkpoint-1", "checkpoint-2", "checkpoint-3", "checkpoint-4"]


# ---------------------------------------------------------------- the lock: real processes, real signals

HOLD = ("import sys, time\nfrom rlhf.dir_lock import acquire\nacquire(sys.argv[1])\nprint('locked', flush=True)\n"
        "time.sleep(float(sys.argv[2]))\n")


def hold_lock(directory, seconds: float) -> subprocess.Popen:
    os.makedirs(directory, exist_ok=True)
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(directory), str(seconds)], stdout=subprocess.PIPE,
                              text=True, env={**os.environ, "PYTHONPATH": ROOT})
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_a_second_run_fails_at_once_naming_the_holder_and_a_stale_lock_is_taken_over(tmp_path, caplog):
    holder = hold_lock(tmp_path, 600)
    try:
        start = time.monotonic()
        with pytest.raises(DirectoryLocked, match=rf"in use by another run \(pid {holder.pid} on host "
                                                  rf"'{socket.gethostname()}'.*wait for that run to end, or give this "
                                                  "one another output_dir"):
            make_trainer(tmp_path)
        assert time.monotonic() - start < 10  # at once: before loading models or data
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert os.path.exists(tmp_path / LOCK_FILE)  # SIGKILL leaves the file behind: stale
    trainer = make_trainer(tmp_path, max_steps=1)
    assert f"Taking over the stale lock {tmp_path / LOCK_FILE} left by a run that is no longer running (pid " \
           f"{holder.pid}" in caplog.text
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    trainer.train()
    trainer.run.release()
    assert not os.path.exists(tmp_path / LOCK_FILE)


def test_the_lock_is_released_when_its_process_exits(tmp_path):
    holder = hold_lock(tmp_path, 0)
    holder.wait()
    assert holder.returncode == 0 and not os.path.exists(tmp_path / LOCK_FILE)
    make_trainer(tmp_path)  # free


def test_two_trainers_of_one_process_share_the_lock(tmp_path):
    first = make_trainer(tmp_path)
    second = make_trainer(tmp_path)
    first.run.release()
    assert os.path.exists(tmp_path / LOCK_FILE)  # still held by the second
    second.run.release()
    assert not os.path.exists(tmp_path / LOCK_FILE)


def test_a_lock_file_that_cannot_be_judged_stale_is_respected(tmp_path):
    """Without an flock held (another host on a shared file system, or a file system without flock), the file's
    holder decides: a process on another host cannot be checked from here, and a live pid here is trusted."""
    lock = tmp_path / LOCK_FILE
    tmp_path.mkdir(exist_ok=True)
    lock.write_text(json.dumps({"pid": 4242, "host": "node-7", "started": time.time(), "command": "grpo.py"}))
    with pytest.raises(DirectoryLocked, match=rf"pid 4242 on host 'node-7'.*this host .* cannot tell whether it is "
                                              rf"still running. If it is not, delete {lock}"):
        make_trainer(tmp_path)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        lock.write_text(json.dumps({"pid": sleeper.pid, "host": socket.gethostname()}))
        with pytest.raises(DirectoryLocked, match=rf"pid {sleeper.pid} .*that process is alive"):
            make_trainer(tmp_path)
    finally:
        sleeper.kill()
        sleeper.wait()
    make_trainer(tmp_path)  # its pid is gone now: stale, taken over

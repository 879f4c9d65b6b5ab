"""A run you can watch: a console line per logging step and per evaluation (with or without the progress bar),
the completions table, and no transformers progress bars inside the run."""

import os
import re

import pytest
from transformers import AutoModelForCausalLM

from rlhf import console
from rlhf.extras.tiny import save_tiny
from rlhf.metrics import read_metrics
from helpers import PROMPTS, make_trainer


def extra_reward(prompts, completions, log_extra, **kwargs):
    log_extra("length", [len(c) for c in completions])
    return [float(len(c) % 3) for c in completions]


@pytest.mark.parametrize("disable_tqdm", [True, False])
def test_a_line_per_logging_step_and_per_evaluation(tmp_path, capfd, disable_tqdm):
    model_dir = save_tiny(str(tmp_path / "tiny"), hidden_size=32, num_layers=2, num_heads=2)
    capfd.readouterr()
    trainer = make_trainer(tmp_path / "run", model=model_dir, max_steps=2, eval_steps=2, save_steps=1,
                           disable_tqdm=disable_tqdm, trainer_kwargs={"eval_dataset": PROMPTS[:4]})
    trainer.train()
    out, err = capfd.readouterr()
    records = read_metrics(str(tmp_path / "run" / "metrics.jsonl"))
    train = [r for r in records if "reward/mean" in r]
    lines = [line for line in out.splitlines() if line.startswith("step ")]
    assert [line.split(" | ")[0] for line in lines] == ["step 1/2", "step 2/2"]
    for line, record in zip(lines, train):
        assert f"reward {record['reward/mean']:.3f} ± {record['reward/std']:.3f}" in line
        assert f"entropy {record['entropy']:.3f}" in line and f"length {record['completions/mean_length']:.1f}" in line
        assert re.search(r"\| [\d.]+ s/step$", line)
    evals = [line for line in out.splitlines() if line.startswith("eval @ step")]
    assert [line.split(" | ")[0] for line in evals] == ["eval @ step 0", "eval @ step 2"]
    assert f"reward {records[-1]['eval/reward_mean']:.3f}" in evals[-1]
    # The model was loaded from a path and checkpoints were written: no transformers bar in the output.
    assert "Loading weights" not in out + err and "Writing model shards" not in out + err
    assert "training:" not in err  # captured output is not a terminal: no bar (the pty test below has one)


def test_transformers_bars_would_show_without_the_quieting(tmp_path, capfd):
    """The negative control of the check above: loading and saving outside the trainer do draw bars here."""
    model_dir = save_tiny(str(tmp_path / "tiny"), hidden_size=32, num_layers=2, num_heads=2)
    AutoModelForCausalLM.from_pretrained(model_dir).save_pretrained(str(tmp_path / "copy"))
    err = capfd.readouterr().err
    assert "Loading weights" in err and "Writing model shards" in err


def test_completions_table_on_the_console(tmp_path, capsys):
    trainer = make_trainer(tmp_path, reward=extra_reward, max_steps=1, log_completions=True,
                           num_completions_to_print=3)
    trainer.train()
    out = capsys.readouterr().out
    assert "Training completions, step 1" in out
    header = next(line for line in out.splitlines() if "prompt" in line and "completion" in line)
    for column in ("prompt", "completion", "extra_reward", "advantage", "length"):
        assert column in header
    assert out.count("+") >= 3 or out.count("=") >= 3  # three prompts shown (every prompt text has one + and =)


def test_tables_without_rich_are_plain_text(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_rich(name, *args, **kwargs):
        if name.startswith("rich"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_rich)
    rows = [{"prompt": "1+1=", "completion": "2", "correct": 1.0, "advantage": 0.5}]
    assert console.completions_table(rows, 4) == ("Training completions, step 4\n"
                                                  "  prompt: 1+1= | completion: 2 | correct: 1 | advantage: 0.5")


def test_line_formats():
    record = {"reward/mean": 0.5, "reward/std": 0.25, "reward/a/mean": 1.0, "reward/b/mean": 0.0, "kl": 0.001,
              "learning_rate": 1e-6, "time/step": 2.0}
    assert console.train_line(3, 10, record, ["a", "b"]) == (
        "step 3/10 | reward 0.500 ± 0.250 | a 1.000 | b 0.000 | kl 0.0010 | lr 1.00e-06 | 2.00 s/step")
    assert console.eval_line(5, {"eval/reward_mean": 0.25, "eval/accuracy": 0.5, "eval/pass@4": 0.75,
                                 "eval/pass@1": 0.5}) == (
        "eval @ step 5 | reward 0.250 | accuracy 0.500 | pass@1 0.500 | pass@4 0.750")


def rate_reward(prompts, completions, log_metric, **kwargs):
    log_metric("format/answer_rate", 0.25)
    return [float(len(c) % 3) for c in completions]


def test_log_metric_values_reach_the_console_lines(tmp_path, capsys):
    """What reward functions give log_metric is on the training line (before the seconds per step) and, from the
    greedy completions, on the evaluation line."""
    trainer = make_trainer(tmp_path, reward=rate_reward, max_steps=1, eval_steps=1,
                           trainer_kwargs={"eval_dataset": PROMPTS[:2]})
    trainer.train()
    out = capsys.readouterr().out
    (line,) = [line for line in out.splitlines() if line.startswith("step ")]
    assert re.search(r"\| format/answer_rate 0\.25 \| [\d.]+ s/step$", line), line
    evals = [line for line in out.splitlines() if line.startswith("eval @ step")]
    assert len(evals) == 2 and all(line.endswith("| format/answer_rate 0.25") for line in evals), evals
    record = {"reward/mean": 0.5, "custom/rate": 0.125, "num_tokens": 10.0, "time/step": 1.0}
    assert console.train_line(1, 2, record, []) == "step 1/2 | reward 0.500 | custom/rate 0.125 | 1.00 s/step"


def test_documented_launch_commands_name_a_config_file():
    """`accelerate launch` without a config prints a six-line block of defaults; every command the README, the
    recipes and their configs document names one (the TRL-style YAML test runs one of them)."""
    import glob
    import os

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    files = [os.path.join(root, "README.md"), *glob.glob(os.path.join(root, "recipes", "*.py")),
             *glob.glob(os.path.join(root, "recipes", "configs", "*.yaml"))]
    commands = [(path, line) for path in files for line in open(path).read().splitlines()
                if re.search(r"accelerate launch\s+(--|\S*/|\S*\.py)", line)]
    assert len(commands) > 10
    for path, line in commands:
        assert "--config_file" in line, (path, line)


def run_logging(tmp_path, name: str, stderr_to_terminal: bool) -> tuple[str, str]:
    """A 6-step run in a child process, stdout to a file and stderr to a file or to a pseudo-terminal."""
    import pty
    import subprocess
    import sys

    script = ("from tests.helpers import make_trainer\n"
              f"make_trainer({str(tmp_path / name)!r}, max_steps=6, logging_steps=2, disable_tqdm=False).train()\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    leader, follower = pty.openpty() if stderr_to_terminal else (None, None)
    if stderr_to_terminal:  # a terminal 120 columns wide (a new pty has none, and a bar of width 0 draws nothing)
        import fcntl
        import struct
        import termios

        fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    with open(tmp_path / f"{name}.out", "w") as out, open(tmp_path / f"{name}.err", "w") as err:
        child = subprocess.Popen([sys.executable, "-c", script], cwd=root, stdout=out,
                                 stderr=follower if stderr_to_terminal else err, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        terminal = b""
        if stderr_to_terminal:
            os.close(follower)
            while True:
                try:
                    chunk = os.read(leader, 65536)
                except OSError:  # the child closed the terminal
                    break
                if not chunk:
                    break
                terminal += chunk
            os.close(leader)
        assert child.wait(timeout=120) == 0
    stderr = terminal.decode(errors="replace") if stderr_to_terminal else (tmp_path / f"{name}.err").read_text()
    return (tmp_path / f"{name}.out").read_text(), stderr


def test_no_progress_bar_redraws_when_the_output_is_a_log_file(tmp_path):
    """Written to files (as a job's log), a run leaves one console line per logging step and no progress-bar redraws;
    the same run with stderr on a terminal draws its bar."""
    stdout, stderr = run_logging(tmp_path, "logged", stderr_to_terminal=False)
    assert [line.split(" | ")[0] for line in stdout.splitlines() if line.startswith("step ")] == \
        ["step 2/6", "step 4/6", "step 6/6"]
    assert "\r" not in stdout + stderr and "training:" not in stderr, stderr[-2000:]
    _, terminal = run_logging(tmp_path, "terminal", stderr_to_terminal=True)
    assert "training:" in terminal and "\r" in terminal  # the control: a terminal gets the bar, redrawn in place

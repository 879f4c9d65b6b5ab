"""`make learn-bench`'s quick mode: one seed, a few steps, our GRPO and TRL's on the random-init task, scored by the
same held-out function; the table, the curves and the per-run records are written."""

import glob
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_learn_bench_quick_mode_writes_table_curves_and_runs(tmp_path):
    result = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "learn.py"), "--quick", "--tasks", "repeat",
                             "--methods", "grpo,trl_grpo", "--out", str(tmp_path)], cwd=ROOT, capture_output=True,
                            text=True, timeout=900, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = (tmp_path / "LEARN.md").read_text()
    assert "| grpo | 1 |" in report and "| trl_grpo | 1 |" in report and "TRL GRPO's final accuracy" in report
    assert (tmp_path / "learn_curves.png").stat().st_size > 10_000
    runs = {os.path.basename(os.path.dirname(p)): json.load(open(p))
            for p in glob.glob(str(tmp_path / "repeat" / "*" / "seed0-*.json"))}
    assert set(runs) == {"grpo", "trl_grpo"}
    for run in runs.values():
        steps = [point[0] for point in run["curve"]]
        assert steps[0] == 0 and steps[-1] == 3 and all(0 <= point[2] <= 1 for point in run["curve"])
        assert run["curve"][-1][1] > 0  # training seconds, evaluation excluded
    assert runs["grpo"]["alarms"] is not None and runs["trl_grpo"]["alarms"] is None  # the monitor is ours
    # The table replays today's monitor on the stored step metrics: on a fresh run it says what the live one said.
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import learn

    assert len(runs["grpo"]["monitor"]["history"]) == 3
    assert learn.replay_alarms(runs["grpo"]) == runs["grpo"]["alarms"] and learn.replay_alarms(runs["trl_grpo"]) is None


def test_a_stored_run_is_only_reused_for_the_same_settings():
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import learn_tasks

    task = learn_tasks.TASKS["addition"]
    same = learn_tasks.fingerprint(task, "grpo", task.steps, task.eval_every)
    assert same == learn_tasks.fingerprint(learn_tasks.TASKS["addition"], "grpo", task.steps, task.eval_every)
    others = {learn_tasks.fingerprint(task, "rloo", task.steps, task.eval_every),
              learn_tasks.fingerprint(task, "grpo", task.steps + 1, task.eval_every),
              learn_tasks.fingerprint(task, "grpo", task.steps, task.eval_every + 1),
              learn_tasks.fingerprint(learn_tasks.TASKS["repeat"], "grpo", task.steps, task.eval_every)}
    assert same not in others and len(others) == 4

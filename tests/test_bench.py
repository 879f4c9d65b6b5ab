"""The benchmark's GPU case, scaled down to run on a CPU in a test: both trainers run and the record is complete."""

import glob
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_smoke_runs_ours_and_trl_and_writes_the_record(tmp_path):
    result = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "run.py"), "--smoke", "--out", str(tmp_path)],
                            cwd=ROOT, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "ours/TRL" in result.stdout
    (path,) = glob.glob(str(tmp_path / "smoke-*.json"))
    record = json.load(open(path))
    assert set(record["results"]) == {"ours_grpo", "trl_grpo", "ours_ppo"}
    for run in record["results"].values():
        assert len(run["step_seconds"]) == 2 and run["median_step_s"] > 0 and run["peak_memory_mb"] > 0
    assert {"generate", "update", "reference", "score"} <= set(record["results"]["ours_grpo"]["phases"])
    assert record["floors_s"]["generate"] > 0 and record["torch"] and record["matched_settings"]

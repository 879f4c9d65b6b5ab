"""The benchmark's GPU and memory cases, scaled down to run on a CPU in a test: both trainers run and the records
are complete."""

import glob
import json
import os
import subprocess
import sys

import pytest

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
    assert record["floors"]["ours_grpo"]["generate"] > 0 and record["torch"] and record["matched_settings"]
    (path,) = glob.glob(str(tmp_path / "memory_smoke-*.json"))
    record = json.load(open(path))
    assert set(record["results"]) == {"ours_grpo"} and "x floor" in result.stdout
    phases = record["results"]["ours_grpo"]["phase_peak_rss_mb"]
    assert {"generate", "update"} <= set(phases) and all(v > 0 for v in phases.values())
    assert record["floors"]["update"] > record["results"]["ours_grpo"]["baseline_rss_mb"] > 0


@pytest.mark.slow  # two recipe subprocesses: about a minute
def test_gpu_decode_comparison_runs_both_decode_paths_through_the_recipe(tmp_path):
    """bench/gpu.sh's second half at a tiny size on the CPU: the recipe with plain generate and with the static KV
    cache both run, and the record holds both. bench/gpu.sh itself parses."""
    assert subprocess.run(["bash", "-n", os.path.join(ROOT, "bench", "gpu.sh")]).returncode == 0
    result = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "gpu_decode.py"), "--smoke", "--out",
                             str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (path,) = glob.glob(str(tmp_path / "decode-smoke-*.json"))
    record = json.load(open(path))
    assert set(record["results"]) == {"dynamic_cache", "static_kv_cache"}
    assert all(r["steps"] == 2 and r["generate_s"] > 0 for r in record["results"].values())

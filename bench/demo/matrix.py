"""The demo's acceptance matrix: `python recipes/demo.py --seed S --algo A --threads T` for seeds x algos x
threads, each as its own process, exactly as a user runs it. Resumable: a (seed, algo, threads) already in
out/matrix/results.jsonl is skipped. The algos of one (seed, threads) share its warm start (demo.py reuses it).

    python bench/demo/matrix.py [--seeds 0 1 2 3 4] [--algos grpo ppo reinforce] [--threads 1 2] [--jobs 2]
    python bench/demo/matrix.py --table      # the markdown table of what has run
    MATRIX_DIR=matrix_v1_lr2e-3 python bench/demo/matrix.py --table   # the first design's (warm-start lr 2e-3)

CPU s of demo.py: the whole process; the warm start is built by the first algo of a (seed, threads) and reused
by the others, so only that one counts it.
--jobs runs that many (seed, threads) units at once, for 1-thread units only (a 2-thread unit runs alone).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
OUT = os.path.join(HERE, "out", os.environ.get("MATRIX_DIR", "matrix"))
RESULTS = os.path.join(OUT, "results.jsonl")
lock = threading.Lock()


def done() -> dict:
    if not os.path.exists(RESULTS):
        return {}
    with open(RESULTS) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return {(r["seed"], r["algo"], r["torch_threads"]): r for r in rows}


def run_unit(seed: int, threads: int, algos: list[str]) -> None:
    work = os.path.join(OUT, f"s{seed}_t{threads}")
    for algo in algos:
        if (seed, algo, threads) in done():
            continue
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": ROOT, "HF_HUB_OFFLINE": "1",
               "TOKENIZERS_PARALLELISM": "false"}
        cmd = [sys.executable, os.path.join(ROOT, "recipes", "demo.py"), "--seed", str(seed), "--algo", algo,
               "--threads", str(threads), "--output_dir", work, "--rebuild_warm_start"]  # not seed 0's shipped one
        os.makedirs(work, exist_ok=True)
        with open(os.path.join(work, f"{algo}.log"), "w") as log:
            rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
        if rc != 0:
            print(f"seed {seed} {algo} threads {threads}: exit {rc}, see {work}/{algo}.log", flush=True)
            continue
        with open(os.path.join(work, f"summary_{algo}.json")) as f:
            summary = json.load(f)
        with lock, open(RESULTS, "a") as f:
            f.write(json.dumps(summary) + "\n")
        print(f"seed {seed} {algo:<9} threads {threads}: {summary['accuracy_before']:.1%} -> "
              f"{summary['accuracy_after']:.1%} ({summary['gain_points']:+.1f}), warm start "
              f"{summary['warm_start_steps']} steps, CPU {summary['total_cpu_seconds']} s, alarms "
              f"{summary['alarms'] or 'none'}", flush=True)


def table() -> str:
    rows = done()
    lines = ["| algo | threads | " + " | ".join(f"seed {s}" for s in range(5)) +
             " | mean gain | worst gain | mean start -> end | warm-start steps | CPU s of demo.py (mean) | alarms |",
             "|---|---|" + "---|" * 5 + "---|---|---|---|---|---|"]
    for algo in ("grpo", "ppo", "reinforce"):
        for threads in (1, 2):
            cells, picked = [], []
            for seed in range(5):
                r = rows.get((seed, algo, threads))
                if r is None:
                    cells.append("")
                    continue
                picked.append(r)
                cells.append(f"{100 * r['accuracy_before']:.1f} -> {100 * r['accuracy_after']:.1f} "
                             f"(**{r['gain_points']:+.1f}**)")
            if not picked:
                continue
            gains = [r["gain_points"] for r in picked]
            alarms = sorted({a for r in picked for a in r.get("alarms", [])})
            lines.append(
                f"| {algo} | {threads} | " + " | ".join(cells) +
                f" | {statistics.mean(gains):+.1f} | {min(gains):+.1f} | "
                f"{100 * statistics.mean(r['accuracy_before'] for r in picked):.1f} -> "
                f"{100 * statistics.mean(r['accuracy_after'] for r in picked):.1f} | "
                f"{min(r['warm_start_steps'] for r in picked)}-{max(r['warm_start_steps'] for r in picked)} | "
                f"{statistics.mean(r['total_cpu_seconds'] for r in picked):.0f} | {', '.join(alarms) or 'none'} |")
    gains = [r["gain_points"] for r in rows.values()]
    if gains:
        lines.append(f"\nAll {len(gains)} runs: mean gain {statistics.mean(gains):+.1f}, worst {min(gains):+.1f}.")
    return "\n".join(lines)


def summary() -> str:
    """Per algo and thread count: the spread over seeds (what the README shows)."""
    rows = done()
    names = {"grpo": "GRPO", "ppo": "PPO (critic, GAE, k1 KL 0.01 in the reward)", "reinforce": "REINFORCE, RLOO baseline"}
    lines = ["| algorithm (`ALGO=`) | torch threads | seeds | after warm start | after 100 RL steps: mean (min-max) | "
             "gain: mean (min-max) | CPU s of `demo.py`: warm start, RL |", "|---|---|---|---|---|---|---|"]
    for algo in ("grpo", "ppo", "reinforce"):
        for threads in (1, 2):
            picked = [r for (s, a, t), r in sorted(rows.items()) if a == algo and t == threads]
            if not picked:
                continue
            before = [100 * r["accuracy_before"] for r in picked]
            after = [100 * r["accuracy_after"] for r in picked]
            gains = [r["gain_points"] for r in picked]
            warm = [r["warm_start_cpu_seconds"] for r in picked]
            lines.append(
                f"| {names[algo]} | {threads} | {', '.join(str(r['seed']) for r in picked)} | "
                f"{min(before):.1f}-{max(before):.1f}% | {statistics.mean(after):.1f}% ({min(after):.1f}-{max(after):.1f}) | "
                f"{statistics.mean(gains):+.1f} ({min(gains):+.1f} to {max(gains):+.1f}) | "
                f"{min(warm):.0f}-{max(warm):.0f}, {statistics.mean(r['rl_cpu_seconds'] for r in picked):.0f} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--algos", nargs="+", default=["grpo", "ppo", "reinforce"])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--table", action="store_true")
    parser.add_argument("--summary", action="store_true", help="the per-algo spread over seeds (for the README)")
    args = parser.parse_args()
    if args.table or args.summary:
        print(table() if args.table else summary())
        return
    os.makedirs(OUT, exist_ok=True)
    for threads in args.threads:
        jobs = args.jobs if threads == 1 else 1
        with ThreadPoolExecutor(jobs) as pool:
            list(pool.map(lambda s: run_unit(s, threads, args.algos), args.seeds))
    print(table())


if __name__ == "__main__":
    main()

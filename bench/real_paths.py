"""Trainer paths on the real model, SmolLM2-135M-Instruct, each once, with numbers (`make real-model` first):

- ``resume``: recipes/grpo.py from the .gguf file itself, killed with SIGKILL once its second checkpoint is on disk,
  resumed with ``--resume_from_checkpoint latest``; its final weights against those of a run never interrupted.
- ``lora``: recipes/grpo.py with a LoRA actor (the reference is the adapter disabled) on the demo's task;
  held-out greedy accuracy before and after.
- ``reward_model``: the RLHF chain on the synthetic preference task (rlhf/extras/synthetic.py): a Bradley-Terry reward
  model on the SmolLM2 backbone (recipes/train_reward_model.py), held-out pairwise accuracy before and after; then PPO
  with the SmolLM2 actor against it (recipes/ppo.py), the reward model's score and the task's hidden gold score on
  held-out prompts before and after. The synthetic task, not one derived from arithmetic: its words are ordinary
  English for SmolLM2's tokenizer, and its gold score says whether raising the learned reward improved the replies.
- ``tools``: GRPO with the calculator tool through the plain-text fallback of SmolLM2's ChatML template: the model as
  shipped, after a short supervised warm start (as shipped it writes no well-formed call), and after GRPO; held-out
  greedy accuracy and tool-call rate.

    python bench/real_paths.py [--cases resume,lora,reward_model,tools] [--out bench/results/real_paths]

Each case's record goes to <out>/<case>.json (with the machine and the thread count); bench/REAL_PATHS.md is made
from all the records there.
"""

import argparse
import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CONFIGS = os.path.join(ROOT, "recipes", "configs")
CONFIG = os.path.join(CONFIGS, "demo_real_grpo.yaml")
RM_CONFIG = os.path.join(CONFIGS, "real_reward_model_synthetic.yaml")
PPO_CONFIG = os.path.join(CONFIGS, "real_ppo_synthetic_rm.yaml")
TOOLS_CONFIG = os.path.join(CONFIGS, "real_tools_grpo.yaml")
# The tool case's supervised warm start (rlhf.extras.calculator.warm_start): 24 steps of 4 conversations, 100 distinct
# ones that call calc and answer with its result making 30% of them, the rest direct answers; lr 1e-4 after 3 steps.
WARM_START = {"max_steps": 24, "tool_examples": 100, "tool_fraction": 0.3, "batch_size": 4, "lr": 1e-4,
              "warmup_steps": 3}


def recipe(output_dir: str, *extra: str, script: str = "grpo.py", config: str = CONFIG, model: str | None = None
           ) -> list[str]:
    """The command line of a recipe on the real model (the .gguf file itself unless ``model`` is given)."""
    from rlhf.extras.real_model import smollm2_path

    return [sys.executable, os.path.join(ROOT, "recipes", script), "--config", config,
            "--model_name_or_path", model or smollm2_path(), "--output_dir", output_dir, *extra]


def records(output_dir: str) -> list[dict]:
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def start(command: list[str]) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(process: subprocess.Popen) -> str:
    output, _ = process.communicate(timeout=3600)
    if process.returncode != 0:
        raise RuntimeError(output[-4000:])
    return output


def weights(directory: str) -> dict:
    from safetensors.torch import load_file

    return {k: v for f in sorted(os.listdir(directory)) if f.endswith(".safetensors")
            for k, v in load_file(os.path.join(directory, f)).items()}


def case_resume(out: str) -> dict:
    """Four steps with a checkpoint after each; SIGKILL once checkpoint-2 is complete; resume; compare."""
    import torch

    common = ["--max_steps", "4", "--save_steps", "1", "--save_total_limit", "2", "--eval_steps", "0",
              "--write_report", "false"]
    straight, broken = os.path.join(out, "resume_straight"), os.path.join(out, "resume_broken")
    start_time = time.time()
    finish(start(recipe(straight, *common)))
    victim = start(recipe(broken, *common))
    marker = os.path.join(broken, "checkpoint-2", "manifest.json")  # written last: the checkpoint is complete
    while not os.path.exists(marker) and victim.poll() is None:
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    killed = victim.returncode == -signal.SIGKILL
    output = finish(start(recipe(broken, *common, "--resume_from_checkpoint", "latest")))
    expected, resumed = weights(os.path.join(straight, "model")), weights(os.path.join(broken, "model"))
    identical = sum(torch.equal(expected[k], resumed[k]) for k in expected)
    max_diff = max((expected[k] - resumed[k]).abs().max().item() for k in expected)
    return {"killed_by_sigkill": killed, "resumed_from": next((line.strip() for line in output.splitlines()
                                                               if "Resumed from" in line), None),
            "tensors": len(expected), "bit_identical_tensors": identical, "max_abs_diff": max_diff,
            "same_keys": expected.keys() == resumed.keys(), "seconds": round(time.time() - start_time, 1)}


def case_lora(out: str) -> dict:
    """The demo's GRPO with a LoRA actor (r 16 on every linear layer, lr 2e-4), seed 0."""
    output_dir = os.path.join(out, "lora")
    start_time = time.time()
    finish(start(recipe(output_dir, "--use_peft", "true", "--lora_r", "16", "--lora_alpha", "32",
                        "--learning_rate", "2e-4", "--write_report", "false")))
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        evals = [r for r in map(json.loads, f) if "eval/accuracy" in r]
    return {"curve": [[r["step"], r["eval/accuracy"]] for r in evals], "accuracy_before": evals[0]["eval/accuracy"],
            "accuracy_after": evals[-1]["eval/accuracy"], "adapter_saved": os.path.isfile(
                os.path.join(output_dir, "model", "adapter_config.json")), "seconds": round(time.time() - start_time, 1)}


def reward_model_at_start(output_dir: str) -> dict:
    """Held-out pairwise accuracy of the reward-model recipe's model before its first step: the recipe's own parse,
    data and trainer (same config, same seed, so the same new head on the backbone), evaluated, not trained."""
    import gc

    from reward_models.trainer import RewardModelConfig, RewardModelScriptArguments, RewardModelTrainer
    from rlhf.cli import parse_args
    from rlhf.extras.real_model import smollm2_path

    script, config = parse_args([RewardModelScriptArguments, RewardModelConfig], [
        "--config", RM_CONFIG, "--model_name_or_path", smollm2_path(), "--output_dir", output_dir])
    train_dataset, eval_dataset = script.load_datasets(require_prompt=False)
    trainer = RewardModelTrainer(script.model_name_or_path, config, train_dataset=train_dataset,
                                 eval_dataset=eval_dataset)
    result = {**trainer.evaluate(), "pairs": len(eval_dataset)}
    del trainer
    gc.collect()
    return result


def greedy_samples(output_dir: str, step: int, names: tuple[str, ...]) -> list[dict]:
    """The distinct greedy replies an evaluation logged (the synthetic prompts have 6 topics), with their scores."""
    seen, out = set(), []
    with open(os.path.join(output_dir, f"samples-{step}.jsonl")) as f:
        for s in map(json.loads, f):
            if s["prompt"] not in seen:
                seen.add(s["prompt"])
                out.append({"prompt": s["prompt"], "reply": s["completion"],
                            **{n: round(s["rewards"][n], 3) for n in names}})
    return out


def pearson(xs: list[float], ys: list[float]) -> float:
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    cov = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    return cov / (sum((x - mx) ** 2 for x in xs) * sum((y - my) ** 2 for y in ys)) ** 0.5


def case_reward_model(out: str) -> dict:
    """The RLHF chain on the synthetic preference task: a Bradley-Terry reward model on the SmolLM2 backbone
    (recipes/train_reward_model.py), then PPO with the SmolLM2 actor against it (recipes/ppo.py, the critic
    starting from the reward model); the task's hidden gold score logged with weight 0."""
    from rlhf.extras.synthetic import eval_prompts

    rm_dir, ppo_dir = os.path.join(out, "reward_model"), os.path.join(out, "ppo")
    start_time = time.time()
    at_start = reward_model_at_start(os.path.join(out, "reward_model_at_start"))
    finish(start(recipe(rm_dir, script="train_reward_model.py", config=RM_CONFIG)))
    rm_seconds = round(time.time() - start_time, 1)
    rm_eval = [r for r in records(rm_dir) if "eval/accuracy" in r][-1]
    reward_model = os.path.join(rm_dir, "model")
    finish(start(recipe(ppo_dir, "--reward_funcs", reward_model, "rlhf.extras.synthetic:gold_reward",
                        "--value_model_name_or_path", reward_model, "--write_report", "false",
                        script="ppo.py", config=PPO_CONFIG)))
    rm_name = "reward_model:model"
    rows = records(ppo_dir)
    evals = [r for r in rows if "eval/reward_mean" in r]
    before, after = evals[0], evals[-1]
    measured = {"rm_greedy": f"eval/reward/{rm_name}/mean", "gold_greedy": "eval/reward/gold_reward/mean",
                "rm_sampled": "eval/sampled/reward_mean", "greedy_length": "eval/mean_length",
                "greedy_truncated": "eval/truncated_frac"}
    with open(os.path.join(ppo_dir, "completions.jsonl")) as f:  # a sample of each step's replies, with their scores
        logged = [json.loads(line)["rewards"] for line in f]
    return {"rm_pairwise_accuracy_before": at_start["eval/accuracy"],
            "rm_pairwise_accuracy_after": rm_eval["eval/accuracy"],
            "rm_margin_before": at_start["eval/margin_mean"], "rm_margin_after": rm_eval["eval/margin_mean"],
            "rm_heldout_pairs": at_start["pairs"], "rm_steps": rm_eval["step"], "rm_seconds": rm_seconds,
            "ppo_steps": after["step"], "heldout_prompts": len(eval_prompts()),
            **{f"{k}_before": before[key] for k, key in measured.items()},
            **{f"{k}_after": after[key] for k, key in measured.items()},
            "eval_curve": [[r["step"], *(round(r[measured[k]], 3) for k in ("rm_greedy", "rm_sampled", "gold_greedy"))]
                           for r in evals],
            "train_curve": [[r["step"], round(r[f"reward/{rm_name}/mean"], 3), round(r["reward/gold_reward/mean"], 3),
                             round(r["completions/mean_length"], 1)] for r in rows if "reward/mean" in r],
            "rm_gold_correlation": {"replies": len(logged), "pearson": pearson(
                [r[rm_name] for r in logged], [r["gold_reward"] for r in logged])},
            "greedy_before": greedy_samples(ppo_dir, before["step"], (rm_name, "gold_reward")),
            "greedy_after": greedy_samples(ppo_dir, after["step"], (rm_name, "gold_reward")),
            "seconds": round(time.time() - start_time, 1)}


def tool_warm_start(path: str, probes: int = 20) -> dict:
    """SmolLM2 after ``WARM_START``: supervised steps on calculator conversations built as a rollout builds them (the
    plain-text tool description in the system message, the tool's turn as context), saved to ``path``. ``skill`` is
    ``tool_use_skill`` on ``probes`` held-out prompts: the probability of sampling the rest of a right call after its
    first token, then the right answer."""
    import gc

    import torch

    from rlhf import GRPOConfig
    from rlhf.agent import AgentLoop
    from rlhf.cli import ScriptArguments, parse_args
    from rlhf.extras.calculator import calc, make_splits, tool_use_skill, warm_start
    from rlhf.extras.real_model import smollm2_path
    from rlhf.models import load_causal_lm, load_tokenizer

    _, config = parse_args([ScriptArguments, GRPOConfig], ["--config", TOOLS_CONFIG, "--model_name_or_path",
                                                            smollm2_path()])
    tokenizer, model = load_tokenizer(smollm2_path()), load_causal_lm(smollm2_path())
    agent = AgentLoop.from_config(tokenizer, [calc], None, config)
    train, held_out = make_splits()
    held_out = [row["prompt"] for row in held_out.select(range(probes))]
    skill_before = tool_use_skill(model, agent, held_out)
    start_time = time.time()
    torch.manual_seed(config.seed)
    steps = warm_start(model, agent, train, seed=config.seed, **WARM_START)
    seconds = round(time.time() - start_time, 1)
    record = {"tools_in_chat_template": agent.template_tools, "warm_start": WARM_START, "warm_start_steps": steps,
              "warm_start_seconds": seconds, "skill_before": skill_before,
              "skill_after": tool_use_skill(model, agent, held_out)}
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    agent.close()
    del model
    gc.collect()
    return record


def case_tools(out: str) -> dict:
    """GRPO with the calculator tool on SmolLM2 through the plain-text tool fallback: the model as shipped evaluated
    (recipes/evaluate.py), a short supervised warm start (it writes no well-formed call without one), then
    recipes/grpo.py from the warm start; held-out greedy accuracy and tool-call rate at each stage."""
    raw_dir, warm_dir, grpo_dir = (os.path.join(out, name) for name in ("tools_raw", "tools_warmstart", "tools_grpo"))
    start_time = time.time()
    finish(start(recipe(raw_dir, script="evaluate.py", config=TOOLS_CONFIG)))
    with open(os.path.join(raw_dir, "eval", "eval_results.json")) as f:
        raw = json.load(f)
    warm = tool_warm_start(warm_dir)
    grpo_start = time.time()
    finish(start(recipe(grpo_dir, "--write_report", "false", config=TOOLS_CONFIG, model=warm_dir)))
    rows = records(grpo_dir)
    evals = [r for r in rows if "eval/accuracy" in r]
    before, after = evals[0], evals[-1]
    with open(os.path.join(grpo_dir, f"samples-{after['step']}.jsonl")) as f:
        sample = json.loads(f.readline())
    return {"heldout_prompts": raw["num_prompts"],
            "raw_accuracy": raw["eval/accuracy"], "raw_tool_call_rate": raw["eval/agent/tool_call_rate"], **warm,
            "grpo_steps": after["step"], "grpo_seconds": round(time.time() - grpo_start, 1),
            **{f"{name}_{when}": r[f"eval/{key}"] for when, r in (("before", before), ("after", after))
               for name, key in (("accuracy", "accuracy"), ("tool_call_rate", "agent/tool_call_rate"),
                                 ("bad_calls", "agent/tool_bad_calls"))},
            "train_curve": [[r["step"], r["agent/tool_call_rate"], round(r["reward/mean"], 3)]
                            for r in rows if "agent/tool_call_rate" in r],
            "greedy_after": {"prompt": sample["prompt"], "completion": sample["completion"]},
            "seconds": round(time.time() - start_time, 1)}


CASES = {"resume": case_resume, "lora": case_lora, "reward_model": case_reward_model, "tools": case_tools}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--out", default=os.path.join(HERE, "results", "real_paths"))
    args = parser.parse_args()
    sys.path.insert(0, HERE)
    from learn import cpu_name

    import torch

    os.makedirs(args.out, exist_ok=True)
    for name in args.cases.split(","):
        print(f"{name} ...", flush=True)
        shutil.rmtree(os.path.join(args.out, "runs"), ignore_errors=True)  # each case's runs start from nothing
        record = {"case": name, "date": str(datetime.date.today()), "cpu": cpu_name(), "cores": os.cpu_count(),
                  "torch_threads": torch.get_num_threads(), **CASES[name](os.path.join(args.out, "runs"))}
        with open(os.path.join(args.out, f"{name}.json"), "w") as f:
            json.dump(record, f, indent=2)
        print(json.dumps(record, indent=2), flush=True)
    write_report(args.out, os.path.join(HERE, "REAL_PATHS.md"))


def write_report(out: str, path: str) -> None:
    """bench/REAL_PATHS.md from every case record in ``out`` (cases run at different times keep their own machine)."""
    lines = ["# Trainer paths on SmolLM2-135M-Instruct", "", "`python bench/real_paths.py`; one record per case "
             "in bench/results/real_paths/, each with the machine it ran on.", ""]
    for name in CASES:
        record_path = os.path.join(out, f"{name}.json")
        if not os.path.exists(record_path):
            lines += [f"## {name}", "", "not run yet", ""]
            continue
        with open(record_path) as f:
            r = json.load(f)
        where = f"{r['date']}, {r['cpu']}, {r['cores']} cores, {r['torch_threads']} torch threads, {r['seconds']} s"
        if name == "resume":
            text = (f"SIGKILL after checkpoint-2 of 4 ({'killed' if r['killed_by_sigkill'] else 'NOT killed'}), "
                    f"resumed ({r['resumed_from']}): {r['bit_identical_tensors']} of {r['tensors']} weight tensors "
                    f"bit-identical to an uninterrupted run, max |difference| {r['max_abs_diff']:.3g}.")
        elif name == "lora":
            text = (f"GRPO with a LoRA actor (r 16, every linear layer, lr 2e-4), the demo's task and reward, seed 0: "
                    f"held-out greedy accuracy {r['accuracy_before']:.1%} -> {r['accuracy_after']:.1%} "
                    f"({', '.join(f'step {s}: {a:.1%}' for s, a in r['curve'])}); adapter saved: {r['adapter_saved']}.")
        elif name == "reward_model":
            text = reward_model_text(r)
        else:
            text = tools_text(r)
        lines += [f"## {name}", "", text, "", where, ""]
    with open(path, "w") as f:
        f.write("\n".join(lines))


def reward_model_text(r: dict) -> str:
    replies = lambda samples: "; ".join(  # noqa: E731
        f"{s['prompt'].strip()} {s['reply'].strip()!r} (reward model {s['reward_model:model']:.2f}, gold "
        f"{s['gold_reward']:g})" for s in samples[:3])
    return (f"Bradley-Terry reward model, a new head on the SmolLM2 backbone (recipes/train_reward_model.py, "
            f"recipes/configs/real_reward_model_synthetic.yaml: {r['rm_steps']} steps of 32 pairs, "
            f"{r['rm_seconds']} s with the evaluation before training) on the synthetic preference task "
            f"(rlhf/extras/synthetic.py): held-out pairwise accuracy {r['rm_pairwise_accuracy_before']:.1%} -> "
            f"{r['rm_pairwise_accuracy_after']:.1%} on {r['rm_heldout_pairs']} pairs (mean margin "
            f"{r['rm_margin_before']:.2f} -> {r['rm_margin_after']:.2f}).\n\n"
            f"Then PPO with the SmolLM2 actor against it (recipes/ppo.py, recipes/configs/real_ppo_synthetic_rm.yaml: "
            f"{r['ppo_steps']} steps of 8 prompts x 2 replies, the critic starting from the reward model), on "
            f"{r['heldout_prompts']} held-out prompts (they repeat a few topics, so greedy gives one reply per "
            f"topic): "
            f"reward-model score, greedy {r['rm_greedy_before']:.2f} -> {r['rm_greedy_after']:.2f}, sampled "
            f"{r['rm_sampled_before']:.2f} -> {r['rm_sampled_after']:.2f}; the task's hidden gold score (never "
            f"trained on; +1 a kind word, -1 an unkind one, -0.5 a word beyond eight), greedy "
            f"{r['gold_greedy_before']:.2f} -> {r['gold_greedy_after']:.2f}; greedy reply length "
            f"{r['greedy_length_before']:.1f} -> {r['greedy_length_after']:.1f} tokens. Every evaluation, reward model "
            f"greedy / sampled / gold greedy: "
            f"{', '.join(f'step {s}: {a:.2f} / {b:.2f} / {g:.2f}' for s, a, b, g in r['eval_curve'])}. "
            f"Training replies (sampled), "
            f"reward model / gold by step: "
            f"{', '.join(f'{s}: {rm:.2f} / {g:.2f}' for s, rm, g, _ in r['train_curve'])}; on "
            f"{r['rm_gold_correlation']['replies']} of these replies (those logged), the reward model's score and the "
            f"gold score correlate with Pearson r = {r['rm_gold_correlation']['pearson']:.2f}.\n\n"
            f"Greedy before: {replies(r['greedy_before'])}.\n\nGreedy after: {replies(r['greedy_after'])}.")


def tools_text(r: dict) -> str:
    messages = r["greedy_after"]["prompt"] + r["greedy_after"]["completion"]
    sample = " | ".join(f"{m['role']}: {m['content']}" for m in messages)
    where = ("in the chat template" if r["tools_in_chat_template"]
             else "as plain text in a system message (ChatML has no tools)")
    w = r["warm_start"]
    return (f"Calculator tool (rlhf.extras.calculator) described {where}, calls parsed from the text; held-out greedy "
            f"results on {r['heldout_prompts']} 2-digit products, reward 1 for exactly the product in the last "
            f"message. "
            f"The model as shipped (recipes/evaluate.py): accuracy {r['raw_accuracy']:.1%}, tool-call rate "
            f"{r['raw_tool_call_rate']:.1%}. Warm start (rlhf.extras.calculator.warm_start, {r['warm_start_steps']} "
            f"supervised steps of {w['batch_size']} conversations, {w['tool_examples']} distinct tool conversations at "
            f"{w['tool_fraction']:.0%}, the rest direct answers, lr {w['lr']:g}; {r['warm_start_seconds']} s): the "
            f"probability of sampling a right call and answer once a call is opened {r['skill_before']:.2g} -> "
            f"{r['skill_after']:.2f}. GRPO from it (recipes/grpo.py, recipes/configs/real_tools_grpo.yaml, "
            f"{r['grpo_steps']} steps of 4 prompts x 8 trajectories, {r['grpo_seconds']} s): accuracy "
            f"{r['accuracy_before']:.1%} -> {r['accuracy_after']:.1%}, tool-call rate {r['tool_call_rate_before']:.1%} "
            f"-> {r['tool_call_rate_after']:.1%}, bad calls {r['bad_calls_before']:.2f} -> "
            f"{r['bad_calls_after']:.2f} a trajectory. Sampled during training, tool-call rate / reward by step: "
            f"{', '.join(f'{s}: {c:.2f} / {m:.2f}' for s, c, m in r['train_curve'])}.\n\n"
            f"After GRPO, greedy: {sample}")


if __name__ == "__main__":
    main()

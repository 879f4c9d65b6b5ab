"""Trainer paths on the real model, SmolLM2-135M-Instruct, each once, with numbers (`make real-model` first):

- ``resume``: recipes/grpo.py from the .gguf file itself, killed with SIGKILL once its second checkpoint is on disk,
  resumed with ``--resume_from_checkpoint latest``; its final weights against those of a run never interrupted.
- ``lora``: recipes/grpo.py with a LoRA actor (the reference is the adapter disabled) on the demo's task;
  held-out greedy accuracy before and after.

    python bench/real_paths.py [--cases resume,lora] [--out bench/results/real_paths]

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
CONFIG = os.path.join(ROOT, "recipes", "configs", "demo_real_grpo.yaml")


def recipe(output_dir: str, *extra: str) -> list[str]:
    from rlhf.extras.real_model import smollm2_path

    return [sys.executable, os.path.join(ROOT, "recipes", "grpo.py"), "--config", CONFIG,
            "--model_name_or_path", smollm2_path(), "--output_dir", output_dir, *extra]


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


CASES = {"resume": case_resume, "lora": case_lora}


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
        else:
            text = (f"GRPO with a LoRA actor (r 16, every linear layer, lr 2e-4), the demo's task and reward, seed 0: "
                    f"held-out greedy accuracy {r['accuracy_before']:.1%} -> {r['accuracy_after']:.1%} "
                    f"({', '.join(f'step {s}: {a:.1%}' for s, a in r['curve'])}); adapter saved: {r['adapter_saved']}.")
        lines += [f"## {name}", "", text, "", where, ""]
    with open(path, "w") as f:
        f.write("\n".join(lines))


if __name__ == "__main__":
    main()

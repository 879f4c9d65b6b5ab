"""20 GRPO steps of Qwen2.5-0.5B's shape (random init, bf16) through recipes/grpo.py, with plain `generate` (dynamic
KV cache, each prompt prefilled once per group) and with the fast decode path (`static_kv_cache: true`: a static KV
cache that transformers compiles with CUDA graphs), side by side: generation seconds per step and the whole step (the
median after two steps, which hold the compilation), and the first step. Part of `bench/gpu.sh`.

    python bench/gpu_decode.py --out bench/results      # on a GPU
    python bench/gpu_decode.py --smoke --out /tmp/x     # the same code at a tiny size on the CPU (a test runs it)
"""

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

from run import SHAPES, build_model, cpu_model  # noqa: E402

SETTINGS = {  # (shape, recipe overrides)
    "cuda": ("cuda", dict(max_steps=20, prompts_per_step=16, num_generations=8, max_new_tokens=128, micro_batch_size=32,
                          dtype="bfloat16")),
    "smoke": ("smoke", dict(max_steps=2, prompts_per_step=2, num_generations=2, max_new_tokens=6, micro_batch_size=4,
                            dtype="float32")),
}


def run_recipe(model_dir: str, output_dir: str, overrides: dict, static: bool) -> dict:
    command = [sys.executable, os.path.join(ROOT, "recipes", "grpo.py"), "--config",
               os.path.join(ROOT, "recipes", "configs", "demo_grpo.yaml"), "--model_name_or_path", model_dir,
               "--reward_funcs", "rlhf.extras.addition:digit_match_reward", "--eval_dataset_name", "none",
               "--output_dir", output_dir, "--logging_steps", "1", "--disable_tqdm", "true", "--write_report", "false",
               "--mini_batch_size", "none", "--learning_rate", "1e-6", "--static_kv_cache", str(static).lower(),
               "--max_prompt_length", "16"]
    for key, value in overrides.items():
        command += [f"--{key}", str(value)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    if result.returncode != 0:
        raise RuntimeError(f"recipe failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f if line.strip()]
    later = records[2:] or records  # the first steps include compilation (static) and warm-up
    return {"generate_s": statistics.median(r["time/generate"] for r in later),
            "step_s": statistics.median(r["time/step"] for r in later),
            "first_step_s": records[0]["time/step"], "steps": len(records),
            "mean_length": statistics.mean(r["completions/mean_length"] for r in records)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out", default=os.path.join(HERE, "results"))
    args = parser.parse_args()
    case = "smoke" if args.smoke else "cuda"
    shape_name, overrides = SETTINGS[case]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = os.path.join(tmp, "model")
        build_model(model_dir, SHAPES[shape_name]["arch"])
        for static in (False, True):
            name = "static_kv_cache" if static else "dynamic_cache"
            print(f"[decode] {name} ...", flush=True)
            results[name] = run_recipe(model_dir, os.path.join(tmp, name), overrides, static)
    plain, fast = results["dynamic_cache"], results["static_kv_cache"]
    rows = ["| generation | generate s/step | step s | first step s |", "|---|---|---|---|"]
    rows += [f"| {name} | {r['generate_s']:.2f} | {r['step_s']:.2f} | {r['first_step_s']:.1f} |"
             for name, r in results.items()]
    rows.append(f"| **static / dynamic** | **{fast['generate_s'] / plain['generate_s']:.2f}** | "
                f"**{fast['step_s'] / plain['step_s']:.2f}** | |")
    print("\n".join(rows))
    record = {"case": f"decode-{case}", "date": datetime.datetime.now().isoformat(timespec="seconds"),
              "machine": cpu_model(), "settings": overrides, "results": results}
    try:
        import torch

        if torch.cuda.is_available():
            record["gpu"] = torch.cuda.get_device_name()
    except ImportError:
        pass
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"decode-{case}-{record['date'].replace(':', '')}.json")
    with open(path, "w") as f:
        json.dump(record, f, indent=2)
    print(f"written: {path}")


if __name__ == "__main__":
    main()

"""One RL run from a saved warm start, as recipes/demo.py runs it (the same config files, data, reward and final
greedy evaluation), with config overrides. Usage:
  rl.py --algo grpo --start DIR --name SWEEP --tag RUN --threads T [--config FILE] [--set key=value ...]
-> out/rl/SWEEP/RUN.json: accuracy before / after, gain, RL CPU seconds, eval curve, train metrics, alarms."""
import argparse
import json
import os
import shutil
import time

from common import OUT, ROOT, describe

import torch

p = argparse.ArgumentParser()
p.add_argument("--algo", default="grpo")
p.add_argument("--start", required=True, help="a saved warm start (model dir)")
p.add_argument("--threads", type=int, default=1)
p.add_argument("--seed", type=int, default=0, help="the RL config's seed")
p.add_argument("--name", required=True)
p.add_argument("--tag", required=True)
p.add_argument("--config", default=None, help="default: recipes/configs/demo_<algo>.yaml")
p.add_argument("--set", nargs="*", default=[], help="config overrides key=value")
p.add_argument("--keep", action="store_true", help="keep the run's output dir (metrics, alarms)")
a = p.parse_args()
torch.set_num_threads(a.threads)

from recipes.demo import ALGORITHMS  # noqa: E402
from rlhf.cli import PPOScriptArguments, parse_args  # noqa: E402
from rlhf.extras.addition import correctness_reward, demo_splits, greedy_accuracy  # noqa: E402

config_path = a.config or os.path.join(ROOT, "recipes", "configs", f"demo_{a.algo}.yaml")
work = os.path.join(OUT, "runs", a.name, a.tag)
shutil.rmtree(work, ignore_errors=True)
overrides = ["--output_dir", work, "--seed", str(a.seed), "--write_report", "false", "--disable_tqdm", "true",
             "--model_name_or_path", a.start]
for kv in a.set:
    k, v = kv.split("=", 1)
    overrides += [f"--{k}", v]
config_class, trainer_class = ALGORITHMS[a.algo]
_, config = parse_args([PPOScriptArguments, config_class], ["--config", config_path, *overrides])
train, _, heldout = demo_splits()
trainer = trainer_class(a.start, [correctness_reward], args=config, train_dataset=train, eval_dataset=heldout)
start_desc = describe(trainer.unwrapped_model, trainer.tokenizer, heldout)
start, cpu_start = time.time(), time.process_time()
records = trainer.train().records
seconds, cpu_seconds = time.time() - start, time.process_time() - cpu_start
before = next(r["eval/accuracy"] for r in records if "eval/accuracy" in r)
after = greedy_accuracy(trainer.unwrapped_model, trainer.tokenizer, heldout)
end_desc = describe(trainer.unwrapped_model, trainer.tokenizer, heldout)
evals = [(r["step"], round(r["eval/accuracy"], 4)) for r in records if "eval/accuracy" in r]
keys = ("reward/mean", "reward/zero_std_group_frac", "entropy", "policy/approx_kl", "clip/low_frac",
        "clip/high_frac", "grad_norm", "kl", "learning_rate")
train_log = [{k: r[k] for k in ("step", *keys) if k in r} for r in records if "reward/mean" in r]
alarms_path = os.path.join(work, "alarms.jsonl")
alarms = [json.loads(line) for line in open(alarms_path)] if os.path.exists(alarms_path) else []
out = {"name": a.name, "tag": a.tag, "algo": a.algo, "start": a.start, "threads": a.threads, "seed": a.seed,
       "set": a.set, "before": before, "after": after, "gain": round(100 * (after - before), 1),
       "rl_seconds": round(seconds, 1), "rl_cpu_seconds": round(cpu_seconds, 1), "max_steps": config.max_steps,
       "start_desc": start_desc, "end_desc": end_desc, "evals": evals, "train_log": train_log,
       "alarms": [{k: x[k] for k in ("step", "alarm", "message")} for x in alarms]}
os.makedirs(os.path.join(OUT, "rl", a.name), exist_ok=True)
json.dump(out, open(os.path.join(OUT, "rl", a.name, a.tag + ".json"), "w"), indent=1)
if not a.keep:
    shutil.rmtree(work, ignore_errors=True)
print(json.dumps({k: out[k] for k in ("name", "tag", "before", "after", "gain", "rl_cpu_seconds")}),
      [x["alarm"] for x in out["alarms"]])

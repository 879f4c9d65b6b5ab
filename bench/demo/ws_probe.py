"""A warm start with a learning curve: every --every steps, held-out greedy accuracy and the exact answer
probabilities (bench/demo/common.py describe). Usage:
  ws_probe.py --tag NAME --seed S --threads T --steps N [--lr LR --batch B --warmup W --schedule S --drop_carry F]
-> out/ws/NAME/s{S}_t{T}.json (and the model with --save)."""
import argparse
import json
import os
import time

from common import OUT, describe  # noqa: F401  (sets sys.path)

import torch

p = argparse.ArgumentParser()
p.add_argument("--tag", required=True)
p.add_argument("--seed", type=int, default=0)
p.add_argument("--threads", type=int, default=1)
p.add_argument("--steps", type=int, required=True)
p.add_argument("--lr", type=float, default=1e-3)
p.add_argument("--batch", type=int, default=128)
p.add_argument("--warmup", type=int, default=50)
p.add_argument("--schedule", default="constant")
p.add_argument("--min_ratio", type=float, default=0.0)
p.add_argument("--drop_carry", type=float, default=0.0)
p.add_argument("--every", type=int, default=100)
p.add_argument("--save", action="store_true")
a = p.parse_args()
torch.set_num_threads(a.threads)
from rlhf.extras.addition import demo_model, demo_splits, greedy_accuracy, warm_start  # noqa: E402

train, validation, heldout = demo_splits()
model, tok = demo_model(a.seed)
curve = []
t0, c0 = time.time(), time.process_time()
probe_cpu = [0.0]


def probe(step):
    c = time.process_time()
    row = {"step": step, "greedy": greedy_accuracy(model, tok, heldout), **describe(model, tok, heldout),
           "cpu": round(c - c0 - probe_cpu[0], 1)}
    curve.append(row)
    print(json.dumps(row), flush=True)
    probe_cpu[0] += time.process_time() - c
    return False


warm_start(model, tok, train, max_steps=a.steps, batch_size=a.batch, lr=a.lr, warmup_steps=a.warmup, seed=a.seed,
           schedule=a.schedule, min_lr_ratio=a.min_ratio, drop_carry=a.drop_carry, check_every=a.every, stop=probe)
if curve[-1]["step"] != a.steps:
    probe(a.steps)
root = os.path.join(OUT, "ws", a.tag)
os.makedirs(root, exist_ok=True)
name = f"s{a.seed}_t{a.threads}"
if a.save:
    model.save_pretrained(os.path.join(root, name))
    tok.save_pretrained(os.path.join(root, name))
json.dump({"args": vars(a), "curve": curve, "wall": round(time.time() - t0, 1),
           "train_cpu": curve[-1]["cpu"]}, open(os.path.join(root, name + ".json"), "w"))

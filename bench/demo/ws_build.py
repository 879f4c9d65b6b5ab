"""The demo's warm start (rlhf.extras.addition.build_warm_start) for one seed and thread count, saved with its
description: ws_build.py --seed S --threads T [--tag NAME]  ->  out/ws/NAME/s{S}_t{T}/ and .json"""
import argparse
import json
import os
import time

from common import OUT, describe

import torch

p = argparse.ArgumentParser()
p.add_argument("--seed", type=int, default=0)
p.add_argument("--threads", type=int, default=1)
p.add_argument("--tag", default="demo")
a = p.parse_args()
torch.set_num_threads(a.threads)
from rlhf.extras.addition import WARM_START, build_warm_start, demo_splits, greedy_accuracy  # noqa: E402

checks = []
t0, c0 = time.time(), time.process_time()
model, tok, steps = build_warm_start(a.seed, log=lambda s, p: (checks.append((s, round(p, 4))), print(s, round(p, 4), round(time.process_time() - c0, 1), flush=True)))
cpu, wall = time.process_time() - c0, time.time() - t0
_, _, heldout = demo_splits()
root = os.path.join(OUT, "ws", a.tag)
name = f"s{a.seed}_t{a.threads}"
model.save_pretrained(os.path.join(root, name))
tok.save_pretrained(os.path.join(root, name))
out = {"seed": a.seed, "threads": a.threads, "settings": WARM_START, "steps": steps, "cpu": round(cpu, 1),
       "wall": round(wall, 1), "greedy": greedy_accuracy(model, tok, heldout), **describe(model, tok, heldout),
       "checks": checks}
json.dump(out, open(os.path.join(root, name + ".json"), "w"))
print(json.dumps({k: v for k, v in out.items() if k != "checks"}))

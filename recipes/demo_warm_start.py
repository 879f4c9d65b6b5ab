"""The demo's warm start: shipped with the repository for seed 0, so that `make demo` shows RL within a few minutes
of a fresh clone; built here for any other seed, or when asked.

    python recipes/demo_warm_start.py check   # rebuild seed 0 here and compare with the shipped one (make warm-start-check)
    python recipes/demo_warm_start.py ship    # rebuild seed 0 and replace the shipped one (then commit it)

The shipped files (recipes/demo_warmstart/: 4 MB of safetensors, the tokenizer, warm_start.json) are what
``build_warm_start(0)`` wrote on the machine named in warm_start.json. Another machine's build differs bit for bit
(floating-point order), so ``check`` compares what makes the warm start the demo's (``warm_start_profile``: held-out
accuracy with and without a carry, and the stop rule's probability), each within ``PROFILE_TOLERANCE``.
"""

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import torch

from rlhf.extras.addition import (
    WARM_START,
    WARM_START_TARGET,
    build_warm_start,
    profile_differences,
    warm_start_profile,
)
from rlhf.extras.machine import describe_machine

SHIPPED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo_warmstart")
SHIPPED_SEED = 0
META = "warm_start.json"


def build(path: str, seed: int) -> dict:
    """Build the warm start of ``seed`` into ``path``; returns its record (steps, seconds, profile, machine)."""
    start, cpu_start = time.time(), time.process_time()
    model, tokenizer, steps = build_warm_start(seed)
    record = {"warm_start_steps": steps, "warm_start_seconds": round(time.time() - start, 1),
              "warm_start_cpu_seconds": round(time.process_time() - cpu_start, 1), "machine": describe_machine(),
              "profile": warm_start_profile(model, tokenizer)}
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    with open(os.path.join(path, META), "w") as f:
        json.dump({"key": key(seed), "record": record}, f, indent=2)
    return record


def key(seed: int) -> dict:
    return {"seed": seed, "threads": torch.get_num_threads(), "settings": WARM_START, "target": WARM_START_TARGET}


def read_meta(path: str) -> dict | None:
    try:
        with open(os.path.join(path, META)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def warm_start_stage(path: str, seed: int, rebuild: bool = False) -> dict:
    """The warm start of ``seed`` in ``path``: the shipped one for seed 0 (unless ``rebuild``), else the one already
    in ``path`` if built with the same seed, thread count and settings, else a new build. Returns its record with
    ``warm_start_source``: shipped, reused or built."""
    shipped = read_meta(SHIPPED)
    if seed == SHIPPED_SEED and not rebuild and shipped is not None:
        if read_meta(path) != shipped:
            shutil.rmtree(path, ignore_errors=True)
            shutil.copytree(SHIPPED, path)
        return {**shipped["record"], "warm_start_source": "shipped"}
    meta = read_meta(path)
    if meta is not None and meta.get("key") == key(seed):
        return {**meta["record"], "warm_start_source": "reused"}
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path)
    return {**build(path, seed), "warm_start_source": "built"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["check", "ship"])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    cli = parser.parse_args()
    if cli.threads is not None:
        torch.set_num_threads(cli.threads)
    shipped = read_meta(SHIPPED)
    with tempfile.TemporaryDirectory() as tmp:
        print(f"Rebuilding the seed-{SHIPPED_SEED} warm start on {describe_machine()} ...", flush=True)
        rebuilt = build(tmp, SHIPPED_SEED)
        print(f"  {rebuilt['warm_start_steps']} steps, {rebuilt['warm_start_seconds']} s: {rebuilt['profile']}")
        if cli.action == "ship":
            shutil.rmtree(SHIPPED, ignore_errors=True)
            shutil.copytree(tmp, SHIPPED)
            print(f"Shipped into {SHIPPED}; commit it.")
            return 0
    if shipped is None:
        print(f"No shipped warm start in {SHIPPED}: run `python {sys.argv[0]} ship`.")
        return 1
    print(f"  shipped ({shipped['record']['machine']}): {shipped['record']['profile']}")
    differences = profile_differences(shipped["record"]["profile"], rebuilt["profile"])
    for line in differences:
        print(f"  DIFFERS by more than the tolerance: {line}")
    print("The rebuilt warm start matches the shipped one." if not differences else
          "The rebuilt warm start does not match: ship a new one (`ship`) if the build itself changed.")
    return 1 if differences else 0


if __name__ == "__main__":
    sys.exit(main())

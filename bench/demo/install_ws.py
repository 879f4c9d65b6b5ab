"""Copy a warm start built by ws_build.py into the matrix's directory with the metadata recipes/demo.py checks, so
the matrix reuses it instead of building the same one again: install_ws.py TAG SEED THREADS"""
import json
import os
import shutil
import sys

from common import OUT

from rlhf.extras.addition import WARM_START, WARM_START_TARGET

tag, seed, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
src = os.path.join(OUT, "ws", tag, f"s{seed}_t{threads}")
built = json.load(open(src + ".json"))
assert built["settings"] == WARM_START, "built with other settings"
dst = os.path.join(OUT, os.environ.get("MATRIX_DIR", "matrix"), f"s{seed}_t{threads}", "warmstart")
shutil.copytree(src, dst, dirs_exist_ok=True)
key = {"seed": seed, "threads": threads, "settings": WARM_START, "target": WARM_START_TARGET}
record = {"warm_start_steps": built["steps"], "warm_start_seconds": built["wall"],
          "warm_start_cpu_seconds": built["cpu"]}
json.dump({"key": key, "record": record}, open(os.path.join(dst, "warm_start.json"), "w"), indent=2)
print(dst, record)

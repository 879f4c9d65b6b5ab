"""Run by test_variant_recipes.py under `accelerate launch`: several recipes, one after the other, in one process
(each as `accelerate launch recipes/<recipe>.py <args>` would run it), so that the launch is paid once.

    recipe_runner.py '[["grpo", ["--config", "recipes/configs/demo_gspo.yaml", ...]], ...]'
"""

import importlib.util
import json
import os
import sys

RECIPES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "recipes")


def recipe(name: str):
    spec = importlib.util.spec_from_file_location(f"recipe_{name}", os.path.join(RECIPES, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


if __name__ == "__main__":
    for name, argv in json.loads(sys.argv[1]):
        print(f"=== {name} {' '.join(argv)}", flush=True)
        recipe(name).main(argv)

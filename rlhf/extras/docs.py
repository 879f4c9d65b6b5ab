"""The README's config tables, generated from the dataclasses so that they cannot drift.

    python -m rlhf.extras.docs --write README.md    # regenerate (make docs)
    python -m rlhf.extras.docs --check README.md    # exit 1 if the README is stale (a test does this)
"""

import argparse
import dataclasses
import sys

from rlhf.configs import (
    GRPOConfig,
    PPOConfig,
    ReinforceConfig,
    RLConfig,
    TokenRewardConfig,
    markdown_table,
)

START, END = "<!-- config-tables:start -->", "<!-- config-tables:end -->"
# (config, the config it extends): each table lists the fields the config adds or whose default it changes.
SECTIONS = [(GRPOConfig, RLConfig), (TokenRewardConfig, RLConfig), (PPOConfig, TokenRewardConfig),
            (ReinforceConfig, TokenRewardConfig)]


def _default(f: dataclasses.Field):
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def config_tables() -> str:
    parts = ["**Every trainer** (`RLConfig`):", "", markdown_table(RLConfig)]
    for cls, parent in SECTIONS:
        inherited = {f.name: _default(f) for f in dataclasses.fields(parent)}
        own = [f.name for f in dataclasses.fields(cls) if f.name not in inherited or inherited[f.name] != _default(f)]
        title = (f"**{cls.__name__}** adds or changes" if cls is not TokenRewardConfig
                 else "**PPOConfig and ReinforceConfig** share (`TokenRewardConfig`)")
        parts += ["", f"{title}:", "", markdown_table(cls, only=own)]
    from reward_models.trainer import RewardModelConfig
    from rlhf.cli import PPOScriptArguments, ScriptArguments

    parts += ["", "**Recipe arguments** (`ScriptArguments` of `recipes/grpo.py`, `ppo.py`, `reinforce.py`, "
              "`evaluate.py`; `ppo.py` adds `value_model_name_or_path`):", "", markdown_table(ScriptArguments),
              "", markdown_table(PPOScriptArguments, only=["value_model_name_or_path"])]

    parts += ["", "**RewardModelConfig** (`recipes/train_reward_model.py`, `reward_models.trainer`):", "",
              markdown_table(RewardModelConfig)]
    return "\n".join(parts)


def render(readme: str) -> str:
    if START not in readme or END not in readme:
        raise ValueError(f"the README has no {START} ... {END} block")
    head, rest = readme.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{config_tables()}\n{END}{tail}"


def main() -> int:
    parser = argparse.ArgumentParser()
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--write", metavar="README")
    group.add_argument("--check", metavar="README")
    args = parser.parse_args()
    path = args.write or args.check
    with open(path) as f:
        current = f.read()
    updated = render(current)
    if args.check:
        if updated != current:
            print(f"{path}: the config tables are stale; run `make docs`.", file=sys.stderr)
            return 1
        return 0
    with open(path, "w") as f:
        f.write(updated)
    return 0


if __name__ == "__main__":
    sys.exit(main())

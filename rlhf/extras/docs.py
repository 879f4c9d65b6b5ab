"""The README's config tables and its table of TRL's names, generated from the code so that they cannot drift.

    python -m rlhf.extras.docs --write README.md    # regenerate (make docs)
    python -m rlhf.extras.docs --check README.md    # exit 1 if the README is stale (a test does this)
"""

import argparse
import dataclasses
import sys

from rlhf.config_fields import markdown_table
from rlhf.configs import (
    GRPOConfig,
    PPOConfig,
    ReinforceConfig,
    RLConfig,
    TokenRewardConfig,
)

START, END = "<!-- config-tables:start -->", "<!-- config-tables:end -->"
TRL_START, TRL_END = "<!-- trl-names:start -->", "<!-- trl-names:end -->"
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


def trl_tables() -> str:
    from rlhf import trl_names

    same = ", ".join(f"`{name}`" for name in trl_names.SAME_NAMES)
    return "\n".join([
        "TRL's names and what they become here (`rlhf/trl_table.py`; in Python, YAML and on the command line):",
        "", trl_names.markdown_table(), "", f"The same name and meaning in both: {same}.", "",
        "Defaults that differ from TRL's `GRPOConfig`:", "", trl_names.defaults_table()])


def _replace_block(readme: str, start: str, end: str, body: str) -> str:
    if start not in readme or end not in readme:
        raise ValueError(f"the README has no {start} ... {end} block")
    head, rest = readme.split(start, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{start}\n{body}\n{end}{tail}"


def render(readme: str) -> str:
    return _replace_block(_replace_block(readme, START, END, config_tables()), TRL_START, TRL_END, trl_tables())


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
            print(f"{path}: the config or TRL tables are stale; run `make docs`.", file=sys.stderr)
            return 1
        return 0
    with open(path, "w") as f:
        f.write(updated)
    return 0


if __name__ == "__main__":
    sys.exit(main())

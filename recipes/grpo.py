"""GRPO from a YAML config.

    accelerate launch recipes/grpo.py --config recipes/configs/grpo_tiny.yaml [--field value ...]

Every field of ScriptArguments (model, data, reward functions) and of GRPOConfig can be set in the
YAML file or overridden on the command line; `--help` lists them. The final model is written to
`<output_dir>/model`.
"""

import os

from rlhf import GRPOConfig, GRPOTrainer
from rlhf.cli import ScriptArguments, import_object, load_dataset_spec, parse_args


def main(argv=None):
    script, config = parse_args([ScriptArguments, GRPOConfig], argv)
    if not script.model_name_or_path or not script.dataset_name or not script.reward_funcs:
        raise SystemExit("model_name_or_path, dataset_name and reward_funcs are required (see --help).")
    trainer = GRPOTrainer(
        model=script.model_name_or_path,
        reward_funcs=[import_object(path) for path in script.reward_funcs],
        args=config,
        train_dataset=load_dataset_spec(script.dataset_name, script.dataset_split),
        eval_dataset=load_dataset_spec(script.eval_dataset_name, script.eval_dataset_split)
        if script.eval_dataset_name else None,
    )
    trainer.train()
    trainer.save_model(os.path.join(config.output_dir, "model"))


if __name__ == "__main__":
    main()

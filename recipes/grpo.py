"""GRPO from a YAML config.

    accelerate launch --config_file recipes/accelerate/one_process.yaml recipes/grpo.py --config recipes/configs/demo_grpo.yaml [--field value ...]

Every field of ScriptArguments (model, data, reward functions) and of GRPOConfig can be set in the
YAML file or overridden on the command line; `--help` lists them. The final model is written to
`<output_dir>/model`.
"""

import os

from rlhf import GRPOConfig, GRPOTrainer
from rlhf.cli import ScriptArguments, parse_args, trainer_inputs
from rlhf.distributed import shutdown


def main(argv=None):
    script, config = parse_args([ScriptArguments, GRPOConfig], argv)
    trainer = GRPOTrainer(args=config, **trainer_inputs(script))
    trainer.train()
    trainer.save_model(os.path.join(config.output_dir, "model"))
    shutdown(trainer.accelerator)


if __name__ == "__main__":
    main()

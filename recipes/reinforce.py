"""REINFORCE / RLOO / REINFORCE++ from a YAML config.

    accelerate launch --config_file recipes/accelerate/one_process.yaml recipes/reinforce.py --config recipes/configs/demo_reinforce.yaml [--baseline reinforce++]

Every field of ScriptArguments (model, data, reward functions) and of ReinforceConfig can be set in
the YAML file or overridden on the command line; `--help` lists them. The final model is written to
`<output_dir>/model`.
"""

import os

from rlhf import ReinforceConfig, ReinforceTrainer
from rlhf.cli import ScriptArguments, parse_args, trainer_inputs
from rlhf.distributed import shutdown


def main(argv=None):
    script, config = parse_args([ScriptArguments, ReinforceConfig], argv)
    trainer = ReinforceTrainer(args=config, **trainer_inputs(script))
    trainer.train()
    trainer.save_model(os.path.join(config.output_dir, "model"))
    shutdown(trainer.accelerator)


if __name__ == "__main__":
    main()

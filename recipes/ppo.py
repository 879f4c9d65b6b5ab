"""PPO with a separate critic from a YAML config.

    accelerate launch --config_file recipes/accelerate/one_process.yaml recipes/ppo.py --config recipes/configs/demo_ppo.yaml [--field value ...]

Every field of PPOScriptArguments (model, critic, data, reward functions) and of PPOConfig can be set
in the YAML file or overridden on the command line; `--help` lists them. The final actor is written
to `<output_dir>/model` and the critic (backbone + value head) to `<output_dir>/critic`.
"""

import os

from rlhf import PPOConfig, PPOTrainer
from rlhf.cli import PPOScriptArguments, parse_args, trainer_inputs
from rlhf.distributed import shutdown


def main(argv=None):
    script, config = parse_args([PPOScriptArguments, PPOConfig], argv)
    trainer = PPOTrainer(args=config, value_model=script.value_model_name_or_path, **trainer_inputs(script))
    trainer.train()
    trainer.save_model(os.path.join(config.output_dir, "model"))
    trainer.save_critic(os.path.join(config.output_dir, "critic"))
    shutdown(trainer.accelerator)


if __name__ == "__main__":
    main()

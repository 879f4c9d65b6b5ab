"""Train a Bradley-Terry reward model on preference pairs.

    accelerate launch --config_file recipes/accelerate/one_process.yaml recipes/train_reward_model.py --config recipes/configs/reward_model_synthetic.yaml

The data has `chosen` and `rejected` columns (text or chat messages), optionally `prompt` and
`margin`. The model is written to `<output_dir>/model` (loadable with
AutoModelForSequenceClassification.from_pretrained) and can be given to any trainer as an entry of
`reward_funcs`.
"""

from reward_models.trainer import (
    RewardModelConfig,
    RewardModelScriptArguments,
    RewardModelTrainer,
)
from rlhf.cli import ConfigError, parse_args
from rlhf.distributed import shutdown


def main(argv=None):
    script, config = parse_args([RewardModelScriptArguments, RewardModelConfig], argv)
    if not script.model_name_or_path or not script.dataset_name:
        raise ConfigError("model_name_or_path and dataset_name must be set (--help lists every option).")
    train_dataset, eval_dataset = script.load_datasets(require_prompt=False)
    trainer = RewardModelTrainer(script.model_name_or_path, config, train_dataset=train_dataset,
                                 eval_dataset=eval_dataset)
    trainer.train()
    path = trainer.save_model()
    if eval_dataset is not None:
        result = trainer.evaluate()
        trainer.accelerator.print(f"held-out pairwise accuracy {result['eval/accuracy']:.1%}, "
                                  f"mean margin {result['eval/margin_mean']:.3f}; model: {path}")
    shutdown(trainer.accelerator)


if __name__ == "__main__":
    main()

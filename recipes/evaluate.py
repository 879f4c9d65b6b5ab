"""Evaluate a saved model, LoRA adapter or checkpoint on a dataset, as training evaluates it.

    python recipes/evaluate.py --config recipes/configs/gsm8k_grpo_qwen2.5-0.5b_lora.yaml \
        --model_name_or_path outputs/gsm8k_grpo_lora/model [--eval_num_generations 8]

The training config gives the data (eval_dataset_name, dataset_mapping, prompt format), the reward
functions and the generation settings; its training-only fields are ignored. `model_name_or_path`
may be a final model, an adapter, or a `checkpoint-<step>` directory. Prints the metrics and writes
`eval_results.json` and `samples-<step>.jsonl` to `eval_output_dir` (default `<output_dir>/eval`).
Launch with `accelerate launch` to split the prompts over several processes.
"""

import dataclasses
import json
import os
from dataclasses import dataclass

from rlhf import GRPOConfig, PPOConfig, ReinforceConfig
from rlhf.checkpoint import atomic_write_text
from rlhf.cli import (
    ConfigError,
    PPOScriptArguments,
    ScriptArguments,
    parse_args,
    recipe_tokenizer,
    reward_functions_from_specs,
)
from rlhf.configs import RLConfig
from rlhf.distributed import shutdown
from rlhf.evaluation import PolicyEvaluator
from rlhf.imports import import_object


@dataclass
class EvaluateArguments:
    """What recipes/evaluate.py adds to a training config."""

    eval_output_dir: str | None = None
    """Where eval_results.json and the samples go (None: <output_dir>/eval)."""
    base_model_name_or_path: str | None = None
    """Base model of a LoRA adapter, when the one its adapter_config.json names is not reachable here."""
    eval_step: int = 0
    """Step whose seed the sampled completions use (give a checkpoint's step to reproduce its training-time numbers)."""


def training_only_fields() -> set[str]:
    """Fields of the trainer configs and recipe arguments that evaluation does not use."""
    used = {f.name for cls in (ScriptArguments, RLConfig, EvaluateArguments) for f in dataclasses.fields(cls)}
    every = {f.name for cls in (GRPOConfig, PPOConfig, ReinforceConfig, PPOScriptArguments)
             for f in dataclasses.fields(cls)}
    return every - used


def main(argv=None) -> dict:
    script, options, config = parse_args([ScriptArguments, EvaluateArguments, RLConfig], argv,
                                         ignore=training_only_fields())
    missing = [name for name in ("model_name_or_path", "eval_dataset_name", "reward_funcs") if not getattr(script, name)]
    if missing:
        raise ConfigError(f"{', '.join(missing)} must be set, in the --config YAML or on the command line.")
    dataset = script.load_eval_dataset(prompt_template=script.prompt_template, system_prompt=script.system_prompt,
                                       conversational=script.conversational)
    evaluator = PolicyEvaluator(script.model_name_or_path, reward_functions_from_specs(script.reward_funcs), config,
                                processing_class=recipe_tokenizer(script),
                                base_model_name_or_path=options.base_model_name_or_path,
                                tools=[import_object(t) for t in script.tools] or None,
                                environment_factory=import_object(script.environment_factory)
                                if script.environment_factory else None)
    output_dir = options.eval_output_dir or os.path.join(config.output_dir, "eval")
    metrics = evaluator.evaluate(dataset, step=options.eval_step, output_dir=output_dir)
    if evaluator.accelerator.is_main_process:
        result = {"model": script.model_name_or_path, "dataset": script.eval_dataset_name,
                  "num_prompts": len(dataset), **metrics}
        atomic_write_text(os.path.join(output_dir, "eval_results.json"), json.dumps(result, indent=2) + "\n")
        width = max(map(len, metrics))
        print("\n".join(f"{name:<{width}}  {value:.4f}" for name, value in metrics.items()))
        print(f"results: {os.path.join(output_dir, 'eval_results.json')}")
    shutdown(evaluator.accelerator)
    return metrics


if __name__ == "__main__":
    main()

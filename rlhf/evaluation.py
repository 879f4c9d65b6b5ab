"""Evaluate a saved policy (a full model, a LoRA adapter, or a training checkpoint) exactly as the trainer
evaluates during training: the same greedy and sampled completions, reward functions and metrics.

    evaluator = PolicyEvaluator("outputs/gsm8k/model", [boxed_answer_reward], GRPOConfig(max_new_tokens=512))
    metrics = evaluator.evaluate(eval_dataset)   # eval/accuracy, eval/pass@k, eval/reward_mean, ...

``recipes/evaluate.py`` wraps this for the command line.
"""

import json
import logging
import os

from rlhf.cli import model_source
from rlhf.configs import RLConfig
from rlhf.data import as_dataset
from rlhf.distributed import make_accelerator
from rlhf.models import disable_dropout, eos_token_ids, load_causal_lm, load_tokenizer
from rlhf.rollout import SamplingParams
from rlhf.trainer.experience import Experience

logger = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"


def load_policy(path: str, dtype: str = "float32", trust_remote_code: bool = False,
                base_model_name_or_path: str | None = None):
    """A causal LM from ``path``: a full model, or a PEFT adapter on its base (the base named in the adapter's
    config, or ``base_model_name_or_path``). The adapter stays separate (not merged), so its log-probs are
    those the trainer computed."""
    if not os.path.isfile(os.path.join(path, ADAPTER_CONFIG)):
        if base_model_name_or_path:
            logger.warning("%s holds a full model; base_model_name_or_path=%s is ignored.", path,
                           base_model_name_or_path)
        return load_causal_lm(path, dtype, trust_remote_code)
    from peft import PeftModel

    if base_model_name_or_path is None:
        with open(os.path.join(path, ADAPTER_CONFIG)) as f:
            base_model_name_or_path = json.load(f).get("base_model_name_or_path")
        if not base_model_name_or_path:
            raise ValueError(f"{path} holds a LoRA adapter whose config names no base model; pass "
                             "base_model_name_or_path.")
    base = load_causal_lm(base_model_name_or_path, dtype, trust_remote_code)
    return PeftModel.from_pretrained(base, path)


class PolicyEvaluator(Experience):
    """A saved policy, its tokenizer and reward functions, with the trainer's ``evaluate``."""

    def __init__(self, model, reward_funcs, args: RLConfig | None = None, processing_class=None,
                 base_model_name_or_path: str | None = None, reward_processing_classes=None):
        self.args = args if args is not None else RLConfig()
        args = self.args
        self.accelerator = make_accelerator()
        source = model_source(model) if isinstance(model, str) else model
        self.tokenizer = load_tokenizer(source, processing_class, args.trust_remote_code)
        policy = (load_policy(source, args.dtype, args.trust_remote_code, base_model_name_or_path)
                  if isinstance(source, str) else source)
        disable_dropout(policy)
        self.eos_ids = eos_token_ids(policy, self.tokenizer)
        self.model = self.accelerator.prepare_model(policy, evaluation_mode=True)
        self.reward_functions = self._build_reward_functions(reward_funcs, reward_processing_classes)
        self.reward_weights = self._check_reward_weights(args.reward_weights)
        self.accuracy_function_index()
        self.sampling = SamplingParams(args.max_new_tokens, args.temperature, args.top_p, args.top_k,
                                       min_new_tokens=args.min_new_tokens)
        self.eval_dataset = None

    def evaluate(self, dataset, step: int = 0, output_dir: str | None = None) -> dict[str, float]:
        """See :meth:`rlhf.trainer.experience.Experience.evaluate`; ``step`` seeds the sampled completions
        (give the training step to reproduce the trainer's numbers) and names the samples file."""
        dataset = as_dataset(dataset, "dataset")
        self._check_reward_columns(dataset)
        self.check_prompts(dataset, "dataset")
        if output_dir is not None and self.accelerator.is_main_process:
            os.makedirs(output_dir, exist_ok=True)
        return super().evaluate(dataset, step=step, output_dir=output_dir)

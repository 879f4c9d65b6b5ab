"""Evaluation: greedy (and optionally sampled) completions of held-out prompts, scored by the reward functions.

``evaluate`` is what the trainer runs every ``eval_steps``; ``PolicyEvaluator`` evaluates a saved policy (a
full model, a LoRA adapter, or a training checkpoint) the same way, for ``recipes/evaluate.py``::

    evaluator = PolicyEvaluator("outputs/gsm8k/model", [boxed_answer_reward], GRPOConfig(max_new_tokens=512))
    metrics = evaluator.evaluate(eval_dataset)   # eval/accuracy, eval/pass@k, eval/reward_mean, ...
"""

import json
import logging
import math
import os
from dataclasses import dataclass

import torch
from accelerate.utils import gather_object

from rlhf.agent import AgentLoop
from rlhf.checkpoint import model_source
from rlhf.configs import RLConfig
from rlhf.data import as_dataset, check_prompts, render_prompts
from rlhf.distributed import make_accelerator
from rlhf.integrity import check_adapter_weights
from rlhf.models import disable_dropout, eos_token_ids, load_causal_lm, load_tokenizer
from rlhf.rewards import (
    RewardContext,
    build_reward_functions,
    check_reward_columns,
    check_reward_weights,
    combine_rewards,
    correctness_index,
    reward_table,
)
from rlhf.rollout import Policy, SamplingParams, generate_rollout

logger = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"


@dataclass
class EvalRollouts:
    """Evaluation completions of every process, rows grouped by prompt."""

    scores: torch.Tensor  # [N, F] float64, NaN where a function returned None
    lengths: torch.Tensor  # [N] the policy's tokens
    truncated: torch.Tensor  # [N] bool
    samples: list[dict]
    episode_stats: dict[str, torch.Tensor]  # multi-turn: [N] per statistic of rlhf.agent.EPISODE_STATS


def pass_at_k(num_correct: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """Unbiased pass@k per prompt from ``num_correct`` correct of ``n`` samples (Chen et al., 2021):
    1 - C(n - c, k) / C(n, k) = 1 - prod_{i = n - c + 1}^{n} (1 - k / i), computed as the product for stability."""
    if not 1 <= k <= n:
        raise ValueError(f"pass@k needs 1 <= k <= n, got k={k}, n={n}.")
    out = []
    for c in num_correct.tolist():
        c = int(c)
        if n - c < k:
            out.append(1.0)
        else:
            out.append(1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1)))
    return torch.tensor(out, dtype=torch.float64)


def write_samples(path: str, step: int, samples: list[dict], names: list[str]) -> None:
    """One JSON line per sample: step, prompt, completion, rewards by function name, and the row's columns."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        for sample in samples:
            rewards = {name: (None if math.isnan(v) else v) for name, v in zip(names, sample["rewards"])}
            f.write(json.dumps({"step": step, **sample, "rewards": rewards}, default=str) + "\n")


def eval_rollouts(policy: Policy, dataset, reward_functions, params: SamplingParams, n: int,
                  batch_size: int, context: RewardContext | None = None, rollout_fn=generate_rollout) -> EvalRollouts:
    """``n`` completions per prompt of ``dataset`` (greedy when ``params`` says so), scored. Prompts are dealt to
    processes in batches; results are gathered, so every process returns the whole dataset's, grouped by
    prompt. ``samples`` holds the main process's first batch as dicts (prompt, completion, rewards, columns)."""
    accelerator = policy.accelerator
    rank, world = accelerator.process_index, accelerator.num_processes
    prompts_per_batch = max(1, batch_size // n)
    scores, lengths, truncated, samples, stats = [], [], [], [], []
    # Every process runs the same number of batches (sharded models generate in lockstep); a process whose
    # share has run out generates for the first prompt again and drops the result.
    rounds = -(-len(dataset) // (prompts_per_batch * world))
    for round_index in range(rounds):
        start = (round_index * world + rank) * prompts_per_batch
        if start >= len(dataset):
            rollout_fn(policy, dataset[:1], params, 1)
            continue
        rollout, texts = rollout_fn(policy, dataset[start:start + prompts_per_batch], params, n)
        per_function = reward_table(reward_functions, texts, context=context)
        scores.append(per_function)
        lengths.append(rollout.policy_tokens.sum(dim=1).cpu())
        truncated.append(rollout.truncated.cpu())
        stats.append({k: torch.tensor(v, dtype=torch.float64) for k, v in texts.episode_stats.items()})
        if not samples:
            samples = [{"prompt": p, "completion": c, "rewards": r, **{k: v[i] for k, v in texts.columns.items()}}
                       for i, (p, c, r) in enumerate(zip(texts.prompts, texts.completions, per_function.tolist()))]
    if not scores:
        scores = [torch.zeros(0, len(reward_functions), dtype=torch.float64)]
        lengths, truncated = [torch.zeros(0, dtype=torch.long)], [torch.zeros(0, dtype=torch.bool)]
    names = sorted(stats[0]) if stats else []
    local = (torch.cat(scores), torch.cat(lengths), torch.cat(truncated),
             *(torch.cat([s[name] for s in stats]) for name in names))
    gathered = gather_object([local]) if world > 1 else [local]
    parts = [torch.cat([part[i] for part in gathered if len(part) > i]) for i in range(3 + len(names))]
    return EvalRollouts(*parts[:3], samples, dict(zip(names, parts[3:])))


@torch.no_grad()
def evaluate(policy: Policy, dataset, reward_functions, reward_weights: list[float], args: RLConfig, step: int,
             output_dir: str | None = None, trainer_state=None, rollout_fn=generate_rollout) -> dict[str, float]:
    """Greedy completions for every prompt of ``dataset``, scored with the reward functions, plus
    ``args.eval_num_generations`` sampled ones per prompt for pass@k.

    Returns eval/reward_mean and _std, eval/reward/<name>/mean and /std, eval/mean_length, min_length, max_length,
    eval/truncated_frac, the lengths of the completions that ended with an EOS (eval/mean_terminated_length, ...;
    0 when none did), and with a correctness reward eval/accuracy (greedy) and eval/pass@k (sampled, unbiased
    estimator). The main process
    writes ``eval_log_samples`` greedy completions to ``<output_dir>/samples-<step>.jsonl``. Sampling is seeded
    from (seed, step, process) in a forked RNG: the training RNG stream is untouched, and the same model
    evaluated at the same step gives the same result. Reward functions get ``trainer_state``; what they give
    ``log_metric`` on the greedy completions is reported as eval/<name>.
    """
    accelerator = policy.accelerator
    context = RewardContext(trainer_state)
    accuracy = correctness_index(reward_functions, args.accuracy_reward)
    policy.model.eval()
    greedy_params = SamplingParams(args.max_new_tokens, do_sample=False, static_kv_cache=args.static_kv_cache)
    greedy = eval_rollouts(policy, dataset, reward_functions, greedy_params, 1, args.eval_batch_size, context,
                           rollout_fn)
    logged = {name: (sum(values), len(values)) for name, values in context.metrics.items()}
    totals: dict[str, list] = {}  # log_metric of the greedy pass, over every process: eval/<name>
    for part in (gather_object([logged]) if accelerator.num_processes > 1 else [logged]):
        for name, (total, count) in part.items():
            totals.setdefault(f"eval/{name}", [0.0, 0])
            totals[f"eval/{name}"] = [totals[f"eval/{name}"][0] + total, totals[f"eval/{name}"][1] + count]
    scores = greedy.scores
    total = combine_rewards(scores, reward_weights)
    out = {"eval/reward_mean": total.mean().item(), "eval/reward_std": _std(total),
           "eval/truncated_frac": greedy.truncated.double().mean().item()}
    lengths = greedy.lengths.double()
    ended = lengths[~greedy.truncated] if bool((~greedy.truncated).any()) else torch.zeros(1, dtype=torch.float64)
    for prefix, values in (("", lengths), ("_terminated", ended)):  # TRL's completions/*_length, *_terminated_length
        for statistic in ("mean", "min", "max"):
            out[f"eval/{statistic}{prefix}_length"] = (getattr(values, statistic)().item() if values.numel()
                                                       else float("nan"))
    for j, func in enumerate(reward_functions):
        present = scores[:, j][~scores[:, j].isnan()]
        out[f"eval/reward/{func.name}/mean"] = present.mean().item() if present.numel() else float("nan")
        out[f"eval/reward/{func.name}/std"] = _std(present) if present.numel() else float("nan")
    out.update({name: total / count for name, (total, count) in totals.items() if count})
    if accuracy is not None:
        out["eval/accuracy"] = (scores[:, accuracy] >= args.accuracy_threshold).double().mean().item()
    out.update({f"eval/agent/{name}": values.mean().item() for name, values in greedy.episode_stats.items()})
    n = args.eval_num_generations
    if n > 0:
        device = accelerator.device
        devices = {"devices": []} if device.type == "cpu" else {"devices": [device], "device_type": device.type}
        with torch.random.fork_rng(**devices):
            torch.manual_seed(args.seed * 1_000_003 + step * 7_919 + accelerator.process_index)
            sampled = eval_rollouts(policy, dataset, reward_functions, sampling_params(args), n, args.eval_batch_size,
                                    rollout_fn=rollout_fn)
        out["eval/sampled/reward_mean"] = combine_rewards(sampled.scores, reward_weights).mean().item()
        if accuracy is not None:
            correct = (sampled.scores[:, accuracy] >= args.accuracy_threshold).view(-1, n).sum(dim=1)
            for k in sorted(set(args.eval_pass_k or [1, n])):
                out[f"eval/pass@{k}"] = pass_at_k(correct, n, k).mean().item()
    if accelerator.is_main_process and args.eval_log_samples > 0:
        write_samples(os.path.join(output_dir or args.output_dir, f"samples-{step}.jsonl"), step,
                      greedy.samples[:args.eval_log_samples], [f.name for f in reward_functions])
    return out


def _std(values: torch.Tensor) -> float:
    """The standard deviation (Bessel-corrected, as the training metrics and TRL's); 0 for a single value."""
    return values.std().item() if values.numel() > 1 else 0.0


def sampling_params(args: RLConfig) -> SamplingParams:
    """The training sampling settings of a config."""
    return SamplingParams(args.max_new_tokens, args.temperature, args.top_p, args.top_k,
                          min_new_tokens=args.min_new_tokens, min_p=args.min_p, static_kv_cache=args.static_kv_cache)


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
    check_adapter_weights(path)  # safetensors only: peft would fall back to a pickled adapter_model.bin
    base = load_causal_lm(base_model_name_or_path, dtype, trust_remote_code)
    return PeftModel.from_pretrained(base, path)


class PolicyEvaluator:
    """A saved policy, its tokenizer and reward functions, evaluated as the trainer evaluates."""

    def __init__(self, model, reward_funcs, args: RLConfig | None = None, processing_class=None,
                 base_model_name_or_path: str | None = None, reward_processing_classes=None, tools=None,
                 environment_factory=None):
        self.args = args if args is not None else RLConfig()
        args = self.args
        accelerator = make_accelerator()
        source = model_source(model) if isinstance(model, str) else model
        tokenizer = load_tokenizer(source, processing_class, args.trust_remote_code)
        loaded = (load_policy(source, args.dtype, args.trust_remote_code, base_model_name_or_path)
                  if isinstance(source, str) else source)
        disable_dropout(loaded)
        self.policy = Policy(accelerator.prepare_model(loaded, evaluation_mode=True), accelerator, tokenizer,
                             eos_token_ids(loaded, tokenizer), args.max_prompt_length, args.truncate_prompts)
        self.reward_functions = build_reward_functions(
            reward_funcs, reward_processing_classes, device=accelerator.device, batch_size=args.reward_model_batch_size,
            normalize=args.normalize_reward_model_scores, dtype=args.dtype, trust_remote_code=args.trust_remote_code,
            timeout=args.reward_timeout, environment_factory=environment_factory)
        self.reward_weights = check_reward_weights(args.reward_weights, self.reward_functions)
        correctness_index(self.reward_functions, args.accuracy_reward)  # an unknown name fails here
        self.agent = (AgentLoop.from_config(tokenizer, tools, environment_factory, args)
                      if tools or environment_factory is not None else None)

    @property
    def accelerator(self):
        return self.policy.accelerator

    def evaluate(self, dataset, step: int = 0, output_dir: str | None = None) -> dict[str, float]:
        """See :func:`evaluate`; ``step`` seeds the sampled completions (give the training step to reproduce the
        trainer's numbers) and names the samples file."""
        dataset = as_dataset(dataset, "dataset")
        check_reward_columns(self.reward_functions, dataset)
        check_prompts(dataset, "dataset", self.policy.tokenizer, self.args.max_prompt_length,
                      self.args.truncate_prompts, render=self.agent.render_prompts if self.agent else render_prompts)
        if output_dir is not None and self.accelerator.is_main_process:
            os.makedirs(output_dir, exist_ok=True)
        return evaluate(self.policy, dataset, self.reward_functions, self.reward_weights, self.args, step, output_dir,
                        rollout_fn=self.agent.rollout if self.agent is not None else generate_rollout)

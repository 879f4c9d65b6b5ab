"""Making experience: prompts -> sampled completions -> rewards -> no-grad log-probs, and greedy
evaluation (mixed into the trainer).

Each process samples its own prompts' completions; rewards are gathered so that every process holds
the whole rollout batch's rewards (group and batch statistics are then exact), and ``local_rows``
takes a process's slice back out.
"""

import json
import logging
import math
import os
from dataclasses import dataclass

import torch
from accelerate.utils import gather_object

from rlhf.data import as_dataset, left_pad, render_prompts, tokenize_prompts
from rlhf.distributed import (
    model_for_generation,
    needs_synced_generation,
    shards_parameters,
)
from rlhf.metrics import StepMetrics
from rlhf.models import completion_logprobs
from rlhf.rewards import RewardFunction, combine_rewards, is_correctness
from rlhf.rollout import Batch, SamplingParams, sample_completions

logger = logging.getLogger(__name__)


@dataclass
class EvalRollouts:
    """Evaluation completions of every process, rows grouped by prompt."""

    scores: torch.Tensor  # [N, F] float64, NaN where a function returned None
    lengths: torch.Tensor  # [N]
    truncated: torch.Tensor  # [N] bool
    samples: list[dict]


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


@dataclass
class RolloutTexts:
    """What reward functions see, one entry per completion (prompts repeated G times)."""

    prompts: list
    completions: list
    completion_ids: list[list[int]]
    columns: dict[str, list]


class Experience:
    """Needs ``args``, ``accelerator``, ``model``, ``ref_model``, ``has_reference``, ``tokenizer``, ``sampler``,
    ``reward_functions``, ``reward_weights``, ``eos_ids``, ``sampling`` (evaluation needs only ``args``,
    ``accelerator``, ``model``, ``tokenizer``, ``eos_ids``, ``sampling`` and the reward functions and weights)."""

    def _build_reward_functions(self, reward_funcs, tokenizers=None) -> list[RewardFunction]:
        """Callables are used as they are; a path or a model object is a reward model, scored with its own
        tokenizer (``reward_processing_classes[i]``, else the one saved with it)."""
        from reward_models.scoring import RewardModelFunction

        funcs = reward_funcs if isinstance(reward_funcs, (list, tuple)) else [reward_funcs]
        if not funcs:
            raise ValueError("reward_funcs is empty; give at least one reward function or reward model.")
        tokenizers = list(tokenizers) if tokenizers is not None else [None] * len(funcs)
        if len(tokenizers) != len(funcs):
            raise ValueError(f"reward_processing_classes has {len(tokenizers)} entries for {len(funcs)} reward_funcs.")
        args = self.args
        built = []
        for func, tokenizer in zip(funcs, tokenizers):
            if isinstance(func, (str, torch.nn.Module)):
                func = RewardModelFunction(func, tokenizer, self.accelerator.device, args.reward_model_batch_size,
                                           normalize=args.normalize_reward_model_scores, dtype=args.dtype,
                                           trust_remote_code=args.trust_remote_code)
            built.append(RewardFunction(func, timeout=args.reward_timeout))
        return built

    def _check_reward_weights(self, weights) -> list[float]:
        if weights is None:
            return [1.0] * len(self.reward_functions)
        if len(weights) != len(self.reward_functions):
            raise ValueError(
                f"reward_weights has {len(weights)} entries but there are {len(self.reward_functions)} reward "
                f"functions ({[f.name for f in self.reward_functions]}); give one weight per function."
            )
        return [float(w) for w in weights]

    def _check_reward_columns(self, dataset) -> None:
        for func in self.reward_functions:
            missing = func.required_columns() - set(dataset.column_names)
            if missing:
                raise ValueError(
                    f"reward function {func.name!r} needs the dataset column(s) {sorted(missing)}, which the dataset "
                    f"lacks (columns: {dataset.column_names}); add them or give those parameters a default."
                )

    def check_prompts(self, dataset, name: str) -> None:
        """Before any training: chat prompts need a chat template, and no prompt may exceed
        ``max_prompt_length`` (unless ``truncate_prompts``, which keeps each prompt's end)."""
        render_prompts(dataset[:1]["prompt"], self.tokenizer)  # raises on chat prompts without a template
        limit = self.args.max_prompt_length
        if limit is None:
            return
        too_long = []
        for start in range(0, len(dataset), 1024):
            texts, is_chat = render_prompts(dataset[start:start + 1024]["prompt"], self.tokenizer)
            lengths = [len(ids) for ids in self.tokenizer(texts, add_special_tokens=not is_chat)["input_ids"]]
            too_long += [(start + i, n) for i, n in enumerate(lengths) if n > limit]
        if not too_long:
            return
        examples = ", ".join(f"#{i} ({n} tokens)" for i, n in too_long[:5])
        if not self.args.truncate_prompts:
            raise ValueError(
                f"{len(too_long)} prompt(s) of {name} are longer than max_prompt_length={limit}: {examples}. Raise "
                "max_prompt_length, filter those prompts out, or set truncate_prompts=True to keep their last tokens."
            )
        logger.warning("%d prompt(s) of %s are longer than max_prompt_length=%d (%s); their beginnings will be cut.",
                       len(too_long), name, limit, examples)

    def _tokenized_prompts(self, prompts: list) -> tuple[torch.Tensor, torch.Tensor, bool]:
        texts, is_chat = render_prompts(prompts, self.tokenizer)
        ids = tokenize_prompts(texts, self.tokenizer, is_chat, self.args.max_prompt_length, self.args.truncate_prompts)
        prompt_ids, prompt_mask = left_pad(ids, self.tokenizer.pad_token_id)
        return prompt_ids.to(self.accelerator.device), prompt_mask.to(self.accelerator.device), is_chat

    def _decode(self, completion_ids: torch.Tensor, mask: torch.Tensor, is_chat: bool):
        lengths = mask.sum(dim=1).tolist()
        id_lists = [row[:n] for row, n in zip(completion_ids.tolist(), lengths)]
        texts = self.tokenizer.batch_decode(id_lists, skip_special_tokens=True)
        completions = [[{"role": "assistant", "content": t}] for t in texts] if is_chat else texts
        return completions, id_lists

    def generate(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, params: SamplingParams,
                 group_size: int = 1):
        """Completions from the actor (gathered from its shards if need be), in Accelerate's autocast."""
        with model_for_generation(self.accelerator, self.model) as model, self.accelerator.autocast():
            return sample_completions(model, prompt_ids, prompt_mask, params, self.eos_ids, self.tokenizer.pad_token_id,
                                      synced_gpus=needs_synced_generation(self.accelerator), group_size=group_size)

    def prefill_group_size(self, group: int) -> int:
        """Rows that share one prompt prefill in ``generate``: the group, unless sharing is off or the model is
        sharded (ZeRO-3 / FSDP generate through the wrapped model)."""
        return group if self.args.share_prompt_prefix and not shards_parameters(self.accelerator) else 1

    def complete(self, rows: dict, params: SamplingParams, n: int) -> tuple[Batch, RolloutTexts]:
        """``n`` completions for each prompt of ``rows`` (a dataset slice), the completions of one prompt in
        contiguous rows: the tensors, and the texts reward functions see."""
        prompt_ids, prompt_mask, is_chat = self._tokenized_prompts(rows["prompt"])
        prompt_ids = prompt_ids.repeat_interleave(n, dim=0)
        prompt_mask = prompt_mask.repeat_interleave(n, dim=0)
        completion_ids, completion_mask, truncated = self.generate(prompt_ids, prompt_mask, params,
                                                                   group_size=self.prefill_group_size(n))
        completions, id_lists = self._decode(completion_ids, completion_mask, is_chat)
        repeat = lambda values: [v for v in values for _ in range(n)]  # noqa: E731
        texts = RolloutTexts(
            prompts=repeat(rows["prompt"]), completions=completions, completion_ids=id_lists,
            columns={k: repeat(v) for k, v in rows.items() if k != "prompt"},
        )
        batch = Batch(prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=completion_ids,
                      completion_mask=completion_mask, truncated=truncated)
        return batch, texts

    def generate_rollout(self, step: int) -> tuple[Batch, RolloutTexts]:
        """This process's prompts for ``step``, each with ``num_generations`` sampled completions
        (the completions of one prompt are contiguous rows)."""
        batch, texts = self.complete(self.train_dataset[self.sampler.indices(step)], self.sampling,
                                     self.args.num_generations)
        loss_mask = batch["completion_mask"].clone()
        if self.args.mask_truncated_completions:
            loss_mask[batch["truncated"]] = 0
        batch["loss_mask"] = loss_mask
        return batch, texts

    def reward_table(self, texts: RolloutTexts) -> torch.Tensor:
        """Every reward function's values for ``texts``: [N, F] float64, NaN where a function returned None."""
        return torch.stack([func(texts.prompts, texts.completions, texts.completion_ids, texts.columns)
                            for func in self.reward_functions], dim=1)

    def score_rollout(self, batch: Batch, texts: RolloutTexts, metrics: StepMetrics) -> torch.Tensor:
        """Total rewards of the *whole* rollout batch (all processes, in process order), [B_global]."""
        per_function = self.reward_table(texts)  # [B_local, F]
        per_function = self.accelerator.gather(per_function.to(self.accelerator.device)).cpu()
        for j, func in enumerate(self.reward_functions):
            if getattr(func.fn, "normalize", False):  # a reward model's scores, whitened over the rollout batch
                scores = per_function[:, j]
                present = scores[~scores.isnan()]
                if present.numel() > 1:
                    per_function[:, j] = (scores - present.mean()) / (present.std() + 1e-8)
        rewards = combine_rewards(per_function, self.reward_weights)
        metrics.add("reward/mean", rewards.mean())
        metrics.add("reward/std", rewards.std() if rewards.numel() > 1 else 0.0)
        for j, func in enumerate(self.reward_functions):
            values = per_function[:, j]
            present = values[~values.isnan()]
            if present.numel():
                metrics.add(f"reward/{func.name}/mean", present.mean())
                metrics.add(f"reward/{func.name}/std", present.std() if present.numel() > 1 else 0.0)
            metrics.add(f"reward/{func.name}/none_frac", values.isnan().double().mean())
        all_none = per_function.isnan().all(dim=1)
        if all_none.any():
            logger.warning("%d completions got None from every reward function; their reward is 0.",
                           int(all_none.sum()))
        grouped = rewards.view(-1, self.args.num_generations)
        metrics.add("reward/zero_std_group_frac", (grouped.std(dim=1) == 0).double().mean()
                    if self.args.num_generations > 1 else 1.0)
        return rewards

    def local_rows(self, values: torch.Tensor) -> torch.Tensor:
        """This process's slice of a tensor gathered over processes in process order."""
        per_process = values.shape[0] // self.accelerator.num_processes
        start = self.accelerator.process_index * per_process
        return values[start:start + per_process].to(self.accelerator.device)

    @torch.no_grad()
    def no_grad_pass(self, score, batch: Batch) -> torch.Tensor:
        """``score(micro)`` -> [b, t] for every micro-batch of ``batch`` (by length, trimmed), reassembled to
        [B, T] in the batch's row order."""
        order = self.length_order(batch)
        ordered = batch.rows(order)
        pieces = []
        size = self.inference_batch_size
        for start in range(0, batch.size, size):
            pieces.append(score(ordered.rows(slice(start, start + size)).trimmed()))
        width = batch["completion_ids"].shape[1]
        scores = torch.cat([torch.nn.functional.pad(p, (0, width - p.shape[1])) for p in pieces])
        return scores[torch.argsort(order)]  # back to the batch's row order

    def reference_logprobs(self, batch: Batch) -> torch.Tensor:
        """Log-probs under the reference: the frozen copy (moved to the device for this pass when it is
        offloaded), or a LoRA actor with its adapter disabled."""
        if self.ref_model is None:
            with self.unwrapped_model.disable_adapter():
                return self._logprobs_no_grad(self.model, batch)
        device = self.accelerator.device
        offloaded = next(self.ref_model.parameters()).device != device
        if offloaded:
            self.ref_model.to(device)
        try:
            return self._logprobs_no_grad(self.ref_model, batch).float()
        finally:
            if offloaded:
                self.ref_model.to("cpu")

    def _logprobs_no_grad(self, model, batch: Batch) -> torch.Tensor:
        """Log-probs [B, T] of every completion under ``model``."""
        prefix_model = self.unwrapped_model if model is self.model else model
        return self.no_grad_pass(lambda micro: completion_logprobs(
            model, micro["prompt_ids"], micro["prompt_mask"], micro["completion_ids"], micro["completion_mask"],
            self.args.temperature, group_size=self.prefix_group_size, prefix_model=prefix_model)[0], batch)

    @property
    def on_policy(self) -> bool:
        """One epoch and one mini-batch: the update never leaves the rollout policy, so the old log-probs
        are the current ones, detached, and the ratio is exactly 1."""
        return self.args.optimizer_steps_per_step == 1

    @property
    def kl_in_reward(self) -> bool:
        """The KL penalty is part of the per-token reward (PPO / REINFORCE with ``kl_in="reward"``)."""
        return False

    @property
    def kl_in_loss(self) -> bool:
        return self.has_reference and not self.kl_in_reward

    @property
    def needs_old_logprobs(self) -> bool:
        """The rollout policy's log-probs are needed: for the ratio off-policy, or for a KL reward."""
        return not self.on_policy or (self.kl_in_reward and self.has_reference)

    def compute_reference_logprobs(self, batch: Batch) -> None:
        """Reference and old-policy log-probs, computed once per rollout batch before any update."""
        if self.has_reference:
            batch["ref_logprobs"] = self.reference_logprobs(batch)
        if self.needs_old_logprobs:
            batch["old_logprobs"] = self._logprobs_no_grad(self.model, batch)

    def _rollout_metrics(self, batch: Batch, metrics: StepMetrics) -> None:
        lengths = self.accelerator.gather(batch["completion_mask"].sum(dim=1)).double()
        truncated = self.accelerator.gather(batch["truncated"].long()).double()
        metrics.add("completions/mean_length", lengths.mean())
        metrics.add_max("completions/max_length", lengths.max())
        metrics.add("completions/min_length", lengths.min())
        metrics.add("completions/truncated_frac", truncated.mean())
        metrics.add("completions/total_tokens", lengths.sum())


    # ------------------------------------------------------------------ evaluation
    def accuracy_function_index(self) -> int | None:
        """Index of the reward function that judges correctness: ``accuracy_reward`` by name, else the first
        one marked with ``rlhf.rewards.correctness``; None when there is none."""
        names = [func.name for func in self.reward_functions]
        if self.args.accuracy_reward is not None:
            if self.args.accuracy_reward not in names:
                raise ValueError(f"accuracy_reward={self.args.accuracy_reward!r} is not one of the reward functions "
                                 f"{names}; name one of them, or set it to None.")
            return names.index(self.args.accuracy_reward)
        marked = [j for j, func in enumerate(self.reward_functions) if is_correctness(func.fn)]
        return marked[0] if marked else None

    @torch.no_grad()
    def evaluate(self, dataset=None, step: int | None = None, output_dir: str | None = None) -> dict[str, float]:
        """Greedy completions for every prompt of ``dataset`` (default: ``eval_dataset``), scored with the reward
        functions, plus ``eval_num_generations`` sampled ones per prompt for pass@k.

        Returns eval/reward_mean, eval/reward/<name>/mean, eval/mean_length, eval/truncated_frac, and with a
        correctness reward eval/accuracy (greedy) and eval/pass@k (sampled, unbiased estimator). The main
        process writes ``eval_log_samples`` greedy completions to ``<output_dir>/samples-<step>.jsonl``.
        Sampling is seeded from (seed, step, process) in a forked RNG: the training RNG stream is untouched
        and the same model evaluated at the same step gives the same result.
        """
        dataset = as_dataset(dataset, "dataset") if dataset is not None else self.eval_dataset
        if dataset is None:
            raise ValueError("evaluate() needs a dataset: pass one, or give the trainer an eval_dataset.")
        args = self.args
        step = getattr(self, "step", 0) if step is None else step
        accuracy = self.accuracy_function_index()
        self.model.eval()
        greedy = self._eval_rollouts(dataset, SamplingParams(args.max_new_tokens, do_sample=False), 1)
        scores = greedy.scores
        out = {"eval/reward_mean": combine_rewards(scores, self.reward_weights).mean().item(),
               "eval/mean_length": greedy.lengths.double().mean().item(),
               "eval/truncated_frac": greedy.truncated.double().mean().item()}
        for j, func in enumerate(self.reward_functions):
            present = scores[:, j][~scores[:, j].isnan()]
            out[f"eval/reward/{func.name}/mean"] = present.mean().item() if present.numel() else float("nan")
        if accuracy is not None:
            out["eval/accuracy"] = (scores[:, accuracy] >= args.accuracy_threshold).double().mean().item()
        n = args.eval_num_generations
        if n > 0:
            device = self.accelerator.device
            devices = {"devices": []} if device.type == "cpu" else {"devices": [device], "device_type": device.type}
            with torch.random.fork_rng(**devices):
                torch.manual_seed(args.seed * 1_000_003 + step * 7_919 + self.accelerator.process_index)
                sampled = self._eval_rollouts(dataset, self.sampling, n)
            out["eval/sampled/reward_mean"] = combine_rewards(sampled.scores, self.reward_weights).mean().item()
            if accuracy is not None:
                correct = (sampled.scores[:, accuracy] >= args.accuracy_threshold).view(-1, n).sum(dim=1)
                for k in sorted(set(args.eval_pass_k or [1, n])):
                    out[f"eval/pass@{k}"] = pass_at_k(correct, n, k).mean().item()
        if self.accelerator.is_main_process and args.eval_log_samples > 0:
            write_samples(os.path.join(output_dir or args.output_dir, f"samples-{step}.jsonl"), step,
                          greedy.samples[:args.eval_log_samples], [f.name for f in self.reward_functions])
        return out

    def _eval_rollouts(self, dataset, params: SamplingParams, n: int) -> EvalRollouts:
        """``n`` completions per prompt of ``dataset`` (greedy when ``params`` says so), scored. Prompts are dealt to
        processes in batches; results are gathered, so every process returns the whole dataset's, grouped by
        prompt. ``samples`` holds the main process's first batch as dicts (prompt, completion, rewards, columns)."""
        rank, world = self.accelerator.process_index, self.accelerator.num_processes
        prompts_per_batch = max(1, self.args.eval_batch_size // n)
        scores, lengths, truncated, samples = [], [], [], []
        # Every process runs the same number of batches (sharded models generate in lockstep); a process
        # whose share has run out generates for the first prompt again and drops the result.
        rounds = -(-len(dataset) // (prompts_per_batch * world))
        for round_index in range(rounds):
            start = (round_index * world + rank) * prompts_per_batch
            if start >= len(dataset):
                self.generate(*self._tokenized_prompts(dataset[:1]["prompt"])[:2], params)
                continue
            batch, texts = self.complete(dataset[start:start + prompts_per_batch], params, n)
            per_function = self.reward_table(texts)
            scores.append(per_function)
            lengths.append(batch["completion_mask"].sum(dim=1).cpu())
            truncated.append(batch["truncated"].cpu())
            if not samples:
                samples = [{"prompt": p, "completion": c, "rewards": r, **{k: v[i] for k, v in texts.columns.items()}}
                           for i, (p, c, r) in enumerate(zip(texts.prompts, texts.completions, per_function.tolist()))]
        if not scores:
            scores = [torch.zeros(0, len(self.reward_functions), dtype=torch.float64)]
            lengths, truncated = [torch.zeros(0, dtype=torch.long)], [torch.zeros(0, dtype=torch.bool)]
        local = (torch.cat(scores), torch.cat(lengths), torch.cat(truncated))
        gathered = gather_object([local]) if world > 1 else [local]
        return EvalRollouts(*(torch.cat([part[i] for part in gathered]) for i in range(3)), samples)

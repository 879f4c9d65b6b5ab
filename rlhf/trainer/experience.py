"""Making experience: prompts -> sampled completions -> rewards -> no-grad log-probs, and greedy
evaluation (mixed into the trainer).

Each process samples its own prompts' completions; rewards are gathered so that every process holds
the whole rollout batch's rewards (group and batch statistics are then exact), and ``local_rows``
takes a process's slice back out.
"""

import logging
from dataclasses import dataclass

import torch
from accelerate.utils import gather_object

from rlhf.data import as_dataset, left_pad, render_prompts, tokenize_prompts
from rlhf.distributed import (
    fsdp_version,
    model_for_generation,
    needs_synced_generation,
    zero_stage,
)
from rlhf.metrics import StepMetrics
from rlhf.models import completion_logprobs
from rlhf.rewards import combine_rewards
from rlhf.rollout import Batch, SamplingParams, sample_completions

logger = logging.getLogger(__name__)


@dataclass
class RolloutTexts:
    """What reward functions see, one entry per completion (prompts repeated G times)."""

    prompts: list
    completions: list
    completion_ids: list[list[int]]
    columns: dict[str, list]


class Experience:
    """Needs ``args``, ``accelerator``, ``model``, ``ref_model``, ``has_reference``, ``tokenizer``, ``sampler``,
    ``reward_functions``, ``reward_weights``, ``eos_ids``, ``sampling``."""

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

    def generate_rollout(self, step: int) -> tuple[Batch, RolloutTexts]:
        """This process's prompts for ``step``, each with ``num_generations`` sampled completions
        (the completions of one prompt are contiguous rows)."""
        group = self.args.num_generations
        rows = self.train_dataset[self.sampler.indices(step)]
        prompt_ids, prompt_mask, is_chat = self._tokenized_prompts(rows["prompt"])
        prompt_ids = prompt_ids.repeat_interleave(group, dim=0)
        prompt_mask = prompt_mask.repeat_interleave(group, dim=0)
        sharded = zero_stage(self.accelerator) == 3 or fsdp_version(self.accelerator) is not None
        prefill_group = group if self.args.share_prompt_prefix and not sharded else 1
        completion_ids, completion_mask, truncated = self.generate(prompt_ids, prompt_mask, self.sampling,
                                                                   group_size=prefill_group)
        completions, id_lists = self._decode(completion_ids, completion_mask, is_chat)
        repeat = lambda values: [v for v in values for _ in range(group)]  # noqa: E731
        texts = RolloutTexts(
            prompts=repeat(rows["prompt"]), completions=completions, completion_ids=id_lists,
            columns={k: repeat(v) for k, v in rows.items() if k != "prompt"},
        )
        loss_mask = completion_mask.clone()
        if self.args.mask_truncated_completions:
            loss_mask[truncated] = 0
        batch = Batch(prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=completion_ids,
                      completion_mask=completion_mask, loss_mask=loss_mask, truncated=truncated)
        return batch, texts

    def score_rollout(self, batch: Batch, texts: RolloutTexts, metrics: StepMetrics) -> torch.Tensor:
        """Total rewards of the *whole* rollout batch (all processes, in process order), [B_global]."""
        per_function = torch.stack([
            func(texts.prompts, texts.completions, texts.completion_ids, texts.columns)
            for func in self.reward_functions
        ], dim=1)  # [B_local, F], NaN where a function returned None
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

    @torch.no_grad()
    def evaluate(self, dataset=None, batch_size: int = 64) -> dict[str, float]:
        """Greedy completions for every prompt of ``dataset`` (default: ``eval_dataset``), scored with the
        reward functions. Returns eval/reward_mean and eval/reward/<name>/mean."""
        dataset = as_dataset(dataset, "dataset") if dataset is not None else self.eval_dataset
        if dataset is None:
            raise ValueError("evaluate() needs a dataset: pass one, or give the trainer an eval_dataset.")
        greedy = SamplingParams(self.args.max_new_tokens, do_sample=False)
        rank, world = self.accelerator.process_index, self.accelerator.num_processes
        self.model.eval()
        scores = []
        # Every process runs the same number of batches (sharded models generate in lockstep); a process
        # whose share has run out scores its first row again and drops the result.
        rounds = -(-len(dataset) // (batch_size * world))
        for round_index in range(rounds):
            start = (round_index * world + rank) * batch_size
            rows = dataset[start:start + batch_size] if start < len(dataset) else None
            if rows is None:
                self.generate(*self._tokenized_prompts(dataset[:1]["prompt"])[:2], greedy)
                continue
            prompt_ids, prompt_mask, is_chat = self._tokenized_prompts(rows["prompt"])
            completion_ids, mask, _ = self.generate(prompt_ids, prompt_mask, greedy)
            completions, id_lists = self._decode(completion_ids, mask, is_chat)
            columns = {k: v for k, v in rows.items() if k != "prompt"}
            scores.append(torch.stack([f(rows["prompt"], completions, id_lists, columns)
                                       for f in self.reward_functions], dim=1))
        local = torch.cat(scores) if scores else torch.zeros(0, len(self.reward_functions), dtype=torch.float64)
        per_function = torch.cat(gather_object([local]))
        out = {"eval/reward_mean": combine_rewards(per_function, self.reward_weights).mean().item()}
        for j, func in enumerate(self.reward_functions):
            present = per_function[:, j][~per_function[:, j].isnan()]
            out[f"eval/reward/{func.name}/mean"] = present.mean().item() if present.numel() else float("nan")
        return out

"""The loop every algorithm shares: rollout -> score -> reference / old log-probs -> advantages ->
epochs of mini-batch updates -> metrics -> checkpoint.

What differs between algorithms is small and explicit: ``compute_advantages`` and ``compute_loss``
(and, for PPO, a critic). Loss normalisation is global: the denominators of a mini-batch are
counted over all its micro-batches and processes before the first backward, so the gradient does
not depend on how the mini-batch is split.
"""

import logging
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object, set_seed
from transformers import get_scheduler

from rlhf.configs import RLConfig
from rlhf.data import PromptSampler, as_dataset, left_pad, render_prompts, tokenize_prompts
from rlhf.metrics import MetricsLogger, PhaseTimer, StepMetrics
from rlhf.models import (
    completion_logprobs,
    disable_dropout,
    eos_token_ids,
    frozen_copy,
    load_causal_lm,
    load_tokenizer,
)
from rlhf.rewards import RewardFunction, combine_rewards
from rlhf.rollout import Batch, SamplingParams, sample_completions
from rlhf.trainer.checkpointing import Checkpointing

logger = logging.getLogger(__name__)


@dataclass
class RolloutTexts:
    """What reward functions see, one entry per completion (prompts repeated G times)."""

    prompts: list
    completions: list
    completion_ids: list[list[int]]
    columns: dict[str, list]


class RLTrainer(Checkpointing):
    """Shared trainer loop. Subclasses set ``config_class`` and implement ``compute_advantages`` and
    ``compute_loss``."""

    config_class: type[RLConfig] = RLConfig

    def __init__(self, model, reward_funcs, args: RLConfig | None = None, train_dataset=None, eval_dataset=None,
                 processing_class=None, peft_config=None):
        self.args = args if args is not None else self.config_class()
        if not isinstance(self.args, self.config_class):
            raise TypeError(f"{type(self).__name__} needs a {self.config_class.__name__}, got {type(self.args).__name__}.")
        args = self.args
        self.accelerator = Accelerator(log_with=args.report_to or None, project_dir=args.output_dir)
        args.validate(self.accelerator.num_processes)
        # device_specific: every process draws different samples from the same prompts.
        set_seed(args.seed, device_specific=True)

        self.tokenizer = load_tokenizer(model, processing_class, args.trust_remote_code)
        actor = load_causal_lm(model, args.dtype, args.trust_remote_code)
        if peft_config is not None:
            raise NotImplementedError("peft_config (LoRA actors) is not supported yet.")
        disable_dropout(actor)
        if args.gradient_checkpointing:
            actor.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.eos_ids = eos_token_ids(actor, self.tokenizer)
        self.ref_model = frozen_copy(actor).to(self.accelerator.device) if args.kl_coef > 0 else None

        self.reward_functions = self._build_reward_functions(reward_funcs)
        self.reward_weights = self._check_reward_weights(args.reward_weights)
        self.train_dataset = as_dataset(train_dataset, "train_dataset")
        self.eval_dataset = as_dataset(eval_dataset, "eval_dataset") if eval_dataset is not None else None
        self._check_reward_columns(self.train_dataset)
        self.sampler = PromptSampler(len(self.train_dataset), args.prompts_per_step, args.seed,
                                     self.accelerator.num_processes, self.accelerator.process_index)

        optimizer = torch.optim.AdamW(
            [p for p in actor.parameters() if p.requires_grad], lr=args.learning_rate,
            betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon, weight_decay=args.weight_decay,
        )
        self.model, self.optimizer = self.accelerator.prepare(actor, optimizer)
        # Stepped by hand once per optimizer step (Accelerate's wrapper would step it per process).
        self.scheduler = get_scheduler(
            {"constant": "constant_with_warmup"}.get(args.lr_scheduler_type, args.lr_scheduler_type),
            self.optimizer, num_warmup_steps=args.warmup_steps,
            num_training_steps=args.max_steps * args.optimizer_steps_per_step,
        )
        self.sampling = SamplingParams(args.max_new_tokens, args.temperature, args.top_p, args.top_k)
        self.step = 0
        if self.accelerator.is_main_process:
            os.makedirs(args.output_dir, exist_ok=True)
        if args.resume_from_checkpoint:
            self.load_checkpoint(args.resume_from_checkpoint)

    # ------------------------------------------------------------------ set-up helpers
    def _build_reward_functions(self, reward_funcs) -> list[RewardFunction]:
        funcs = reward_funcs if isinstance(reward_funcs, (list, tuple)) else [reward_funcs]
        if not funcs:
            raise ValueError("reward_funcs is empty; give at least one reward function.")
        return [RewardFunction(f) for f in funcs]

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

    @property
    def unwrapped_model(self):
        return self.accelerator.unwrap_model(self.model)

    # ------------------------------------------------------------------ the loop
    def train(self) -> list[dict]:
        """Run until ``max_steps``; returns the logged metric records."""
        args = self.args
        if self.step >= args.max_steps:
            self.accelerator.print(f"Training already finished: step {self.step} of max_steps={args.max_steps}. "
                                   "Nothing to do; raise max_steps to train further.")
            return []
        if args.report_to:
            self.accelerator.init_trackers(args.run_name or os.path.basename(os.path.normpath(args.output_dir)),
                                           config=args.to_dict())
        metrics_logger = MetricsLogger(args.output_dir, self.accelerator, args.max_steps, self.step, args.disable_tqdm)
        records = []
        evaluating = args.eval_steps > 0 and self.eval_dataset is not None
        if evaluating and self.step == 0:
            records.append(metrics_logger.write(0, self.evaluate()))
        while self.step < args.max_steps:
            metrics_logger.accumulate(self.training_step())
            self.step += 1
            if self.step % args.logging_steps == 0 or self.step == args.max_steps:
                records.append(metrics_logger.log(self.step))
            if evaluating and (self.step % args.eval_steps == 0 or self.step == args.max_steps):
                records.append(metrics_logger.write(self.step, self.evaluate()))
            if args.save_steps and (self.step % args.save_steps == 0 or self.step == args.max_steps):
                self.save_checkpoint()
            metrics_logger.advance()
        metrics_logger.close()
        self.accelerator.end_training()
        return records

    def training_step(self) -> dict[str, float]:
        """One rollout batch, start to finish. Returns global metrics (identical on every process)."""
        timer, metrics = PhaseTimer(), StepMetrics()
        start = time.perf_counter()
        batch = self.make_rollout_batch(self.step, metrics, timer)
        self.model.train()
        with timer("update"):
            self.update(batch, metrics)
        seconds = time.perf_counter() - start
        out = metrics.reduce(self.accelerator)
        out.update({f"time/{phase}": s for phase, s in timer.seconds.items()})
        out["time/step"] = seconds
        out["tokens_per_second"] = out.pop("completions/total_tokens") / seconds
        out["learning_rate"] = self.scheduler.get_last_lr()[0]
        return out

    def make_rollout_batch(self, step: int, metrics: StepMetrics | None = None,
                           timer: PhaseTimer | None = None) -> Batch:
        """Everything the update needs for ``step``: completions, rewards, reference / old log-probs and
        advantages, all computed before any parameter changes."""
        metrics = metrics if metrics is not None else StepMetrics()
        timer = timer if timer is not None else PhaseTimer()
        self.model.eval()
        with timer("generate"):
            batch, texts = self.generate_rollout(step)
        with timer("score"):
            rewards = self.score_rollout(batch, texts, metrics)
        with timer("reference"):
            self.compute_reference_logprobs(batch)
        self.compute_advantages(batch, rewards, metrics)
        self._rollout_metrics(batch, metrics)
        return batch

    # ------------------------------------------------------------------ rollout
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

    def generate_rollout(self, step: int) -> tuple[Batch, RolloutTexts]:
        """This process's prompts for ``step``, each with ``num_generations`` sampled completions
        (the completions of one prompt are contiguous rows)."""
        group = self.args.num_generations
        rows = self.train_dataset[self.sampler.indices(step)]
        prompt_ids, prompt_mask, is_chat = self._tokenized_prompts(rows["prompt"])
        prompt_ids = prompt_ids.repeat_interleave(group, dim=0)
        prompt_mask = prompt_mask.repeat_interleave(group, dim=0)
        completion_ids, completion_mask, truncated = sample_completions(
            self.unwrapped_model, prompt_ids, prompt_mask, self.sampling, self.eos_ids, self.tokenizer.pad_token_id
        )
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
    def _logprobs_no_grad(self, model, batch: Batch) -> torch.Tensor:
        """Log-probs [B, T] of every completion under ``model``, micro-batch by micro-batch."""
        pieces = []
        size = self.args.micro_batch_size
        for start in range(0, batch.size, size):
            micro = batch.rows(slice(start, start + size)).trimmed()
            logprobs, _ = completion_logprobs(model, micro["prompt_ids"], micro["prompt_mask"], micro["completion_ids"],
                                              micro["completion_mask"], self.args.temperature)
            pieces.append(logprobs)
        width = batch["completion_ids"].shape[1]
        return torch.cat([torch.nn.functional.pad(p, (0, width - p.shape[1])) for p in pieces])

    @property
    def needs_old_logprobs(self) -> bool:
        """True when the update leaves the rollout policy: more than one epoch or mini-batch. Otherwise
        the old log-probs are the current ones, detached, and the ratio is exactly 1."""
        return self.args.optimizer_steps_per_step > 1

    def compute_reference_logprobs(self, batch: Batch) -> None:
        """Reference and old-policy log-probs, computed once per rollout batch before any update."""
        if self.ref_model is not None:
            batch["ref_logprobs"] = self._logprobs_no_grad(self.ref_model, batch)
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

    # ------------------------------------------------------------------ algorithm hooks
    def compute_advantages(self, batch: Batch, rewards: torch.Tensor, metrics: StepMetrics) -> None:
        """Store ``batch["advantages"]`` ([B] or [B, T]) from the global rewards."""
        raise NotImplementedError

    def compute_loss(self, micro: Batch, denominators: dict, metrics: StepMetrics) -> torch.Tensor:
        """The loss of one micro-batch, normalised with the mini-batch's global ``denominators``."""
        raise NotImplementedError

    # ------------------------------------------------------------------ update
    def loss_denominators(self, mini: Batch) -> dict:
        """Global token and sequence counts of a mini-batch (summed over processes)."""
        mask = mini["loss_mask"]
        counts = torch.stack([mask.sum(), (mask.sum(dim=1) > 0).sum()]).double()
        counts = self.accelerator.reduce(counts, reduction="sum") if self.accelerator.num_processes > 1 else counts
        return {"num_tokens": counts[0], "num_seqs": counts[1], "seq_len": self.args.max_new_tokens}

    def accumulate_gradients(self, mini: Batch, metrics: StepMetrics) -> None:
        """Forward and backward every micro-batch of ``mini``; gradients add up to the mini-batch's."""
        denominators = self.loss_denominators(mini)
        size = self.args.micro_batch_size
        starts = range(0, mini.size, size)
        self._micro_share = 1.0 / (len(starts) * self.accelerator.num_processes)
        for i, start in enumerate(starts):
            last = i == len(starts) - 1
            with nullcontext() if last else self.accelerator.no_sync(self.model):
                loss = self.compute_loss(mini.rows(slice(start, start + size)).trimmed(), denominators, metrics)
                # DDP averages gradients over processes; the denominators are already global.
                self.accelerator.backward(loss * self.accelerator.num_processes)

    def record_loss(self, metrics: StepMetrics, name: str, loss: torch.Tensor) -> None:
        """Log a micro-batch's share of a mini-batch loss: the logged value is the mini-batch's loss
        (the sum of its micro-batch losses over processes), averaged over the step's mini-batches."""
        metrics.add(name, loss.detach() / self._micro_share, self._micro_share)

    def optimizer_step(self, metrics: StepMetrics) -> None:
        max_norm = self.args.max_grad_norm if self.args.max_grad_norm is not None else float("inf")
        grad_norm = self.accelerator.clip_grad_norm_(self.model.parameters(), max_norm)
        metrics.add("grad_norm", grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def update(self, batch: Batch, metrics: StepMetrics) -> None:
        """``num_epochs`` passes over the rollout batch in shuffled mini-batches."""
        local_mini = self.args.effective_mini_batch_size // self.accelerator.num_processes
        generator = torch.Generator().manual_seed(self.args.seed * 7919 + self.step)
        for _ in range(self.args.num_epochs):
            order = torch.randperm(batch.size, generator=generator).to(self.accelerator.device)
            for start in range(0, batch.size, local_mini):
                self.accumulate_gradients(batch.rows(order[start:start + local_mini]), metrics)
                self.optimizer_step(metrics)

    # ------------------------------------------------------------------ evaluation
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
        for start in range(rank * batch_size, len(dataset), batch_size * world):
            rows = dataset[start:start + batch_size]
            prompt_ids, prompt_mask, is_chat = self._tokenized_prompts(rows["prompt"])
            completion_ids, mask, _ = sample_completions(self.unwrapped_model, prompt_ids, prompt_mask, greedy,
                                                         self.eos_ids, self.tokenizer.pad_token_id)
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

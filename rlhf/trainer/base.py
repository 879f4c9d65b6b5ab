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

import torch
from accelerate.utils import set_seed
from transformers import get_scheduler

from rlhf.configs import RLConfig
from rlhf.core import aggregate_loss, kl_penalty, masked_mean, policy_loss
from rlhf.data import PromptSampler, as_dataset
from rlhf.distributed import make_accelerator
from rlhf.metrics import MetricsLogger, PhaseTimer, StepMetrics
from rlhf.models import (
    apply_lora,
    completion_logprobs,
    disable_dropout,
    eos_token_ids,
    frozen_copy,
    load_causal_lm,
    load_tokenizer,
    resolve_dtype,
)
from rlhf.rollout import Batch, SamplingParams
from rlhf.trainer.checkpointing import Checkpointing
from rlhf.trainer.experience import Experience

logger = logging.getLogger(__name__)


class NonFiniteError(RuntimeError):
    """Too many consecutive updates had a non-finite loss or gradient."""


class RLTrainer(Experience, Checkpointing):
    """Shared trainer loop. Subclasses set ``config_class`` and implement ``compute_advantages`` and
    ``compute_loss``."""

    config_class: type[RLConfig] = RLConfig

    def __init__(self, model, reward_funcs, args: RLConfig | None = None, train_dataset=None, eval_dataset=None,
                 processing_class=None, peft_config=None, reward_processing_classes=None):
        self.args = args if args is not None else self.config_class()
        if not isinstance(self.args, self.config_class):
            raise TypeError(f"{type(self).__name__} needs a {self.config_class.__name__}, got {type(self.args).__name__}.")
        args = self.args
        self.accelerator = make_accelerator(log_with=args.report_to or None, project_dir=args.output_dir)
        args.validate(self.accelerator.num_processes)
        # Micro-batches per mini-batch on each process; set before prepare() so DeepSpeed sees it too.
        self.accelerator.gradient_accumulation_steps = (
            args.effective_mini_batch_size // self.accelerator.num_processes
            // args.local_micro_batch_size(self.accelerator.num_processes))
        # device_specific: every process draws different samples from the same prompts.
        set_seed(args.seed, device_specific=True)

        self.tokenizer = load_tokenizer(model, processing_class, args.trust_remote_code)
        actor = load_causal_lm(model, args.dtype, args.trust_remote_code)
        self.eos_ids = eos_token_ids(actor, self.tokenizer)
        self.peft_config = peft_config
        self.init_algorithm(actor)  # e.g. PPO's critic, from the plain actor (before LoRA and Accelerate)
        if peft_config is not None:
            actor = apply_lora(actor, peft_config, args.gradient_checkpointing)
        disable_dropout(actor)
        if args.gradient_checkpointing:
            actor.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.kl_coef = args.kl_coef  # the current coefficient: an adaptive controller may move it
        self.has_reference = args.kl_coef > 0
        # A LoRA actor's reference is its base model with the adapter disabled: no second copy.
        self.ref_model = None
        if self.has_reference and peft_config is None:
            self.ref_model = frozen_copy(actor, resolve_dtype(args.ref_model_dtype) if args.ref_model_dtype else None)
            self.ref_model.to("cpu" if args.offload_reference else self.accelerator.device)

        self.reward_functions = self._build_reward_functions(reward_funcs, reward_processing_classes)
        self.reward_weights = self._check_reward_weights(args.reward_weights)
        self.accuracy_function_index()  # an unknown accuracy_reward name fails here, not at the first evaluation
        self.train_dataset = as_dataset(train_dataset, "train_dataset")
        self.eval_dataset = as_dataset(eval_dataset, "eval_dataset") if eval_dataset is not None else None
        self._check_reward_columns(self.train_dataset)
        self.check_prompts(self.train_dataset, "train_dataset")
        if self.eval_dataset is not None:
            self._check_reward_columns(self.eval_dataset)
            self.check_prompts(self.eval_dataset, "eval_dataset")
        self._check_sequence_length(actor)
        self.model_source = model if isinstance(model, str) else getattr(actor.config, "_name_or_path", "")
        self.sampler = PromptSampler(len(self.train_dataset), args.prompts_per_step, args.seed,
                                     self.accelerator.num_processes, self.accelerator.process_index)

        self.model, self.optimizer = self.accelerator.prepare(actor, self.make_optimizer(actor, args.learning_rate))
        self.scheduler = self.make_scheduler(self.optimizer)
        self.sampling = SamplingParams(args.max_new_tokens, args.temperature, args.top_p, args.top_k,
                                       min_new_tokens=args.min_new_tokens)
        self.step = 0
        self.consecutive_skips = 0
        if self.accelerator.is_main_process:
            os.makedirs(args.output_dir, exist_ok=True)
        if args.resume_from_checkpoint:
            self.load_checkpoint(args.resume_from_checkpoint)

    # ------------------------------------------------------------------ set-up helpers
    def init_algorithm(self, actor) -> None:
        """Build what an algorithm adds (e.g. PPO's critic) from the plain actor, before LoRA is applied
        to it and before Accelerate wraps it (``self.peft_config`` is set)."""

    def make_optimizer(self, model, learning_rate: float) -> torch.optim.Optimizer:
        """AdamW, with PyTorch's fused kernel where it exists (CPU and CUDA; 5x faster on CPU here)."""
        args = self.args
        params = [p for p in model.parameters() if p.requires_grad]
        settings = dict(lr=learning_rate, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon,
                        weight_decay=args.weight_decay)
        try:
            return torch.optim.AdamW(params, fused=True, **settings)
        except (RuntimeError, ValueError):  # a device or dtype without a fused kernel
            return torch.optim.AdamW(params, **settings)

    def make_scheduler(self, optimizer):
        """Warm-up then the configured decay, over every optimizer step of the run. Stepped by hand once
        per optimizer step (Accelerate's wrapper would step it once per process)."""
        args = self.args
        return get_scheduler({"constant": "constant_with_warmup"}.get(args.lr_scheduler_type, args.lr_scheduler_type),
                             optimizer, num_warmup_steps=args.warmup_steps,
                             num_training_steps=args.max_steps * args.optimizer_steps_per_step)

    def _check_sequence_length(self, actor) -> None:
        longest = self.args.max_new_tokens + (self.args.max_prompt_length or 0)
        positions = getattr(actor.config.get_text_config(), "max_position_embeddings", None)
        if positions is not None and longest > positions:
            logger.warning("max_prompt_length + max_new_tokens = %d exceeds the model's max_position_embeddings=%d; "
                           "positions past it are out of the range the model was trained on.", longest, positions)

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
        metrics_path = os.path.join(args.output_dir, "metrics.jsonl")
        if self.step == 0 and self.accelerator.is_main_process and os.path.exists(metrics_path):
            logger.warning("Starting a new run in %s: replacing its metrics.jsonl.", args.output_dir)
            os.remove(metrics_path)
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
        if args.write_report and self.accelerator.is_main_process:
            self._write_report()
        # Not accelerator.end_training(): it would also destroy the process group that save_model still needs.
        for tracker in self.accelerator.trackers:
            tracker.finish()
        return records

    def _write_report(self) -> None:
        """output_dir/report.html. A failure here is logged, never raised: the run itself has succeeded, and
        the model still has to be saved."""
        from rlhf.report import write_report

        try:
            self.accelerator.print(f"Report: {write_report(self.args.output_dir)}")
        except Exception as error:  # noqa: BLE001 - a broken plot must not cost the trained model
            logger.warning("Could not write the report (%s: %s); python -m rlhf.report %s retries.",
                           type(error).__name__, error, self.args.output_dir)

    def training_step(self) -> dict[str, float]:
        """One rollout batch, start to finish. Returns global metrics (identical on every process)."""
        timer, metrics = PhaseTimer(), StepMetrics()
        start = time.perf_counter()
        batch = self.make_rollout_batch(self.step, metrics, timer)
        for model in self.trained_models:
            model.train()
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
        self._last_rollout_texts = texts
        with timer("score"):
            rewards = self.score_rollout(batch, texts, metrics)
        with timer("reference"):
            self.compute_reference_logprobs(batch)
        self.compute_advantages(batch, rewards, metrics)
        self._rollout_metrics(batch, metrics)
        return batch

    # ------------------------------------------------------------------ algorithm hooks
    def compute_advantages(self, batch: Batch, rewards: torch.Tensor, metrics: StepMetrics) -> None:
        """Store ``batch["advantages"]`` ([B] or [B, T]) from the global rewards."""
        raise NotImplementedError

    def compute_loss(self, micro: Batch, denominators: dict, metrics: StepMetrics) -> torch.Tensor:
        """The loss of one micro-batch, normalised with the mini-batch's global ``denominators``."""
        return self.actor_loss(micro, denominators, metrics)

    def actor_loss(self, micro: Batch, denominators: dict, metrics: StepMetrics) -> torch.Tensor:
        """Clipped policy loss with ``micro["advantages"]`` ([B] or [B, T]), plus the KL term when it sits in
        the loss and the entropy bonus."""
        args = self.args
        mask = micro["loss_mask"]
        logprobs, entropy = completion_logprobs(
            self.model, micro["prompt_ids"], micro["prompt_mask"], micro["completion_ids"], micro["completion_mask"],
            args.temperature, with_entropy=True, entropy_grad=args.entropy_coef > 0,
            group_size=self.prefix_group_size, prefix_model=self.unwrapped_model,
        )
        old_logprobs = logprobs.detach() if self.on_policy else micro["old_logprobs"]
        loss, stats = policy_loss(logprobs, old_logprobs, micro["advantages"], mask, args.clip_eps_low,
                                  args.clip_eps_high, args.dual_clip, args.loss_agg, **denominators)
        tokens = mask.sum()
        self._mini_batch_kl += torch.stack([stats["approx_kl"] * tokens, tokens.to(stats["approx_kl"].dtype)])
        self.record_loss(metrics, "loss/policy", loss)
        if self.kl_in_loss:
            kl = kl_penalty(logprobs, micro["ref_logprobs"], args.kl_estimator)
            loss = loss + self.kl_coef * aggregate_loss(kl, mask, args.loss_agg, **denominators)
            metrics.add("kl", masked_mean(kl.detach(), mask), tokens)
        if args.entropy_coef > 0:
            loss = loss - args.entropy_coef * aggregate_loss(entropy, mask, args.loss_agg, **denominators)
        metrics.add("entropy", masked_mean(entropy.detach(), mask), tokens)
        metrics.add("clip/low_frac", stats["clip_frac_low"], tokens)
        metrics.add("clip/high_frac", stats["clip_frac_high"], tokens)
        metrics.add("clip/dual_frac", stats["dual_clip_frac"], tokens)
        metrics.add("policy/approx_kl", stats["approx_kl"], tokens)
        metrics.add("policy/ratio_mean", stats["ratio_mean"], tokens)
        metrics.add_max("policy/ratio_max", stats["ratio_max"])
        return loss

    def global_mean_var(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and unbiased variance of the masked elements of ``x`` over all processes."""
        valid = mask.bool()
        x = torch.where(valid, x, torch.zeros_like(x)).double()
        sums = torch.stack([valid.sum().double(), x.sum()])
        if self.accelerator.num_processes > 1:
            sums = self.accelerator.reduce(sums, reduction="sum")
        count, total = sums[0], sums[1]
        mean = total / count.clamp(min=1)
        squares = torch.where(valid, (x - mean) ** 2, torch.zeros_like(x)).sum()
        if self.accelerator.num_processes > 1:
            squares = self.accelerator.reduce(squares, reduction="sum")
        return mean, squares / (count - 1).clamp(min=1)

    def global_whiten(self, x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
        """``masked_whiten`` with the statistics of the whole rollout batch (all processes)."""
        mean, var = self.global_mean_var(x, mask)
        whitened = ((x.double() - mean) * torch.rsqrt(var + eps)).to(x.dtype)
        return torch.where(mask.bool(), whitened, torch.zeros_like(whitened))

    # ------------------------------------------------------------------ update
    def loss_denominators(self, mini: Batch) -> dict:
        """Global token and sequence counts of a mini-batch (summed over processes)."""
        mask = mini["loss_mask"]
        counts = torch.stack([mask.sum(), (mask.sum(dim=1) > 0).sum()]).double()
        counts = self.accelerator.reduce(counts, reduction="sum") if self.accelerator.num_processes > 1 else counts
        return {"num_tokens": counts[0], "num_seqs": counts[1], "seq_len": self.args.max_new_tokens}

    @property
    def trained_models(self) -> list:
        """Every model that receives gradients in the update."""
        return [self.model]

    def accumulate_gradients(self, mini: Batch, metrics: StepMetrics) -> None:
        """Forward and backward every micro-batch of ``mini``; gradients add up to the mini-batch's."""
        denominators = self.loss_denominators(mini)
        mini = mini.rows(self.length_order(mini))  # similar lengths share a micro-batch: less padding
        size = self.args.local_micro_batch_size(self.accelerator.num_processes)
        starts = range(0, mini.size, size)
        self._micro_share = 1.0 / (len(starts) * self.accelerator.num_processes)
        self._mini_batch_kl = torch.zeros(2, device=self.accelerator.device)  # approx-KL sum and token count
        # Accelerate divides each loss by gradient_accumulation_steps (DeepSpeed does the same) and DDP
        # averages gradients over processes; the denominators are already global, so undo both.
        scale = self.accelerator.num_processes * self.accelerator.gradient_accumulation_steps
        for start in starts:
            # accumulate() skips the gradient all-reduce (DDP) or the engine step (DeepSpeed) until the last
            # micro-batch of the mini-batch.
            with self.accelerator.accumulate(*self.trained_models):
                loss = self.compute_loss(mini.rows(slice(start, start + size)).trimmed(), denominators, metrics)
                self.accelerator.backward(loss * scale)

    def record_loss(self, metrics: StepMetrics, name: str, loss: torch.Tensor) -> None:
        """Log a micro-batch's share of a mini-batch loss: the logged value is the mini-batch's loss
        (the sum of its micro-batch losses over processes), averaged over the step's mini-batches."""
        metrics.add(name, loss.detach() / self._micro_share, self._micro_share)

    def optimization_targets(self) -> list[tuple[str, object, torch.optim.Optimizer, object]]:
        """(metric prefix, model, optimizer, scheduler) of every model this update steps."""
        return [("", self.model, self.optimizer, self.scheduler)]

    def optimizer_step(self, metrics: StepMetrics) -> bool:
        """Clip and step every target, or skip them all if any gradient norm is not finite (a NaN or inf
        loss leaves one). Returns whether the update was applied."""
        max_norm = self.args.max_grad_norm if self.args.max_grad_norm is not None else float("inf")
        targets = self.optimization_targets()
        # DeepSpeed clips inside its engine and returns no norm here (None); it also skips overflowing steps.
        norms = [self.accelerator.clip_grad_norm_(model.parameters(), max_norm) for _, model, _, _ in targets]
        known = [torch.as_tensor(n, dtype=torch.float32) for n in norms if n is not None]
        finite = not known or bool(torch.isfinite(torch.stack(known)).all())
        for (prefix, _, optimizer, scheduler), norm in zip(targets, norms):
            if finite:
                optimizer.step()
                scheduler.step()
                if norm is not None:
                    metrics.add(f"{prefix}grad_norm", norm)
            optimizer.zero_grad(set_to_none=True)
        return finite

    def should_stop_update(self, metrics: StepMetrics) -> bool:
        """Checked after every optimizer step: True ends this step's update early."""
        return False

    def mini_batch_approx_kl(self) -> float:
        """Approximate KL between the rollout policy and the policy of the last mini-batch, over all
        processes (a synchronising collective: call it only when the value is needed)."""
        totals = self._mini_batch_kl
        if self.accelerator.num_processes > 1:
            totals = self.accelerator.reduce(totals, reduction="sum")
        return (totals[0] / totals[1].clamp(min=1)).item()

    def update(self, batch: Batch, metrics: StepMetrics) -> None:
        """``num_epochs`` passes over the rollout batch in shuffled mini-batches."""
        local_mini = self.args.effective_mini_batch_size // self.accelerator.num_processes
        generator = torch.Generator().manual_seed(self.args.seed * 7919 + self.step)
        metrics.add_sum("guard/skipped_updates", 0.0)
        for _ in range(self.args.num_epochs):
            order = self._shuffled_rows(batch.size, generator).to(self.accelerator.device)
            for start in range(0, batch.size, local_mini):
                mini = batch.rows(order[start:start + local_mini])
                self.accumulate_gradients(mini, metrics)
                if self.optimizer_step(metrics):
                    self.consecutive_skips = 0
                else:
                    self.skip_nonfinite_update(mini, metrics)
                if self.should_stop_update(metrics):
                    return

    def length_order(self, batch: Batch) -> torch.Tensor:
        """Rows ordered by length, longest first (whole groups when prompts are shared). Micro-batches cut
        from this order hold sequences of similar length, so trimming leaves little padding; the loss
        is normalised over the whole mini-batch, so the order does not change the gradient."""
        lengths = batch["prompt_mask"].sum(dim=1) + batch["completion_mask"].sum(dim=1)
        group = self.prefix_group_size
        if group == 1:
            return torch.argsort(lengths, descending=True, stable=True)
        groups = torch.argsort(lengths.view(-1, group).amax(dim=1), descending=True, stable=True)
        return (groups.unsqueeze(1) * group + torch.arange(group, device=groups.device)).reshape(-1)

    def _shuffled_rows(self, rows: int, generator: torch.Generator) -> torch.Tensor:
        """A random order of the rows; whole groups move together when prompts are shared within them."""
        group = self.prefix_group_size
        if group == 1:
            return torch.randperm(rows, generator=generator)
        groups = torch.randperm(rows // group, generator=generator)
        return (groups.unsqueeze(1) * group + torch.arange(group)).reshape(-1)

    @property
    def prefix_group_size(self) -> int:
        """G when each micro-batch holds whole groups whose prompt can be run once (share_prompt_prefix), else 1."""
        args, accelerator = self.args, self.accelerator
        group = args.num_generations
        local_mini = args.effective_mini_batch_size // accelerator.num_processes
        if (self.prefill_group_size(group) == 1 or group == 1 or args.gradient_checkpointing
                or local_mini % group or args.local_micro_batch_size(accelerator.num_processes) % group
                or self.inference_batch_size % group):
            return 1
        return group

    @property
    def inference_batch_size(self) -> int:
        return self.args.inference_batch_size or 2 * self.args.local_micro_batch_size(self.accelerator.num_processes)

    def skip_nonfinite_update(self, mini: Batch, metrics: StepMetrics) -> None:
        """Count a skipped update; after ``max_nonfinite_updates`` in a row save the batch and stop."""
        self.consecutive_skips += 1
        # Summed over processes: divide by the process count for updates (each process skips the same one).
        metrics.add_sum("guard/skipped_updates", 1.0 / self.accelerator.num_processes)
        logger.warning("Step %d: non-finite loss or gradient; update skipped (%d in a row).", self.step,
                       self.consecutive_skips)
        if self.consecutive_skips >= self.args.max_nonfinite_updates:
            path = os.path.join(self.args.output_dir,
                                f"nonfinite-step{self.step}-rank{self.accelerator.process_index}.pt")
            torch.save({"step": self.step, "tensors": {k: v.detach().cpu() for k, v in mini.items()},
                        "prompts": self._last_rollout_texts.prompts,
                        "completions": self._last_rollout_texts.completions}, path)
            raise NonFiniteError(
                f"{self.consecutive_skips} updates in a row had a non-finite loss or gradient (step {self.step}); "
                f"the last mini-batch is saved in {path} (torch.load(path, weights_only=True)). Check the rewards, "
                "lower learning_rate, or set max_grad_norm; the last good checkpoint is untouched."
            )

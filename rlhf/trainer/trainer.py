"""The trainer every algorithm shares. One step, top to bottom (``make_rollout`` then ``training_step``):

    generate -> score -> reference / old log-probs (and values) -> advantages -> epochs of mini-batch updates
    -> metrics

Each phase is a call to a plain function with its inputs passed explicitly. What an algorithm changes is
the small object in ``rlhf.trainer.algorithms`` (its advantage estimator, whether it has a critic); where
the KL enters is ``rlhf.trainer.kl.KLPenalty``; the losses are ``rlhf.trainer.update.micro_batch_loss``.
"""

import logging
import os
import time

import torch
from accelerate.utils import DistributedType, set_seed
from transformers import get_scheduler

from rlhf.agent import AgentLoop
from rlhf.checkpoint import read_state
from rlhf.configs import GRPOConfig, PPOConfig, ReinforceConfig, RLConfig
from rlhf.critic import build_critic
from rlhf.data import PromptSampler, as_dataset, check_prompts, render_prompts
from rlhf.distributed import make_accelerator, shards_parameters
from rlhf.evaluation import evaluate, sampling_params
from rlhf.forward import enable_token_scoring
from rlhf.metrics import MetricsLogger, PhaseTimer, StepMetrics
from rlhf.models import (
    apply_lora,
    disable_dropout,
    eos_token_ids,
    frozen_copy,
    load_causal_lm,
    load_tokenizer,
    resolve_dtype,
)
from rlhf.rewards import (
    build_reward_functions,
    check_reward_columns,
    check_reward_weights,
    correctness_index,
    score_rollout,
)
from rlhf.rollout import Policy, Rollout, RolloutTexts, generate_rollout
from rlhf.trainer import checkpointing
from rlhf.trainer.algorithms import BatchReduce, algorithm_for
from rlhf.trainer.kl import KLPenalty
from rlhf.trainer.scoring import reference_logprobs, rollout_logprobs, rollout_values
from rlhf.trainer.update import NonFiniteGuard, TrainedModel, plan_step, update

logger = logging.getLogger(__name__)


class RLTrainer:
    """Trains ``model`` with the algorithm its config names (``GRPOTrainer``, ``PPOTrainer`` and
    ``ReinforceTrainer`` fix the config class)."""

    config_class: type[RLConfig] = RLConfig

    def __init__(self, model, reward_funcs, args: RLConfig | None = None, train_dataset=None, eval_dataset=None,
                 processing_class=None, peft_config=None, reward_processing_classes=None, value_model=None,
                 tools=None, environment_factory=None):
        self.args = args = args if args is not None else self.config_class()
        if not isinstance(args, self.config_class):
            raise TypeError(f"{type(self).__name__} needs a {self.config_class.__name__}, got {type(args).__name__}.")
        accelerator = self.accelerator = make_accelerator(log_with=args.report_to or None,
                                                          project_dir=args.output_dir)
        args.validate(accelerator.num_processes)
        self.algorithm = algorithm_for(args)
        self.plan = plan_step(args, accelerator.num_processes, shards_parameters(accelerator))
        # Micro-batches per mini-batch on each process; set before prepare() so DeepSpeed sees it too.
        accelerator.gradient_accumulation_steps = self.plan.mini_batch // self.plan.micro_batch
        set_seed(args.seed, device_specific=True)  # every process draws different samples from the same prompts

        # --- models: the actor, PPO's critic (from the plain actor, before LoRA), the reference
        self.tokenizer = load_tokenizer(model, processing_class, args.trust_remote_code)
        actor = load_causal_lm(model, args.dtype, args.trust_remote_code)
        eos_ids = eos_token_ids(actor, self.tokenizer)
        if args.chunked_lm_head:
            enable_token_scoring(actor)  # log-probs without [B, T, V] logits; the reference copy inherits it
        critic = None
        if self.algorithm.has_critic:
            if accelerator.distributed_type == DistributedType.DEEPSPEED:
                raise ValueError("PPO trains two models (actor and critic), which one Accelerate DeepSpeed engine "
                                 "does not support; use DDP or FSDP for PPO (recipes/accelerate/multi_gpu.yaml, "
                                 "fsdp.yaml), or GRPO / REINFORCE under DeepSpeed.")
            critic = build_critic(value_model, actor, resolve_dtype(args.dtype), args.trust_remote_code)
        if peft_config is not None:
            actor = apply_lora(actor, peft_config, args.gradient_checkpointing)
            if critic is not None:
                critic.add_lora(peft_config)
        for m in (actor, critic):
            if m is not None:
                disable_dropout(m)
                if args.gradient_checkpointing:
                    m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.kl = KLPenalty(self.plan.kl_in, args.kl_coef, args.kl_estimator, args.kl_target, args.kl_horizon)
        # A LoRA actor's reference is its base model with the adapter disabled: no second copy (pitfall 19).
        self.ref_model = None
        if self.plan.kl_in is not None and peft_config is None:
            self.ref_model = frozen_copy(actor, resolve_dtype(args.ref_model_dtype) if args.ref_model_dtype else None)
            self.ref_model.to("cpu" if args.offload_reference else accelerator.device)

        # --- rewards and data, all checked before the first step
        self.reward_functions = build_reward_functions(
            reward_funcs, reward_processing_classes, device=accelerator.device, batch_size=args.reward_model_batch_size,
            normalize=args.normalize_reward_model_scores, dtype=args.dtype, trust_remote_code=args.trust_remote_code,
            timeout=args.reward_timeout, allow_none=environment_factory is not None)
        self.reward_weights = check_reward_weights(args.reward_weights, self.reward_functions)
        correctness_index(self.reward_functions, args.accuracy_reward)  # an unknown name fails now, not at eval
        # Tools or an environment: multi-turn rollouts (rlhf/agent.py) instead of one completion per sample.
        self.agent = (AgentLoop.from_config(self.tokenizer, tools, environment_factory, args)
                      if tools or environment_factory is not None else None)
        self.rollout_fn = generate_rollout if self.agent is None else self.agent.rollout
        self.train_dataset = as_dataset(train_dataset, "train_dataset")
        self.eval_dataset = as_dataset(eval_dataset, "eval_dataset") if eval_dataset is not None else None
        for name, dataset in (("train_dataset", self.train_dataset), ("eval_dataset", self.eval_dataset)):
            if dataset is not None:
                check_reward_columns(self.reward_functions, dataset)
                check_prompts(dataset, name, self.tokenizer, args.max_prompt_length, args.truncate_prompts,
                              render=self.agent.render_prompts if self.agent is not None else render_prompts)
        _warn_past_positions(actor, args)
        self.model_source = model if isinstance(model, str) else getattr(actor.config, "_name_or_path", "")
        self.sampler = PromptSampler(len(self.train_dataset), args.prompts_per_step, args.seed,
                                     accelerator.num_processes, accelerator.process_index)

        # --- Accelerate
        self.model, self.optimizer = accelerator.prepare(actor, make_optimizer(actor, args.learning_rate, args))
        self.scheduler = make_scheduler(self.optimizer, args)
        self.actor = TrainedModel("", self.model, self.optimizer, self.scheduler, self.unwrapped_model, "model")
        self.critic = self.critic_model = None
        if critic is not None:
            learning_rate = args.critic_learning_rate if args.critic_learning_rate is not None else args.learning_rate
            self.critic, critic_optimizer = accelerator.prepare(critic, make_optimizer(critic, learning_rate, args))
            self.critic_model = TrainedModel("critic/", self.critic, critic_optimizer,
                                             make_scheduler(critic_optimizer, args),
                                             accelerator.unwrap_model(self.critic), "critic")
        self.policy = Policy(self.model, accelerator, self.tokenizer, eos_ids, args.max_prompt_length,
                             args.truncate_prompts, prefill_group=args.share_prompt_prefix
                             and not shards_parameters(accelerator))
        self.sampling = sampling_params(args)
        self.reduce = BatchReduce(accelerator)
        self.guard = NonFiniteGuard(args.max_nonfinite_updates, args.output_dir)
        self.step = 0
        if accelerator.is_main_process:
            os.makedirs(args.output_dir, exist_ok=True)
        if args.resume_from_checkpoint:
            self.load_checkpoint(args.resume_from_checkpoint)

    # ------------------------------------------------------------------ one step
    def make_rollout(self, step: int, metrics: StepMetrics | None = None,
                     timer: PhaseTimer | None = None) -> tuple[Rollout, RolloutTexts]:
        """Everything the update of ``step`` needs, computed before any parameter changes, and the texts the
        reward functions saw."""
        args, plan, accelerator = self.args, self.plan, self.accelerator
        metrics = metrics if metrics is not None else StepMetrics()
        timer = timer if timer is not None else PhaseTimer()
        self.model.eval()
        with timer("generate"):  # this process's prompts, num_generations completions each
            rollout, texts = self.rollout_fn(self.policy, self.train_dataset[self.sampler.indices(step)],
                                             self.sampling, args.num_generations)
        if args.mask_truncated_completions:
            rollout.loss_mask[rollout.truncated] = 0
        with timer("score"):  # the whole batch's rewards, [B_global]
            rewards = score_rollout(self.reward_functions, self.reward_weights, texts, accelerator,
                                    args.num_generations, metrics, turn_rewards=rollout.turn_rewards)
        with timer("reference"):
            if plan.kl_in is not None:
                rollout.ref_logprobs = reference_logprobs(self.ref_model, self.model, rollout, plan, args.temperature,
                                                          accelerator)
            if plan.needs_old_logprobs:
                rollout.old_logprobs = rollout_logprobs(self.model, rollout, plan, args.temperature,
                                                        prefix_model=self.unwrapped_model)
            if self.critic is not None:
                rollout.old_values = rollout_values(self.critic, rollout, plan, accelerator)
        rollout.advantages, rollout.returns = self.algorithm.advantages(rewards, rollout, self.kl, self.reduce,
                                                                        metrics)
        if args.filter_zero_std_groups:
            rollout.loss_mask = rollout.loss_mask * self.reduce.local_rows(informative_rows(rewards, args)).unsqueeze(1)
        log_rollout(rollout, texts, accelerator, metrics)
        return rollout, texts

    def training_step(self) -> dict[str, float]:
        """One rollout batch, start to finish. Returns global metrics (identical on every process)."""
        args = self.args
        timer, metrics = PhaseTimer(), StepMetrics()
        start = time.perf_counter()
        rollout, texts = self.make_rollout(self.step, metrics, timer)
        warming_up = self.critic is not None and self.step < args.critic_warmup_steps  # PPO: the critic alone first
        with timer("update"):
            update(None if warming_up else self.actor, self.critic_model if self.critic is not None else None,
                   rollout, texts, args, self.plan, self.kl, self.accelerator, self.step, self.guard,
                   metrics, target_kl=args.target_kl)
        seconds = time.perf_counter() - start
        out = metrics.reduce(self.accelerator)
        out.update({f"time/{phase}": s for phase, s in timer.seconds.items()})
        out["time/step"] = seconds
        out["tokens_per_second"] = out.pop("completions/total_tokens") / seconds
        out["learning_rate"] = self.scheduler.get_last_lr()[0]
        if self.plan.kl_in is not None:
            out["kl_coef"] = self.kl.coef
        self.kl.update_coef(out.get("kl/sequence"), args.rollout_batch_size)
        return out

    # ------------------------------------------------------------------ the run
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
            _write_report(self.accelerator, args.output_dir)
        # Not accelerator.end_training(): it would also destroy the process group that save_model still needs.
        for tracker in self.accelerator.trackers:
            tracker.finish()
        return records

    def evaluate(self, dataset=None, step: int | None = None, output_dir: str | None = None) -> dict[str, float]:
        """Greedy (and sampled) evaluation on ``dataset`` (default: ``eval_dataset``); see ``rlhf.evaluation``."""
        dataset = as_dataset(dataset, "dataset") if dataset is not None else self.eval_dataset
        if dataset is None:
            raise ValueError("evaluate() needs a dataset: pass one, or give the trainer an eval_dataset.")
        return evaluate(self.policy, dataset, self.reward_functions, self.reward_weights, self.args,
                        self.step if step is None else step, output_dir, rollout_fn=self.rollout_fn)

    # ------------------------------------------------------------------ saving and resuming
    @property
    def unwrapped_model(self):
        return self.accelerator.unwrap_model(self.model)

    @property
    def trained_models(self) -> list[TrainedModel]:
        return [self.actor] + ([self.critic_model] if self.critic is not None else [])

    @property
    def consecutive_skips(self) -> int:
        return self.guard.consecutive

    @property
    def kl_coef(self) -> float:
        return self.kl.coef

    def save_model(self, path: str | None = None) -> str:
        """Write the actor and tokenizer (safetensors) so that ``from_pretrained(path)`` loads them; a LoRA actor
        writes its adapter, or with ``save_merged_lora`` the merged model. Default: ``output_dir/model``."""
        return checkpointing.save_model(path or os.path.join(self.args.output_dir, "model"), self.accelerator,
                                        self.model, self.tokenizer, self.args.save_merged_lora)

    def save_checkpoint(self) -> str:
        state = {"step": self.step, "config": self.args.to_dict(), "num_processes": self.accelerator.num_processes,
                 "kl_coef": self.kl.coef, "model": self.model_source, "trainer": type(self).__name__}
        return checkpointing.save_checkpoint(self.args.output_dir, self.step, self.accelerator, self.trained_models,
                                             self.tokenizer, state, self.args.save_total_limit)

    def load_checkpoint(self, path: str) -> None:
        """Restore everything ``save_checkpoint`` wrote; ``"latest"`` picks the newest in ``output_dir``."""
        path = checkpointing.resolve_checkpoint(path, self.args.output_dir)
        checkpointing.check_resumable(read_state(path), self.args.to_dict(), self.model_source,
                                      type(self).__name__, self.accelerator.num_processes)
        state = checkpointing.load_checkpoint(path, self.accelerator, self.trained_models)
        self.step = state["step"]
        self.kl.coef = state["kl_coef"]
        self.accelerator.print(f"Resumed from {path} at step {self.step}.")


class GRPOTrainer(RLTrainer):
    """GRPO (Shao et al. 2024) with the Dr. GRPO and DAPO variants: no critic; each completion's advantage is its
    reward relative to the other completions of its prompt. See ``GRPOConfig``."""

    config_class = GRPOConfig


class ReinforceTrainer(RLTrainer):
    """REINFORCE with a baseline: none, the batch mean, RLOO or REINFORCE++. See ``ReinforceConfig``."""

    config_class = ReinforceConfig


class PPOTrainer(RLTrainer):
    """PPO with a critic (a backbone + a value head, by default a copy of the actor's backbone, or
    ``value_model``: a path, e.g. a trained reward model, or a model object). See ``PPOConfig``."""

    config_class = PPOConfig

    @property
    def unwrapped_critic(self):
        return self.accelerator.unwrap_model(self.critic)

    def save_critic(self, path: str) -> str:
        """Write the critic (backbone + value head, safetensors); ``ValueModel.from_pretrained`` loads it."""
        return checkpointing.save_model(path, self.accelerator, self.critic, None)


def informative_rows(rewards: torch.Tensor, args: RLConfig) -> torch.Tensor:
    """[B_global] 1.0 for the completions of groups whose rewards differ, 0.0 for groups whose completions all
    scored the same: they carry no signal, and DAPO drops them so they do not dilute the token-mean."""
    zero_std = rewards.view(-1, args.num_generations).std(dim=1) == 0
    return (~zero_std).repeat_interleave(args.num_generations).float()


def log_rollout(rollout: Rollout, texts: RolloutTexts, accelerator, metrics: StepMetrics) -> None:
    """Lengths count the policy's tokens only; multi-turn rollouts add agent/<statistic> (rlhf.agent.EPISODE_STATS)."""
    lengths = accelerator.gather(rollout.policy_tokens.sum(dim=1)).double()
    truncated = accelerator.gather(rollout.truncated.long()).double()
    metrics.add("completions/mean_length", lengths.mean())
    metrics.add_max("completions/max_length", lengths.max())
    metrics.add("completions/min_length", lengths.min())
    metrics.add("completions/truncated_frac", truncated.mean())
    metrics.add("completions/total_tokens", lengths.sum())
    for name, values in texts.episode_stats.items():
        metrics.add(f"agent/{name}", torch.tensor(values, dtype=torch.float64).mean(), len(values))


def make_optimizer(model, learning_rate: float, args: RLConfig) -> torch.optim.Optimizer:
    """AdamW, with PyTorch's fused kernel where it exists (CPU and CUDA; 5x faster on CPU here)."""
    params = [p for p in model.parameters() if p.requires_grad]
    settings = dict(lr=learning_rate, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon,
                    weight_decay=args.weight_decay)
    try:
        return torch.optim.AdamW(params, fused=True, **settings)
    except (RuntimeError, ValueError):  # a device or dtype without a fused kernel
        return torch.optim.AdamW(params, **settings)


def make_scheduler(optimizer, args: RLConfig):
    """Warm-up then the configured decay, over every optimizer step of the run. Stepped by hand once per
    optimizer step (Accelerate's wrapper would step it once per process)."""
    return get_scheduler({"constant": "constant_with_warmup"}.get(args.lr_scheduler_type, args.lr_scheduler_type),
                         optimizer, num_warmup_steps=args.warmup_steps,
                         num_training_steps=args.max_steps * args.optimizer_steps_per_step)


def _warn_past_positions(actor, args: RLConfig) -> None:
    longest = args.max_new_tokens + (args.max_prompt_length or 0)
    positions = getattr(actor.config.get_text_config(), "max_position_embeddings", None)
    if positions is not None and longest > positions:
        logger.warning("max_prompt_length + max_new_tokens = %d exceeds the model's max_position_embeddings=%d; "
                       "positions past it are out of the range the model was trained on.", longest, positions)


def _write_report(accelerator, output_dir: str) -> None:
    """output_dir/report.html. A failure here is logged, never raised: the run itself has succeeded, and the model
    still has to be saved."""
    from rlhf.report import write_report

    try:
        accelerator.print(f"Report: {write_report(output_dir)}")
    except Exception as error:  # noqa: BLE001 - a broken plot must not cost the trained model
        logger.warning("Could not write the report (%s: %s); python -m rlhf.report %s retries.",
                       type(error).__name__, error, output_dir)

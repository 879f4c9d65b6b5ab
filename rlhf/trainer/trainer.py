"""The trainer every algorithm shares. One step, top to bottom (``make_rollout`` then ``training_step``):

    generate -> score (rounds of refill with dynamic sampling) -> reference / old / teacher log-probs (and values)
    -> advantages (+ the teacher's per-token signal) -> which tokens train (filters, rollout correction, entropy
    selection) -> epochs of mini-batch updates -> metrics

Each phase is a call to a plain function with its inputs passed explicitly. What an algorithm changes is
the small object in ``rlhf.trainer.algorithms`` (its advantage estimator, whether it has a critic); where
the KL enters is ``rlhf.trainer.kl.KLPenalty``; the losses are ``rlhf.trainer.update.micro_batch_loss``.
"""

import logging
import os
import time
import weakref

import torch
from accelerate.utils import DistributedType, set_seed
from datasets import IterableDataset
from transformers import get_scheduler

from rlhf import trackers
from rlhf.agent import AgentLoop
from rlhf.callbacks import Callbacks, TrainResult, epoch_at, new_state
from rlhf.checkpoint import read_state
from rlhf.configs import GRPOConfig, PPOConfig, ReinforceConfig, RLConfig
from rlhf.core import rollout_correction
from rlhf.critic import build_critic
from rlhf.data import PromptSampler, StreamSampler, as_dataset, check_prompts, dataset_columns, render_prompts
from rlhf.distributed import fill_deepspeed_config, make_accelerator, sample_in_autocast, shards_parameters
from rlhf.evaluation import evaluate, sampling_params
from rlhf.fingerprints import dataset_fingerprint, model_fingerprint
from rlhf.forward import enable_token_scoring
from rlhf.metrics import CompletionSamples, PhaseTimer, StepMetrics, read_metrics
from rlhf.monitor import HealthMonitor
from rlhf.models import (
    absolute_positions,
    apply_lora,
    check_reference_options,
    disable_dropout,
    eos_token_ids,
    frozen_copy,
    input_vocab_size,
    load_causal_lm,
    load_teacher,
    load_tokenizer,
    output_vocab_size,
    resolve_dtype,
)
from rlhf.rewards import (
    RewardContext,
    build_reward_functions,
    check_reward_columns,
    check_reward_weights,
    correctness_index,
)
from rlhf.rollout import Policy, Rollout, RolloutTexts, generate_rollout
from rlhf.run_dir import RunDirectory
from rlhf.trainer import checkpointing
from rlhf.trainer.algorithms import BatchReduce, algorithm_for
from rlhf.trainer.kl import KLPenalty
from rlhf.trainer.run_log import RunLog
from rlhf.trainer.sampling import informative_rows, sample_groups
from rlhf.trainer.scoring import frozen_logprobs, reference_logprobs, rollout_logprobs, rollout_values
from rlhf.trainer.token_signals import high_entropy_tokens, log_mismatch, teacher_advantages
from rlhf.trainer.update import NonFiniteGuard, StepResult, TrainedModel, plan_step, update, weight_norms

logger = logging.getLogger(__name__)


class RLTrainer:
    """Trains ``model`` with the algorithm its config names (``GRPOTrainer``, ``PPOTrainer`` and
    ``ReinforceTrainer`` fix the config class)."""

    config_class: type[RLConfig] = RLConfig

    def __init__(self, model, reward_funcs, args: RLConfig | None = None, train_dataset=None, eval_dataset=None,
                 processing_class=None, peft_config=None, reward_processing_classes=None, value_model=None,
                 teacher_model=None, teacher_processing_class=None, callbacks=None, optimizers=(None, None),
                 tools=None, environment_factory=None):
        self.args = args = args if args is not None else self.config_class()
        if not isinstance(args, self.config_class):
            raise TypeError(f"{type(self).__name__} needs a {self.config_class.__name__}, got {type(args).__name__}.")
        if any(o is not None for o in optimizers):
            raise ValueError("optimizers: the trainer builds its own AdamW and schedule from the config; set "
                             "learning_rate, lr_scheduler_type, warmup_steps, weight_decay, adam_beta1/2 instead.")
        self.callbacks = Callbacks(callbacks, args.callback_timeout)
        accelerator = self.accelerator = make_accelerator(log_with=trackers.build(args) or None,
                                                          project_dir=args.output_dir,
                                                          mixed_precision=args.mixed_precision)
        args.validate(accelerator.num_processes)
        # The output directory: locked for this run, refused if it holds another run's checkpoints (rlhf/run_dir.py).
        self.run = RunDirectory.claim(args.output_dir, accelerator, args.resume_from_checkpoint,
                                      args.overwrite_output_dir)
        weakref.finalize(self, self.run.release)
        self.algorithm = algorithm_for(args)
        teacher_model = teacher_model if teacher_model is not None else args.teacher_model
        self.plan = plan_step(args, accelerator.num_processes, shards_parameters(accelerator),
                              distilling=teacher_model is not None)
        # Micro-batches per mini-batch on each process; set before prepare() so DeepSpeed sees it too.
        accelerator.gradient_accumulation_steps = self.plan.mini_batch // self.plan.micro_batch
        if accelerator.state.deepspeed_plugin is not None:
            fill_deepspeed_config(accelerator.state.deepspeed_plugin.deepspeed_config, self.plan.micro_batch,
                                  accelerator.gradient_accumulation_steps, args.max_grad_norm)
        set_seed(args.seed, device_specific=True)  # every process draws different samples from the same prompts

        # --- models: the actor, PPO's critic (from the plain actor, before LoRA), the reference
        self.tokenizer = load_tokenizer(model, processing_class, args.trust_remote_code,
                                        args.model_init_kwargs.get("revision"))
        actor = load_causal_lm(model, args.dtype, args.trust_remote_code, args.model_init_kwargs)
        vocab_rows = input_vocab_size(actor)  # a prompt id past these is an IndexError at step 1: checked below
        initial_weights = model_fingerprint(actor)  # a resume must start from the same model (its reference)
        eos_ids = eos_token_ids(actor, self.tokenizer)
        if args.chunked_lm_head:
            enable_token_scoring(actor)  # log-probs without [B, T, V] logits; the reference copy inherits it
        critic = None
        if self.algorithm.has_critic:
            if accelerator.distributed_type == DistributedType.DEEPSPEED:
                # Accelerate wraps each prepared model in its own DeepSpeed engine but sends every backward() to the
                # first engine only (Accelerator.deepspeed_engine_wrapped), and refuses to prepare two models at once:
                # the critic's gradients would be neither reduced across processes nor stepped.
                raise ValueError("PPO trains two models (actor and critic); under DeepSpeed, Accelerate routes backward "
                                 "through one engine only, so the critic would never be reduced or stepped. Use FSDP "
                                 "(recipes/accelerate/fsdp.yaml) or DDP (multi_gpu.yaml) for PPO; GRPO and REINFORCE "
                                 "run under DeepSpeed.")
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
        check_reference_options(args, lora=peft_config is not None, has_reference=self.plan.kl_in is not None)
        if self.plan.kl_in is not None and peft_config is None:
            self.ref_model = frozen_copy(actor, resolve_dtype(args.ref_model_dtype) if args.ref_model_dtype else None)
            self.ref_model.to("cpu" if args.offload_reference else accelerator.device)
        # On-policy distillation: a frozen teacher, scored like the reference (same forward path, same autocast).
        self.teacher = None
        if teacher_model is not None:
            self.teacher = load_teacher(teacher_model, self.tokenizer, args.teacher_dtype, args.dtype,
                                        teacher_processing_class, args.trust_remote_code, output_vocab_size(actor))
            if args.chunked_lm_head:
                enable_token_scoring(self.teacher)
            self.teacher.to("cpu" if args.offload_teacher else accelerator.device)
            if args.filter_zero_std_groups:
                logger.warning("filter_zero_std_groups with a teacher: groups whose task rewards are all equal leave "
                               "the loss, and the teacher's signal on them with it.")

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
        if self.agent is not None and args.rollout_correction is not None:
            raise ValueError(f"rollout_correction={args.rollout_correction!r} with tools or an environment: the "
                             "multi-turn rollout does not record the sampler's log-probs it needs. Leave it None.")
        self.train_dataset = as_dataset(train_dataset, "train_dataset", streaming=True)
        self.eval_dataset = as_dataset(eval_dataset, "eval_dataset") if eval_dataset is not None else None
        longest_prompt = 0
        for name, dataset in (("train_dataset", self.train_dataset), ("eval_dataset", self.eval_dataset)):
            if dataset is not None:
                check_reward_columns(self.reward_functions, dataset_columns(dataset), name)
                longest_prompt = max(longest_prompt, check_prompts(
                    dataset, name, self.tokenizer, args.max_prompt_length, args.truncate_prompts,
                    render=self.agent.render_prompts if self.agent is not None else render_prompts,
                    vocab_size=vocab_rows))
        streamed = isinstance(self.train_dataset, IterableDataset)
        if streamed and args.max_prompt_length:  # only the stream's first rows were measured
            longest_prompt = args.max_prompt_length
        self.num_prompts = None if streamed else len(self.train_dataset)
        # num_train_epochs, a fractional save_steps and warmup_ratio become steps now that the data is known
        self.args = args = args.for_dataset(self.num_prompts)
        _check_positions(actor, args, longest_prompt, multi_turn=self.agent is not None)
        # A .gguf path stays that (the loaders find its converted directory in the cache).
        self.model_source = (os.fspath(model) if isinstance(model, (str, os.PathLike))
                             else getattr(actor.config, "_name_or_path", ""))
        # What the run is made from, saved in its checkpoints and compared on resume (checkpointing.resume_changes).
        self.identity = {"trainer": type(self).__name__, "num_processes": accelerator.num_processes,
                         "model": self.model_source, "model_fingerprint": initial_weights,
                         "train_dataset": dataset_fingerprint(self.train_dataset),
                         "eval_dataset": dataset_fingerprint(self.eval_dataset),
                         "reward_functions": [f.name for f in self.reward_functions]}
        if streamed and args.filter_zero_std_groups and args.max_sampling_rounds > 1:
            raise ValueError(f"max_sampling_rounds={args.max_sampling_rounds} with a streamed train_dataset: dynamic "
                             "sampling's refill rounds draw prompts at random, which a stream cannot do (and step k "
                             "must read rows k x prompts_per_step onwards to resume). Pass a Dataset, or set "
                             "max_sampling_rounds=1 (zero-variance groups are then only filtered).")
        self.sampler = (StreamSampler(args.prompts_per_step, accelerator.num_processes, accelerator.process_index)
                        if streamed else PromptSampler(self.num_prompts, args.prompts_per_step, args.seed,
                                                       accelerator.num_processes, accelerator.process_index))

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
                             and not shards_parameters(accelerator),
                             autocast=sample_in_autocast(args.autocast_generation, accelerator))
        self.sampling = sampling_params(args)
        self.reduce = BatchReduce(accelerator)
        self.guard = NonFiniteGuard(args.max_nonfinite_updates, args.output_dir, self.run.checkpoints)
        self.state = new_state(args, accelerator, self.num_prompts)  # transformers' TrainerState: the step lives here
        if args.resume_from_checkpoint:
            self.load_checkpoint(args.resume_from_checkpoint)
        self._event("on_init_end")

    # ------------------------------------------------------------------ one step
    def make_rollout(self, step: int, metrics: StepMetrics | None = None,
                     timer: PhaseTimer | None = None) -> tuple[Rollout, RolloutTexts]:
        """Everything the update of ``step`` needs, computed before any parameter changes, and the texts the
        reward functions saw."""
        args, plan, accelerator = self.args, self.plan, self.accelerator
        metrics = metrics if metrics is not None else StepMetrics()
        timer = timer if timer is not None else PhaseTimer()
        self.model.eval()
        # this process's prompts, num_generations completions (or multi-turn trajectories) each; the whole batch's
        # rewards [B_global], the reward functions given trainer_state, log_metric and log_extra as in TRL
        rollout, texts, rewards = sample_groups(self.policy, self.train_dataset, self.sampler, step, self.sampling,
                                                args, self.reward_functions, self.reward_weights, accelerator,
                                                metrics, timer, RewardContext(self.state), self.rollout_fn)
        if args.mask_truncated_completions:
            rollout.loss_mask[rollout.truncated] = 0
        selecting = args.top_entropy_quantile < 1
        with timer("reference"):
            if plan.kl_in is not None:
                rollout.ref_logprobs = reference_logprobs(self.ref_model, self.model, rollout, plan, args.temperature,
                                                          accelerator)
            if plan.needs_old_logprobs:  # and the sampling policy's entropies, when they choose the tokens
                old = rollout_logprobs(self.model, rollout, plan, args.temperature, prefix_model=self.unwrapped_model,
                                       with_entropy=selecting)
                rollout.old_logprobs, entropy = old if selecting else (old, None)
            if self.teacher is not None:
                rollout.teacher_logprobs = frozen_logprobs(self.teacher, rollout, plan, args.temperature, accelerator)
            if self.critic is not None:
                rollout.old_values = rollout_values(self.critic, rollout, plan, accelerator)
        rollout.advantages, rollout.returns = self.algorithm.advantages(rewards, rollout, self.kl, self.reduce,
                                                                        metrics)
        if self.teacher is not None:  # on-policy distillation: the teacher's dense per-token signal
            rollout.advantages = teacher_advantages(rollout.advantages, rollout.old_logprobs, rollout.teacher_logprobs,
                                                    rollout.policy_tokens, args.distill_coef, self.reduce, metrics)
        # Which tokens train: each filter below takes tokens out of loss_mask, so out of the loss and its counts.
        if args.filter_zero_std_groups:
            rows = self.reduce.local_rows(informative_rows(rewards, args.num_generations))
            rollout.loss_mask = rollout.loss_mask * rows.unsqueeze(1)
        if rollout.old_logprobs is not None and rollout.sampler_logprobs is not None:  # else during the update
            log_mismatch(rollout.old_logprobs, rollout.sampler_logprobs, rollout.loss_mask,
                         args.rollout_correction_cap, metrics)
        if args.rollout_correction is not None:  # for a sampler that is not exactly the trained policy
            rollout.correction_weights, keep = rollout_correction(rollout.old_logprobs, rollout.sampler_logprobs,
                                                                  rollout.loss_mask, args.rollout_correction,
                                                                  args.rollout_correction_cap)
            rollout.loss_mask = rollout.loss_mask * keep.unsqueeze(1)
        if selecting:  # the others' policy loss is 0; top_entropy_normalization="selected" also takes them out
            rollout.loss_mask, rollout.selected_tokens = high_entropy_tokens(
                entropy, rollout.loss_mask, args.top_entropy_quantile, args.top_entropy_normalization, self.reduce,
                metrics)
        log_rollout(rollout, texts, accelerator, metrics)
        return rollout, texts

    def training_step(self, timer: PhaseTimer | None = None, samples: CompletionSamples | None = None
                      ) -> dict[str, float]:
        """One rollout batch, start to finish. Returns global metrics (identical on every process); ``timer`` (e.g.
        a profiler's) times the phases; ``samples``, when given, keeps a few of the step's completions with their
        rewards for the completions table."""
        return self.run_step(timer, samples).metrics

    def run_step(self, timer: PhaseTimer | None = None, samples: CompletionSamples | None = None) -> StepResult:
        """``training_step``, returning what the step did as fields (``StepResult``) beside its metrics."""
        args = self.args
        timer, metrics = timer if timer is not None else PhaseTimer(), StepMetrics()
        start = time.perf_counter()
        rollout, texts = self.make_rollout(self.step, metrics, timer)
        rollout_kl = self.kl.measure(rollout, self.accelerator, metrics)  # None: the update's pass measures it
        warming_up = self.critic is not None and self.step < args.critic_warmup_steps  # PPO: the critic alone first
        with timer("update"):
            result = update(None if warming_up else self.actor, self.critic_model if self.critic is not None else None,
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
        rollout_kl = rollout_kl if rollout_kl is not None else result.rollout_kl
        self.kl.update_coef(rollout_kl, args.rollout_batch_size)
        if samples is not None:
            samples.record(self.step + 1, texts, rollout)
        return StepResult(out, result, rollout_kl)

    # ------------------------------------------------------------------ the run
    def train(self, resume_from_checkpoint: str | bool | None = None) -> TrainResult:
        """Run until ``max_steps`` or until a callback stops it. ``resume_from_checkpoint`` (as in TRL): a checkpoint
        directory, or True for the newest one in ``output_dir``. Returns the logged metric records: a list that also
        carries ``global_step``, ``training_loss`` and ``metrics``, as transformers' TrainOutput does."""
        args, accelerator = self.args, self.accelerator
        if resume_from_checkpoint:
            self.load_checkpoint("latest" if resume_from_checkpoint is True else resume_from_checkpoint)
        self._writing_to(None)  # a new run: refused if output_dir holds another run's checkpoints or outputs
        if self.step >= args.max_steps:
            accelerator.print(f"Training already finished: step {self.step} of max_steps={args.max_steps}. "
                              "Nothing to do; raise max_steps to train further.")
            return TrainResult([], self.step)
        started, first_step = time.perf_counter(), self.step
        trackers.start(accelerator, args)
        run_log = RunLog(args, accelerator, self.state, [f.name for f in self.reward_functions], self._event)
        records = []
        monitor = HealthMonitor(args.num_generations, args.max_grad_norm) if args.health_monitor else None
        self._event("on_train_begin")
        evaluating = args.eval_steps > 0 and self.eval_dataset is not None
        if evaluating and self.step == 0:
            records.append(run_log.log_eval(self.step, self.evaluate()))
        while self.step < args.max_steps:
            self._event("on_step_begin")
            step_result = self.run_step(samples=run_log.samples)
            step_metrics = step_result.metrics
            run_log.accumulate(step_metrics)
            self.step += 1
            self.state.epoch = epoch_at(self.step, args.prompts_per_step, self.num_prompts)
            self._event("on_step_end")
            alarms = monitor.observe(self.step, step_metrics) if monitor else []
            stop = self.callbacks.requested("should_training_stop", accelerator)
            last = stop or self.step == args.max_steps
            if self._due("should_log", self.step % args.logging_steps == 0 or last):
                records.append(run_log.log(self.step))
            if self._due("should_evaluate", evaluating and (self.step % args.eval_steps == 0 or last)):
                evaluation = self.evaluate()
                records.append(run_log.log_eval(self.step, evaluation))
                alarms += monitor.observe_eval(self.step, evaluation) if monitor else []
            for alarm in alarms:  # said once: on the console, in alarms.jsonl, and so in the report
                run_log.alarm(alarm)
            if self._due("should_save", args.save_steps and (self.step % args.save_steps == 0 or last)):
                if step_result.update.skipped_updates == 0:
                    self.save_checkpoint()
                    self._event("on_save")
                else:  # its weights may be what made the update non-finite: keep the last good checkpoint as latest
                    logger.warning("Step %d: an update was skipped as non-finite; no checkpoint is written for this "
                                   "step (the newest is %s).", self.step, self.run.newest_checkpoint())
            run_log.advance()
            if stop and self.step < args.max_steps:
                run_log.print(f"Stopped by a callback at step {self.step} of {args.max_steps}.")
                break
        run_log.close()
        self._event("on_train_end")
        run_log.write_report()
        trackers.finish(accelerator)
        return TrainResult(records, self.step, time.perf_counter() - started, self.state.epoch, self.step - first_step)

    # ------------------------------------------------------------------ callbacks
    def _event(self, event: str, **kwargs):
        return self.callbacks.fire(event, self.args, self.state, model=self.unwrapped_model,
                                   processing_class=self.tokenizer, optimizer=self.optimizer,
                                   lr_scheduler=self.scheduler, train_dataloader=None, eval_dataloader=None, **kwargs)

    def _due(self, flag: str, scheduled: bool) -> bool:
        """Whether to log / evaluate / save now: on schedule, or because a callback asked (asked first: it clears)."""
        return self.callbacks.requested(flag, self.accelerator) or bool(scheduled)

    def evaluate(self, dataset=None, step: int | None = None, output_dir: str | None = None) -> dict[str, float]:
        """Greedy (and sampled) evaluation on ``dataset`` (default: ``eval_dataset``); see ``rlhf.evaluation``."""
        dataset = as_dataset(dataset, "dataset") if dataset is not None else self.eval_dataset
        if dataset is None:
            raise ValueError("evaluate() needs a dataset: pass one, or give the trainer an eval_dataset.")
        self._writing_to(output_dir)  # its samples file
        return evaluate(self.policy, dataset, self.reward_functions, self.reward_weights, self.args,
                        self.step if step is None else step, output_dir, self.state, rollout_fn=self.rollout_fn)

    # ------------------------------------------------------------------ saving and resuming
    @property
    def step(self) -> int:
        """Steps done (rollout batches): ``state.global_step``."""
        return self.state.global_step

    @step.setter
    def step(self, value: int) -> None:
        self.state.global_step = value

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
        writes its adapter, or with ``save_merged_lora`` the merged model. Default, as in TRL: ``output_dir`` itself
        (metrics, checkpoints and other files there stay)."""
        self._writing_to(path)
        return checkpointing.save_model(path or self.args.output_dir, self.accelerator, self.model, self.tokenizer,
                                        self.args.save_merged_lora, self.run.newest_checkpoint())

    def _writing_to(self, path: str | None) -> None:
        """Before writing to ``path`` (None: ``output_dir``): if it is in output_dir, output_dir must be this run's
        (``RunDirectory.start``)."""
        output_dir = os.path.abspath(self.args.output_dir)
        if path is None or os.path.commonpath([os.path.abspath(path), output_dir]) == output_dir:
            self.run.start(type(self).__name__)

    def save_checkpoint(self) -> str:
        self._writing_to(None)
        state = {"step": self.step, "run_id": self.run.run_id, "config": self.args.to_dict(), "kl_coef": self.kl.coef,
                 "weight_norms": weight_norms(self.trained_models, self.accelerator), **self.identity}
        return checkpointing.save_checkpoint(self.args.output_dir, self.step, self.accelerator, self.trained_models,
                                             self.tokenizer, state, self.args.save_total_limit)

    def load_checkpoint(self, path: str) -> None:
        """Restore everything ``save_checkpoint`` wrote and continue its run; ``"latest"`` picks the newest checkpoint
        of ``output_dir``'s run whose manifest verifies. Settings that changed since are refused or applied and
        logged (``checkpointing.resume_changes``)."""
        path = self.run.resolve(path)
        state = read_state(path)
        changes = checkpointing.resume_changes(state, self.identity, self.args.to_dict())
        checkpointing.load_checkpoint(path, self.accelerator, self.trained_models)
        self.step = state["step"]
        self.kl.coef = self.args.kl_coef if "kl_coef" in changes else state["kl_coef"]  # a new kl_coef replaces it
        self.run.resume(path, state, type(self).__name__)
        if changes:
            logger.warning("Resuming %s with changed settings, applied from step %d on: %s", path, self.step,
                           checkpointing.describe_changes(changes))
        self.state.epoch = epoch_at(self.step, self.args.prompts_per_step, self.num_prompts)
        metrics_path = os.path.join(self.args.output_dir, "metrics.jsonl")  # the history up to the checkpoint
        self.state.log_history = [r for r in (read_metrics(metrics_path) if os.path.exists(metrics_path) else [])
                                  if r.get("step", 0) <= self.step]
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
        self._writing_to(path)
        return checkpointing.save_model(path, self.accelerator, self.critic, None,
                                        last_checkpoint=self.run.newest_checkpoint())


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


def _check_positions(actor, args: RLConfig, longest_prompt: int, multi_turn: bool) -> None:
    """A model with a learned absolute position table (GPT-2) cannot run past it: an error naming the numbers and the
    fields. A rotary model can, outside what it was trained on: a warning."""
    table = absolute_positions(actor)
    completion = (f"the trajectory budget (max_trajectory_tokens or max_turns x max_new_tokens) "
                  f"{args.trajectory_tokens}" if multi_turn else f"max_new_tokens={args.max_new_tokens}")
    longest = longest_prompt + (args.trajectory_tokens if multi_turn else args.max_new_tokens)
    if table is not None and longest > table:
        raise ValueError(f"The longest prompt ({longest_prompt} tokens) + {completion} = {longest} exceeds the "
                         f"model's {table} absolute positions (a learned position table, as GPT-2's n_positions): "
                         "past it the forward pass fails with an IndexError. Lower max_new_tokens, or bound the prompts "
                         "with max_prompt_length (with truncate_prompts=True, or filter the longer prompts out).")
    if table is not None:  # checked against the prompts themselves, not the limits
        return
    longest = args.max_new_tokens + (args.max_prompt_length or 0)
    positions = getattr(actor.config.get_text_config(), "max_position_embeddings", None)
    if positions is not None and longest > positions:
        logger.warning("max_prompt_length + max_new_tokens = %d exceeds the model's max_position_embeddings=%d; "
                       "positions past it are out of the range the model was trained on.", longest, positions)

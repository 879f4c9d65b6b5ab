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

from rlhf import trackers
from rlhf.callbacks import TrainResult, epoch_at
from rlhf.checkpoint import read_state
from rlhf.configs import GRPOConfig, PPOConfig, ReinforceConfig, RLConfig, RLOOConfig
from rlhf.core import rollout_correction
from rlhf.custom_rollout import CustomRollout
from rlhf.data import as_dataset
from rlhf.dir_lock import LOCK_FILE
from rlhf.evaluation import evaluate
from rlhf.metrics import CompletionSamples, PhaseTimer, StepMetrics, read_metrics
from rlhf.monitor import HealthMonitor
from rlhf.rewards import RewardContext
from rlhf.rollout import Rollout, RolloutTexts
from rlhf.run_dir import ABANDONED_DIR, RUN_FILE
from rlhf.trainer import checkpointing
from rlhf.trainer.build import RunInputs, build_run, parts_of
from rlhf.trainer.kl import sync_reference
from rlhf.trainer.passes import frozen_logprobs, reference_logprobs, rollout_logprobs, rollout_values
from rlhf.trainer.run_log import RunLog
from rlhf.trainer.sampling import informative_rows, sample_groups
from rlhf.trainer.token_signals import high_entropy_tokens, log_mismatch, teacher_advantages
from rlhf.trainer.update import StepResult, TrainedModel, update, weight_norms
from rlhf.trl_metrics import history_record, kind_of

logger = logging.getLogger(__name__)

# What push_to_hub leaves out of output_dir: checkpoints and the run's bookkeeping (transformers skips "checkpoint-*"
# and "_*" too); the model, its tokenizer files, the metrics and the report go up.
HUB_IGNORED = ("checkpoint-*", "_*", RUN_FILE, LOCK_FILE, f"{ABANDONED_DIR}/*", "nonfinite-step*.pt")


class RLTrainer:
    """Trains ``model`` with the algorithm its config names (``GRPOTrainer``, ``PPOTrainer``, ``ReinforceTrainer``
    and ``RLOOTrainer`` fix the config class). Construction builds the run's parts (``rlhf.trainer.build``); the
    arguments are TRL's, plus ``rollout_func`` (TRL's custom rollout hook, ``rlhf.custom_rollout``)."""

    config_class: type[RLConfig] = RLConfig
    _run_log: RunLog | None = None  # while train() runs: where trainer.log() writes

    def __init__(self, model, reward_funcs=None, args: RLConfig | None = None, train_dataset=None, eval_dataset=None,
                 processing_class=None, peft_config=None, reward_processing_classes=None, value_model=None,
                 teacher_model=None, teacher_processing_class=None, callbacks=None, optimizers=(None, None),
                 tools=None, environment_factory=None, rollout_func=None):
        args = args if args is not None else self.config_class()
        if not isinstance(args, self.config_class):
            raise TypeError(f"{type(self).__name__} needs a {self.config_class.__name__}, got {type(args).__name__}.")
        inputs = RunInputs(model, reward_funcs, train_dataset, eval_dataset, processing_class, peft_config,
                           reward_processing_classes, value_model, teacher_model, teacher_processing_class, callbacks,
                           optimizers, tools, environment_factory)
        # Every part of the run, built and checked (rlhf/trainer/build.py); kept under the same names.
        vars(self).update(parts_of(build_run(type(self).__name__, args, inputs)))
        if rollout_func is not None:  # TRL's: the user's function makes the completions (rlhf/custom_rollout.py)
            self.rollout_fn = CustomRollout(rollout_func, self, tools, environment_factory)
        weakref.finalize(self, self.run.release)
        if self.args.resume_from_checkpoint:
            self.load_checkpoint(self.args.resume_from_checkpoint)
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
            sync_reference(self.ref_model, self.model, args, self.step + 1, self.accelerator)  # TR-DPO, when asked
        seconds = time.perf_counter() - start
        out = metrics.reduce(self.accelerator)
        out.update({f"time/{phase}": s for phase, s in timer.seconds.items()})
        out["time/step"] = seconds
        out["tokens_per_second"] = out.pop("completions/total_tokens") / seconds
        self.state.num_input_tokens_seen += int(out.pop("num_tokens/step", 0))  # TRL's num_tokens: the run's total
        out["num_tokens"] = float(self.state.num_input_tokens_seen)
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
        directory, or True for the newest one in ``output_dir``. Returns ``(global_step, training_loss, metrics)`` as
        transformers' ``TrainOutput`` does, with the logged records as ``records`` (``TrainResult``)."""
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
        run_log = self._run_log = RunLog(args, accelerator, self.state, [f.name for f in self.reward_functions],
                                         self._event)
        records = []
        monitor = HealthMonitor(args.num_generations, args.max_grad_norm) if args.health_monitor else None
        self._event("on_train_begin")
        evaluating = args.eval_steps > 0 and self.eval_dataset is not None
        if evaluating and self.step == 0:
            records.append(run_log.log_eval(self.step, *self._timed_evaluation()))
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
                evaluation, seconds, prompts = self._timed_evaluation()
                records.append(run_log.log_eval(self.step, evaluation, seconds, prompts))
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
        summary = run_log.summary(self.step, time.perf_counter() - started, self.step - first_step,
                                  args.rollout_batch_size * args.num_epochs)  # as transformers: log_history, trackers
        # and on_log
        self._run_log = None
        self._event("on_train_end")
        run_log.write_report()
        trackers.finish(accelerator)
        return TrainResult(records, self.step, summary, self.state.epoch)

    def _timed_evaluation(self) -> tuple[dict, float, int]:
        """``evaluate()`` on the eval set, with the seconds it took and the number of prompts (TRL's eval_runtime)."""
        started = time.perf_counter()
        evaluation = self.evaluate()
        return evaluation, time.perf_counter() - started, len(self.eval_dataset)

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

    # ------------------------------------------------------------------ transformers' Trainer surface
    @property
    def processing_class(self):
        """The tokenizer (transformers' name for it)."""
        return self.tokenizer

    def add_callback(self, callback) -> None:
        """Add a ``TrainerCallback`` (class or instance) after construction."""
        self.callbacks.add(callback)

    def pop_callback(self, callback):
        """Remove and return a callback: that instance, or the first of that class (None if there is none)."""
        return self.callbacks.pop(callback)

    def remove_callback(self, callback) -> None:
        self.callbacks.pop(callback)

    def is_world_process_zero(self) -> bool:
        return self.accelerator.is_main_process

    def is_local_process_zero(self) -> bool:
        return self.accelerator.is_local_main_process

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Log ``logs`` at the current step, as transformers' ``Trainer.log``: into ``state.log_history`` and the
        callbacks' ``on_log``, and while training also into metrics.jsonl and the trackers."""
        if self._run_log is not None:
            self._run_log.log_values(self.step, dict(logs))
            return
        entry = history_record({**logs, "step": self.step}, "user", self.state.epoch)  # as RunLog.history lays it out
        self.state.log_history.append(entry)
        self._event("on_log", logs=entry)

    def push_to_hub(self, commit_message: str = "End of training", blocking: bool = True, token: str | None = None,
                    revision: str | None = None, repo_id: str | None = None, private: bool | None = None) -> str:
        """Save the model into ``output_dir`` (``save_model``), then upload ``output_dir`` to the Hub without its
        checkpoints and run files, as transformers' ``Trainer.push_to_hub`` does. ``repo_id`` defaults to
        ``hub_model_id``, else ``output_dir``'s name; ``private`` defaults to ``hub_private_repo``. Returns the commit
        URL (on the main process; others return "")."""
        self.save_model()
        if not self.is_world_process_zero():
            return ""
        from huggingface_hub import create_repo, upload_folder

        repo_id = repo_id or self.args.hub_model_id or os.path.basename(os.path.abspath(self.args.output_dir))
        private = private if private is not None else self.args.hub_private_repo
        repo = create_repo(repo_id, token=token, private=private, exist_ok=True).repo_id
        commit = upload_folder(repo_id=repo, folder_path=self.args.output_dir, commit_message=commit_message,
                               token=token, revision=revision, run_as_future=not blocking,
                               ignore_patterns=list(HUB_IGNORED))
        return str(commit.result() if not blocking else commit)

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
                 "num_input_tokens_seen": self.state.num_input_tokens_seen,
                 "weight_norms": weight_norms(self.trained_models, self.accelerator), **self.identity}
        return checkpointing.save_checkpoint(self.args.output_dir, self.step, self.accelerator, self.trained_models,
                                             self.tokenizer, state, self.args.save_total_limit,
                                             reference=self.ref_model if self.args.sync_ref_model else None)

    def load_checkpoint(self, path: str) -> None:
        """Restore everything ``save_checkpoint`` wrote and continue its run; ``"latest"`` picks the newest checkpoint
        of ``output_dir``'s run whose manifest verifies. Settings that changed since are refused or applied and
        logged (``checkpointing.resume_changes``)."""
        path = self.run.resolve(path)
        state = read_state(path)
        changes = checkpointing.resume_changes(state, self.identity, self.args.to_dict())
        checkpointing.load_checkpoint(path, self.accelerator, self.trained_models, reference=self.ref_model)
        self.step = state["step"]
        self.kl.coef = self.args.kl_coef if "kl_coef" in changes else state["kl_coef"]  # a new kl_coef replaces it
        self.run.resume(path, state, type(self).__name__)
        if changes:
            logger.warning("Resuming %s with changed settings, applied from step %d on: %s", path, self.step,
                           checkpointing.describe_changes(changes))
        self.state.epoch = epoch_at(self.step, self.args.prompts_per_step, self.num_prompts)
        self.state.num_input_tokens_seen = state.get("num_input_tokens_seen", 0)
        metrics_path = os.path.join(self.args.output_dir, "metrics.jsonl")  # the history up to the checkpoint
        records = read_metrics(metrics_path) if os.path.exists(metrics_path) else []
        self.state.log_history = [  # with TRL's names beside ours, as the run wrote it
            history_record(r, kind_of(r), epoch_at(r["step"], self.args.prompts_per_step, self.num_prompts))
            for r in records if r.get("step", 0) <= self.step]
        self.accelerator.print(f"Resumed from {path} at step {self.step}.")


class GRPOTrainer(RLTrainer):
    """GRPO (Shao et al. 2024) with the Dr. GRPO and DAPO variants: no critic; each completion's advantage is its
    reward relative to the other completions of its prompt. See ``GRPOConfig``."""

    config_class = GRPOConfig


class RLOOTrainer(RLTrainer):
    """TRL's RLOO (``trl.RLOOTrainer``): REINFORCE with the leave-one-out baseline on KL-shaped sequence rewards,
    one advantage per sequence. See ``RLOOConfig``."""

    config_class = RLOOConfig


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
    """Lengths count the policy's tokens only; multi-turn rollouts add agent/<statistic> (rlhf.agent.EPISODE_STATS).
    The lengths of the completions that ended with an EOS are TRL's completions/*_terminated_length (0 if none did);
    prompt + completion tokens make the run's num_tokens (``run_step``)."""
    lengths = accelerator.gather(rollout.policy_tokens.sum(dim=1)).double()
    truncated = accelerator.gather(rollout.truncated.long()).double()
    prompt_tokens = accelerator.gather(rollout.prompt_mask.sum(dim=1)).double()
    metrics.add("completions/mean_length", lengths.mean())
    metrics.add_max("completions/max_length", lengths.max())
    metrics.add("completions/min_length", lengths.min())
    metrics.add("completions/truncated_frac", truncated.mean())
    ended = lengths[truncated == 0] if bool((truncated == 0).any()) else torch.zeros(1, dtype=lengths.dtype)
    metrics.add("completions/mean_terminated_length", ended.mean())
    metrics.add("completions/min_terminated_length", ended.min())
    metrics.add_max("completions/max_terminated_length", ended.max())
    metrics.add("completions/total_tokens", lengths.sum())
    metrics.add("num_tokens/step", prompt_tokens.sum() + lengths.sum())  # global already: the same on every process
    for name, values in texts.episode_stats.items():
        metrics.add(f"agent/{name}", torch.tensor(values, dtype=torch.float64).mean(), len(values))

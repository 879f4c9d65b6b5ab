"""Training configs: one dataclass per algorithm, a docstring under every field.

A *step* is one rollout batch: ``prompts_per_step`` prompts x ``num_generations`` completions,
generated, scored, and trained on for ``num_epochs`` passes in mini-batches. ``max_steps`` counts
these steps; each makes ``num_epochs * rollout_batch / mini_batch_size`` optimizer steps.
"""

import dataclasses
import math
from dataclasses import dataclass, field
from typing import ClassVar, Literal

from rlhf.config_fields import field_type_errors
from rlhf.core import LOSS_AGG_MODES, ImportanceLevel, KLEstimator, PolicyLossType, RewardScale, RolloutCorrection
from rlhf.trl_names import BY_NAME, AcceptsTRLNames, trl_attribute, trl_read

KLPlacement = Literal["reward", "loss"]
# rlhf.core's modes, and TRL's bnpo: each micro-batch's token mean, micro-batches weighted equally (the loss then
# depends on micro_batch_size, by definition; rlhf/trainer/update.py).
LossAggregation = Literal[LOSS_AGG_MODES + ("micro-batch-token-mean",)]


@dataclass
class RLConfig(metaclass=AcceptsTRLNames):
    """Fields shared by every trainer. TRL's names are accepted too (``rlhf/trl_names.py``)."""

    trains_critic: ClassVar[bool] = False  # a second trained model, the critic (PPO)
    # --- run -------------------------------------------------------------------------------
    output_dir: str = "outputs/run"
    """Where metrics.jsonl, checkpoints and the final model go."""
    seed: int = 42
    """Seed for sampling, shuffling and initialisation; each process adds its rank."""
    max_steps: int = 100
    """Number of training steps (one rollout batch each)."""
    num_train_epochs: float | None = None
    """Passes over the training prompts; when set, it decides max_steps = ceil(num_train_epochs x prompts /
    prompts_per_step) once the dataset is known (TRL's name; None: max_steps decides)."""
    logging_steps: int = 1
    """Log metrics (averaged over the steps since the last log) every this many steps."""
    save_steps: int | float = 0
    """Write a checkpoint to ``output_dir/checkpoint-<step>`` every this many steps (0: never); a number in (0, 1) is
    a fraction of max_steps, rounded up (as in TRL)."""
    save_total_limit: int | None = None
    """Keep only this run's newest N checkpoints, N >= 1 (None: keep all)."""
    resume_from_checkpoint: str | None = None
    """A checkpoint directory, or "latest" for the newest checkpoint of ``output_dir``'s run that verifies, to resume
    from (see "Failures and recovery" in the README)."""
    overwrite_output_dir: bool = False
    """Let a new run start in an ``output_dir`` that holds another run's checkpoints or outputs (metrics, completions,
    alarms, eval samples, report, saved model), deleting them (otherwise an error when the run starts writing)."""
    report_to: list[str] = field(default_factory=list)
    """Trackers to log to: tensorboard (output_dir/runs/<run_name>), wandb, trackio, mlflow, ... or "all" installed
    ones; a string, a list, or "none" (metrics.jsonl is always written; rlhf/trackers.py)."""
    run_name: str | None = None
    """Name of the run in trackers (default: the basename of ``output_dir``)."""
    hub_model_id: str | None = None
    """The Hub repository ``trainer.push_to_hub()`` uploads to (default: the basename of ``output_dir`` in your
    namespace)."""
    hub_private_repo: bool | None = None
    """Whether ``push_to_hub()`` creates the repository private (None: the Hub's default for your account)."""
    disable_tqdm: bool = False
    """Turn the progress bar off (the console still gets a line per logging step). There is none either when stderr is
    not a terminal (a log file, a pipe, CI), where each redraw would be a line of its own."""
    log_completions: bool = False
    """At every logging step, show a table of sampled training prompts, completions and their rewards per function on
    the console and in the trackers (``output_dir/completions.jsonl`` and the report get them either way)."""
    num_completions_to_print: int | None = 8
    """Completions in that table (None: all of the step's completions on the main process)."""
    write_report: bool = True
    """At the end of training write ``output_dir/report.html``: curves of reward, eval accuracy, KL, entropy, length
    and clip fraction, and sample completions (``python -m rlhf.report <output_dir>`` writes it on demand)."""
    health_monitor: bool = True
    """Watch the run for the failures users keep hitting (the learning signal drying up, entropy collapse, identical
    rewards, updates too large, exploding gradients, truncation, over-optimisation, a reward held down by the KL
    penalty, non-finite updates) and explain each once, with likely causes and what to try, on the console, in
    alarms.jsonl and in the report (rlhf/monitor.py)."""
    eval_steps: int = 0
    """Evaluate on ``eval_dataset`` (greedy completions, scored by the reward functions) before training,
    every this many steps and at the end (0: never)."""
    eval_num_generations: int = 0
    """Sampled completions per eval prompt (at the training temperature / top_p / top_k), besides the greedy one;
    with a correctness reward they give eval/pass@k (0: greedy only)."""
    eval_pass_k: list[int] | None = None
    """The k of the pass@k metrics, each <= eval_num_generations (None: 1 and eval_num_generations)."""
    eval_batch_size: int = 64
    """Completions per generate call during evaluation."""
    eval_log_samples: int = 8
    """Greedy eval completions written, with their rewards, to ``output_dir/samples-<step>.jsonl`` (0: none)."""
    accuracy_reward: str | None = None
    """Name of the reward function that says whether a completion is correct, for eval/accuracy and pass@k (None:
    the first one marked with rlhf.rewards.correctness, e.g. the answer rules of reward_models.rules)."""
    accuracy_threshold: float = 1.0
    """A completion is correct when the accuracy reward is at least this."""

    # --- model -----------------------------------------------------------------------------
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "float32"
    """Dtype the actor is loaded in when given as a path. Mixed precision is Accelerate's (--mixed_precision)."""
    trust_remote_code: bool = False
    """Allow model code from the hub. Off unless you trust the repository."""
    model_init_kwargs: dict[str, object] = field(default_factory=dict)
    """More keyword arguments for ``from_pretrained`` when the actor is given as a path, e.g. {attn_implementation:
    sdpa, revision: main}; its ``revision`` also applies to the tokenizer (TRL's name)."""
    mixed_precision: Literal["no", "fp16", "bf16"] | None = None
    """Autocast precision of the forward passes (None: what accelerate launch says; TRL's bf16 / fp16 set it)."""
    autocast_generation: bool | None = None
    """Sample under the mixed-precision autocast too (None: yes, on every device). Measured on SmolLM2-135M, 32 rows x
    up to 64 tokens, bf16 on a 2-core Xeon with AMX: generation 4.9 s against 6.5 s with a float32 sampler, and the
    sampler's log-probs 0.031 nats per token from the bf16 update's against 0.027 for the float32 sampler's. False:
    the sampler runs in the weights' dtype and only the scoring and update passes in the autocast; the rollout/*
    metrics measure the gap either way."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, ~30% more compute."""
    share_prompt_prefix: bool = True
    """Run each prompt once for its num_generations completions in the scoring and training passes (its KV
    cache is shared): the same results, less compute. Off automatically under FSDP, ZeRO-3 and gradient checkpointing."""
    chunked_lm_head: bool = True
    """Compute log-probs and entropies from the final hidden states through the LM head in token x vocabulary tiles,
    forward and backward, never building the [batch, tokens, vocab] logits (see rlhf/core/lm_head.py). Models whose
    head is not a plain linear layer keep the full logits whatever this says."""
    inference_batch_size: int | None = None
    """Completions per forward of the no-grad passes (reference, old log-probs, values); None: 2 x micro_batch_size (no activations are kept)."""
    ref_model_dtype: Literal["float32", "bfloat16", "float16"] | None = None
    """Dtype of the reference model's copy, e.g. bfloat16 to halve its memory (None: the actor's dtype)."""
    offload_reference: bool = False
    """Keep the reference model on the CPU, moving it to the device only for its pass of each step."""
    save_merged_lora: bool = False
    """With a LoRA actor, ``save_model`` writes the base model with the adapter merged in, instead of the adapter."""

    # --- batch geometry --------------------------------------------------------------------
    prompts_per_step: int = 8
    """Prompts per step, across all processes. Must be divisible by the number of processes."""
    num_generations: int = 8
    """Completions sampled per prompt (the group size G)."""
    mini_batch_size: int | None = None
    """Completions per optimizer step, across all processes (None: the whole rollout batch, one step per epoch)."""
    micro_batch_size: int = 8
    """Completions per forward/backward pass on each process; gradients accumulate up to a mini-batch (capped at the per-process mini-batch)."""
    num_epochs: int = 1
    """Passes over each rollout batch. With 1 (and one mini-batch) the update is exactly on-policy."""

    # --- generation ------------------------------------------------------------------------
    max_prompt_length: int | None = 512
    """Longest prompt in tokens; longer prompts are an error unless ``truncate_prompts`` (None: no limit)."""
    truncate_prompts: bool = False
    """Cut prompts longer than ``max_prompt_length`` from the left (keeping their end) with a warning."""
    max_new_tokens: int = 256
    """Longest completion in tokens; a completion that reaches it without an EOS is truncated."""
    min_new_tokens: int = 0
    """Suppress EOS before this many tokens. The sampled distribution then differs from the scored one at those positions (use for benchmarks)."""
    temperature: float = 1.0
    """Sampling temperature. Log-probs for the ratio and the KL are computed at the same temperature."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens with this much probability (1.0: off)."""
    top_k: int = 0
    """Keep only the k most likely tokens when sampling (0: off)."""
    min_p: float | None = None
    """Keep only tokens at least this fraction as likely as the most likely one when sampling (None: off). Like
    top_p and top_k it truncates the sampling distribution; the log-probs are those of the full tempered distribution."""
    static_kv_cache: bool = False
    """Generate with a preallocated (static) KV cache, which transformers compiles with CUDA graphs on a GPU: much
    faster decoding there after a one-time compilation; no gain on a CPU. Each prompt is then prefilled per completion."""

    # --- multi-turn: tools and environments (rlhf/agent.py) -----------------------------------
    max_turns: int = 4
    """Policy turns per trajectory with tools or an environment (max_new_tokens bounds each); a trajectory that
    still calls a tool or gets an observation after the last one ends there, marked truncated."""
    max_trajectory_tokens: int | None = None
    """Most tokens after the prompt in a multi-turn trajectory, the policy's and the environment's together; the
    trajectory ends, marked truncated, when the next turn would not fit (None: max_turns x max_new_tokens)."""
    tool_timeout: float = 10.0
    """Seconds a tool call may run; past it the call is stopped and the model sees an error message."""
    max_tool_response_chars: int = 2000
    """Longest tool result or error message the model sees, in characters; longer ones are cut, saying so."""
    tool_workers: int = 4
    """Processes that run tool calls, in parallel; a call past tool_timeout is ended by killing its process.
    0: run calls in threads of the trainer's process, where a call that hangs is abandoned, never stopped."""
    environment_timeout: float | None = None
    """Seconds one call of the environment (``environment_factory()``, ``reset``, ``step``) may take before the run
    stops with an error naming it (None: no limit). With a limit the calls run in a thread of their own."""

    # --- rewards ---------------------------------------------------------------------------
    reward_weights: list[float] | None = None
    """Weight of each reward function in the total reward (None: all 1.0)."""
    reward_model_batch_size: int = 32
    """Completions per forward pass of a reward model given in ``reward_funcs``."""
    normalize_reward_model_scores: bool = False
    """Whiten each reward model's scores over the rollout batch (all processes) before they are weighted."""
    mask_truncated_completions: bool = False
    """Leave completions that hit ``max_new_tokens`` without an EOS out of the loss (DAPO)."""
    filter_zero_std_groups: bool = False
    """Leave groups whose rewards are all equal (zero advantage) out of the loss and its token count (DAPO)."""
    max_sampling_rounds: int = 1
    """With filter_zero_std_groups, DAPO's dynamic sampling: sample further rounds of fresh prompts (none already in
    the step while the dataset has unused ones; then the step's least used) until prompts_per_step groups with
    differing rewards are collected or this many rounds have run; short of that, train on those found (the batch is
    topped up with groups the filter leaves out of the loss). 1: only drop."""

    # --- loss ------------------------------------------------------------------------------
    clip_eps_low: float = 0.2
    """Lower PPO clip: the ratio is clipped at 1 - clip_eps_low for negative advantages."""
    clip_eps_high: float = 0.2
    """Upper PPO clip: the ratio is clipped at 1 + clip_eps_high for positive advantages (DAPO: 0.28)."""
    dual_clip: float | None = None
    """Dual-clip constant c > 1: caps the loss of a negative-advantage token at -c * A (None: off)."""
    kl_coef: float = 0.0
    """Weight of the KL penalty to the frozen reference model (0: no reference model is loaded)."""
    kl_estimator: KLEstimator = "k3"
    """KL estimator: k1 = d, k2 = d^2/2, k3 = exp(-d) - 1 + d with d = logp - logp_ref."""
    kl_in: KLPlacement | None = "loss"
    """Where the KL penalty goes: added to the loss (GRPO), or subtracted from each token's reward before the
    advantages (PPO, REINFORCE; InstructGPT); None: no KL term (see rlhf/trainer/kl.py)."""
    kl_target: float | None = None
    """Adapt kl_coef towards this KL per sequence (Ziegler et al. 2019), a proportional controller (None: fixed kl_coef)."""
    kl_horizon: int = 10000
    """Horizon, in samples, of the adaptive KL controller."""
    sync_ref_model: bool = False
    """Move the reference towards the policy every ref_model_sync_steps steps (TR-DPO, arXiv 2404.09656; TRL's name):
    ref = ref_model_mixup_alpha * policy + (1 - alpha) * ref, weight by weight. Needs a KL term (kl_coef > 0) and a
    separate reference copy: not with a LoRA actor (its reference is the adapter disabled), as in TRL."""
    ref_model_mixup_alpha: float = 0.6
    """TR-DPO's alpha in [0, 1]: the policy's share of the reference after each sync (1: a hard copy)."""
    ref_model_sync_steps: int = 512
    """TR-DPO's tau: sync every this many steps, after the step's update. A step is one rollout batch, as for
    save_steps: TRL's optimizer steps when each step makes one (TRL's default batch geometry)."""
    loss_agg: LossAggregation = "token-mean"
    """How per-token losses are reduced: token-mean (DAPO), seq-mean-token-mean (GRPO), seq-mean-token-sum, seq-mean-token-sum-norm (Dr. GRPO), micro-batch-token-mean (TRL's bnpo)."""
    entropy_coef: float = 0.0
    """Weight of an entropy bonus (the loss subtracts entropy_coef * entropy)."""
    importance_sampling_level: ImportanceLevel = "token"
    """The ratio r = pi / pi_old the policy loss clips: per token; per sequence (GSPO: exp of the mean log-ratio over
    the sequence's tokens, clipped per sequence; the paper pairs it with seq-mean-token-mean and clip_eps_low / high of
    3e-4 / 4e-4); sequence_token (GSPO-token: the sequence ratio's value with a per-token gradient); or sequence_sum
    (the sequence's likelihood ratio, exp of the summed log-ratio: TRL's RLOO)."""
    policy_loss_type: PolicyLossType = "ppo"
    """ppo: the clipped surrogate max(-A r, -A clip(r)); cispo (MiniMax-M1): -sg(clip(r, 1 - clip_eps_low,
    1 + clip_eps_high)) * A * log p, whose clipped tokens still give gradient; sapo (TRL's loss_type sapo): a soft
    gate -A * 4 / tau * sigmoid(tau * (r - 1)) instead of the clip (rlhf.core.policy_loss)."""
    sapo_temperature_pos: float = 1.0
    """SAPO's gate temperature tau for tokens with a positive advantage (TRL's name and default)."""
    sapo_temperature_neg: float = 1.05
    """SAPO's gate temperature for tokens with a zero or negative advantage; larger than the positive one, it damps
    their off-policy updates sooner (TRL's name and default)."""
    top_entropy_quantile: float = 1.0
    """Train only on this fraction of the batch's loss tokens, those of highest entropy under the sampling policy,
    chosen over all processes: the others' policy loss is multiplied by 0 ("Beyond the 80/20 rule": 0.2; 1.0: all
    tokens). What they still count in: top_entropy_normalization."""
    top_entropy_normalization: Literal["completion", "selected"] = "completion"
    """With top_entropy_quantile < 1. completion (the paper's and TRL's): the unselected tokens stay in loss_agg's
    token and sequence counts and in the KL and value losses; only their policy loss (and entropy bonus) is 0.
    selected (this toolkit's earlier rule): they leave every loss term and its counts, a policy gradient about
    1 / top_entropy_quantile larger. Either way a sequence ratio (GSPO) is over the whole completion."""
    rollout_correction: RolloutCorrection | None = None
    """For a sampler that is not exactly the trained policy (bf16 / autocast sampling, other kernels):
    token_truncate weighs each token's policy loss by min(pi_old / pi_sampler, rollout_correction_cap);
    sequence_mask leaves out sequences whose ratio prod pi_old / pi_sampler is outside [1 / cap, cap]. pi_sampler is
    what generation sampled from (after top-k / top-p). Logged either way: the mismatch (rollout/abs_log_ratio, k3,
    max_abs_log_ratio) and what each mode would truncate or mask at the cap (rollout/truncated_frac, masked_frac)."""
    rollout_correction_cap: float = 2.0
    """C of the rollout correction, > 1."""

    # --- on-policy distillation -----------------------------------------------------------
    teacher_model: str | None = None
    """A teacher (path or hub id; the trainers also take a model object) sharing the actor's tokenizer: every token's
    advantage gains distill_coef * (log p_teacher - log p_actor) of the actor's own samples, the negative per-token
    reverse KL to the teacher (None: no teacher). A teacher whose tokenizer adds tokens after the actor's ids is
    scored over the actor's ids only, renormalised (the actor cannot sample the others)."""
    teacher_dtype: Literal["float32", "bfloat16", "float16"] | None = None
    """Dtype of the teacher (None: the actor's ``dtype`` for a path; a model object as it is)."""
    offload_teacher: bool = False
    """Keep the teacher on the CPU, moving it to the device only for its pass of each step."""
    distill_coef: float = 1.0
    """Weight of the teacher's per-token signal; with reward_weights of 0 it is the whole signal."""

    # --- optimisation ----------------------------------------------------------------------
    learning_rate: float = 1e-6
    """Peak learning rate of AdamW, at most 1."""
    lr_scheduler_type: Literal["constant", "linear", "cosine"] = "constant"
    """Schedule after warm-up: constant, linear decay to 0, or cosine decay to 0."""
    warmup_steps: int = 0
    """Optimizer steps of linear warm-up from 0 to ``learning_rate``."""
    warmup_ratio: float = 0.0
    """Warm-up as a fraction of the run's optimizer steps, rounded up; used when warmup_steps is 0 (TRL's name)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.999
    """AdamW beta2."""
    adam_epsilon: float = 1e-8
    """AdamW epsilon."""
    max_grad_norm: float | None = 1.0
    """Clip the global gradient norm to this (None: no clipping; the norm is still logged)."""
    target_kl: float | None = None
    """Stop the step's remaining mini-batches once one ends with an approximate KL to the rollout policy above this."""

    # --- guards ----------------------------------------------------------------------------
    max_nonfinite_updates: int = 3
    """An update with a non-finite loss or gradient is skipped; this many in a row stop the run (the batch is saved)."""
    reward_timeout: float | None = None
    """Seconds a reward function may take on one batch before the run stops with an error naming it (None: no limit)."""
    callback_timeout: float | None = None
    """Seconds one callback event (``on_step_end``, ...) may take before the run stops with an error naming the
    callback (None: no limit). With a limit the callbacks run in a thread of their own."""

    def __setattr__(self, name: str, value) -> None:
        """A TRL name set after construction (``args.beta = 0.5``) sets our field as the constructor would
        (``rlhf.trl_names.trl_attribute``), or raises naming the field to set: never a stray attribute nothing reads."""
        if name in BY_NAME and name not in self.__dataclass_fields__:
            mapped = trl_attribute(self, name, value)
            if mapped is not None:
                for field_name, setting in mapped.items():
                    super().__setattr__(field_name, setting)
                return
        super().__setattr__(name, value)

    def __getattr__(self, name: str):
        """TRL's names read back after construction (``args.beta``, ``args.epsilon_high``): our field's value in TRL's
        meaning (``rlhf.trl_names.trl_read``). Only called for names that are not attributes."""
        if name in BY_NAME:
            return trl_read(self, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    # --- derived ---------------------------------------------------------------------------
    @property
    def rollout_batch_size(self) -> int:
        """Completions per step across all processes."""
        return self.prompts_per_step * self.num_generations

    @property
    def trajectory_tokens(self) -> int:
        """The token budget of a multi-turn trajectory after its prompt."""
        return self.max_trajectory_tokens or self.max_turns * self.max_new_tokens

    @property
    def effective_mini_batch_size(self) -> int:
        return self.mini_batch_size or self.rollout_batch_size

    def local_micro_batch_size(self, num_processes: int = 1) -> int:
        """``micro_batch_size``, capped at the per-process mini-batch: a config written for one process keeps
        working on several."""
        return min(self.micro_batch_size, max(1, self.effective_mini_batch_size // num_processes))

    @property
    def optimizer_steps_per_step(self) -> int:
        return self.num_epochs * (self.rollout_batch_size // self.effective_mini_batch_size)

    def for_dataset(self, num_prompts: int | None) -> "RLConfig":
        """This config with the numbers that depend on the run's length made concrete, once the training data is
        known (``num_prompts``; None for a stream): max_steps from num_train_epochs, save_steps from a fraction of
        max_steps, warmup_steps from warmup_ratio (each rounded up)."""
        changes: dict = {}
        max_steps = self.max_steps
        if self.num_train_epochs is not None:
            if num_prompts is None:
                raise ValueError(f"num_train_epochs={self.num_train_epochs} needs to know how many prompts there are; "
                                 "a streamed IterableDataset does not say: set max_steps instead.")
            max_steps = max(1, math.ceil(self.num_train_epochs * num_prompts / self.prompts_per_step))
            changes.update(max_steps=max_steps, num_train_epochs=None)
        if isinstance(self.save_steps, float):
            changes["save_steps"] = max(1, math.ceil(self.save_steps * max_steps))
        if self.warmup_ratio and not self.warmup_steps:
            changes["warmup_steps"] = math.ceil(self.warmup_ratio * max_steps * self.optimizer_steps_per_step)
        return dataclasses.replace(self, **changes) if changes else self

    def validate(self, num_processes: int = 1, deepspeed: bool = False, sharded: bool = False) -> None:
        """Check every field, how they combine and the batch geometry; raise ValueError naming the field and the fix.
        ``deepspeed``: the launch runs under DeepSpeed (Accelerate's distributed type); ``sharded``: each process holds
        a shard of the parameters (FSDP, ZeRO-3).

        First every field against its annotation (type, finiteness, the legal values of a Literal), then
        ranges, then how the batch divides."""
        errors = field_type_errors(self)
        if errors:  # ranges cannot be checked on values of the wrong type
            raise ValueError(f"Invalid {type(self).__name__}:\n  - " + "\n  - ".join(errors))

        def need(ok: bool, message: str) -> None:
            if not ok:
                errors.append(message)

        for name in ("max_steps", "prompts_per_step", "num_generations", "micro_batch_size", "num_epochs",
                     "max_new_tokens", "logging_steps", "eval_batch_size", "max_nonfinite_updates", "kl_horizon",
                     "max_sampling_rounds", "max_turns", "max_tool_response_chars"):
            need(getattr(self, name) >= 1, f"{name}={getattr(self, name)} must be >= 1.")
        for name in ("save_steps", "eval_steps", "eval_num_generations", "eval_log_samples", "warmup_steps",
                     "top_k", "kl_coef", "weight_decay", "clip_eps_high", "entropy_coef", "distill_coef"):
            need(getattr(self, name) >= 0, f"{name}={getattr(self, name)} must be >= 0.")
        need(0 <= self.learning_rate <= 1, _learning_rate_error("learning_rate", self.learning_rate))
        need(self.eval_pass_k is None or (self.eval_num_generations > 0 and all(
             1 <= k <= self.eval_num_generations for k in self.eval_pass_k)),
             f"eval_pass_k={self.eval_pass_k}: each k must be in [1, eval_num_generations={self.eval_num_generations}]; "
             "raise eval_num_generations or drop the larger k.")
        for name in ("reward_timeout", "environment_timeout", "callback_timeout"):
            need(getattr(self, name) is None or getattr(self, name) > 0,
                 f"{name}={getattr(self, name)} must be > 0 seconds (or None for no limit).")
        need(self.tool_timeout > 0, f"tool_timeout={self.tool_timeout} must be > 0 seconds.")
        need(self.tool_workers >= 0, f"tool_workers={self.tool_workers} must be >= 0 (0: threads).")
        need(self.temperature > 0, f"temperature={self.temperature} must be > 0.")
        need(0 <= self.min_new_tokens <= self.max_new_tokens,
             f"min_new_tokens={self.min_new_tokens} must be in [0, max_new_tokens={self.max_new_tokens}].")
        need(0 < self.top_p <= 1, f"top_p={self.top_p} must be in (0, 1].")
        need(self.min_p is None or 0 <= self.min_p <= 1, f"min_p={self.min_p} must be in [0, 1] (or None).")
        need(0 <= self.warmup_ratio < 1, f"warmup_ratio={self.warmup_ratio} must be in [0, 1).")
        need(self.num_train_epochs is None or self.num_train_epochs > 0,
             f"num_train_epochs={self.num_train_epochs} must be > 0 (or None to let max_steps decide).")
        need(self.num_completions_to_print is None or self.num_completions_to_print >= 1,
             f"num_completions_to_print={self.num_completions_to_print} must be >= 1 (or None for all).")
        need(isinstance(self.save_steps, int) or 0 < self.save_steps < 1,
             f"save_steps={self.save_steps} must be a whole number of steps, or a fraction of the run in (0, 1).")
        need(0 <= self.clip_eps_low < 1, f"clip_eps_low={self.clip_eps_low} must be in [0, 1).")
        need(self.dual_clip is None or self.dual_clip > 1, f"dual_clip={self.dual_clip} must be > 1 (or None).")
        need(self.dual_clip is None or self.policy_loss_type == "ppo",
             f"dual_clip={self.dual_clip} bounds PPO's clipped surrogate; policy_loss_type="
             f"{self.policy_loss_type!r} has no such term: set dual_clip=None.")
        for name in ("sapo_temperature_pos", "sapo_temperature_neg"):
            need(getattr(self, name) > 0, f"{name}={getattr(self, name)} must be > 0 (SAPO divides by it).")
        need(0 <= self.ref_model_mixup_alpha <= 1,
             f"ref_model_mixup_alpha={self.ref_model_mixup_alpha} must be in [0, 1] (the policy's share of the "
             "synced reference).")
        need(self.ref_model_sync_steps >= 1, f"ref_model_sync_steps={self.ref_model_sync_steps} must be >= 1.")
        need(not self.sync_ref_model or (self.kl_coef > 0 and self.kl_in is not None),
             f"sync_ref_model=True with kl_coef={self.kl_coef}, kl_in={self.kl_in!r}: without a KL term there is no "
             "reference model to sync. Set sync_ref_model=False, or kl_coef > 0 (TRL: beta).")
        need(0 < self.top_entropy_quantile <= 1,
             f"top_entropy_quantile={self.top_entropy_quantile} must be in (0, 1] (the fraction of tokens kept).")
        need(self.rollout_correction_cap > 1, f"rollout_correction_cap={self.rollout_correction_cap} must be > 1.")
        need(self.max_sampling_rounds == 1 or self.filter_zero_std_groups,
             f"max_sampling_rounds={self.max_sampling_rounds} refills the groups that filter_zero_std_groups drops; "
             "set filter_zero_std_groups=True, or max_sampling_rounds=1.")
        need(not (self.kl_in is None and self.kl_coef > 0),
             f"kl_coef={self.kl_coef} with kl_in=None: set kl_coef=0 for no KL term, or kl_in to reward or loss.")
        need(self.target_kl is None or self.target_kl > 0, f"target_kl={self.target_kl} must be > 0 (or None).")
        need(self.kl_target is None or (self.kl_target > 0 and self.kl_coef > 0),
             f"kl_target={self.kl_target} needs kl_target > 0 and an initial kl_coef > 0 (kl_coef={self.kl_coef}).")
        need(0 <= self.adam_beta1 < 1 and 0 <= self.adam_beta2 < 1,
             f"adam_beta1={self.adam_beta1}, adam_beta2={self.adam_beta2} must be in [0, 1).")
        need(self.adam_epsilon > 0, f"adam_epsilon={self.adam_epsilon} must be > 0.")
        need(self.max_grad_norm is None or self.max_grad_norm > 0,
             f"max_grad_norm={self.max_grad_norm} must be > 0 (or None to disable clipping).")
        for name in ("max_prompt_length", "mini_batch_size", "save_total_limit", "inference_batch_size",
                     "max_trajectory_tokens"):
            need(getattr(self, name) is None or getattr(self, name) >= 1,
                 f"{name}={getattr(self, name)} must be >= 1 (or None).")
        need(self.reward_model_batch_size >= 1, f"reward_model_batch_size={self.reward_model_batch_size} must be >= 1.")

        # Batch geometry: rollout -> mini-batches -> per-process micro-batches.
        if not errors:
            need(self.prompts_per_step % num_processes == 0,
                 f"prompts_per_step={self.prompts_per_step} must be divisible by the number of processes "
                 f"({num_processes}) so that each process owns whole groups; use a multiple of {num_processes}.")
            rollout = self.rollout_batch_size
            mini = self.effective_mini_batch_size
            need(mini >= 1 and rollout % mini == 0,
                 f"mini_batch_size={self.mini_batch_size} must divide the rollout batch "
                 f"(prompts_per_step x num_generations = {rollout}); try one of {_divisors(rollout)}.")
            if mini >= 1 and rollout % mini == 0:
                need(mini % num_processes == 0,
                     f"mini_batch_size={mini} must be divisible by the number of processes ({num_processes}).")
                local_mini = mini // num_processes
                need(local_mini == 0 or local_mini % self.local_micro_batch_size(num_processes) == 0,
                     f"micro_batch_size={self.micro_batch_size} must divide the per-process mini-batch "
                     f"(mini_batch_size / processes = {local_mini}); try one of {_divisors(local_mini)}.")
        need(not (deepspeed and self.trains_critic),
             "PPO trains two models (actor and critic); under DeepSpeed, Accelerate routes backward through one engine "
             "only (Accelerator.deepspeed_engine_wrapped) and refuses to prepare two models at once, so the critic would "
             "never be reduced or stepped. Use FSDP (recipes/accelerate/fsdp.yaml) or DDP (multi_gpu.yaml) for PPO; "
             "GRPO and REINFORCE run under DeepSpeed.")
        need(not (sharded and self.sync_ref_model),
             "sync_ref_model=True under FSDP or DeepSpeed ZeRO-3: each process holds only a shard of the policy, so there "
             "is no whole policy to mix into the reference. Use DDP or ZeRO-1/2, or set sync_ref_model=False.")
        errors.extend(self._validate_algorithm())
        if errors:
            raise ValueError(f"Invalid {type(self).__name__}:\n  - " + "\n  - ".join(errors))

    def _validate_algorithm(self) -> list[str]:
        """Checks specific to one algorithm's fields; return the error messages."""
        return []

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class GRPOConfig(RLConfig):
    """GRPO: group-normalised advantages, no critic (Shao et al. 2024).

    Variants by configuration: Dr. GRPO is ``scale_rewards="none"`` with
    ``loss_agg="seq-mean-token-sum-norm"``; DAPO is ``clip_eps_high=0.28``, ``loss_agg="token-mean"``,
    ``mask_truncated_completions=True`` (or the soft overlong penalty) and
    ``filter_zero_std_groups=True``.
    """

    scale_rewards: RewardScale = "group"
    """Divide group-centred rewards by the group's std, the batch's std, or nothing (Dr. GRPO)."""
    multi_objective_aggregation: Literal["sum_then_normalize", "normalize_then_sum"] = "sum_then_normalize"
    """How several reward functions make one advantage (TRL's name). sum_then_normalize: the weighted sum, then
    scale_rewards. normalize_then_sum (GDPO, arXiv 2601.05242): each function's rewards normalised within the group
    first, then the weighted sum, then normalised over the batch (scale_rewards is not used, as in TRL)."""
    def _validate_algorithm(self) -> list[str]:
        errors = []
        if self.kl_in == "reward" and self.kl_coef > 0:
            errors.append("kl_in='reward': GRPO's advantage is one number per sequence, so its KL term sits in the "
                          "loss (kl_in='loss'); for a KL-shaped token reward use REINFORCE or PPO.")
        if self.num_generations < 2:
            errors.append(
                f"num_generations={self.num_generations}: GRPO compares completions of the same prompt, "
                "so it needs at least 2 per prompt (8 or 16 is typical)."
            )
        return errors


@dataclass
class TokenRewardConfig(RLConfig):
    """Fields of the algorithms that turn the sequence reward into per-token rewards (PPO, REINFORCE):
    the reward sits on the last completion token and, with ``kl_in="reward"``, every token pays
    ``kl_coef`` times its KL to the reference."""

    kl_coef: float = 0.01
    """KL penalty weight (the initial one when ``kl_target`` is set); 0: no reference model is loaded. 0.01, not the
    0.05 of older PPO code and TRL's RLOO: with a reward in [0, 1], learning a task can take tens of nats of KL per
    sequence, and at 0.05 that costs more than the reward pays, so the run settles at the optimum of reward -
    kl_coef * KL far below the task's (bench/LEARN.md; the monitor's kl_bound alarm says so when it happens)."""
    kl_estimator: KLEstimator = "k1"
    """KL estimator: k1 = d, k2 = d^2/2, k3 = exp(-d) - 1 + d with d = logp - logp_ref."""
    kl_in: KLPlacement | None = "reward"
    """Where the KL penalty goes: subtracted from each token's reward (InstructGPT), or added to the loss (GRPO);
    None: no KL term."""
    gamma: float = 1.0
    """Discount of future token rewards."""

    def _validate_algorithm(self) -> list[str]:
        errors = []
        if not 0 <= self.gamma <= 1:
            errors.append(f"gamma={self.gamma} must be in [0, 1].")
        return errors


@dataclass
class PPOConfig(TokenRewardConfig):
    """PPO with a separate critic (a backbone + a scalar value head) and GAE (Schulman et al. 2017;
    Ouyang et al. 2022)."""

    trains_critic: ClassVar[bool] = True
    num_generations: int = 1
    """Completions sampled per prompt (PPO needs no groups; more than 1 is allowed)."""
    prompts_per_step: int = 64
    """Prompts per step, across all processes. Must be divisible by the number of processes."""
    gae_lambda: float = 0.95
    """GAE lambda: 1 gives Monte-Carlo returns minus values, 0 the one-step TD residual."""
    vf_coef: float = 0.1
    """Weight of the value loss."""
    value_clip_eps: float | None = 0.2
    """Clip each new value to within this of its old value in the value loss (None: no clipping)."""
    whiten_advantages: bool = True
    """Whiten advantages over the rollout batch (all processes) after computing returns."""
    critic_learning_rate: float | None = None
    """Peak learning rate of the critic's AdamW, at most 1 (None: ``learning_rate``)."""
    critic_warmup_steps: int = 0
    """Steps at the start during which only the critic trains (the actor stays frozen)."""
    def _validate_algorithm(self) -> list[str]:
        errors = super()._validate_algorithm()
        if not 0 <= self.gae_lambda <= 1:
            errors.append(f"gae_lambda={self.gae_lambda} must be in [0, 1].")
        if self.vf_coef < 0:
            errors.append(f"vf_coef={self.vf_coef} must be >= 0.")
        if self.value_clip_eps is not None and self.value_clip_eps <= 0:
            errors.append(f"value_clip_eps={self.value_clip_eps} must be > 0 (or None to disable value clipping).")
        if self.critic_learning_rate is not None and not 0 <= self.critic_learning_rate <= 1:
            errors.append(_learning_rate_error("critic_learning_rate", self.critic_learning_rate))
        if self.critic_warmup_steps < 0:
            errors.append(f"critic_warmup_steps={self.critic_warmup_steps} must be >= 0.")
        return errors


@dataclass
class ReinforceConfig(TokenRewardConfig):
    """REINFORCE (Williams 1992) with a choice of baseline: none, the batch mean, leave-one-out (RLOO,
    Ahmadian et al. 2024), REINFORCE++ (Hu 2025: KL in the reward, returns whitened over the batch) or
    REINFORCE++-baseline (the group mean subtracted first)."""

    baseline: Literal["none", "mean", "rloo", "reinforce++", "reinforce++-baseline"] = "rloo"
    """none: advantage = reward-to-go; mean: minus the batch-mean reward; rloo: minus the mean reward of the
    prompt's other completions; reinforce++: reward-to-go with KL in the reward, whitened over the batch;
    reinforce++-baseline: minus the prompt's group-mean reward, then as reinforce++."""
    num_generations: int = 4
    """Completions sampled per prompt (rloo needs at least 2)."""

    def _validate_algorithm(self) -> list[str]:
        errors = super()._validate_algorithm()
        if self.baseline == "rloo" and self.num_generations < 2:
            errors.append(f"num_generations={self.num_generations}: the rloo baseline leaves one completion out of "
                          "its prompt's group, so it needs at least 2 per prompt.")
        if self.baseline == "reinforce++-baseline" and self.num_generations < 2:
            errors.append(f"num_generations={self.num_generations}: the reinforce++-baseline baseline subtracts the "
                          "mean reward of the prompt's group, so it needs at least 2 completions per prompt.")
        return errors


@dataclass
class RLOOConfig(RLConfig):
    """TRL's RLOO (``trl.RLOOConfig``; Ahmadian et al. 2024), with TRL's fields and defaults: each sequence's reward,
    clipped to ``reward_clip_range``, minus ``kl_coef`` (TRL: beta) x its KL to the reference summed over its tokens
    (k1 on the sampling policy, no gradient), less the mean of the same quantity over the prompt's other completions;
    whitened over the batch with ``normalize_advantages``. One advantage per sequence. The loss is TRL's: PPO's
    clipped surrogate on each sequence's likelihood ratio (``importance_sampling_level="sequence_sum"``), averaged
    over sequences."""

    num_generations: int = 2
    """Completions sampled per prompt (at least 2: the baseline leaves one out; TRL's default)."""
    kl_coef: float = 0.05
    """Weight of the KL to the reference subtracted from each sequence's reward before the baseline (TRL's beta and
    default; 0: no reference model is loaded)."""
    kl_estimator: KLEstimator = "k1"
    """KL estimator: k1 = logp - logp_ref per token, summed over the sequence (TRL's RLOO)."""
    kl_in: KLPlacement | None = "reward"
    """The KL sits in the sequence reward (TRL's RLOO); None: no KL term."""
    loss_agg: LossAggregation = "seq-mean-token-mean"
    """With the sequence ratio every token of a sequence holds its sequence's loss: the mean over sequences (TRL)."""
    importance_sampling_level: ImportanceLevel = "sequence_sum"
    """The ratio the loss clips: the sequence's likelihood ratio exp(sum of its tokens' log-ratios), as TRL's RLOO
    (epsilon / epsilon_high bound it)."""
    normalize_advantages: bool = False
    """Whiten the advantages over the rollout batch (all processes): mean 0, std 1 (+1e-4), as TRL."""
    reward_clip_range: list[float] | None = None
    """Clip each sequence's total (weighted) reward to [min, max] before the KL and the baseline (None: no clip)."""

    def __post_init__(self):
        if isinstance(self.reward_clip_range, tuple):  # TRL's type: tuple[float, float]
            self.reward_clip_range = list(self.reward_clip_range)

    def _validate_algorithm(self) -> list[str]:
        errors = []
        if self.num_generations < 2:
            errors.append(f"num_generations={self.num_generations}: RLOO leaves one completion out of its prompt's "
                          "group, so it needs at least 2 per prompt.")
        if self.kl_in == "loss" and self.kl_coef > 0:
            errors.append("kl_in='loss': RLOO's KL sits in the sequence reward (kl_in='reward'), as in TRL.")
        clip = self.reward_clip_range
        if clip is not None and (len(clip) != 2 or clip[0] > clip[1]):
            errors.append(f"reward_clip_range={clip} must be [min, max] with min <= max (or None).")
        return errors


def _learning_rate_error(name: str, value: float) -> str:
    return (f"{name}={value} must be in [0, 1]: AdamW moves each weight by about the learning rate per step, so a "
            "larger one destroys the model in one update; fine-tuning uses about 1e-6 to 1e-4.")


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]

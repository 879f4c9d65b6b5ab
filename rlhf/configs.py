"""Training configs: one dataclass per algorithm, a docstring under every field.

A *step* is one rollout batch: ``prompts_per_step`` prompts x ``num_generations`` completions,
generated, scored, and trained on for ``num_epochs`` passes in mini-batches. ``max_steps`` counts
these steps; each makes ``num_epochs * rollout_batch / mini_batch_size`` optimizer steps.
"""

import ast
import dataclasses
import inspect
import textwrap
from dataclasses import dataclass, field
from typing import Literal

from rlhf.core import LOSS_AGG_MODES


@dataclass
class RLConfig:
    """Fields shared by every trainer."""

    # --- run -------------------------------------------------------------------------------
    output_dir: str = "outputs/run"
    """Where metrics.jsonl, checkpoints and the final model go."""
    seed: int = 42
    """Seed for sampling, shuffling and initialisation; each process adds its rank."""
    max_steps: int = 100
    """Number of training steps (one rollout batch each)."""
    logging_steps: int = 1
    """Log metrics (averaged over the steps since the last log) every this many steps."""
    save_steps: int = 0
    """Write a checkpoint to ``output_dir/checkpoint-<step>`` every this many steps (0: never)."""
    save_total_limit: int | None = None
    """Keep only the newest N checkpoints (None: keep all)."""
    resume_from_checkpoint: str | None = None
    """A checkpoint directory, or "latest" for the newest one in ``output_dir``, to resume from."""
    report_to: list[str] = field(default_factory=list)
    """Accelerate trackers to log to, e.g. ["tensorboard"] or ["wandb"] (metrics.jsonl is always written)."""
    run_name: str | None = None
    """Name of the run in trackers (default: the basename of ``output_dir``)."""
    disable_tqdm: bool = False
    """Turn the progress bar off."""
    write_report: bool = True
    """At the end of training write ``output_dir/report.html``: curves of reward, eval accuracy, KL, entropy, length
    and clip fraction, and sample completions (``python -m rlhf.report <output_dir>`` writes it on demand)."""
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
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, ~30% more compute."""
    share_prompt_prefix: bool = True
    """Run each prompt once for its num_generations completions in the scoring and training passes (its KV
    cache is shared): the same results, less compute. Off automatically under FSDP, ZeRO-3 and gradient checkpointing."""
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

    # --- rewards ---------------------------------------------------------------------------
    reward_weights: list[float] | None = None
    """Weight of each reward function in the total reward (None: all 1.0)."""
    reward_model_batch_size: int = 32
    """Completions per forward pass of a reward model given in ``reward_funcs``."""
    normalize_reward_model_scores: bool = False
    """Whiten each reward model's scores over the rollout batch (all processes) before they are weighted."""
    mask_truncated_completions: bool = False
    """Leave completions that hit ``max_new_tokens`` without an EOS out of the loss (DAPO)."""

    # --- loss ------------------------------------------------------------------------------
    clip_eps_low: float = 0.2
    """Lower PPO clip: the ratio is clipped at 1 - clip_eps_low for negative advantages."""
    clip_eps_high: float = 0.2
    """Upper PPO clip: the ratio is clipped at 1 + clip_eps_high for positive advantages (DAPO: 0.28)."""
    dual_clip: float | None = None
    """Dual-clip constant c > 1: caps the loss of a negative-advantage token at -c * A (None: off)."""
    kl_coef: float = 0.0
    """Weight of the KL penalty to the frozen reference model (0: no reference model is loaded)."""
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"
    """KL estimator: k1 = d, k2 = d^2/2, k3 = exp(-d) - 1 + d with d = logp - logp_ref."""
    loss_agg: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"] = (
        "token-mean"
    )
    """How per-token losses are reduced: token-mean (DAPO), seq-mean-token-mean (GRPO), seq-mean-token-sum, seq-mean-token-sum-norm (Dr. GRPO)."""
    entropy_coef: float = 0.0
    """Weight of an entropy bonus (the loss subtracts entropy_coef * entropy)."""

    # --- optimisation ----------------------------------------------------------------------
    learning_rate: float = 1e-6
    """Peak learning rate of AdamW."""
    lr_scheduler_type: Literal["constant", "linear", "cosine"] = "constant"
    """Schedule after warm-up: constant, linear decay to 0, or cosine decay to 0."""
    warmup_steps: int = 0
    """Optimizer steps of linear warm-up from 0 to ``learning_rate``."""
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

    # --- guards ----------------------------------------------------------------------------
    max_nonfinite_updates: int = 3
    """An update with a non-finite loss or gradient is skipped; this many in a row stop the run (the batch is saved)."""
    reward_timeout: float | None = None
    """Seconds a reward function may take on one batch before the run stops with an error naming it (None: no limit)."""

    # --- derived ---------------------------------------------------------------------------
    @property
    def rollout_batch_size(self) -> int:
        """Completions per step across all processes."""
        return self.prompts_per_step * self.num_generations

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

    def validate(self, num_processes: int = 1) -> None:
        """Check every field and the batch geometry; raise ValueError naming the field and the fix."""
        errors = []

        def need(ok: bool, message: str) -> None:
            if not ok:
                errors.append(message)

        for name in ("max_steps", "prompts_per_step", "num_generations", "micro_batch_size", "num_epochs",
                     "max_new_tokens", "logging_steps"):
            need(getattr(self, name) >= 1, f"{name}={getattr(self, name)} must be >= 1.")
        need(self.save_steps >= 0, f"save_steps={self.save_steps} must be >= 0 (0 disables checkpoints).")
        need(self.eval_steps >= 0, f"eval_steps={self.eval_steps} must be >= 0 (0 disables evaluation).")
        need(self.eval_num_generations >= 0,
             f"eval_num_generations={self.eval_num_generations} must be >= 0 (0: greedy evaluation only).")
        need(self.eval_batch_size >= 1, f"eval_batch_size={self.eval_batch_size} must be >= 1.")
        need(self.eval_log_samples >= 0, f"eval_log_samples={self.eval_log_samples} must be >= 0.")
        need(self.eval_pass_k is None or (self.eval_num_generations > 0 and all(
             1 <= k <= self.eval_num_generations for k in self.eval_pass_k)),
             f"eval_pass_k={self.eval_pass_k}: each k must be in [1, eval_num_generations={self.eval_num_generations}]; "
             "raise eval_num_generations or drop the larger k.")
        need(self.max_nonfinite_updates >= 1, f"max_nonfinite_updates={self.max_nonfinite_updates} must be >= 1.")
        need(self.reward_timeout is None or self.reward_timeout > 0,
             f"reward_timeout={self.reward_timeout} must be > 0 seconds (or None for no limit).")
        need(self.temperature > 0, f"temperature={self.temperature} must be > 0.")
        need(0 <= self.min_new_tokens <= self.max_new_tokens,
             f"min_new_tokens={self.min_new_tokens} must be in [0, max_new_tokens={self.max_new_tokens}].")
        need(0 < self.top_p <= 1, f"top_p={self.top_p} must be in (0, 1].")
        need(self.top_k >= 0, f"top_k={self.top_k} must be >= 0 (0 disables it).")
        need(0 <= self.clip_eps_low < 1, f"clip_eps_low={self.clip_eps_low} must be in [0, 1).")
        need(self.clip_eps_high >= 0, f"clip_eps_high={self.clip_eps_high} must be >= 0.")
        need(self.dual_clip is None or self.dual_clip > 1, f"dual_clip={self.dual_clip} must be > 1 (or None).")
        need(self.kl_coef >= 0, f"kl_coef={self.kl_coef} must be >= 0.")
        need(self.kl_estimator in ("k1", "k2", "k3"), f"kl_estimator={self.kl_estimator!r} must be k1, k2 or k3.")
        need(self.loss_agg in LOSS_AGG_MODES, f"loss_agg={self.loss_agg!r} must be one of {LOSS_AGG_MODES}.")
        need(self.learning_rate >= 0, f"learning_rate={self.learning_rate} must be >= 0.")
        need(self.lr_scheduler_type in ("constant", "linear", "cosine"),
             f"lr_scheduler_type={self.lr_scheduler_type!r} must be constant, linear or cosine.")
        need(self.max_grad_norm is None or self.max_grad_norm > 0,
             f"max_grad_norm={self.max_grad_norm} must be > 0 (or None to disable clipping).")
        need(self.inference_batch_size is None or self.inference_batch_size >= 1,
             f"inference_batch_size={self.inference_batch_size} must be >= 1 (or None).")
        need(self.max_prompt_length is None or self.max_prompt_length >= 1,
             f"max_prompt_length={self.max_prompt_length} must be >= 1 (or None).")
        need(self.dtype in ("auto", "float32", "bfloat16", "float16"),
             f"dtype={self.dtype!r} must be auto, float32, bfloat16 or float16.")
        need(self.reward_weights is None or all(isinstance(w, (int, float)) for w in self.reward_weights),
             f"reward_weights={self.reward_weights} must be a list of numbers.")

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

    scale_rewards: Literal["group", "batch", "none"] = "group"
    """Divide group-centred rewards by the group's std, the batch's std, or nothing (Dr. GRPO)."""
    filter_zero_std_groups: bool = False
    """Leave groups whose rewards are all equal (zero advantage) out of the loss and its token count (DAPO)."""

    def _validate_algorithm(self) -> list[str]:
        errors = []
        if self.scale_rewards not in ("group", "batch", "none"):
            errors.append(f"scale_rewards={self.scale_rewards!r} must be group, batch or none.")
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

    kl_coef: float = 0.05
    """KL penalty weight (the initial one when ``kl_target`` is set); 0: no reference model is loaded."""
    kl_estimator: Literal["k1", "k2", "k3"] = "k1"
    """KL estimator: k1 = d, k2 = d^2/2, k3 = exp(-d) - 1 + d with d = logp - logp_ref."""
    kl_in: Literal["reward", "loss"] = "reward"
    """Where the KL penalty goes: subtracted from each token's reward (InstructGPT), or added to the loss (GRPO)."""
    kl_target: float | None = None
    """Adapt kl_coef towards this KL per sequence (Ziegler et al. 2019), a proportional controller (None: fixed kl_coef)."""
    kl_horizon: int = 10000
    """Horizon, in samples, of the adaptive KL controller."""
    gamma: float = 1.0
    """Discount of future token rewards."""

    def _validate_algorithm(self) -> list[str]:
        errors = []
        if not 0 <= self.gamma <= 1:
            errors.append(f"gamma={self.gamma} must be in [0, 1].")
        if self.kl_in not in ("reward", "loss"):
            errors.append(f"kl_in={self.kl_in!r} must be reward or loss.")
        if self.kl_target is not None and (self.kl_target <= 0 or self.kl_coef <= 0):
            errors.append(f"kl_target={self.kl_target} needs kl_target > 0 and an initial kl_coef > 0 "
                          f"(kl_coef={self.kl_coef}).")
        if self.kl_horizon < 1:
            errors.append(f"kl_horizon={self.kl_horizon} must be >= 1.")
        return errors


@dataclass
class PPOConfig(TokenRewardConfig):
    """PPO with a separate critic (a backbone + a scalar value head) and GAE (Schulman et al. 2017;
    Ouyang et al. 2022)."""

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
    """Peak learning rate of the critic's AdamW (None: ``learning_rate``)."""
    critic_warmup_steps: int = 0
    """Steps at the start during which only the critic trains (the actor stays frozen)."""
    target_kl: float | None = None
    """Stop the step's remaining epochs once a mini-batch's approximate KL to the rollout policy exceeds this."""

    def _validate_algorithm(self) -> list[str]:
        errors = super()._validate_algorithm()
        if not 0 <= self.gae_lambda <= 1:
            errors.append(f"gae_lambda={self.gae_lambda} must be in [0, 1].")
        if self.vf_coef < 0:
            errors.append(f"vf_coef={self.vf_coef} must be >= 0.")
        if self.value_clip_eps is not None and self.value_clip_eps <= 0:
            errors.append(f"value_clip_eps={self.value_clip_eps} must be > 0 (or None to disable value clipping).")
        if self.critic_learning_rate is not None and self.critic_learning_rate < 0:
            errors.append(f"critic_learning_rate={self.critic_learning_rate} must be >= 0.")
        if self.critic_warmup_steps < 0:
            errors.append(f"critic_warmup_steps={self.critic_warmup_steps} must be >= 0.")
        if self.target_kl is not None and self.target_kl <= 0:
            errors.append(f"target_kl={self.target_kl} must be > 0 (or None).")
        return errors


@dataclass
class ReinforceConfig(TokenRewardConfig):
    """REINFORCE (Williams 1992) with a choice of baseline: none, the batch mean, leave-one-out (RLOO,
    Ahmadian et al. 2024) or REINFORCE++ (Hu 2025: KL in the reward, returns whitened over the batch)."""

    baseline: Literal["none", "mean", "rloo", "reinforce++"] = "rloo"
    """none: advantage = reward-to-go; mean: minus the batch-mean reward; rloo: minus the mean reward of the
    prompt's other completions; reinforce++: reward-to-go with KL in the reward, whitened over the batch."""
    num_generations: int = 4
    """Completions sampled per prompt (rloo needs at least 2)."""

    def _validate_algorithm(self) -> list[str]:
        errors = super()._validate_algorithm()
        if self.baseline not in ("none", "mean", "rloo", "reinforce++"):
            errors.append(f"baseline={self.baseline!r} must be none, mean, rloo or reinforce++.")
        if self.baseline == "rloo" and self.num_generations < 2:
            errors.append(f"num_generations={self.num_generations}: the rloo baseline leaves one completion out of "
                          "its prompt's group, so it needs at least 2 per prompt.")
        return errors


def _type_name(annotation) -> str:
    return annotation.__name__ if isinstance(annotation, type) else str(annotation).replace("typing.", "")


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each dataclass field, read from the source of ``cls`` and its bases."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        body = tree.body[0].body
        for node, following in zip(body, body[1:]):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(following, ast.Expr)
                and isinstance(following.value, ast.Constant)
                and isinstance(following.value.value, str)
            ):
                docs[node.target.id] = " ".join(following.value.value.split())
    return docs


def markdown_table(cls: type, only: list[str] | None = None) -> str:
    """A markdown table of the fields of ``cls`` (or just ``only``): name, type, default, meaning."""
    docs = field_docs(cls)
    rows = ["| field | type | default | meaning |", "|---|---|---|---|"]
    for f in dataclasses.fields(cls):
        if only is not None and f.name not in only:
            continue
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        type_name = _type_name(f.type).replace("|", "\\|")
        rows.append(f"| `{f.name}` | {type_name} | `{default!r}` | {docs.get(f.name, '')} |")
    return "\n".join(rows)

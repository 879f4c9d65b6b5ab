"""Our metric names and TRL's, in one table: what a TRL user finds in the trackers and in ``trainer.state.log_history``.

A run writes its metrics under our names to ``metrics.jsonl`` (what the report, the health monitor and the console
read). Where a record leaves for the trackers or ``log_history``, each metric of ours that TRL's ``GRPOTrainer`` also
logs takes TRL's name, and the keys follow transformers' layout:

- ``log_history``: a training record keeps our names and adds TRL's (``reward/mean`` and ``reward``) and ``epoch``;
  an evaluation record adds TRL's ``eval_<name>`` keys (``eval/reward_mean`` and ``eval_reward``); at the end of
  ``train()`` a summary record (``train_runtime``, ``train_samples_per_second``, ``train_steps_per_second``,
  ``train_loss``), as transformers' ``Trainer`` appends one;
- the trackers: only the TRL-named view, as transformers' ``TensorBoardCallback`` / ``WandbCallback`` write it
  (``rewrite_logs``): ``train/<name>`` for training and summary keys, ``eval/<name>`` for ``eval_<name>``
  (``train/reward``, ``eval/reward``, ``train/epoch``). A metric TRL does not have keeps our name there
  (``train/advantages/mean``, ``eval/accuracy``), as does what reward functions give ``log_metric``.

``docs/metrics.md`` is generated from ``TRAIN``, ``EVAL``, ``SUMMARY`` and ``TRL_ONLY`` (``python -m
rlhf.extras.docs --write docs/``); ``tests/compat/test_trl_metrics.py`` runs TRL's ``GRPOTrainer`` and ours with
the same settings and checks that every tag TRL writes is ours too, but for those ``TRL_ONLY`` lists, each with why.
"""

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Metric:
    """One metric: our name (``{fn}``: a reward function's name, ``{x}``: any text), TRL's name for it (None: TRL
    has none; our name is used everywhere), and what it measures, with how TRL's differs where it does."""

    ours: str
    trl: str | None
    meaning: str


# ---------------------------------------------------------------------------------------------------- training
TRAIN = [
    Metric("reward/mean", "reward", "the total reward (reward functions' weighted sum) averaged over the step's "
           "completions"),
    Metric("reward/std", "reward_std", "its standard deviation over the step's completions (Bessel-corrected, as "
           "TRL's)"),
    Metric("reward/{fn}/mean", "rewards/{fn}/mean", "one reward function's mean over the completions it scored "
           "(None left out)"),
    Metric("reward/{fn}/std", "rewards/{fn}/std", "its standard deviation over those completions"),
    Metric("reward/zero_std_group_frac", "frac_reward_zero_std", "the fraction of groups whose rewards are all equal "
           "(no advantage). TRL with `scale_rewards=\"batch\"`: whether the whole batch's std is 0"),
    Metric("kl", "kl", "the mean per-token KL to the reference model, when there is a KL term (`kl_coef` > 0; TRL: "
           "`beta` != 0)"),
    Metric("entropy", "entropy", "the policy's mean per-token entropy over the trained tokens"),
    Metric("clip/low_frac", "clip_ratio/low_mean", "the fraction of trained tokens clipped below: ratio < 1 - "
           "clip_eps_low with a negative advantage. With `policy_loss_type: cispo`, a ratio below the bound whatever "
           "the advantage (TRL logs `cispo_clip_ratio` instead); with `sapo`, 0"),
    Metric("clip/high_frac", "clip_ratio/high_mean", "the fraction clipped above: ratio > 1 + clip_eps_high with a "
           "positive advantage (cispo and sapo as above)"),
    Metric("clip/region_frac", "clip_ratio/region_mean", "the fraction clipped either way: low + high"),
    Metric("clip/low_min", "clip_ratio/low_min", "the smallest fraction of low-clipped tokens of any sequence of the "
           "step, all processes (TRL: of each micro-batch, averaged over them)"),
    Metric("clip/high_max", "clip_ratio/high_max", "the largest fraction of high-clipped tokens of any sequence of the "
           "step (TRL: of each micro-batch, averaged)"),
    Metric("loss/total", "loss", "the loss trained: policy loss + KL term - entropy bonus (+ vf_coef x value loss "
           "for PPO), per optimizer step, averaged over the step's"),
    Metric("grad_norm", "grad_norm", "the actor's gradient norm before clipping, averaged over the step's optimizer "
           "steps (TRL: the last one's)"),
    Metric("learning_rate", "learning_rate", "the learning rate after the step's last optimizer step"),
    Metric("num_tokens", "num_tokens", "prompt + completion tokens trained on since the run began, all processes "
           "(`state.num_input_tokens_seen`, kept in checkpoints); the latest value of the logging window"),
    Metric("completions/mean_length", "completions/mean_length", "completion length in tokens (the policy's own: "
           "tool or environment tokens are not counted), mean over the step's completions"),
    Metric("completions/min_length", "completions/min_length", "the shortest completion of the step"),
    Metric("completions/max_length", "completions/max_length", "the longest completion of the step"),
    Metric("completions/truncated_frac", "completions/clipped_ratio", "the fraction of completions that reached "
           "max_new_tokens without an EOS"),
    Metric("completions/mean_terminated_length", "completions/mean_terminated_length", "the mean length of the "
           "completions that ended with an EOS (0 when none did)"),
    Metric("completions/min_terminated_length", "completions/min_terminated_length", "the shortest of them"),
    Metric("completions/max_terminated_length", "completions/max_terminated_length", "the longest of them"),
    Metric("time/step", "step_time", "wall time of one step, generation to the last optimizer step, in seconds (TRL: "
           "of one optimizer step, which includes generation when it ran in that step)"),
    Metric("agent/tool_calls", "tools/call_frequency", "tool calls per trajectory (multi-turn rollouts)"),
    Metric("epoch", "epoch", "passes over the training prompts (`state.epoch`; in `log_history` and the trackers, not "
           "in metrics.jsonl)"),
    # ours only
    Metric("reward/{fn}/none_frac", None, "the fraction of completions a reward function returned None for"),
    Metric("advantages/mean", None, "the mean advantage over the trained tokens (or sequences)"),
    Metric("advantages/std", None, "its standard deviation"),
    Metric("kl/sequence", None, "the rollout's KL to the reference per sequence (what an adaptive kl_coef follows)"),
    Metric("kl/reward_penalty", None, "with `kl_in=\"reward\"`: the KL penalty added to the rewards per sequence"),
    Metric("kl_coef", None, "the KL coefficient (changes with an adaptive KL)"),
    Metric("clip/dual_frac", None, "the fraction of tokens the dual clip bounds (`dual_clip`)"),
    Metric("policy/approx_kl", None, "the updated policy's KL to the sampling policy per token (k3)"),
    Metric("policy/ratio_mean", None, "the mean importance ratio over the trained tokens"),
    Metric("policy/ratio_max", None, "the largest importance ratio of the step"),
    Metric("policy/early_stopped", None, "whether `target_kl` ended the step's update early"),
    Metric("loss/policy", None, "the policy loss alone (TRL's `policy_loss`, logged only with an entropy bonus, "
           "includes the KL term)"),
    Metric("loss/value", None, "PPO's value loss"),
    Metric("critic/{x}", None, "PPO's critic: `grad_norm`, `value_clip_frac`, `explained_variance`, `returns_mean`, "
           "`values_mean`"),
    Metric("time/{x}", None, "seconds per phase of the step: `generate`, `score`, `reference`, `update`"),
    Metric("tokens_per_second", None, "completion tokens per second of the step"),
    Metric("guard/skipped_updates", None, "optimizer steps skipped for a non-finite loss or gradient"),
    Metric("rollout/{x}", None, "the sampler's mismatch with the trainer and the rollout correction: "
           "`abs_log_ratio`, `max_abs_log_ratio`, `k3`, `truncated_frac`, `masked_frac`"),
    Metric("sampling/{x}", None, "dynamic sampling: `rounds`, `informative_frac`"),
    Metric("entropy/{x}", None, "entropy-selected tokens: `selected_frac`, `selection_threshold`"),
    Metric("distill/reverse_kl", None, "on-policy distillation: the student's reverse KL to the teacher per token"),
    Metric("agent/{x}", None, "multi-turn rollouts, per trajectory: `turns`, `tool_call_rate`, `tool_errors`, "
           "`tool_timeouts`, `tool_long_results`, `tool_bad_calls`, `environment_tokens`, `max_turns_frac`, "
           "`token_budget_frac`"),
]

# ---------------------------------------------------------------------------------------------------- evaluation
EVAL = [
    Metric("eval/reward_mean", "eval_reward", "the total reward of the greedy completions, one per eval prompt (TRL: "
           "`num_generations` sampled completions per prompt at the training temperature, also under `eval/reward`)"),
    Metric("eval/reward_std", "eval_reward_std", "its standard deviation"),
    Metric("eval/reward/{fn}/mean", "eval_rewards/{fn}/mean", "one reward function's mean (None left out)"),
    Metric("eval/reward/{fn}/std", "eval_rewards/{fn}/std", "its standard deviation"),
    Metric("eval/mean_length", "eval_completions/mean_length", "the greedy completions' mean length in tokens"),
    Metric("eval/min_length", "eval_completions/min_length", "the shortest"),
    Metric("eval/max_length", "eval_completions/max_length", "the longest"),
    Metric("eval/truncated_frac", "eval_completions/clipped_ratio", "the fraction that reached max_new_tokens "
           "without an EOS"),
    Metric("eval/mean_terminated_length", "eval_completions/mean_terminated_length", "the mean length of those that "
           "ended with an EOS (0 when none did)"),
    Metric("eval/min_terminated_length", "eval_completions/min_terminated_length", "the shortest of them"),
    Metric("eval/max_terminated_length", "eval_completions/max_terminated_length", "the longest of them"),
    Metric("eval/num_tokens", "eval_num_tokens", "the training tokens seen when the evaluation ran (as TRL: "
           "`state.num_input_tokens_seen`)"),
    Metric("eval/runtime", "eval_runtime", "seconds the evaluation took"),
    Metric("eval/samples_per_second", "eval_samples_per_second", "eval prompts per second"),
    Metric("eval/agent/tool_calls", "eval_tools/call_frequency", "tool calls per greedy trajectory"),
    # ours only: eval_<name> in log_history, eval/<name> in the trackers
    Metric("eval/accuracy", None, "the fraction of greedy completions the correctness reward passes"),
    Metric("eval/pass@{x}", None, "pass@k of `eval_num_generations` sampled completions (unbiased estimator)"),
    Metric("eval/sampled/reward_mean", None, "the sampled completions' mean total reward"),
    Metric("eval/agent/{x}", None, "multi-turn statistics of the greedy trajectories, as `agent/...` in training"),
]

# ---------------------------------------------------------------------------------------------------- end of train()
SUMMARY = [
    Metric("train_runtime", "train_runtime", "seconds `train()` ran"),
    Metric("train_samples_per_second", "train_samples_per_second", "completions trained per second: steps x "
           "completions per step x num_epochs over them (TRL: optimizer steps x completions per optimizer step, the "
           "same count)"),
    Metric("train_steps_per_second", "train_steps_per_second", "steps (rollout batches) per second (TRL: optimizer "
           "steps)"),
    Metric("train_loss", "train_loss", "the mean of `loss/total` over the steps this `train()` call ran"),
]

# ---------------------------------------------------------------------------------------------------- TRL only
TRL_ONLY = {
    # tag as TRL's GRPOTrainer writes it in the trackers -> why it is not ours
    "train/total_flos": "floating-point operations are not counted (TRL logs 0 for a model without "
                        "`floating_point_ops`, and only at the end)",
    "eval/loss": "evaluation generates and scores completions; it runs no training forward pass, so it has no loss",
    "eval/kl": "no training forward pass in evaluation (see eval/loss)",
    "eval/entropy": "no training forward pass in evaluation (see eval/loss)",
    "eval/clip_ratio/low_mean": "no importance ratio in evaluation (see eval/loss)",
    "eval/clip_ratio/high_mean": "no importance ratio in evaluation (see eval/loss)",
    "eval/clip_ratio/region_mean": "no importance ratio in evaluation (see eval/loss)",
    "eval/clip_ratio/low_min": "no importance ratio in evaluation (see eval/loss)",
    "eval/clip_ratio/high_max": "no importance ratio in evaluation (see eval/loss)",
    "eval/frac_reward_zero_std": "greedy evaluation has one completion per prompt: there are no groups",
    "eval/steps_per_second": "evaluation is not a loop of dataloader steps (greedy batches, then sampled ones for "
                             "pass@k); eval/samples_per_second counts prompts",
}
"""TRL's tags for things we do not compute, each with why: the allow-list of ``tests/compat/test_trl_metrics.py``.
Settings we do not have add more (``sampling/*`` of vLLM, ``cispo_clip_ratio``, ``vespo/phi_seq_mean``,
``aux_loss``, ``entropy_coef``, ``policy_loss``, ``tools/failure_frequency``): ``docs/metrics.md`` lists them."""

TRL_FEATURES = [
    (("sampling/sampling_logp_difference/mean", "sampling/sampling_logp_difference/max",
      "sampling/importance_sampling_ratio/min", "sampling/importance_sampling_ratio/mean",
      "sampling/importance_sampling_ratio/max"),
     "vLLM's importance-sampling correction; ours are `rollout/abs_log_ratio`, `rollout/max_abs_log_ratio` and the "
     "rollout correction (`rollout_correction`)"),
    (("cispo_clip_ratio",), "TRL's CISPO bounds the ratio by epsilon_high alone; ours clips on both sides and logs "
                            "`clip/low_frac` / `clip/high_frac`"),
    (("vespo/phi_seq_mean",), "VESPO is not implemented here"),
    (("aux_loss",), "a mixture-of-experts router loss: not added here"),
    (("entropy_coef",), "TRL's adaptive entropy coefficient; ours is the fixed `entropy_coef` of the config"),
    (("policy_loss",), "logged by TRL only with an entropy bonus, and it includes the KL term; ours is `loss/policy` "
                       "(without it)"),
    (("tools/failure_frequency",), "failed tool calls per call; ours counts each kind per trajectory "
                                   "(`agent/tool_errors`, `agent/tool_timeouts`, `agent/tool_bad_calls`)"),
]
"""TRL's training metrics of features or settings we do not have (their ``eval/`` twins likewise)."""


# ---------------------------------------------------------------------------------------------------- the mapping
def _pattern(name: str) -> str:
    return "^" + re.escape(name).replace(r"\{fn\}", "(?P<fn>.+)").replace(r"\{x\}", "(?P<x>.+)") + "$"


def _compile(table: list[Metric]) -> list[tuple[re.Pattern, Metric]]:
    # exact names first, so that reward/mean is not taken for a reward function called "mean"
    ordered = sorted(table, key=lambda m: "{" in m.ours)
    return [(re.compile(_pattern(m.ours)), m) for m in ordered]


_TRAIN, _EVAL = _compile(TRAIN), _compile(EVAL)
SUMMARY_KEYS = tuple(m.ours for m in SUMMARY)


def _lookup(key: str, compiled) -> tuple[Metric, re.Match] | None:
    for pattern, metric in compiled:
        if (match := pattern.match(key)) is not None:
            return metric, match
    return None


def trl_name(key: str, kind: str = "train") -> str:
    """The key TRL's ``log_history`` would hold for our metric ``key`` of a ``kind`` ("train" or "eval") record:
    TRL's name where it has one (``reward/mean`` -> ``reward``; ``eval/reward_mean`` -> ``eval_reward``), else ours
    (``eval/accuracy`` -> ``eval_accuracy``, as transformers prefixes an evaluation's keys)."""
    if kind == "eval":
        found = _lookup(key, _EVAL)
        if found is not None and found[0].trl is not None:
            metric, match = found
            return metric.trl.format(**match.groupdict())
        return "eval_" + key.removeprefix("eval/")
    found = _lookup(key, _TRAIN)
    if found is not None and found[0].trl is not None:
        metric, match = found
        return metric.trl.format(**match.groupdict())
    return key


def trl_view(record: dict, kind: str = "train", epoch: float | None = None) -> dict:
    """A record of ours (metrics.jsonl's, with ``step``) as TRL's ``log_history`` entry would hold it, without
    ``step``: TRL's names, ``eval_`` keys for an evaluation, and ``epoch``. ``kind="summary"`` (the end-of-train
    record) and ``"user"`` (``trainer.log``): the keys as they are."""
    out = {}
    for key, value in record.items():
        if key in ("step", "epoch"):
            continue
        out[key if kind in ("summary", "user") else trl_name(key, kind)] = value
    if epoch is not None:
        out["epoch"] = epoch
    return out


def history_record(record: dict, kind: str = "train", epoch: float | None = None) -> dict:
    """The ``log_history`` entry of a record: our keys (what existing readers of log_history use), TRL's beside
    them, ``epoch`` and ``step``."""
    return {**record, **trl_view(record, kind, epoch), "step": record["step"]}


def tracker_values(view: dict) -> dict:
    """The tags transformers' tracker callbacks write for a ``log_history`` entry (``rewrite_logs``): ``eval_<name>``
    becomes ``eval/<name>``, every other key ``train/<key>``; ``step`` is the tag's step, not a tag."""
    out = {}
    for key, value in view.items():
        if key == "step":
            continue
        out["eval/" + key.removeprefix("eval_") if key.startswith("eval_") else "train/" + key] = value
    return out


def kind_of(record: dict) -> str:
    """"eval" for an evaluation record of ours (every metric key eval/...), "summary" for the end-of-train one, else
    "train"."""
    keys = [k for k in record if k not in ("step", "epoch")]
    if keys and all(k in SUMMARY_KEYS for k in keys):
        return "summary"
    return "eval" if keys and all(k.startswith("eval/") for k in keys) else "train"


def is_trainer_metric(key: str, kind: str = "train") -> bool:
    """Whether ``key`` is one the trainer logs itself (else a reward function's ``log_metric`` value, or a
    callback's)."""
    return key in ("step", "epoch") or _lookup(key, _EVAL if kind == "eval" else _TRAIN) is not None


# ---------------------------------------------------------------------------------------------------- the docs page
def _cell(name: str | None) -> str:
    return f"`{name}`" if name else "-"


def _rows(table: list[Metric], kind: str) -> list[str]:
    rows = []
    for m in table:
        if kind == "eval":
            theirs = m.trl or trl_name(m.ours, "eval")
            tag = "eval/" + theirs.removeprefix("eval_")
        else:
            theirs = m.trl or m.ours
            tag = "train/" + theirs
        trl = _cell(m.trl) if m.trl else "- (ours: " + _cell(theirs) + ")"
        rows.append(f"| {_cell(m.ours)} | {trl} | `{tag}` | {m.meaning} |")
    return rows


def markdown_page(generated_note: str = "") -> str:
    """docs/metrics.md: both names of every metric, where each is written, and what TRL logs that we do not."""
    head = ["| ours (metrics.jsonl, report, console) | TRL's (`log_history`) | tracker tag | what it is |",
            "|---|---|---|---|"]
    summary_head = ["| ours (`train()`'s `metrics`) | TRL's (`log_history`) | tracker tag | what it is |", head[1]]
    parts = [
        "# Metrics", "",
        *([generated_note, ""] if generated_note else []),
        "A run writes its metrics under two sets of names, generated here from `rlhf/trl_metrics.py`:", "",
        "- **ours** in `output_dir/metrics.jsonl`, which the report (`report.html`), the health monitor, the console "
        "line and the progress bar read;",
        "- **TRL's** where a TRL user looks: the trackers of `report_to` get exactly the tags transformers' "
        "`TensorBoardCallback` and `WandbCallback` write for TRL's `GRPOTrainer` (`train/<name>` for training, "
        "`eval/<name>` for an evaluation; wandb also gets `train/global_step`, its x-axis), and "
        "`trainer.state.log_history` (and the `logs` of a callback's `on_log`) holds TRL's keys (`reward`, "
        "`eval_reward`, `epoch`) beside ours. A metric TRL does not have keeps our name (`train/advantages/mean`, "
        "`eval/accuracy`; `eval_accuracy` in `log_history`), as does what a reward function gives `log_metric` "
        "(`train/<name>`, `eval/<name>`).", "",
        "`{fn}` is a reward function's name. `tests/compat/test_trl_metrics.py` runs TRL's `GRPOTrainer` and ours "
        "with the same settings and checks that every TensorBoard tag and `log_history` key TRL writes is written "
        "here too, except those listed under *What TRL logs that we do not*.", "",
        "## Training: every `logging_steps`", "", *head, *_rows(TRAIN, "train"), "",
        "## Evaluation: every `eval_steps`", "",
        "Our evaluation scores greedy completions (one per eval prompt) and, with `eval_num_generations`, sampled ones "
        "for pass@k; TRL's samples `num_generations` completions per prompt with the training settings and runs the "
        "loss on them.", "", *head, *_rows(EVAL, "eval"), "",
        "## End of `train()`", "",
        "One more record in `log_history` and the trackers (not in metrics.jsonl), as transformers' `Trainer` writes "
        "it; wandb keeps these in the run's summary.", "", *summary_head, *_rows(SUMMARY, "summary"), "",
        "## What TRL logs that we do not", "",
        "| TRL's tag | why not here |", "|---|---|",
        *[f"| `{tag}` | {why} |" for tag, why in TRL_ONLY.items()],
        *["| " + ", ".join(f"`train/{name}`" for name in names) + f" | {why} |" for names, why in TRL_FEATURES],
        "",
    ]
    return "\n".join(parts)

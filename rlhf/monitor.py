"""A training-health monitor: reads each step's metrics as they come and, when a run goes wrong in a way users
keep hitting, says so once, with the likely causes and what to try.

Each detector is a small function of the metric history. It looks at the first and the last ``window`` steps
of the run (10 by default) and fires at most once per run; its alarm goes to the console, to alarms.jsonl (a
record with ``"alarm"``, ``"message"`` and the numbers behind it) and to the report. The thresholds are below,
each with why it is set where it is. In runs that learn, entropy falls and gradient norms rise too (0.44 ->
0.21 and 2.6 -> 6.8 in the demo's healthy runs): those alone never raise an alarm; the detectors that look at
them fire only while the reward is not improving.

| alarm | fires when |
|---|---|
| no_learning_signal | over the first window, >= 80% of groups have identical rewards (group size > 1) |
| signal_drying_up | the share of zero-variance groups rose by >= 0.25 to >= 50% and the reward is not improving |
| entropy_collapse | entropy fell below 30% of its start and the reward is not improving |
| identical_rewards | every completion of the batch got the same reward, 5 steps in a row (not when that reward is above
  the first step's and the highest of the run: every completion solved) |
| update_too_large | mean clip fraction > 0.3 or approximate KL to the sampling policy > 0.2 over the last 5 steps |
| exploding_gradients | the gradient norm is clipped in >= 80% of the last window, its mean grew >= 3x, and the
  reward is not improving |
| truncation | >= 50% of completions hit max_new_tokens over the last window and the reward is not improving (a task
  whose answers fill max_new_tokens exactly, such as bench's repeat task, learns with every completion at the limit) |
| over_optimisation | held-out accuracy (or eval reward) is >= 5 points below its best at each of the last two
  evaluations, at least a window of steps after the best, while the train reward rose (by more than two standard
  errors) |
| kl_bound | KL in the reward: the reward stopped rising (last window vs the one before), the KL penalty is >= 30%
  of the mean reward and entropy is still >= 50% of its start (the policy has barely moved from the reference) |
| nonfinite_updates | an update was skipped for a non-finite loss or gradient |

"The reward is not improving": the mean reward of the last window exceeds the first window's by less than two
standard errors of that difference (and by less than 0.01).
"""

import math
import statistics
from dataclasses import dataclass, field

WINDOW = 10


@dataclass
class Alarm:
    name: str
    step: int
    message: str  # what happened, with the numbers
    causes: str  # the likely causes
    remedies: str  # what to try

    def record(self) -> dict:
        """The line alarms.jsonl gets."""
        return {"step": self.step, "alarm": self.name, "message": self.message, "causes": self.causes,
                "remedies": self.remedies}

    def text(self) -> str:
        return f"[health] step {self.step}: {self.message}\n  likely causes: {self.causes}\n  try: {self.remedies}"


def _values(history: list[dict], key: str) -> list[float]:
    return [h[key] for h in history if isinstance(h.get(key), (int, float)) and math.isfinite(h[key])]


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def _rose(before: list[float], after: list[float], window: int) -> bool:
    """Whether the mean of ``after`` beats that of ``before`` (``window`` values each) by more than two standard
    errors of the difference (and by more than 0.01)."""
    spread = math.sqrt((statistics.pvariance(before) + statistics.pvariance(after)) / window)
    return _mean(after) - _mean(before) > max(2 * spread, 0.01)


def reward_improving(history: list[dict], window: int = WINDOW) -> bool:
    """Whether the mean reward of the last ``window`` steps beats the first ``window``'s by at least two standard
    errors of the difference (or by 0.01, whichever is larger)."""
    rewards = _values(history, "reward/mean")
    if len(rewards) < 2 * window:
        return True  # too early to say it is not
    return _rose(rewards[:window], rewards[-window:], window)


@dataclass
class HealthMonitor:
    """Feed it every step's metrics (``observe``) and every evaluation (``observe_eval``); it returns the alarms that
    fire, each at most once per run."""

    group_size: int = 1
    max_grad_norm: float | None = None
    window: int = WINDOW
    history: list[dict] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)
    fired: dict[str, Alarm] = field(default_factory=dict)

    def observe(self, step: int, metrics: dict) -> list[Alarm]:
        self.history.append({"step": step, **metrics})
        return self._check(step)

    def observe_eval(self, step: int, metrics: dict) -> list[Alarm]:
        self.evals.append({"step": step, **metrics})
        return self._check(step)

    def _check(self, step: int) -> list[Alarm]:
        new = []
        for detector in DETECTORS:
            name = detector.__name__
            if name in self.fired:
                continue
            found = detector(self, step)
            if found is not None:
                self.fired[name] = found
                new.append(found)
        return new


# --------------------------------------------------------------------------------------------------- detectors
# Each takes the monitor and the current step and returns an Alarm or None; its name is the alarm's name.

def no_learning_signal(m: HealthMonitor, step: int) -> Alarm | None:
    if m.group_size < 2 or len(m.history) != max(5, m.window // 2):
        return None
    share = _mean(_values(m.history, "reward/zero_std_group_frac"))
    if share < 0.8:
        return None
    return Alarm("no_learning_signal", step,
                 f"{share:.0%} of groups had identical rewards over the first {len(m.history)} steps: their "
                 "advantages are 0, so they teach nothing.",
                 "the task is too hard (every completion scores 0) or too easy (every one scores 1) for this model; a "
                 "reward function that ignores the completion; too little sampling diversity (low temperature).",
                 "a denser reward with partial credit, easier prompts or a warm start, more generations per prompt, "
                 "a higher temperature, or filter_zero_std_groups so such groups leave the loss.")


def signal_drying_up(m: HealthMonitor, step: int) -> Alarm | None:
    if m.group_size < 2 or len(m.history) < 2 * m.window:
        return None
    shares = _values(m.history, "reward/zero_std_group_frac")
    first, last = _mean(shares[:m.window]), _mean(shares[-m.window:])
    if last - first < 0.25 or last < 0.5 or reward_improving(m.history, m.window):
        return None
    return Alarm("signal_drying_up", step,
                 f"the share of groups whose completions all scored the same rose from {first:.0%} to {last:.0%} "
                 "while the reward stopped improving: the learning signal is drying up.",
                 "the policy is collapsing onto one answer per prompt (often after too large updates: too high a "
                 "learning rate, several clipped optimizer steps per rollout), or the prompts it can solve are solved.",
                 "a lower learning_rate or fewer optimizer steps per rollout (mini_batch_size = the rollout batch), "
                 "a warm-up and decaying schedule, a KL term (kl_coef), more generations per prompt, or harder prompts.")


def entropy_collapse(m: HealthMonitor, step: int) -> Alarm | None:
    if len(m.history) < 2 * m.window:
        return None
    entropy = _values(m.history, "entropy")
    first, last = _mean(entropy[:m.window]), _mean(entropy[-m.window:])
    if not first > 0 or last > 0.3 * first or reward_improving(m.history, m.window):
        return None
    return Alarm("entropy_collapse", step,
                 f"entropy fell from {first:.3g} to {last:.3g} while the reward did not improve: the policy became "
                 "nearly deterministic without getting better.",
                 "updates too large for the reward's noise; a reward the policy satisfies by repeating itself.",
                 "a lower learning_rate, an entropy bonus (entropy_coef), a KL term to the reference (kl_coef), or "
                 "clip_eps_high above clip_eps_low (DAPO's clip-higher).")


def identical_rewards(m: HealthMonitor, step: int) -> Alarm | None:
    stds = _values(m.history, "reward/std")
    if len(stds) < 5 or any(s > 0 for s in stds[-5:]):
        return None
    means = _values(m.history, "reward/mean")
    value = means[-1]
    if value >= max(means) and value > means[0]:  # every completion at the best reward the run has seen: solved
        return None
    return Alarm("identical_rewards", step,
                 f"every completion got the same reward ({value:.4g}) for 5 steps in a row: nothing can be learned.",
                 "a reward function that returns a constant (wrong column, a parsing failure, every completion "
                 "truncated before the answer), or None for everything (which counts as 0).",
                 "print a few completions with their rewards (log_completions or the samples file) and check the "
                 "reward function on them by hand.")


def update_too_large(m: HealthMonitor, step: int) -> Alarm | None:
    if len(m.history) < 5:
        return None
    recent = m.history[-5:]
    clip = _mean([h.get("clip/low_frac", 0.0) + h.get("clip/high_frac", 0.0) for h in recent])
    kl = _mean(_values(recent, "policy/approx_kl")) if _values(recent, "policy/approx_kl") else 0.0
    if clip <= 0.3 and kl <= 0.2:
        return None
    return Alarm("update_too_large", step,
                 f"over the last 5 steps {clip:.0%} of tokens hit the PPO clip and the approximate KL to the sampling "
                 f"policy was {kl:.3g}: each step moves the policy far from the one that sampled (healthy runs stay "
                 "under about 20% and 0.05).",
                 "too high a learning rate, too many optimizer steps per rollout (num_epochs x rollout / mini_batch_size).",
                 "a lower learning_rate, fewer epochs or larger mini-batches, target_kl to stop a step's epochs early.")


def exploding_gradients(m: HealthMonitor, step: int) -> Alarm | None:
    if m.max_grad_norm is None or len(m.history) < 2 * m.window:
        return None
    norms = _values(m.history, "grad_norm")
    if len(norms) < 2 * m.window:
        return None
    first, last = _mean(norms[:m.window]), _mean(norms[-m.window:])
    clipped = sum(n > m.max_grad_norm for n in norms[-m.window:]) / m.window
    if clipped < 0.8 or last < 3 * first or reward_improving(m.history, m.window):
        return None
    return Alarm("exploding_gradients", step,
                 f"the gradient norm grew from {first:.3g} to {last:.3g} and was clipped at {m.max_grad_norm} in "
                 f"{clipped:.0%} of the last {m.window} steps, while the reward did not improve.",
                 "a learning rate too high for this model; advantages of very different scales; a loss aggregation "
                 "that weights long sequences heavily.",
                 "a lower learning_rate with a warm-up, scale_rewards / whitened advantages, loss_agg='token-mean'.")


def truncation(m: HealthMonitor, step: int) -> Alarm | None:
    if len(m.history) < m.window:
        return None
    recent = _values(m.history[-m.window:], "completions/truncated_frac")
    if not recent or _mean(recent) < 0.5 or reward_improving(m.history, m.window):
        return None
    length = _mean(_values(m.history[-m.window:], "completions/mean_length"))
    return Alarm("truncation", step,
                 f"{_mean(recent):.0%} of completions hit max_new_tokens over the last {m.window} steps (mean "
                 f"length {length:.1f}): their rewards judge text cut off mid-answer.",
                 "max_new_tokens too small for the task, or a policy that has learned to ramble or never emits EOS.",
                 "raise max_new_tokens, mask_truncated_completions or the soft overlong penalty (DAPO), a length "
                 "penalty, or check that the tokenizer's EOS is in the model's generation EOS ids.")


def over_optimisation(m: HealthMonitor, step: int) -> Alarm | None:
    key = "eval/accuracy" if any("eval/accuracy" in e for e in m.evals) else "eval/reward_mean"
    points = [(e["step"], e[key]) for e in m.evals if isinstance(e.get(key), (int, float))]
    if len(points) < 3:
        return None
    best_step, best = max(points, key=lambda p: p[1])
    last_step, last = points[-1]
    scale = 100 if key == "eval/accuracy" else 1
    # A fall, not a dip: the last two evaluations both after the best and both >= 5 points below it (a single
    # evaluation 6 points down, back up at the next, happens in healthy runs: bench/LEARN.md).
    previous_step, previous = points[-2]
    if previous_step <= best_step or last_step - best_step < m.window or (best - max(last, previous)) * scale < 5:
        return None
    train = [(h["step"], h["reward/mean"]) for h in m.history if isinstance(h.get("reward/mean"), (int, float))]
    at_best = [r for s, r in train if best_step - m.window < s <= best_step]
    recent = [r for s, r in train if s > last_step - m.window]
    if len(at_best) < m.window or len(recent) < m.window:
        return None
    if not _rose(at_best, recent, m.window):  # the train reward must really have risen
        return None
    return Alarm("over_optimisation", step,
                 f"{key} fell from {best:.3g} (step {best_step}) to {last:.3g} while the train reward rose from "
                 f"{_mean(at_best):.3g} to {_mean(recent):.3g}: the policy is learning the reward, not the task.",
                 "reward hacking (the reward can be satisfied without solving the task), a learned reward model "
                 "being over-optimised, or overfitting the training prompts.",
                 "keep the checkpoint of the best evaluation, add a KL term to the reference (kl_coef), tighten the "
                 "reward (format checks, a gold or rule reward beside the learned one), or stop earlier.")


def kl_bound(m: HealthMonitor, step: int) -> Alarm | None:
    if len(m.history) < 3 * m.window:
        return None
    penalty = _values(m.history[-m.window:], "kl/reward_penalty")  # KL in the reward only: -kl_coef * KL/sequence
    rewards = _values(m.history, "reward/mean")
    entropy = _values(m.history, "entropy")
    if len(penalty) < m.window or len(rewards) < 3 * m.window or not entropy or not entropy[0] > 0:
        return None
    cost, reward = -_mean(penalty), _mean(rewards[-m.window:])
    still_rising = _rose(rewards[-2 * m.window:-m.window], rewards[-m.window:], m.window)
    moved = 1 - _mean(entropy[-m.window:]) / _mean(entropy[:m.window])
    if still_rising or cost < 0.3 * abs(reward) or moved > 0.5:
        return None
    coef = m.history[-1].get("kl_coef", math.nan)
    return Alarm("kl_bound", step,
                 f"the reward stopped rising at {reward:.3g} while the KL penalty costs {cost:.3g} per sequence "
                 f"({cost / max(abs(reward), 1e-12):.0%} of it, kl_coef={coef:.3g}) and the policy is still close to the "
                 f"reference (entropy {1 - moved:.0%} of its start): the run has reached the optimum of reward - "
                 "kl_coef * KL, not of the reward.",
                 "kl_coef too large for the reward's scale: solving the task needs more KL (in nats per sequence) "
                 "than the reward it gains pays for; typical with a reward in [0, 1], long completions or a reference "
                 "far from the task (a random or weakly warm-started model).",
                 "a smaller kl_coef (0.01, or 0 with a warm start you trust), kl_target to adapt it, rewards on a larger "
                 "scale, or kl_in='loss'.")


def nonfinite_updates(m: HealthMonitor, step: int) -> Alarm | None:
    skipped = m.history[-1].get("guard/skipped_updates", 0.0) if m.history else 0.0
    if not skipped:
        return None
    return Alarm("nonfinite_updates", step,
                 f"{skipped:g} update(s) of step {step} had a non-finite loss or gradient and were skipped.",
                 "rewards of extreme size, a learning rate that blew the weights up, fp16 overflow.",
                 "check the rewards' range, lower learning_rate, keep max_grad_norm set, use bf16 instead of fp16.")


DETECTORS = [no_learning_signal, signal_drying_up, entropy_collapse, identical_rewards, update_too_large,
             exploding_gradients, truncation, over_optimisation, kl_bound, nonfinite_updates]

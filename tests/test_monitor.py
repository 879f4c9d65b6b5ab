"""The training-health monitor: each detector fires on a run constructed to trigger it (metric streams written
out here, and real tiny runs), once, with its numbers; a healthy run raises nothing."""

import json
import math

import pytest
import torch
from helpers import make_trainer

from rlhf.monitor import HealthMonitor, reward_improving


def stream(steps=30, **series):
    """Per-step metrics: each keyword is a function of the step (0-based) giving that metric."""
    base = {"reward/mean": lambda t: 0.3, "reward/std": lambda t: 0.4, "reward/zero_std_group_frac": lambda t: 0.2,
            "entropy": lambda t: 0.5, "grad_norm": lambda t: 0.8, "clip/low_frac": lambda t: 0.0,
            "clip/high_frac": lambda t: 0.0, "policy/approx_kl": lambda t: 0.0,
            "completions/truncated_frac": lambda t: 0.0, "completions/mean_length": lambda t: 5.0,
            "guard/skipped_updates": lambda t: 0.0}
    base.update(series)
    return [{key: f(t) for key, f in base.items()} for t in range(steps)]


def run(metrics, evals=(), group_size=8, max_grad_norm=1.0):
    monitor = HealthMonitor(group_size=group_size, max_grad_norm=max_grad_norm)
    fired = []
    evals = dict(evals)
    for t, m in enumerate(metrics, start=1):
        fired += monitor.observe(t, m)
        if t in evals:
            fired += monitor.observe_eval(t, evals[t])
    return fired


def noisy(t, seed=0):
    """Deterministic noise in [-0.05, 0.05]."""
    return 0.05 * math.sin(7.3 * t + seed)


HEALTHY = stream(  # learning: reward rises; entropy 0.44 -> 0.21 and grad norm 2.6 -> 6.8 (clipped) as in the demo
    60, **{"reward/mean": lambda t: 0.3 + 0.01 * t + noisy(t), "entropy": lambda t: 0.44 - 0.0039 * t,
           "grad_norm": lambda t: 2.6 + 0.07 * t, "reward/zero_std_group_frac": lambda t: 0.2 + 0.003 * t,
           "clip/low_frac": lambda t: 0.05, "policy/approx_kl": lambda t: 0.01})


def test_a_healthy_run_raises_nothing():
    assert run(HEALTHY) == []


CASES = {
    "no_learning_signal": dict(metrics=stream(**{"reward/zero_std_group_frac": lambda t: 0.9})),
    "signal_drying_up": dict(metrics=stream(60, **{"reward/mean": lambda t: 0.3 + noisy(t),
                                                   "reward/zero_std_group_frac": lambda t: min(0.2 + 0.01 * t, 0.7)})),
    "entropy_collapse": dict(metrics=stream(60, **{"reward/mean": lambda t: 0.3 + noisy(t),
                                                   "entropy": lambda t: max(0.5 - 0.02 * t, 0.05)})),
    "identical_rewards": dict(metrics=stream(**{"reward/std": lambda t: 0.0})),
    "update_too_large": dict(metrics=stream(**{"clip/low_frac": lambda t: 0.2, "clip/high_frac": lambda t: 0.2})),
    "exploding_gradients": dict(metrics=stream(60, **{"reward/mean": lambda t: 0.3 + noisy(t),
                                                      "grad_norm": lambda t: 2.0 * 1.05 ** t})),
    "truncation": dict(metrics=stream(**{"completions/truncated_frac": lambda t: 0.8})),
    "over_optimisation": dict(metrics=stream(60, **{"reward/mean": lambda t: 0.3 + 0.01 * t}),
                              evals=[(10, {"eval/accuracy": 0.40}), (20, {"eval/accuracy": 0.52}),
                                     (40, {"eval/accuracy": 0.45}), (60, {"eval/accuracy": 0.38})]),
    "nonfinite_updates": dict(metrics=stream(**{"guard/skipped_updates": lambda t: 1.0 if t == 7 else 0.0})),
    # RLOO with kl_coef 0.05 on the random-init repeat task (bench/learn.py): the reward climbs 0.07 -> 0.34 and
    # stops there, the KL penalty costs 0.2 of it, entropy stays at 4.1 of 4.6
    "kl_bound": dict(metrics=stream(80, **{"reward/mean": lambda t: min(0.07 + 0.009 * t, 0.34) + noisy(t) / 5,
                                           "kl/reward_penalty": lambda t: -min(0.0067 * t, 0.2),
                                           "entropy": lambda t: 4.6 - min(0.017 * t, 0.5)})),
}


def test_kl_in_the_reward_of_a_run_that_learns_raises_nothing():
    """The same task with kl_coef 0.01: the reward reaches 0.97 with a penalty of 0.29 and entropy falls to 0.5."""
    learning = stream(120, **{"reward/mean": lambda t: min(0.07 + 0.015 * t, 0.97) + noisy(t) / 5,
                              "kl/reward_penalty": lambda t: -min(0.005 * t, 0.29),
                              "entropy": lambda t: max(4.6 - 0.07 * t, 0.5)})
    assert run(learning) == []


@pytest.mark.parametrize("name", sorted(CASES))
def test_each_detector_fires_once_on_a_run_built_to_trigger_it(name):
    fired = run(**CASES[name])
    assert [a.name for a in fired] == [name], [a.text() for a in fired]
    alarm = fired[0]
    assert alarm.message and alarm.causes and alarm.remedies and f"step {alarm.step}" in alarm.text()


def test_group_size_one_is_not_a_missing_signal():
    """PPO with one completion per prompt logs zero_std_group_frac = 1 by definition: no alarm."""
    assert run(stream(**{"reward/zero_std_group_frac": lambda t: 1.0}), group_size=1) == []


def test_reward_improving_needs_more_than_noise():
    flat = [{"reward/mean": 0.3 + noisy(t)} for t in range(40)]
    rising = [{"reward/mean": 0.3 + 0.01 * t + noisy(t)} for t in range(40)]
    assert not reward_improving(flat) and reward_improving(rising)


def test_a_real_run_with_a_constant_reward_says_so_once_in_the_file_and_the_report(tmp_path, caplog):
    trainer = make_trainer(tmp_path, reward=lambda prompts, completions, **kw: [0.5] * len(completions),
                           max_steps=7, write_report=True)
    trainer.train()
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == list(range(1, 8)) and not any("alarm" in line for line in lines)
    alarms = [json.loads(line) for line in (tmp_path / "alarms.jsonl").read_text().splitlines()]
    assert sorted(a["alarm"] for a in alarms) == ["identical_rewards", "no_learning_signal"]
    assert "every completion got the same reward (0.5)" in caplog.text
    report = (tmp_path / "report.html").read_text()
    assert "Training health: 2 alarm(s)" in report and "identical_rewards" in report


def test_a_single_evaluation_dip_is_not_over_optimisation():
    # Our GRPO on addition, seed 4 (bench/LEARN.md): held-out accuracy every 10 steps, one dip of 6 points that the
    # next evaluation recovers, while the train reward keeps rising.
    accuracy = [59.6, 87.6, 91.2, 91.8, 91.2, 91.4, 92.4, 94.8, 94.4, 94.8, 93.8, 93.2, 91.8, 94.8, 88.8, 93.8]
    evals = [(10 * i, {"eval/accuracy": a / 100}) for i, a in enumerate(accuracy) if i]
    rising = stream(150, **{"reward/mean": lambda t: 0.6 + 0.002 * t + noisy(t) / 5})
    assert run(rising, evals=evals) == []
    # The same run had it stayed down: an alarm.
    fallen = evals[:-1] + [(150, {"eval/accuracy": 0.885})]
    assert [a.name for a in run(rising, evals=fallen)] == ["over_optimisation"]


def test_every_completion_solved_is_not_identical_rewards():
    # Our GRPO on 2 processes, repeat task, seed 3: the reward climbs to 1.0 for every completion (99.2% exact).
    solved = stream(60, **{"reward/mean": lambda t: min(0.1 + 0.03 * t, 1.0),
                           "reward/std": lambda t: 0.0 if t >= 30 else 0.2})
    assert run(solved) == []
    collapsed = stream(60, **{"reward/mean": lambda t: 0.6 if t < 30 else 0.2,
                              "reward/std": lambda t: 0.0 if t >= 30 else 0.2})
    assert "identical_rewards" in [a.name for a in run(collapsed)]


def test_a_run_that_learns_with_every_completion_at_the_length_limit_raises_no_truncation_alarm():
    # The repeat task: the answer is exactly max_new_tokens long, so every completion is truncated while the
    # reward climbs 0.07 -> 0.6.
    learning = stream(60, **{"completions/truncated_frac": lambda t: 1.0, "completions/mean_length": lambda t: 8.0,
                             "reward/mean": lambda t: min(0.07 + 0.01 * t, 0.6) + noisy(t) / 5})
    assert run(learning) == []
    stalled = stream(60, **{"completions/truncated_frac": lambda t: 1.0, "completions/mean_length": lambda t: 8.0,
                            "reward/mean": lambda t: 0.07 + noisy(t) / 5})
    assert [a.name for a in run(stalled)] == ["truncation"]


def test_a_real_run_with_nonfinite_updates_and_truncation_is_flagged(tmp_path):
    # A random model rarely stops within 2 tokens; a constant reward cannot improve (truncation alone is no alarm
    # while the reward climbs; judging "not improving" takes two windows, 20 steps).
    trainer = make_trainer(tmp_path, reward=lambda prompts, completions, **kw: [0.5] * len(completions), max_steps=20,
                           max_new_tokens=2)
    original = trainer.algorithm.advantages

    def poisoned(rewards, batch, *args):
        advantages, returns = original(rewards, batch, *args)
        return (torch.full_like(advantages, float("nan")) if trainer.step == 3 else advantages), returns

    trainer.algorithm.advantages = poisoned
    trainer.train()
    alarms = {json.loads(line).get("alarm") for line in (tmp_path / "alarms.jsonl").read_text().splitlines()}
    assert {"nonfinite_updates", "truncation"} <= alarms


def test_the_monitor_can_be_turned_off(tmp_path):
    trainer = make_trainer(tmp_path, reward=lambda prompts, completions, **kw: [0.5] * len(completions),
                           max_steps=6, health_monitor=False)
    trainer.train()
    assert not (tmp_path / "alarms.jsonl").exists() and "alarm" not in (tmp_path / "metrics.jsonl").read_text()

"""TRL's metric names where a TRL user looks: TRL's ``GRPOTrainer`` and ours run with the same settings (TRL's names:
a tiny model, two steps, ``report_to="tensorboard"``, ``logging_steps=1``, an evaluation with ``eval_strategy="steps"``)
and every TensorBoard tag and ``trainer.state.log_history`` key TRL writes must be written here too, but for the tags
``rlhf.trl_metrics.TRL_ONLY`` lists, each with why. Both event files are read back with tensorboard's own reader."""

import glob
import os

import pytest
from datasets import Dataset

from rlhf.extras.tiny import save_tiny
from rlhf.metrics import read_metrics
from rlhf.trl_metrics import TRL_ONLY

pytest.importorskip("trl")
event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")

# TRL's names for both: the same settings, given to each library's GRPOConfig.
SETTINGS = dict(max_steps=2, per_device_train_batch_size=8, num_generations=4, max_completion_length=8, seed=0,
                learning_rate=1e-3, beta=0.04, report_to="tensorboard", logging_steps=1, save_strategy="no",
                eval_strategy="steps", eval_steps=2, per_device_eval_batch_size=8, disable_tqdm=True)


def correct(prompts, completions, log_metric=None, **kwargs):
    log_metric("custom/answer_rate", 0.25)
    return [float(len(c) % 3) for c in completions]


def tidy(prompts, completions, **kwargs):
    return [float(sum(map(ord, c)) % 5) for c in completions]


def prompts(n):
    return Dataset.from_list([{"prompt": f"{a}+{a}="} for a in range(n)])


def tensorboard_tags(run_dir: str) -> dict[str, list[int]]:
    """Every scalar tag of every event file under ``run_dir``, with the steps it was written at."""
    tags = {}
    for path in glob.glob(os.path.join(run_dir, "**", "events.out.tfevents.*"), recursive=True):
        events = event_accumulator.EventAccumulator(path, size_guidance={"scalars": 0})
        events.Reload()
        for tag in events.Tags()["scalars"]:
            tags.setdefault(tag, []).extend(e.step for e in events.Scalars(tag))
    return tags


def kinds(log_history: list[dict]) -> dict[str, set]:
    """The keys of log_history's training, evaluation and end-of-train records."""
    out = {"train": set(), "eval": set(), "summary": set()}
    for entry in log_history:
        kind = "summary" if "train_runtime" in entry else "eval" if "eval_reward" in entry else "train"
        out[kind] |= set(entry)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from trl import GRPOConfig as TRLConfig
    from trl import GRPOTrainer as TRLTrainer

    from rlhf import GRPOConfig, GRPOTrainer

    root = tmp_path_factory.mktemp("trl_metrics")
    model = save_tiny(str(root / "model"), hidden_size=32, num_layers=2, num_heads=2)
    out = {}
    theirs = TRLTrainer(model=model, reward_funcs=[correct, tidy], train_dataset=prompts(16),
                        eval_dataset=prompts(4), args=TRLConfig(output_dir=str(root / "trl"), use_cpu=True, **SETTINGS))
    theirs.train()
    out["trl"] = theirs.state.log_history, tensorboard_tags(str(root / "trl" / "runs"))
    ours = GRPOTrainer(model=model, reward_funcs=[correct, tidy], train_dataset=prompts(16), eval_dataset=prompts(4),
                       args=GRPOConfig(output_dir=str(root / "ours"), write_report=False, **SETTINGS))
    ours.train()
    out["ours"] = ours.state.log_history, tensorboard_tags(str(root / "ours" / "runs"))
    out["metrics"] = read_metrics(str(root / "ours" / "metrics.jsonl"))
    return out


def test_every_tensorboard_tag_trl_writes_is_ours_but_the_documented_ones(runs):
    _, trl_tags = runs["trl"]
    _, our_tags = runs["ours"]
    missing = set(trl_tags) - set(our_tags)
    unexplained = sorted(missing - set(TRL_ONLY))
    assert not unexplained, f"TRL writes tags we do not, with no reason in rlhf.trl_metrics.TRL_ONLY: {unexplained}"
    stale = sorted(set(TRL_ONLY) - missing)
    assert not stale, f"TRL_ONLY lists tags TRL does not write here or that we write too: {stale}"
    assert len(set(trl_tags) & set(our_tags)) >= 45  # the shared part is most of it, not a handful
    for tag in ("train/reward", "train/rewards/correct/mean", "train/kl", "train/num_tokens", "train/loss",
                "train/custom/answer_rate"):  # written at the same steps
        assert our_tags[tag] == trl_tags[tag] == [1, 2], tag
    assert 2 in our_tags["eval/reward"] and trl_tags["eval/reward"] == [2]


def test_every_log_history_key_trl_writes_is_ours_but_the_documented_ones(runs):
    trl_history, _ = runs["trl"]
    our_history, _ = runs["ours"]
    # TRL_ONLY's tags as log_history keys (transformers' rewrite_logs, backwards)
    not_ours = {tag.replace("eval/", "eval_", 1) if tag.startswith("eval/") else tag.removeprefix("train/")
                for tag in TRL_ONLY}
    theirs, ours = kinds(trl_history), kinds(our_history)
    for kind in ("train", "eval", "summary"):
        missing = theirs[kind] - ours[kind]
        assert missing <= not_ours, f"{kind}: TRL's log_history has keys ours lacks: {sorted(missing - not_ours)}"
    assert theirs["train"] <= ours["train"]  # every training key, to the last one
    assert [e["step"] for e in our_history if "reward" in e] == [e["step"] for e in trl_history if "reward" in e]


def test_ours_and_trls_names_carry_the_same_values(runs):
    history, tags = runs["ours"]
    records = runs["metrics"]
    train = [e for e in history if "reward/mean" in e]
    assert [e["step"] for e in train] == [r["step"] for r in records if "reward/mean" in r] == [1, 2]
    for entry in train:
        assert entry["reward"] == entry["reward/mean"] and entry["reward_std"] == entry["reward/std"]
        assert entry["rewards/tidy/mean"] == entry["reward/tidy/mean"]
        assert entry["completions/clipped_ratio"] == entry["completions/truncated_frac"]
        assert entry["clip_ratio/region_mean"] == entry["clip_ratio/low_mean"] + entry["clip_ratio/high_mean"]
        assert entry["step_time"] == entry["time/step"] and entry["loss"] == entry["loss/total"]
    tokens = [e["num_tokens"] for e in train]
    assert 0 < tokens[0] < tokens[1]  # a running total, as TRL's
    evaluation = history[-2]
    assert evaluation["eval_reward"] == evaluation["eval/reward_mean"] and evaluation["eval_num_tokens"] == tokens[1]
    assert history[-1]["train_runtime"] > 0 and history[-1]["step"] == 2
    assert "train/reward/mean" not in tags and "reward/mean" not in tags  # the trackers carry TRL's names only


def test_clip_ratios_are_trls_formulas_and_the_step_takes_the_extremes():
    """clip_ratio/low_mean, high_mean, region_mean, low_min, high_max as TRL's compute_loss writes them out, on one
    micro-batch; a step's low_min / high_max are the extremes over its micro-batches (StepMetrics)."""
    import torch

    from rlhf.core import policy_loss
    from rlhf.metrics import StepMetrics

    generator = torch.Generator().manual_seed(0)
    old = torch.randn(4, 6, generator=generator, dtype=torch.float64)
    new = old + 0.5 * torch.randn(4, 6, generator=generator, dtype=torch.float64)
    advantages = torch.tensor([1.0, -1.0, 0.5, -0.5], dtype=torch.float64)
    mask = torch.ones(4, 6, dtype=torch.float64)
    mask[2, 3:] = 0
    _, pg = policy_loss(new, old, advantages, mask, 0.2, 0.28)
    # TRL (grpo_trainer.py, compute_loss): coef_1 = exp(log ratio); masked means over tokens, then per sequence
    coef_1, adv = torch.exp(new - old), advantages.unsqueeze(1)
    low, high = ((coef_1 < 1 - 0.2) & (adv < 0)).double(), ((coef_1 > 1 + 0.28) & (adv > 0)).double()
    assert pg["clip_frac_low"].item() == pytest.approx(((low * mask).sum() / mask.sum()).item())
    assert pg["clip_frac_high"].item() == pytest.approx(((high * mask).sum() / mask.sum()).item())
    assert torch.allclose(pg["clip_frac_low_rows"], (low * mask).sum(-1) / mask.sum(-1))
    assert torch.allclose(pg["clip_frac_high_rows"], (high * mask).sum(-1) / mask.sum(-1))
    assert 0 < pg["clip_frac_low"] and 0 < pg["clip_frac_high"]  # the case is not vacuous
    metrics = StepMetrics()
    for value in (0.5, 0.25, 0.75):
        metrics.add_min("clip/low_min", value)
        metrics.add_max("clip/high_max", value)
    assert metrics.reduce() == {"clip/low_min": 0.25, "clip/high_max": 0.75}

"""TRL's RLOO: ``from trl import RLOOConfig, RLOOTrainer`` -> ``from rlhf import ...`` runs TRL's documented quick
start (the RLOOTrainer docstring's example, with a tiny local model and dataset instead of hub names, and two steps),
TRL's RLOOConfig fields and defaults are ours, and the advantages and the loss follow TRL's RLOOTrainer formulas
(``_generate_and_score_completions``: reward clip, the KL summed per sequence in the reward, leave-one-out,
whitening; ``_compute_loss``: the clipped sequence ratio)."""

import dataclasses
from types import SimpleNamespace

import pytest
import torch
from datasets import Dataset

from rlhf import RLOOConfig, RLOOTrainer  # was: from trl import RLOOConfig, RLOOTrainer
from rlhf.cli import parse_args
from rlhf.extras.tiny import save_tiny
from rlhf.metrics import read_metrics
from rlhf.trainer.algorithms import BatchReduce, algorithm_for
from rlhf.trainer.kl import KLPenalty
from rlhf.trl_names import BY_NAME, SAME_NAMES

trl = pytest.importorskip("trl")


def test_quick_start(tmp_path):
    from reward_models.rules import accuracy_reward  # was: from trl.rewards import accuracy_reward

    model = save_tiny(str(tmp_path / "model"), hidden_size=32, num_layers=2, num_heads=2)  # was: the hub's Qwen
    # was: dataset = load_dataset("trl-lib/DeepMath-103K", split="train")
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": f"What is {a} + {a}?"}],
                                  "solution": str(2 * a)} for a in range(8)])

    trainer = RLOOTrainer(
        model=model,
        reward_funcs=accuracy_reward,
        train_dataset=dataset,
        args=RLOOConfig(output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=4,  # added: two
                        max_completion_length=8, report_to="none", disable_tqdm=True),  # steps, TRL's names
    )
    trainer.train()
    records = read_metrics(str(tmp_path / "out" / "metrics.jsonl"))
    assert [r["step"] for r in records] == [1, 2] and "kl" in records[0]  # beta=0.05: a reference model, KL logged


def test_trls_fields_and_defaults():
    theirs = trl.RLOOConfig(output_dir="/tmp/trl-unused", use_cpu=True)
    ours = RLOOConfig()
    assert (ours.kl_coef, ours.num_generations, ours.normalize_advantages, ours.reward_clip_range) == (
        theirs.beta, theirs.num_generations, theirs.normalize_advantages, theirs.reward_clip_range)
    assert (ours.clip_eps_low, ours.clip_eps_high, ours.learning_rate) == (theirs.epsilon, theirs.epsilon, 1e-6)
    assert (ours.beta, ours.epsilon) == (theirs.beta, theirs.epsilon)  # TRL's names read back
    named = RLOOConfig(beta=0.1, normalize_advantages=True, reward_clip_range=(-1.0, 1.0), num_generations=4)
    assert (named.kl_coef, named.normalize_advantages, named.reward_clip_range) == (0.1, True, [-1.0, 1.0])
    (flags,) = parse_args([RLOOConfig], ["--beta", "0.1", "--normalize_advantages", "true", "--reward_clip_range",
                                         "-1", "1", "--num_generations", "4"])  # TRL's command line, the same config
    assert flags == named
    with pytest.raises(ValueError, match=r"reward_clip_range=\[1.0, -1.0\] must be \[min, max\]"):
        RLOOConfig(reward_clip_range=(1.0, -1.0)).validate()
    trl_fields = {f.name for f in dataclasses.fields(trl.RLOOConfig)}  # each ours, or TRL's name with its rule
    assert trl_fields - {f.name for f in dataclasses.fields(RLOOConfig)} - set(SAME_NAMES) - set(BY_NAME) == set()


class Metrics:
    def __init__(self):
        self.values = {}

    def add(self, name, value, count=None):
        self.values[name] = value


@pytest.mark.parametrize("normalize, clip, beta", [(False, None, 0.05), (True, (-0.5, 0.8), 0.1), (False, None, 0.0)])
def test_advantages_are_trls_formula(normalize, clip, beta):
    torch.manual_seed(0)
    groups, size, tokens = 3, 4, 5
    rewards = torch.randn(groups * size, dtype=torch.float64)
    mask = (torch.rand(groups * size, tokens) > 0.2).float()
    old, ref = torch.randn(groups * size, tokens), torch.randn(groups * size, tokens)
    config = RLOOConfig(num_generations=size, beta=beta, normalize_advantages=normalize, reward_clip_range=clip)
    rollout = SimpleNamespace(policy_tokens=mask, old_logprobs=old, ref_logprobs=ref, size=groups * size)
    kl = KLPenalty("reward" if beta > 0 else None, config.kl_coef, config.kl_estimator)
    reduce = BatchReduce(SimpleNamespace(num_processes=1, process_index=0, device="cpu"))
    ours, returns = algorithm_for(config).advantages(rewards, rollout, kl, reduce, Metrics())

    # TRL: rewards.clamp(*reward_clip_range); rewards - beta * ((old - ref) * mask).sum(-1); baseline = (sum of the
    # group - r_i) / (G - 1); advantages = rewards - baseline; (a - mean(a)) / (std(a) + 1e-4) with Bessel's std.
    expected = rewards.clone()
    if clip:
        expected = expected.clamp(min=clip[0], max=clip[1])
    expected = expected - beta * ((old - ref) * mask).sum(-1).double()
    grouped = expected.view(groups, size)
    baseline = ((grouped.sum(dim=1, keepdim=True) - grouped) / (size - 1)).view(-1)
    expected = expected - baseline
    if normalize:
        expected = (expected - expected.mean()) / (expected.std() + 1e-4)
    assert returns is None and torch.allclose(ours.double(), expected, atol=1e-5)


def test_loss_is_trls_sequence_loss():
    """TRL's RLOOTrainer._compute_loss: log_ratio = sum of the masked token log-probs minus the old ones; per sequence
    -min(exp(log_ratio) A, clamp(exp(log_ratio), 1 - epsilon, 1 + epsilon_high) A); the mean over sequences. Off-policy
    ratios that clip, value and gradient."""
    from rlhf.core import policy_loss

    torch.manual_seed(1)
    old, advantages = torch.randn(6, 5), torch.randn(6)
    mask = (torch.rand(6, 5) > 0.2).float()
    logprobs = (old + torch.randn(6, 5) * 0.15).requires_grad_()
    config = RLOOConfig(epsilon=0.2, epsilon_high=0.28)
    ratio = ((logprobs * mask).sum(1) - (old * mask).sum(1)).exp()
    theirs = -torch.min(ratio * advantages, torch.clamp(ratio, 1 - 0.2, 1 + 0.28) * advantages).mean()
    assert ((ratio < 0.8) | (ratio > 1.28)).any()  # some sequences clip
    ours, _ = policy_loss(logprobs, old, advantages, mask, config.clip_eps_low, config.clip_eps_high, config.dual_clip,
                          config.loss_agg, level=config.importance_sampling_level)
    assert torch.allclose(ours, theirs, atol=1e-6)
    assert torch.allclose(*(torch.autograd.grad(loss, logprobs)[0] for loss in (ours, theirs)), atol=1e-6)

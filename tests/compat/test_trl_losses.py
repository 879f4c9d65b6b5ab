"""TRL 1.16's loss type sapo, its multi_objective_aggregation="normalize_then_sum" (GDPO) and sync_ref_model (TR-DPO),
ported from TRL's documentation (docs/source/paper_index.md) with only the imports changed, each run for two steps on
a tiny model; and, where TRL's own code can be called on its own, ours against it on the same tensors: SAPO's loss
and gradient against ``GRPOTrainer._compute_loss``, the reference mix against ``SyncRefModelCallback``."""

import copy
import json
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from datasets import Dataset

from rlhf import GRPOConfig, GRPOTrainer  # was: from trl import GRPOConfig, GRPOTrainer
from rlhf.core import aggregate_loss, grpo_advantages, kl_penalty, policy_loss
from rlhf.extras.tiny import save_tiny, tiny_model
from rlhf.metrics import read_metrics
from rlhf.trainer.kl import mix_into_reference
from tests.core.test_sapo_gdpo import gdpo_reference

trl = pytest.importorskip("trl")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return save_tiny(str(tmp_path_factory.mktemp("tiny") / "model"), hidden_size=32, num_layers=2, num_heads=2)


# Added to each documented config (its "..."): two steps of 2 prompts x 4 completions, in TRL's names.
TWO_STEPS = dict(max_steps=2, per_device_train_batch_size=8, num_generations=4, max_completion_length=8,
                 report_to="none", logging_steps=1, disable_tqdm=True, num_completions_to_print=None)
DATASET = Dataset.from_list([{"prompt": f"What is {a} + {a}?", "solution": str(2 * a)} for a in range(8)])


def length_reward(completions, **kwargs):
    return [float(len(c)) for c in completions]


def vowel_reward(completions, **kwargs):
    return [float(sum(ch in "aeiou" for ch in c) % 2) for c in completions]


# ---------------------------------------------------------------------------------------------------- SAPO
def test_sapo_as_documented(tmp_path, model):
    training_args = GRPOConfig(
        loss_type="sapo",
        sapo_temperature_pos=1.0,  # default value
        sapo_temperature_neg=1.05,  # default value
        scale_rewards="group",
        output_dir=str(tmp_path), **TWO_STEPS,  # added: where, and two steps
    )
    assert (training_args.policy_loss_type, training_args.loss_agg) == ("sapo", "seq-mean-token-mean")
    trainer = GRPOTrainer(model=model, reward_funcs=length_reward, args=training_args, train_dataset=DATASET)
    trainer.train()
    # On-policy r = 1, where the gate is 2 / tau: the loss is mean_i(-A_i * 2 / tau_i), not PPO's mean(-A) = 0.
    rows = [json.loads(line) for line in (tmp_path / "completions.jsonl").read_text().splitlines()]
    records = read_metrics(str(tmp_path / "metrics.jsonl"))
    assert [r["step"] for r in records] == [1, 2]
    for record in records:
        advantages = torch.tensor([row["advantage"] for row in rows if row["step"] == record["step"]])
        expected = (-advantages * 2 / torch.where(advantages > 0, 1.0, 1.05)).mean()
        assert record["loss/policy"] == pytest.approx(expected.item(), abs=1e-6)
        assert abs(expected) > 1e-3


def trl_compute_loss(loss_type, logprobs, old_logprobs, ref_logprobs, advantages, mask, beta, args):
    """TRL's own GRPOTrainer._compute_loss on these tensors: a stand-in ``self`` whose model pass returns
    ``logprobs`` (the rest of its state as a plain one-process GRPOTrainer has it)."""
    fake = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logprobs, torch.zeros_like(logprobs), None),
        aux_loss_enabled=False, top_entropy_quantile=1.0, off_policy_mask_threshold=None,
        importance_sampling_level=args.importance_sampling_level, beta=beta, args=args, loss_type=loss_type,
        epsilon_low=args.epsilon, epsilon_high=args.epsilon_high or args.epsilon, use_vllm=False,
        vllm_importance_sampling_correction=False, model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1, _entropy_bonus_enabled=False, max_completion_length=logprobs.shape[1],
        _metrics=defaultdict(lambda: defaultdict(list)),
        accelerator=SimpleNamespace(gather=lambda x: x, reduce=lambda x, reduction: x, num_processes=1))
    rows = logprobs.shape[0]
    inputs = {"prompt_ids": torch.zeros(rows, 1, dtype=torch.long), "prompt_mask": torch.ones(rows, 1),
              "completion_ids": torch.zeros_like(mask, dtype=torch.long), "completion_mask": mask,
              "advantages": advantages, "old_per_token_logps": old_logprobs, "ref_per_token_logps": ref_logprobs}
    return trl.GRPOTrainer._compute_loss(fake, None, inputs)


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_sapo_loss_and_gradient_equal_trls_compute_loss(level):
    torch.manual_seed(0)
    mask = torch.ones(6, 5)
    mask[1, 2:] = mask[4, 4:] = 0
    old_logprobs = torch.randn(6, 5) - 1.0
    ref_logprobs = old_logprobs + 0.3 * torch.randn(6, 5)
    advantages = torch.tensor([1.2, -0.4, 0.0, 0.8, -1.5, 0.3])
    beta = 0.04
    # use_bias_correction_kl=False: our KL term is not weighted by the ratio (the TRL table's row for it)
    args = trl.GRPOConfig(output_dir="/tmp/trl-unused", use_cpu=True, loss_type="sapo", beta=beta,
                          sapo_temperature_pos=0.8, sapo_temperature_neg=1.3, importance_sampling_level=level,
                          use_bias_correction_kl=False)
    config = GRPOConfig(loss_type="sapo", beta=beta, sapo_temperature_pos=0.8, sapo_temperature_neg=1.3,
                        importance_sampling_level=level)
    start = old_logprobs + 0.5 * torch.randn(6, 5)  # off-policy: ratios well away from 1
    theirs_lp, ours_lp = start.clone().requires_grad_(), start.clone().requires_grad_()

    theirs = trl_compute_loss("sapo", theirs_lp, old_logprobs, ref_logprobs, advantages, mask, beta, args)
    ours, _ = policy_loss(ours_lp, old_logprobs, advantages, mask, config.clip_eps_low, config.clip_eps_high,
                          agg=config.loss_agg, level=config.importance_sampling_level,
                          loss_type=config.policy_loss_type,
                          sapo_temperatures=(config.sapo_temperature_pos, config.sapo_temperature_neg))
    ours = ours + config.kl_coef * aggregate_loss(kl_penalty(ours_lp, ref_logprobs, config.kl_estimator), mask,
                                                  config.loss_agg)
    theirs.backward()
    ours.backward()
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(ours_lp.grad, theirs_lp.grad, rtol=1e-5, atol=1e-8)
    # and it is not PPO's clipped loss, which TRL computes for grpo on the same tensors
    grpo = trl_compute_loss("grpo", start.clone(), old_logprobs, ref_logprobs, advantages, mask, beta, args)
    assert not torch.allclose(grpo, theirs, atol=1e-3)


# ---------------------------------------------------------------------------------------------------- GDPO
def test_gdpo_as_documented(tmp_path, model):
    training_args = GRPOConfig(
        multi_objective_aggregation="normalize_then_sum",
        reward_weights=[1.0, 0.5],  # added: two reward functions, as "only has an effect" with more than one
        output_dir=str(tmp_path), **TWO_STEPS,  # added: where, and two steps
    )
    trainer = GRPOTrainer(model=model, reward_funcs=[length_reward, vowel_reward], args=training_args,
                          train_dataset=DATASET)
    trainer.train()
    rows = [json.loads(line) for line in (tmp_path / "completions.jsonl").read_text().splitlines()]
    assert sorted({row["step"] for row in rows}) == [1, 2]
    for step in (1, 2):  # every completion of the step (num_completions_to_print=None), in batch order
        batch = [row for row in rows if row["step"] == step]
        table = [[row["rewards"]["length_reward"], row["rewards"]["vowel_reward"]] for row in batch]
        advantages = torch.tensor([row["advantage"] for row in batch], dtype=torch.float64)
        expected = torch.tensor(gdpo_reference(table, [1.0, 0.5], 4), dtype=torch.float64)
        torch.testing.assert_close(advantages, expected, rtol=1e-5, atol=1e-5)
        summed = torch.tensor([r[0] + 0.5 * r[1] for r in table], dtype=torch.float64)
        assert not torch.allclose(advantages, grpo_advantages(summed, 4), atol=1e-3)  # not sum_then_normalize


def test_gdpo_is_a_grpo_setting():
    from rlhf import PPOConfig

    with pytest.raises(TypeError, match="multi_objective_aggregation"):
        PPOConfig(multi_objective_aggregation="normalize_then_sum")


# ---------------------------------------------------------------------------------------------------- TR-DPO
def test_sync_ref_model_as_documented(tmp_path, model):
    training_args = GRPOConfig(
        sync_ref_model=True,  # enable TR-DPO (Section 3 of the paper)
        ref_model_mixup_alpha=0.6,  # α soft update weight (Table 1 of the paper)
        ref_model_sync_steps=1,  # was 512 (τ, Table 1 of the paper): every step, so two steps show it
        beta=0.05,  # β temperature (Table 1 of the paper)
        learning_rate=1e-2,  # was 1e-6 (Table 2 of the paper): large enough to move a tiny model in two steps
        output_dir=str(tmp_path), **TWO_STEPS,  # added: where, and two steps
    )
    trainer = GRPOTrainer(model=model, reward_funcs=length_reward, args=training_args, train_dataset=DATASET)
    initial = copy.deepcopy(trainer.ref_model)
    trainer.train()
    policy = trainer.unwrapped_model
    for (name, ref), start, now in zip(trainer.ref_model.named_parameters(), initial.parameters(), policy.parameters()):
        assert not torch.equal(ref, start) or torch.equal(start, now), name  # moved wherever the policy moved


def test_sync_ref_model_without_a_kl_term_is_refused_as_in_trl():
    with pytest.raises(ValueError, match="without a KL term there is no reference model to sync"):
        GRPOConfig(sync_ref_model=True).validate()  # TRL's default beta is 0.0 too


def test_the_mix_equals_trls_sync_callback():
    policy = tiny_model("llama", hidden_size=32, num_layers=2, num_heads=2, seed=1)
    reference = tiny_model("llama", hidden_size=32, num_layers=2, num_heads=2, seed=2)
    theirs = copy.deepcopy(reference)
    trl.trainer.callbacks.SyncRefModelCallback._sync_target_model(policy, theirs, 0.6)
    mix_into_reference(reference, policy, 0.6)
    for (name, a), b in zip(reference.named_parameters(), theirs.parameters()):
        assert torch.equal(a, b), name

"""Shared by the trainer tests: a tiny GRPO trainer and gradient utilities."""

import torch

from rlhf import (
    GRPOConfig,
    GRPOTrainer,
    PPOConfig,
    PPOTrainer,
    ReinforceConfig,
    ReinforceTrainer,
)
from rlhf.distributed import shards_parameters
from rlhf.metrics import StepMetrics
from rlhf.trainer.plan import plan_step
from rlhf.trainer.update import accumulate_gradients
from rlhf.extras.tiny import EOS_ID, char_tokenizer, tiny_model

ALGORITHMS = {"grpo": (GRPOConfig, GRPOTrainer), "ppo": (PPOConfig, PPOTrainer),
              "reinforce": (ReinforceConfig, ReinforceTrainer)}

PROMPTS = [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a in range(3, 9) for b in range(2, 7)]


def varied_reward(prompts, completions, **kwargs):
    """Deterministic and different across completions, so that groups have nonzero std."""
    return [float(sum(map(ord, c)) % 5) for c in completions]


def prompt_completion_reward(prompts, completions, **kwargs):
    """Depends on the prompt and the completion: pairing a completion with the wrong prompt, or losing or
    repeating a sample, changes the mean."""
    return [float(sum(map(ord, p + c)) % 7) for p, c in zip(prompts, completions)]


def make_trainer(tmp_path, model=None, tokenizer=None, reward=varied_reward, algo="grpo", trainer_kwargs=None,
                 **overrides):
    """A tiny trainer: 4 prompts x 4 completions of at most 6 tokens, one micro-batch."""
    settings = dict(output_dir=str(tmp_path), max_steps=2, prompts_per_step=4, num_generations=4, max_new_tokens=6,
                    micro_batch_size=16, learning_rate=1e-3, disable_tqdm=True, seed=0, write_report=False)
    settings.update(overrides)
    model = model if model is not None else tiny_model("llama", hidden_size=32, num_layers=2, num_heads=2, seed=0)
    config_class, trainer_class = ALGORITHMS[algo]
    return trainer_class(model, [reward], args=config_class(**settings), processing_class=tokenizer or char_tokenizer(),
                         **{"train_dataset": PROMPTS, **(trainer_kwargs or {})})


def flat_grad(model):
    return torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None]).clone()


def accumulate(trainer, batch, metrics=None):
    """One mini-batch's forward and backward passes, as the trainer's update runs them (the plan is re-derived
    from ``trainer.args``, so a test may change micro_batch_size in between)."""
    plan = plan_step(trainer.args, trainer.accelerator.num_processes, shards_parameters(trainer.accelerator))
    for model in trainer.trained_models:
        model.model.train()
    accumulate_gradients(trainer.actor, trainer.critic_model, batch, trainer.args, plan, trainer.kl,
                         trainer.accelerator, metrics if metrics is not None else StepMetrics())


def gradient(trainer, batch, metrics=None):
    trainer.optimizer.zero_grad(set_to_none=True)
    accumulate(trainer, batch, metrics)
    return flat_grad(trainer.model)


def relative_error(a, b):
    return ((a - b).norm() / b.norm()).item()


def independent_lengths(completion_ids):
    """Valid length of each completion: up to and including the first EOS (a loop, not the library)."""
    return [row.index(EOS_ID) + 1 if EOS_ID in row else len(row) for row in completion_ids.tolist()]


def with_varied_lengths(batch):
    """``batch`` with row i ended by an EOS at length 1 + (3 i mod T) (masks cut after it): tests whose negative
    control needs completions of different lengths get them whatever the sampler drew."""
    batch = type(batch)(**{name: value.clone() for name, value in batch.tensors().items()})
    width = batch.completion_ids.shape[1]
    for i in range(batch.size):
        n = 1 + (3 * i) % width
        batch.completion_ids[i, n - 1] = EOS_ID
        batch.completion_mask[i, n:] = 0
        batch.loss_mask[i, n:] = 0
    assert len(set(independent_lengths(batch.completion_ids))) > 1
    return batch


def policy_gradient_reference(model, batch):
    """The plain policy gradient -sum_i sum_t A_it grad log p_it / N, scoring each sequence alone without
    padding (full log-softmax). Advantages are [B] (per sequence) or [B, T] (per token)."""
    model.zero_grad(set_to_none=True)
    lengths = independent_lengths(batch.completion_ids)
    num_tokens = sum(lengths)
    loss = 0.0
    for i, n in enumerate(lengths):
        prompt = batch.prompt_ids[i][batch.prompt_mask[i].bool()]
        completion = batch.completion_ids[i, :n]
        logits = model(input_ids=torch.cat([prompt, completion]).unsqueeze(0)).logits[0, len(prompt) - 1 : -1]
        logprobs = torch.log_softmax(logits, -1).gather(-1, completion.unsqueeze(-1)).squeeze(-1)
        advantages = batch.advantages[i] if batch.advantages.dim() == 1 else batch.advantages[i, :n]
        loss = loss - (advantages * logprobs).sum() / num_tokens
    loss.backward()
    return flat_grad(model), lengths


def padded_batch(prompts, completions, pad_id=0):
    """Left-padded prompts and right-padded completions (lists of ids) as the four tensors the forward passes take."""
    from rlhf.data import left_pad

    prompt_ids, prompt_mask = left_pad(prompts, pad_id)
    width = max(map(len, completions))
    completion_ids = torch.full((len(completions), width), pad_id)
    completion_mask = torch.zeros((len(completions), width), dtype=torch.long)
    for i, c in enumerate(completions):
        completion_ids[i, : len(c)] = torch.tensor(c)
        completion_mask[i, : len(c)] = 1
    return prompt_ids, prompt_mask, completion_ids, completion_mask

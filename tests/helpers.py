"""Shared by the trainer tests: a tiny GRPO trainer and gradient utilities."""

import torch

from rlhf import GRPOConfig, GRPOTrainer
from rlhf.metrics import StepMetrics
from rlhf.tiny import char_tokenizer, tiny_model

PROMPTS = [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a in range(3, 9) for b in range(2, 7)]


def varied_reward(prompts, completions, **kwargs):
    """Deterministic and different across completions, so that groups have nonzero std."""
    return [float(sum(map(ord, c)) % 5) for c in completions]


def make_trainer(tmp_path, model=None, tokenizer=None, reward=varied_reward, **overrides):
    settings = dict(output_dir=str(tmp_path), max_steps=2, prompts_per_step=4, num_generations=4, max_new_tokens=6,
                    micro_batch_size=16, learning_rate=1e-3, disable_tqdm=True, seed=0)
    settings.update(overrides)
    model = model if model is not None else tiny_model("llama", hidden_size=32, num_layers=2, num_heads=2, seed=0)
    return GRPOTrainer(model, [reward], args=GRPOConfig(**settings), train_dataset=PROMPTS,
                       processing_class=tokenizer or char_tokenizer())


def flat_grad(model):
    return torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None]).clone()


def gradient(trainer, batch, metrics=None):
    trainer.model.train()
    trainer.optimizer.zero_grad(set_to_none=True)
    trainer.accumulate_gradients(batch, metrics if metrics is not None else StepMetrics())
    return flat_grad(trainer.model)


def relative_error(a, b):
    return ((a - b).norm() / b.norm()).item()

"""rlhf: token-level policy-gradient RL (GRPO, PPO, REINFORCE) for Hugging Face causal LMs.

The public names load on first use, so that ``import rlhf.core`` (the torch-only math) loads nothing else.
"""

import importlib

__version__ = "0.1.0"

_PUBLIC = {
    "GRPOConfig": "rlhf.configs",
    "PPOConfig": "rlhf.configs",
    "ReinforceConfig": "rlhf.configs",
    "RLOOConfig": "rlhf.configs",
    "RLConfig": "rlhf.configs",
    "GRPOTrainer": "rlhf.trainer",
    "PPOTrainer": "rlhf.trainer",
    "ReinforceTrainer": "rlhf.trainer",
    "RLOOTrainer": "rlhf.trainer",
    "RLTrainer": "rlhf.trainer",
    "ValueModel": "rlhf.critic",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'rlhf' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)

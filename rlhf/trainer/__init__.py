"""The trainer: a run built from a config and the user's objects (``build.py``), the step loop (``trainer.py``),
what each algorithm adds (``algorithms.py``), where the KL enters (``kl.py``), how a step's batch divides
(``plan.py``), the no-grad log-prob and value passes (``passes.py``), the update and its losses
(``update.py``) and checkpoints (``checkpointing.py``)."""

from rlhf.trainer.trainer import GRPOTrainer, PPOTrainer, ReinforceTrainer, RLOOTrainer, RLTrainer
from rlhf.trainer.update import NonFiniteError, WeightsBlownUpError

__all__ = ["GRPOTrainer", "NonFiniteError", "PPOTrainer", "RLTrainer", "ReinforceTrainer", "RLOOTrainer",
           "WeightsBlownUpError"]

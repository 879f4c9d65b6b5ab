"""The trainer loop (``trainer.py``), what each algorithm adds (``algorithms.py``), where the KL enters
(``kl.py``), the update and its losses (``update.py``), the no-grad passes (``scoring.py``) and
checkpoints (``checkpointing.py``)."""

from rlhf.trainer.trainer import GRPOTrainer, PPOTrainer, ReinforceTrainer, RLTrainer
from rlhf.trainer.update import NonFiniteError, WeightsBlownUpError

__all__ = ["GRPOTrainer", "NonFiniteError", "PPOTrainer", "RLTrainer", "ReinforceTrainer", "WeightsBlownUpError"]

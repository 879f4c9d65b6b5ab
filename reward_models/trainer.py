"""Bradley-Terry reward-model training (Ouyang et al., 2022) on Accelerate.

loss = -log sigmoid(r_chosen - r_rejected - margin) + center_rewards_coefficient * (r_chosen + r_rejected)^2,
averaged over the pairs of a batch (the optional ``margin`` column as in Llama 2; the centring term as
in TRL, Eisenstein et al. 2023). Evaluation reports pairwise accuracy (r_chosen > r_rejected), the
mean margin r_chosen - r_rejected, and the loss. Data: ``chosen`` / ``rejected`` columns, plain text
or chat messages, with an optional ``prompt`` column (string or messages).
"""

import os
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from accelerate.utils import set_seed
from transformers import get_scheduler

from rlhf.reward_model import LastTokenScorer, encode, load_reward_model
from rlhf.checkpoint import save_pretrained_model, staged_directory
from rlhf.dataset_adapters import DataArguments
from rlhf.data import PromptSampler
from rlhf.distributed import make_accelerator
from rlhf.metrics import MetricsLogger, StepMetrics


@dataclass
class RewardModelConfig:
    """Training settings of a Bradley-Terry reward model."""

    output_dir: str = "outputs/reward_model"
    """Where metrics.jsonl and the trained model (``output_dir/model``) go."""
    seed: int = 42
    """Seed of the initialisation of the head and of the data order."""
    num_epochs: float = 1.0
    """Passes over the training pairs (fractions allowed)."""
    batch_size: int = 32
    """Pairs per optimizer step, across all processes."""
    micro_batch_size: int = 8
    """Pairs per forward/backward on each process."""
    max_length: int = 1024
    """Longest prompt + completion in tokens; longer ones keep their end."""
    learning_rate: float = 1e-5
    """Peak learning rate of AdamW."""
    lr_scheduler_type: Literal["constant", "linear", "cosine"] = "linear"
    """Schedule after warm-up."""
    warmup_steps: int = 0
    """Optimizer steps of linear warm-up."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    max_grad_norm: float | None = 1.0
    """Clip the gradient norm to this (None: no clipping)."""
    center_rewards_coefficient: float | None = None
    """Weight of the (r_chosen + r_rejected)^2 term that keeps rewards centred on 0 (None: off; 0.01 is typical)."""
    use_margin: bool = True
    """Subtract the dataset's ``margin`` column, when it has one, inside the sigmoid."""
    eval_steps: int = 0
    """Evaluate every this many steps and at the end (0: only at the end, when there is an eval dataset)."""
    logging_steps: int = 10
    """Log training metrics every this many steps."""
    disable_tqdm: bool = False
    """Turn the progress bar off."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "float32"
    """Dtype the model is loaded in."""
    trust_remote_code: bool = False
    """Allow model code from the hub."""

    def validate(self, num_processes: int = 1) -> None:
        errors = []
        if self.batch_size % num_processes or (self.batch_size // num_processes) % self.micro_batch_size:
            errors.append(f"batch_size={self.batch_size} must split into {num_processes} process(es) x whole "
                          f"micro-batches of micro_batch_size={self.micro_batch_size}.")
        for name in ("num_epochs", "learning_rate", "max_length", "micro_batch_size", "logging_steps"):
            if getattr(self, name) <= 0:
                errors.append(f"{name}={getattr(self, name)} must be > 0.")
        if errors:
            raise ValueError("Invalid RewardModelConfig:\n  - " + "\n  - ".join(errors))


@dataclass
class RewardModelScriptArguments(DataArguments):
    """What recipes/train_reward_model.py trains on: preference pairs (``chosen`` / ``rejected``, optionally
    ``prompt`` and ``margin``; map other column names with ``dataset_mapping``)."""

    model_name_or_path: str = ""
    """The base model: a sequence-classification checkpoint or a causal LM (it gets a new one-output head)."""


def _check_pairs(dataset, name: str) -> None:
    missing = {"chosen", "rejected"} - set(dataset.column_names)
    if missing:
        raise ValueError(f"{name} lacks the column(s) {sorted(missing)} (columns: {dataset.column_names}); "
                         "preference data needs 'chosen' and 'rejected' (and optionally 'prompt' and 'margin').")


class RewardModelTrainer:
    """Train a one-output sequence classifier on preference pairs."""

    def __init__(self, model, args: RewardModelConfig | None = None, train_dataset=None, eval_dataset=None,
                 processing_class=None):
        self.args = args = args or RewardModelConfig()
        self.accelerator = make_accelerator()
        args.validate(self.accelerator.num_processes)
        set_seed(args.seed)
        model, self.tokenizer = load_reward_model(model, processing_class, args.dtype, args.trust_remote_code)
        _check_pairs(train_dataset, "train_dataset")
        if eval_dataset is not None:
            _check_pairs(eval_dataset, "eval_dataset")
        self.train_dataset, self.eval_dataset = train_dataset, eval_dataset
        self.steps_per_epoch = max(1, len(train_dataset) // args.batch_size)
        self.max_steps = max(1, round(args.num_epochs * self.steps_per_epoch))
        optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)
        self.scorer, self.optimizer = self.accelerator.prepare(LastTokenScorer(model), optimizer)
        self.scheduler = get_scheduler({"constant": "constant_with_warmup"}.get(args.lr_scheduler_type,
                                                                              args.lr_scheduler_type),
                                       self.optimizer, num_warmup_steps=args.warmup_steps,
                                       num_training_steps=self.max_steps)
        self.sampler = PromptSampler(len(train_dataset), args.batch_size, args.seed, self.accelerator.num_processes,
                                     self.accelerator.process_index)
        self.step = 0
        if self.accelerator.is_main_process:
            os.makedirs(args.output_dir, exist_ok=True)

    @property
    def model(self):
        return self.accelerator.unwrap_model(self.scorer).model

    def _pair_scores(self, rows: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(r_chosen, r_rejected), [n] each, with gradient when the scorer is in a grad context."""
        n = len(rows["chosen"])
        prompts = rows.get("prompt", [None] * n)
        inputs = encode(self.tokenizer, prompts + prompts, rows["chosen"] + rows["rejected"], self.args.max_length,
                        self.accelerator.device)
        scores = self.scorer(**inputs)
        return scores[:n], scores[n:]

    def _margins(self, rows: dict, n: int) -> torch.Tensor:
        if self.args.use_margin and "margin" in rows:
            return torch.tensor(rows["margin"], dtype=torch.float32, device=self.accelerator.device)
        return torch.zeros(n, device=self.accelerator.device)

    def pair_loss(self, chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor) -> torch.Tensor:
        """Per-pair loss [n]: -log sigmoid(r_c - r_r - margin) (+ the centring term)."""
        loss = -F.logsigmoid(chosen - rejected - margin)
        if self.args.center_rewards_coefficient:
            loss = loss + self.args.center_rewards_coefficient * (chosen + rejected) ** 2
        return loss

    def training_step(self) -> dict[str, float]:
        args, accelerator = self.args, self.accelerator
        metrics = StepMetrics()
        self.scorer.train()
        rows = self.train_dataset[self.sampler.indices(self.step)]
        local = len(rows["chosen"])
        for start in range(0, local, args.micro_batch_size):
            micro = {k: v[start:start + args.micro_batch_size] for k, v in rows.items()}
            last = start + args.micro_batch_size >= local
            with nullcontext() if last else accelerator.no_sync(self.scorer):
                chosen, rejected = self._pair_scores(micro)
                loss = self.pair_loss(chosen, rejected, self._margins(micro, len(chosen)))
                # Normalised by the global batch; DDP averages over processes, hence the factor.
                accelerator.backward(loss.sum() / args.batch_size * accelerator.num_processes)
            metrics.add("loss", loss.mean(), len(chosen))
            metrics.add("accuracy", (chosen > rejected).float().mean(), len(chosen))
            metrics.add("margin_mean", (chosen - rejected).mean(), len(chosen))
        max_norm = args.max_grad_norm if args.max_grad_norm is not None else float("inf")
        metrics.add("grad_norm", accelerator.clip_grad_norm_(self.scorer.parameters(), max_norm))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        out = metrics.reduce(accelerator)
        out["learning_rate"] = self.scheduler.get_last_lr()[0]
        return out

    @torch.no_grad()
    def evaluate(self, dataset=None, batch_size: int = 64) -> dict[str, float]:
        """eval/accuracy, eval/margin_mean and eval/loss over every pair of ``dataset`` (default: eval_dataset)."""
        dataset = dataset if dataset is not None else self.eval_dataset
        if dataset is None:
            raise ValueError("evaluate() needs a dataset: pass one, or give the trainer an eval_dataset.")
        _check_pairs(dataset, "dataset")
        self.scorer.eval()
        metrics = StepMetrics()
        rank, world = self.accelerator.process_index, self.accelerator.num_processes
        for start in range(rank * batch_size, len(dataset), batch_size * world):
            rows = dataset[start:start + batch_size]
            chosen, rejected = self._pair_scores(rows)
            n = len(chosen)
            metrics.add("eval/loss", self.pair_loss(chosen, rejected, self._margins(rows, n)).mean(), n)
            metrics.add("eval/accuracy", (chosen > rejected).float().mean(), n)
            metrics.add("eval/margin_mean", (chosen - rejected).mean(), n)
        return metrics.reduce(self.accelerator)

    def train(self) -> list[dict]:
        args = self.args
        logger = MetricsLogger(args.output_dir, self.accelerator, self.max_steps, self.step, args.disable_tqdm)
        records = []
        while self.step < self.max_steps:
            logger.accumulate(self.training_step())
            self.step += 1
            if self.step % args.logging_steps == 0 or self.step == self.max_steps:
                records.append(logger.log(self.step))
            if self.eval_dataset is not None and ((args.eval_steps and self.step % args.eval_steps == 0)
                                                  or self.step == self.max_steps):
                records.append(logger.write(self.step, self.evaluate()))
            logger.advance()
        logger.close()
        return records

    def save_model(self, path: str | None = None) -> str:
        """Write the reward model and its tokenizer; ``AutoModelForSequenceClassification.from_pretrained``
        loads it."""
        path = path or os.path.join(self.args.output_dir, "model")
        self.accelerator.wait_for_everyone()
        state_dict = self.accelerator.get_state_dict(self.scorer)
        if self.accelerator.is_main_process:
            state_dict = {k[len("model."):]: v for k, v in state_dict.items() if k.startswith("model.")}
            with staged_directory(path) as tmp:
                save_pretrained_model(self.model, self.tokenizer, tmp, state_dict)
        self.accelerator.wait_for_everyone()
        return path

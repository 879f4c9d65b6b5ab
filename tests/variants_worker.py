"""Run by test_variants_multiprocess.py under `accelerate launch` with two CPU processes (gloo): for every new
variant, one rollout batch gathered from both processes, the gradient of one update on it (after the same
perturbation of the weights, so that the ratios are not 1), the reduced metrics, and what each process held."""

import sys

import torch
from accelerate.utils import gather_object
from helpers import accumulate, make_trainer
from multiproc_worker import gathered
from test_distillation import student, teacher
from test_dynamic_sampling import half_informative
from test_policy_variants import perturb

from rlhf.distributed import shutdown
from rlhf.extras.tiny import char_tokenizer
from rlhf.metrics import StepMetrics

COMMON = dict(mini_batch_size=16, micro_batch_size=4, num_epochs=2)
VARIANTS = {
    "gspo": dict(importance_sampling_level="sequence", loss_agg="seq-mean-token-mean"),
    "gspo_token": dict(importance_sampling_level="sequence_token"),
    "cispo": dict(policy_loss_type="cispo", clip_eps_low=0.05, clip_eps_high=0.05),
    "token_truncate": dict(rollout_correction="token_truncate", top_k=20),
    "sequence_mask": dict(rollout_correction="sequence_mask", rollout_correction_cap=1.84, top_p=0.9),
    "entropy": dict(top_entropy_quantile=0.3),
    "reinforce_pp_baseline": dict(algo="reinforce", baseline="reinforce++-baseline"),
    "dynamic": dict(reward=half_informative, filter_zero_std_groups=True, max_sampling_rounds=8),
    "distill": dict(model="student", distill_coef=0.5),
}


def build(out_dir: str, name: str):
    """The trainer of variant ``name`` (the test builds the one-process twin with this too)."""
    settings = {**COMMON, **VARIANTS[name]}
    if settings.pop("model", None) == "student":
        settings.update(model=student(), trainer_kwargs=dict(teacher_model=teacher(),
                                                             teacher_processing_class=char_tokenizer()))
    return make_trainer(f"{out_dir}/{name}", **settings)


def main(out_dir: str) -> None:
    results = {}
    for name in VARIANTS:
        trainer = build(out_dir, name)
        metrics = StepMetrics()
        batch, texts = trainer.make_rollout(0, metrics)
        reduced = metrics.reduce(trainer.accelerator)
        perturb(trainer.model)
        trainer.optimizer.zero_grad(set_to_none=True)
        accumulate(trainer, batch)
        grad = torch.cat([p.grad.reshape(-1) for p in trainer.model.parameters()])
        results[name] = {"batch": gathered(trainer, batch), "grad": grad, "metrics": reduced,
                         "rows": gather_object([batch.size]),
                         "texts": gather_object([(p, c) for p, c in zip(texts.prompts, texts.completions)])}
    if trainer.accelerator.is_main_process:
        torch.save({"world_size": trainer.accelerator.num_processes, "results": results}, out_dir + "/variants.pt")
    shutdown(trainer.accelerator)


if __name__ == "__main__":
    main(sys.argv[1])

"""Run by test_multiprocess.py under `accelerate launch` with two CPU processes (gloo).

Writes, from the main process, what the test compares against a one-process run: the world size, the
completions each process sampled for one shared prompt, the whole rollout batch gathered from both
processes, the gradient of one update, the reduced reward metric, and a greedy evaluation.
"""

import sys

import torch
from accelerate.utils import gather_object
from helpers import accumulate, make_trainer, prompt_completion_reward

from rlhf.distributed import shutdown
from rlhf.metrics import StepMetrics
from rlhf.rollout import generate_rollout

EVAL_PROMPTS = [{"prompt": f"{a}+{a + 3}="} for a in range(7)]  # 7: the processes get unequal shares
EVAL_SETTINGS = dict(reward=prompt_completion_reward, eval_batch_size=2, accuracy_reward="prompt_completion_reward",
                     accuracy_threshold=3.0)
PAD = {"prompt_ids": (0, True), "prompt_mask": (0, True)}  # key: (pad value, pad on the left)


def gathered(trainer, batch):
    out = {}
    for key, value in batch.tensors().items():
        if value.dim() == 2:
            pad, first = PAD.get(key, (0, False))
            value = trainer.accelerator.pad_across_processes(value, dim=1, pad_index=pad, pad_first=first)
        out[key] = trainer.accelerator.gather(value).cpu()
    return out


def main(out_dir: str) -> None:
    same_prompt = make_trainer(out_dir + "/same", mini_batch_size=16, micro_batch_size=4)
    same_prompt.train_dataset = same_prompt.train_dataset.map(lambda row: {"prompt": "5+5=", "answer": "10"})
    _, texts = generate_rollout(same_prompt.policy, same_prompt.train_dataset[same_prompt.sampler.indices(0)],
                                same_prompt.sampling, same_prompt.args.num_generations)
    completions = gather_object([texts.completions])

    evaluation = make_trainer(out_dir + "/eval", **EVAL_SETTINGS).evaluate(EVAL_PROMPTS, step=0)
    trainer = make_trainer(out_dir + "/grad", mini_batch_size=16, micro_batch_size=4, kl_coef=0.1)
    metrics = StepMetrics()
    batch, _ = trainer.make_rollout(0, metrics)
    reduced = metrics.reduce(trainer.accelerator)
    trainer.optimizer.zero_grad(set_to_none=True)
    accumulate(trainer, batch)
    grad = torch.cat([p.grad.reshape(-1) for p in trainer.model.parameters()])
    full = gathered(trainer, batch)
    if trainer.accelerator.is_main_process:
        torch.save({"world_size": trainer.accelerator.num_processes, "completions": completions, "batch": full,
                    "grad": grad, "reward_mean": reduced["reward/mean"],
                    "evaluation": evaluation}, out_dir + "/result.pt")
    shutdown(trainer.accelerator)


if __name__ == "__main__":
    main(sys.argv[1])

"""Run by test_agent.py::test_two_processes_match_one_on_multi_turn_rollouts under `accelerate launch` with two
CPU processes (gloo): multi-turn rollouts with an environment (whose turn counts differ between processes),
the whole batch gathered, and the gradient of one update."""

import sys

import torch
from agent_helpers import Countdown, agent_trainer, eos_heavy_model
from helpers import accumulate
from multiproc_worker import gathered

from rlhf.distributed import shutdown
from rlhf.extras.tiny import char_tokenizer

SETTINGS = dict(tools=None, environment_factory=Countdown, reward=None, num_generations=4, max_new_tokens=6,
                max_turns=3, temperature=1.0, mini_batch_size=16, micro_batch_size=4, kl_coef=0.1)
PROMPTS = ["1+2=", "3+4=", "5+6=", "7+8="]


def main(out_dir: str) -> None:
    trainer = agent_trainer(out_dir, eos_heavy_model(), char_tokenizer(), PROMPTS, **SETTINGS)
    batch, texts = trainer.make_rollout(0)
    trainer.optimizer.zero_grad(set_to_none=True)
    accumulate(trainer, batch)
    grad = torch.cat([p.grad.reshape(-1) for p in trainer.model.parameters()])
    full = gathered(trainer, batch)
    turns = trainer.accelerator.gather(torch.tensor(texts.episode_stats["turns"])).tolist()
    if trainer.accelerator.is_main_process:
        torch.save({"world_size": trainer.accelerator.num_processes, "batch": full, "grad": grad, "turns": turns},
                   out_dir + "/result.pt")
    shutdown(trainer.accelerator)


if __name__ == "__main__":
    main(sys.argv[1])

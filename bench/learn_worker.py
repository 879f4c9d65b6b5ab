"""One learning-benchmark run in its own process: one task, one method, one seed (bench/learn.py drives them).

Every method is scored by the same function (``heldout_scores``): completions of the held-out prompts (greedy, or
sampled at temperature 1 from a fixed seed), their accuracy and mean reward, every ``eval_every`` steps; the time it takes is left out of the training
wall-clock. Our runs also feed the training-health monitor (rlhf.monitor) and keep its alarms.

    python bench/learn_worker.py '<json spec>'     # prints one line: RESULT {...}
"""

import json
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import learn_tasks  # noqa: E402


@torch.no_grad()
def heldout_scores(model, tokenizer, dataset, rewards, correct, max_new_tokens: int, weights=None,
                   sampled: bool = False) -> tuple[float, float]:
    """(accuracy, mean reward) of completions of ``dataset``'s prompts, scored on their token ids: greedy, or
    sampled at temperature 1 from a fixed seed in a forked RNG (the training RNG is untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(12345)
        return _scores(model, tokenizer, dataset, rewards, correct, max_new_tokens, weights, sampled)


def _scores(model, tokenizer, dataset, rewards, correct, max_new_tokens, weights, sampled):
    from rlhf.data import left_pad, render_prompts, tokenize_prompts
    from rlhf.rewards import combine_rewards
    from rlhf.rollout import SamplingParams, sample_completions

    was_training = model.training
    model.eval()
    params = SamplingParams(max_new_tokens=max_new_tokens, do_sample=sampled)
    device = next(model.parameters()).device
    accuracy, reward, n = 0.0, 0.0, 0
    for start in range(0, len(dataset), 256):
        rows = dataset[start:start + 256]
        texts, chat = render_prompts(rows["prompt"], tokenizer)  # chat messages through the chat template
        ids, mask = left_pad(tokenize_prompts(texts, tokenizer, chat), tokenizer.pad_token_id)
        completion_ids, completion_mask, _ = sample_completions(model, ids.to(device), mask.to(device), params,
                                                                [tokenizer.eos_token_id], tokenizer.pad_token_id)
        lengths = completion_mask.sum(dim=1).tolist()
        id_lists = [row[:k] for row, k in zip(completion_ids.tolist(), lengths)]
        texts = tokenizer.batch_decode(id_lists, skip_special_tokens=True)
        columns = {k: v for k, v in rows.items() if k != "prompt"}
        table = torch.tensor([f(rows["prompt"], texts, completion_ids=id_lists, **columns) for f in rewards],
                             dtype=torch.float64).T
        reward += combine_rewards(table, weights or [1.0] * len(rewards)).sum().item()
        accuracy += sum(correct(rows["prompt"], texts, completion_ids=id_lists, **columns))
        n += len(texts)
    model.train(was_training)
    return accuracy / n, reward / n


class Curve:
    """Held-out scores against steps and training seconds (evaluation time excluded)."""

    def __init__(self, score):
        self.score, self.points, self.seconds = score, [], 0.0

    def add(self, step: int, model) -> dict:
        accuracy, reward = self.score(model)
        self.points.append([step, round(self.seconds, 3), accuracy, reward])
        return {"eval/accuracy": accuracy, "eval/reward_mean": reward}


def run_ours(spec: dict, task, method: str) -> dict:
    from rlhf import (
        GRPOConfig,
        GRPOTrainer,
        PPOConfig,
        PPOTrainer,
        ReinforceConfig,
        ReinforceTrainer,
        RLOOConfig,
        RLOOTrainer,
    )
    from rlhf.extras.tiny import char_tokenizer
    from rlhf.monitor import HealthMonitor

    algorithm, overrides = learn_tasks.METHODS[method]
    config_class, trainer_class = {"grpo": (GRPOConfig, GRPOTrainer), "ppo": (PPOConfig, PPOTrainer),
                                   "reinforce": (ReinforceConfig, ReinforceTrainer),
                                   "rloo": (RLOOConfig, RLOOTrainer)}[algorithm]
    train, heldout, rewards, correct = learn_tasks.task_data(task.name)
    args = config_class(
        output_dir=spec["output_dir"], seed=spec["seed"], max_steps=spec["steps"], learning_rate=task.learning_rate,
        **learn_tasks.matched_shape(task), reward_weights=learn_tasks.reward_weights(task.name), disable_tqdm=True,
        write_report=False, overwrite_output_dir=True,  # the bench owns its run directories: a rerun replaces
        **{**task.extra, **overrides})
    trainer = trainer_class(spec["model_dir"], rewards, args=args, train_dataset=train,
                            processing_class=None if task.real_model else char_tokenizer())
    main = trainer.accelerator.is_main_process
    model, tokenizer = trainer.unwrapped_model, trainer.tokenizer
    curve = Curve(lambda m: heldout_scores(m, tokenizer, heldout, rewards, correct, task.max_new_tokens,
                                           learn_tasks.reward_weights(task.name), task.sampled_eval))
    monitor = HealthMonitor(args.num_generations, args.max_grad_norm)
    alarms, history = [], []
    if main:
        curve.add(0, model)
    for step in range(1, spec["steps"] + 1):
        start = time.perf_counter()
        metrics = trainer.training_step()
        trainer.step += 1
        curve.seconds += time.perf_counter() - start
        history.append({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
        alarms += monitor.observe(step, metrics)
        if main and (step % spec["eval_every"] == 0 or step == spec["steps"]):
            alarms += monitor.observe_eval(step, curve.add(step, model))
    from rlhf.distributed import shutdown

    processes = trainer.accelerator.num_processes
    shutdown(trainer.accelerator)
    # The step metrics ride along so that a later monitor can be replayed on this run (bench/learn.py replay_alarms).
    return {"curve": curve.points, "alarms": [[a.step, a.name, a.message] for a in alarms],
            "monitor": {"group_size": args.num_generations, "max_grad_norm": args.max_grad_norm, "history": history},
            "num_processes": processes, "is_main": main}


def run_trl(spec: dict, task, method: str) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    train, heldout, rewards, correct = learn_tasks.task_data(task.name)
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"])
    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"], padding_side="left")
    completions = task.prompts_per_step * task.num_generations
    # TRL's defaults, except: the learning rate, the batch shape, the sampling and the schedule, matched to ours
    # (constant learning rate, no warm-up, temperature 1, no top-k / top-p, fp32 on the CPU).
    matched = dict(output_dir=spec["output_dir"], seed=spec["seed"], max_steps=spec["steps"],
                   learning_rate=task.learning_rate, num_generations=task.num_generations,
                   per_device_train_batch_size=completions, gradient_accumulation_steps=1,
                   max_completion_length=task.max_new_tokens, temperature=1.0, top_p=1.0, top_k=0,
                   lr_scheduler_type="constant", bf16=False, use_cpu=True, report_to="none", logging_steps=1,
                   save_strategy="no", disable_tqdm=True, dataloader_num_workers=0,
                   reward_weights=learn_tasks.reward_weights(task.name))
    if method == "trl_grpo":
        from trl import GRPOConfig as Config
        from trl import GRPOTrainer as Trainer
    else:
        from trl import RLOOConfig as Config
        from trl import RLOOTrainer as Trainer
    args = Config(**matched)
    curve = Curve(lambda m: heldout_scores(m, tokenizer, heldout, rewards, correct, task.max_new_tokens,
                                           learn_tasks.reward_weights(task.name), task.sampled_eval))
    clock = {"since": None}

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            clock["since"] = time.perf_counter()

        def on_step_end(self, args, state, control, model=None, **kwargs):
            curve.seconds += time.perf_counter() - clock["since"]
            if state.global_step % spec["eval_every"] == 0 or state.global_step == spec["steps"]:
                curve.add(state.global_step, model)

    curve.add(0, model)
    trainer = Trainer(model=model, reward_funcs=rewards, args=args, train_dataset=train, processing_class=tokenizer,
                      callbacks=[Clock()])
    trainer.train()
    return {"curve": curve.points, "alarms": None, "num_processes": 1, "is_main": True}


def main() -> None:
    spec = json.loads(sys.argv[1])
    torch.manual_seed(spec["seed"])
    task = learn_tasks.TASKS[spec["task"]]
    method = spec["method"]
    runner = run_trl if method.startswith("trl_") else run_ours
    result = runner(spec, task, method)
    if result.pop("is_main"):
        print("RESULT " + json.dumps({**{k: spec[k] for k in ("task", "method", "seed", "steps")}, **result}))


if __name__ == "__main__":
    main()

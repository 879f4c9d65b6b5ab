"""The learning benchmark's tasks and methods: what each run trains, with which settings, and how it is scored.

Three tasks of different shape:
- ``addition``: 2-digit addition from the demo's warm start (one warm start, seed 0, shared by every method and
  seed), exact-match correctness reward; held-out greedy accuracy on 500 problems disjoint from training.
- ``repeat``: from a random initialisation (seeded by the run's seed), a per-character reward in [0, 1]
  (``rlhf.extras.repeat``); accuracy: sampled completions (temperature 1) that are exactly the letter 8 times
  (greedy decoding is no measure here: a random init with tied embeddings already repeats the last token).
- ``arithmetic`` (`make learn-bench-real`): a real pretrained chat model, SmolLM2-135M-Instruct
  (rlhf/extras/real_model.py), asked small arithmetic questions in chat form (``rlhf.extras.arithmetic``): reward
  = right number (however worded) + the same again when nothing follows it; held-out accuracy: greedy replies
  with the right number, on 200 problems disjoint from training (as `make demo-real`).

Methods: our GRPO, PPO, RLOO and REINFORCE++ with their default settings (learning rate aside) on the task's batch
shape, our GRPO on two processes with the same global batch, and TRL's GRPOTrainer and RLOOTrainer, TRL's
defaults except the learning rate and the matched batch shape, sampling and schedule. "Batch shape" includes the
pass size: TRL runs the whole rollout batch in one forward/backward (per_device_train_batch_size = completions) and
so do we (micro_batch_size = completions). It changes no number, only speed: with the default micro_batch_size
of 8 the update here is 32 small passes and the step ~4.5x slower (0.72 s vs 0.16 s on addition, this 2-core Xeon).
"""

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field

from rlhf.extras import addition, arithmetic, repeat


@dataclass
class Task:
    name: str
    prompts_per_step: int
    num_generations: int
    max_new_tokens: int
    max_prompt_length: int
    learning_rate: float
    steps: int
    eval_every: int
    quick_steps: int = 3
    sampled_eval: bool = False  # score sampled completions (temperature 1) rather than greedy ones
    real_model: bool = False  # SmolLM2-135M-Instruct with its own tokenizer and chat template
    seeds: list[int] | None = None  # every method's seeds on this task (None: SEEDS / HEADLINE_SEEDS)
    extra: dict = field(default_factory=dict)


TASKS = {
    "addition": Task("addition", prompts_per_step=32, num_generations=8, max_new_tokens=6, max_prompt_length=16,
                     learning_rate=5e-5, steps=150, eval_every=10),
    # Greedy decoding of a random init with tied embeddings already repeats the prompt's last token: the task's
    # accuracy is that of samples at temperature 1 (what the policy would do), 4 per held-out prompt.
    "repeat": Task("repeat", prompts_per_step=16, num_generations=8, max_new_tokens=8, max_prompt_length=8,
                   learning_rate=3e-3, steps=120, eval_every=10, sampled_eval=True),
    # A real 135 M-parameter model at about 5-20 s a step on 2 cores: the shape (8 prompts x 4 completions x
    # 16 tokens), 20 steps, 3 seeds per method. lr 2e-5: 5e-5 collapsed the policy within a few steps here.
    "arithmetic": Task("arithmetic", prompts_per_step=8, num_generations=4, max_new_tokens=16, max_prompt_length=64,
                       learning_rate=2e-5, steps=20, eval_every=10, quick_steps=2, real_model=True, seeds=[0, 1, 2]),
}

# method -> (algorithm, config overrides beyond the task's shape and learning rate). Defaults otherwise.
METHODS = {
    "grpo": ("grpo", {}),
    "ppo": ("ppo", {}),
    "rloo": ("reinforce", {"baseline": "rloo"}),
    # RLOOTrainer: TRL's RLOO on our trainer (its defaults: beta 0.05 as a sequence KL in the reward, a sequence
    # importance ratio): which of the two RLOO set-ups is behind the gap to TRL's RLOOTrainer.
    "rloo_trainer": ("rloo", {}),
    # PPO with a 5x stronger KL in the reward: on SmolLM2 the default 0.01 let the KL to the reference reach 4-8 nats
    # per sequence and the entropy collapse within 10 steps while the critic explained none of the return variance.
    "ppo_kl05": ("ppo", {"kl_coef": 0.05}),
    # ... and a critic learning rate 10x the actor's: at lr 2e-5 AdamW moves the fresh value head's bias by at most
    # 2e-5 a step, 4e-4 in 20 steps, against returns of 0-2, so the critic cannot fit the mean return in this budget.
    "ppo_critic_lr": ("ppo", {"kl_coef": 0.05, "critic_learning_rate": 2e-4}),
    "reinforce++": ("reinforce", {"baseline": "reinforce++"}),
    "grpo_2proc": ("grpo", {}),  # launched on two processes, same global batch
    "trl_grpo": ("trl_grpo", {}),
    "trl_rloo": ("trl_rloo", {}),
    # The policy-gradient variants (`make learn-bench-variants`), each GRPO or REINFORCE with one switch.
    "gspo": ("grpo", {"importance_sampling_level": "sequence"}),
    "gspo_token": ("grpo", {"importance_sampling_level": "sequence_token"}),
    "cispo": ("grpo", {"policy_loss_type": "cispo"}),
    "entropy_top20": ("grpo", {"top_entropy_quantile": 0.2}),
    "dapo_dynamic": ("grpo", {"filter_zero_std_groups": True, "max_sampling_rounds": 3}),
    "rollout_correction": ("grpo", {"rollout_correction": "token_truncate"}),
    "reinforce++_baseline": ("reinforce", {"baseline": "reinforce++-baseline"}),
}
# Seeds per method. The comparison the benchmark exists for, our GRPO against TRL's, gets ten: on addition both
# plateau at 93-95% held-out accuracy, so the step at which a seed first reaches TRL's final is set by evaluation
# noise, and five seeds flipped the order of the medians (seeds 0-4: ours 60 steps, TRL 50; seeds 0-9: 60 and 75).
SEEDS = list(range(5))
HEADLINE_SEEDS = {"grpo": list(range(10)), "trl_grpo": list(range(10))}
# What `make learn-bench` runs; `make learn-bench-variants` runs VARIANTS (with grpo and trl_grpo to compare).
CORE = ["grpo", "ppo", "rloo", "reinforce++", "grpo_2proc", "trl_grpo", "trl_rloo"]
VARIANTS = ["grpo", "trl_grpo", "gspo", "gspo_token", "cispo", "entropy_top20", "dapo_dynamic", "rollout_correction",
            "reinforce++_baseline"]


def task_data(name: str):
    """(train dataset, held-out dataset, reward functions, the correctness function, the held-out metric's name)."""
    if name == "addition":
        train, heldout = addition.make_splits(digits=2, num_eval=500, seed=0)
        return train.select(range(300, len(train))), heldout, [addition.correctness_reward], \
            addition.correctness_reward
    if name == "repeat":
        train, heldout = repeat.make_dataset(1024, seed=1234), repeat.make_dataset(256, seed=99)
        # The exact-match column rides along with weight 0: logged, never trained on.
        return train, heldout, [repeat.repeat_reward, repeat.exact_repeat], repeat.exact_repeat
    if name == "arithmetic":
        train, heldout = arithmetic.make_splits(num_eval=200, seed=0)
        # As in `make demo-real`: the right number, once more when nothing follows it; the strict format logged only.
        return train, heldout, [arithmetic.correct_answer, arithmetic.concise_answer, arithmetic.exact_answer], \
            arithmetic.correct_answer
    raise ValueError(f"unknown task {name!r}")


def matched_shape(task: Task) -> dict:
    """Our config's batch settings for ``task``, as TRL's run gets them: every completion in one pass."""
    completions = task.prompts_per_step * task.num_generations
    return dict(prompts_per_step=task.prompts_per_step, num_generations=task.num_generations,
                max_new_tokens=task.max_new_tokens, max_prompt_length=task.max_prompt_length,
                micro_batch_size=completions)


def fingerprint(task: Task, method: str, steps: int, eval_every: int) -> str:
    """A short hash of everything that sets a run's numbers here (the code aside)."""
    settings = [asdict(task), METHODS[method], matched_shape(task), steps, eval_every]
    return hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]


def reward_weights(name: str) -> list[float] | None:
    return {"repeat": [1.0, 0.0], "arithmetic": [1.0, 1.0, 0.0]}.get(name)


def start_model_dir(name: str, seed: int, cache: str, quick: bool) -> str:
    """A saved starting model for ``name``: the shared warm start (addition) or the seed's random init (repeat)."""
    from rlhf.extras.tiny import char_tokenizer

    if name == "arithmetic":
        from rlhf.extras.real_model import smollm2

        return smollm2()  # the converted checkpoint, cached outside ``cache`` (rlhf/gguf.py)
    if name == "repeat":
        path = os.path.join(cache, f"repeat-init-seed{seed}")
        if not os.path.isdir(path):
            repeat.make_model(seed).save_pretrained(path)
            char_tokenizer().save_pretrained(path)
        return path
    settings = hashlib.sha1(json.dumps([addition.WARM_START, addition.WARM_START_TARGET], sort_keys=True).encode())
    path = os.path.join(cache, f"addition-warmstart-{settings.hexdigest()[:8]}" + ("-quick" if quick else ""))
    if not os.path.isdir(path):
        model, tokenizer, _ = addition.build_warm_start(seed=0, steps=10 if quick else None)
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
    return path

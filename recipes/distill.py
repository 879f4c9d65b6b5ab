"""On-policy distillation on the demo task: a larger tiny model (the teacher) teaches a smaller one (the student)
through the per-token reverse KL on the student's own samples. CPU only, no network.

    python recipes/distill.py [--seed 0]          # prepare teacher and student, distil, print held-out accuracy
    python recipes/distill.py --stage prepare     # only write outputs/distill/{teacher,student}
    accelerate launch --config_file recipes/accelerate/one_process.yaml recipes/grpo.py --config recipes/configs/demo_distill.yaml   # the distillation on its own

1. Teacher: the demo's 4-layer Llama (hidden 128), trained supervised until --teacher_accuracy on a validation split
   (or --teacher: an existing one, such as the demo's RL-trained model).
2. Student: a 2-layer Llama (hidden 64), warm-started supervised to --student_accuracy.
3. Distillation with recipes/configs/demo_distill.yaml: the GRPO trainer with ``teacher_model``; every token's
   advantage is log p_teacher - log p_student, with the task reward weighted 0 (the teacher is the only signal).
Writes outputs/distill/: teacher/, student/, run/ (metrics.jsonl, model/), summary.json.
"""

import argparse
import json
import os
import time

from rlhf import GRPOConfig, GRPOTrainer
from rlhf.cli import ScriptArguments, parse_args
from rlhf.extras.addition import correctness_reward, greedy_accuracy, make_splits, warm_start
from rlhf.extras.tiny import char_tokenizer, tiny_model

CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "demo_distill.yaml")
SIZES = {"teacher": dict(hidden_size=128, num_layers=4, num_heads=4), "student": dict(hidden_size=64, num_layers=2,
                                                                                     num_heads=4)}


def supervised(path: str, size: dict, train, validation, seed: int, target: float, max_steps: int) -> dict:
    """A tiny Llama of ``size`` trained on prompt -> answer until validation accuracy reaches ``target``."""
    tokenizer = char_tokenizer()
    model = tiny_model("llama", max_positions=32, tie_word_embeddings=False, seed=seed, **size)
    start = time.time()
    steps = warm_start(model, tokenizer, train, max_steps=max_steps, seed=seed, check_every=25,
                       stop=lambda step: greedy_accuracy(model, tokenizer, validation) >= target)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return {"steps": steps, "seconds": round(time.time() - start, 1),
            "parameters": sum(p.numel() for p in model.parameters()),
            "validation_accuracy": greedy_accuracy(model, tokenizer, validation)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output_dir", default="outputs/distill")
    parser.add_argument("--stage", choices=["all", "prepare"], default="all")
    parser.add_argument("--teacher", default=None, help="an existing teacher directory (e.g. outputs/demo/grpo/model, "
                        "the demo's RL-trained model) instead of training one")
    parser.add_argument("--teacher_accuracy", type=float, default=0.8)
    parser.add_argument("--student_accuracy", type=float, default=0.1)
    parser.add_argument("--max_steps", type=int, default=None, help="override the config's max_steps")
    cli = parser.parse_args()

    train, heldout = make_splits(digits=2, num_eval=500, seed=0)
    validation, train = train.select(range(300)), train.select(range(300, len(train)))
    summary = {"seed": cli.seed, "teacher_path": cli.teacher or os.path.join(cli.output_dir, "teacher")}
    roles = (("teacher", cli.teacher_accuracy, 6000), ("student", cli.student_accuracy, 3000))
    for role, target, limit in roles[1:] if cli.teacher else roles:
        path = os.path.join(cli.output_dir, role)
        print(f"[{role}] supervised until validation accuracy >= {target:.0%} -> {path}")
        summary[role] = supervised(path, SIZES[role], train, validation, cli.seed, target, limit)
        print(f"      {summary[role]}")
    if cli.stage == "prepare":
        return

    overrides = ["--model_name_or_path", os.path.join(cli.output_dir, "student"),
                 "--teacher_model", summary["teacher_path"], "--output_dir", os.path.join(cli.output_dir, "run")]
    if cli.max_steps is not None:
        overrides += ["--max_steps", str(cli.max_steps)]
    _, config = parse_args([ScriptArguments, GRPOConfig], ["--config", CONFIG, *overrides])
    trainer = GRPOTrainer(os.path.join(cli.output_dir, "student"), [correctness_reward], args=config,
                          train_dataset=train, eval_dataset=heldout)
    tokenizer = trainer.tokenizer
    teacher_heldout = greedy_accuracy(trainer.teacher, tokenizer, heldout)
    before = greedy_accuracy(trainer.unwrapped_model, tokenizer, heldout)
    start = time.time()
    trainer.train()
    trainer.save_model(os.path.join(config.output_dir, "model"))
    after = greedy_accuracy(trainer.unwrapped_model, tokenizer, heldout)
    summary.update(teacher_heldout=teacher_heldout, student_before=before, student_after=after,
                   distill_steps=config.max_steps, distill_seconds=round(time.time() - start, 1))
    with open(os.path.join(cli.output_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(f"held-out greedy accuracy on {len(heldout)} problems (seed {cli.seed}): teacher {teacher_heldout:.1%}; "
          f"student {before:.1%} -> {after:.1%} after {config.max_steps} steps of distillation "
          f"({summary['distill_seconds']} s)")


if __name__ == "__main__":
    main()

"""The learning benchmark (`make learn-bench`): our GRPO, PPO, RLOO and REINFORCE++ (defaults, learning rate aside),
our GRPO on two processes, and TRL's GRPOTrainer and RLOOTrainer, on the same starting model, reward and batch
shape, on two tasks (bench/learn_tasks.py), for several seeds each. Writes a table (held-out accuracy before and
after, with the spread over seeds; steps and training seconds to reach TRL GRPO's final accuracy; the
training-health monitor's alarms) to bench/LEARN.md and a PNG of accuracy against steps and seconds (mean and
min-max band over seeds) to bench/learn_curves.png.

    make learn-bench                             # everything: 10 seeds for our GRPO and TRL's, 5 for the rest
    python bench/learn.py --quick --out /tmp/x   # one seed, a few steps (a test runs this)
    python bench/learn.py --methods grpo,trl_grpo --tasks repeat --seeds 0,1

Runs already in --out with the same settings are reused (delete them to rerun); each is one process (two for grpo_2proc).
"""

import argparse
import datetime
import json
import math
import os
import platform
import socket
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import learn_tasks  # noqa: E402
from rlhf.extras.machine import cpu_name  # noqa: E402

REFERENCE = "trl_grpo"


def free_port() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])


def run_one(spec: dict) -> dict:
    command = [sys.executable, os.path.join(HERE, "learn_worker.py"), json.dumps(spec)]
    if spec["method"].endswith("_2proc"):
        command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                   os.path.join(ROOT, "recipes", "accelerate", "cpu_2proc.yaml"), "--main_process_port", free_port(),
                   *command[1:]]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600)
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    if result.returncode != 0 or not lines:
        raise RuntimeError(f"{spec['task']}/{spec['method']}/seed{spec['seed']} failed:\n"
                           f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def collect(args) -> dict:
    """{task: {method: [result per seed]}}, running what --out does not hold yet."""
    cache = os.path.join(args.out, "models")
    os.makedirs(cache, exist_ok=True)
    out = {}
    for task_name in args.tasks:
        task = learn_tasks.TASKS[task_name]
        steps = task.quick_steps if args.quick else task.steps
        eval_every = max(1, steps // 3) if args.quick else task.eval_every
        for method in args.methods:
            for seed in args.seeds or task.seeds or learn_tasks.HEADLINE_SEEDS.get(method, learn_tasks.SEEDS):
                # The settings' fingerprint is in the name: a run with other settings is never reused for these.
                settings = learn_tasks.fingerprint(task, method, steps, eval_every)
                path = os.path.join(args.out, task_name, method, f"seed{seed}-{settings}.json")
                if not os.path.exists(path):
                    if args.stored_only:
                        continue
                    spec = {"task": task_name, "method": method, "seed": seed, "steps": steps,
                            "eval_every": eval_every, "quick": args.quick,
                            "model_dir": learn_tasks.start_model_dir(task_name, seed, cache, args.quick),
                            "output_dir": os.path.join(args.out, "runs", task_name, method, f"seed{seed}")}
                    print(f"{task_name} / {method} / seed {seed} ...", flush=True)
                    result = run_one(spec)
                    os.makedirs(os.path.dirname(path), exist_ok=True)
                    with open(path, "w") as f:
                        json.dump(result, f)
                with open(path) as f:
                    out.setdefault(task_name, {}).setdefault(method, []).append(json.load(f))
    return out


def first_reaching(curve: list, target: float) -> tuple[int, float] | None:
    """(step, training seconds) of the first evaluation at or above ``target``."""
    return next(((step, seconds) for step, seconds, accuracy, _ in curve if accuracy >= target - 1e-9), None)


def median_reaching(values: list[float | None]) -> str:
    """The median over seeds of the steps (or seconds) to the target, a seed that never reaches it counting as
    infinitely many: "never" when half the seeds or more do not; the count of those that do when not all."""
    if not values:
        return "-"
    median = statistics.median(math.inf if v is None else v for v in values)
    reached = sum(v is not None for v in values)
    text = "never" if math.isinf(median) else f"{median:.0f}"
    return text if reached == len(values) else f"{text} ({reached}/{len(values)} seeds reach it)"


def replay_alarms(run: dict) -> list[list] | None:
    """The alarms today's monitor (rlhf/monitor.py) raises on a stored run, fed as the worker fed it: every step's
    metrics, and the held-out scores at each evaluation after step 0. None for a run that is not ours; a run stored
    before the metrics were kept gives the alarms recorded when it ran."""
    from rlhf.monitor import HealthMonitor

    if run["alarms"] is None or "monitor" not in run:
        return run["alarms"]
    settings = run["monitor"]
    monitor = HealthMonitor(settings["group_size"], settings["max_grad_norm"])
    evals = {step: {"eval/accuracy": accuracy, "eval/reward_mean": reward}
             for step, _, accuracy, reward in run["curve"][1:]}
    alarms = []
    for step, metrics in enumerate(settings["history"], start=1):
        alarms += monitor.observe(step, metrics)
        if step in evals:
            alarms += monitor.observe_eval(step, evals[step])
    return [[a.step, a.name, a.message] for a in alarms]


def spread(values: list[float]) -> str:
    mean = statistics.mean(values)
    return f"{100 * mean:.1f} ({100 * min(values):.1f}-{100 * max(values):.1f})" if len(values) > 1 else \
        f"{100 * mean:.1f}"


def table(results: dict) -> str:
    lines = []
    for task_name, methods in results.items():
        reference = methods.get(REFERENCE)
        target = statistics.median(r["curve"][-1][2] for r in reference) if reference else None
        lines += [f"### {task_name}" + (f" (TRL GRPO's final accuracy, median over seeds: {100 * target:.1f}%)"
                                        if target is not None else ""), "",
                  "| method | seeds | accuracy before % | after % (min-max) | "
                  "steps to TRL GRPO's final (median over seeds) | "
                  "training s to it (median) | s/step | health alarms |", "|---|---|---|---|---|---|---|---|"]
        for method, runs in methods.items():
            before = [r["curve"][0][2] for r in runs]
            after = [r["curve"][-1][2] for r in runs]
            reach = [first_reaching(r["curve"], target) for r in runs] if target is not None else []
            steps, seconds = median_reaching([x and x[0] for x in reach]), median_reaching([x and x[1] for x in reach])
            per_step = statistics.median(r["curve"][-1][1] / max(1, r["curve"][-1][0]) for r in runs)
            replayed = [replay_alarms(r) for r in runs]
            alarms = ("n/a" if replayed[0] is None else
                      ", ".join(sorted({a[1] for alarms in replayed for a in alarms})) or "none")
            lines.append(f"| {method} | {len(runs)} | {spread(before)} | {spread(after)} | {steps} | {seconds} | "
                         f"{per_step:.2f} | {alarms} |")
        lines.append("")
    return "\n".join(lines)


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(results)
    figure, axes = plt.subplots(len(tasks), 2, figsize=(12, 4 * len(tasks)), squeeze=False)
    for row, task_name in enumerate(tasks):
        for col, (index, label) in enumerate(((0, "step"), (1, "training seconds"))):
            axis = axes[row][col]
            for method, runs in results[task_name].items():
                points = [[(p[index], p[2]) for p in r["curve"]] for r in runs]
                length = min(len(p) for p in points)
                xs = [statistics.mean(p[i][0] for p in points) for i in range(length)]
                ys = [[p[i][1] * 100 for p in points] for i in range(length)]
                line, = axis.plot(xs, [statistics.mean(y) for y in ys], label=method)
                axis.fill_between(xs, [min(y) for y in ys], [max(y) for y in ys], alpha=0.15, color=line.get_color())
            axis.set_xlabel(label)
            axis.set_ylabel("held-out accuracy (%)")
            axis.set_title(f"{task_name}: accuracy vs {label} (mean, min-max band)")
            axis.grid(alpha=0.3)
        axes[row][0].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one seed, a few steps")
    parser.add_argument("--tasks", default=",".join(learn_tasks.TASKS))
    parser.add_argument("--methods", default=",".join(learn_tasks.CORE),
                        help="comma-separated names of bench/learn_tasks.py METHODS, or 'variants'")
    parser.add_argument("--seeds", default=None, help="comma-separated, for every method (default: 0-9 for our GRPO "
                                                      "and TRL's, 0-4 for the rest; --quick: 0)")
    parser.add_argument("--out", default=os.path.join(HERE, "results", "learn"))
    parser.add_argument("--stored-only", action="store_true",
                        help="build the table from the runs --out holds, running none (the seeds column counts them)")
    parser.add_argument("--report", default=None, help="markdown report path (default: bench/LEARN.md, or "
                                                       "<out>/LEARN.md with --quick)")
    args = parser.parse_args()
    args.tasks = args.tasks.split(",")
    args.methods = learn_tasks.VARIANTS if args.methods == "variants" else args.methods.split(",")
    args.seeds = [int(s) for s in (args.seeds or "0").split(",")] if args.seeds or args.quick else None
    report = args.report or (os.path.join(args.out, "LEARN.md") if args.quick else os.path.join(HERE, "LEARN.md"))
    os.makedirs(os.path.dirname(os.path.abspath(report)), exist_ok=True)  # before the runs, not after them
    results = collect(args)
    name = os.path.splitext(os.path.basename(report))[0].lower()  # LEARN.md -> learn_curves.png
    png = os.path.join(os.path.dirname(report), f"{name}_curves.png")
    plot(results, png)
    text = (f"# Learning benchmark\n\n`bench/learn.py --tasks {','.join(args.tasks)}` on {datetime.date.today()}, "
            f"{cpu_name()}, {os.cpu_count()} cores, {platform.platform()}; seeds "
            f"{args.seeds or 'as in the seeds column (bench/learn_tasks.py: SEEDS, HEADLINE_SEEDS, a task`s own)'}"
            f"{' (quick mode)' if args.quick else ''}. Curves: `{os.path.basename(png)}`. Settings: "
            "bench/learn_tasks.py. Steps and seconds to TRL GRPO's final accuracy: the first evaluation at or above "
            "it, the median over seeds, a seed that never gets there counting as infinitely many; s/step: training "
            "time only (evaluations excluded), median over seeds.\n\n" + table(results))
    with open(report, "w") as f:
        f.write(text)
    print(text)
    print(f"written: {report}, {png}")


if __name__ == "__main__":
    main()

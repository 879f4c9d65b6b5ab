"""One benchmark run in its own process (so that peak memory is its own): ours (GRPO or PPO) or TRL's
GRPOTrainer, on the model directory and settings the driver (bench/run.py) gives.

Prints one JSON line: seconds per step, per phase for ours, and peak memory.
"""

import argparse
import contextlib
import json
import os
import resource
import statistics
import threading
import time

import torch
from datasets import Dataset


def prompts(n: int, length: int = 40) -> Dataset:
    """Fixed prompts of ``length`` tokens (the character tokenizer: one per character, plus <bos>)."""
    rows = []
    for i in range(n):
        text = f"Q{i:03d}: add {i * 7 % 97} and {i * 13 % 89}; answer = "
        text = (text * (length // len(text) + 1))[-(length - 1):]
        rows.append({"prompt": text})
    return Dataset.from_list(rows)


def chat_prompts(n: int) -> Dataset:
    """The first ``n`` training prompts of the real model's task (rlhf/extras/arithmetic.py), as conversations."""
    from rlhf.extras.arithmetic import make_splits

    return make_splits()[0].select(range(n)).select_columns(["prompt"])


def length_reward(prompts, completions, **kwargs):
    """A cheap reward (the benchmark measures the trainer, not the reward); completions are texts, or conversations
    (one assistant message) with chat prompts."""
    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return [float(sum(ch.isdigit() for ch in c)) / max(1, len(c)) for c in texts]


def train_prompts(spec: dict) -> Dataset:
    shape = spec["shape"]
    return chat_prompts(64) if shape.get("chat") else prompts(64, shape["prompt_length"])


def peak_memory_mb(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def rss_mb() -> float:
    """Resident memory of this process now (Linux /proc)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class RssSampler:
    """Samples this process's RSS every ``interval`` seconds in a thread; ``phase(name)`` labels the samples, and
    ``peaks`` holds the highest RSS seen during each label (a short spike between two samples can be missed;
    ``resource``'s ru_maxrss, the whole run's peak, cannot)."""

    def __init__(self, interval: float = 0.002):
        self.interval, self.label, self.peaks = interval, "setup", {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            now = rss_mb()
            self.peaks[self.label] = max(self.peaks.get(self.label, 0.0), now)
            time.sleep(self.interval)

    @contextlib.contextmanager
    def phase(self, name: str):
        previous, self.label = self.label, name
        try:
            yield
        finally:
            self.peaks[name] = max(self.peaks.get(name, 0.0), rss_mb())
            self.label = previous

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join()
        return self.peaks


def labelled_timer(sampler: RssSampler):
    """A PhaseTimer that also labels the RSS samples with the phase it times."""
    from rlhf.metrics import PhaseTimer

    class LabelledTimer(PhaseTimer):
        @contextlib.contextmanager
        def __call__(self, phase: str):
            with sampler.phase(phase), super().__call__(phase):
                yield

    return LabelledTimer()


def summary(step_seconds: list[float], warmup: int, tokens_per_step: int, device: str, extra: dict) -> dict:
    measured = step_seconds[warmup:]
    median = statistics.median(measured)
    return {"step_seconds": step_seconds, "median_step_s": median, "tokens_per_s": tokens_per_step / median,
            "peak_memory_mb": peak_memory_mb(device), **extra}


def run_ours(spec: dict) -> dict:
    from rlhf import GRPOConfig, GRPOTrainer, PPOConfig, PPOTrainer
    from rlhf.metrics import PhaseTimer

    algo = spec["algo"]
    config_class, trainer_class = {"grpo": (GRPOConfig, GRPOTrainer), "ppo": (PPOConfig, PPOTrainer)}[algo]
    shape = spec["shape"]
    extra = {"kl_coef": 0.0} if algo == "grpo" else {"kl_coef": 0.05, "critic_learning_rate": 1e-5}
    args = config_class(
        output_dir=spec["output_dir"], seed=0, max_steps=spec["steps"], prompts_per_step=shape["prompts"],
        num_generations=shape["generations"], max_new_tokens=shape["new_tokens"],
        min_new_tokens=0 if shape.get("natural_eos") else shape["new_tokens"],
        mini_batch_size=shape["prompts"] * shape["generations"], micro_batch_size=shape["micro_batch"],
        max_prompt_length=None, temperature=1.0, top_p=1.0, top_k=0, learning_rate=1e-5, max_grad_norm=1.0,
        loss_agg="token-mean", dtype=shape["dtype"], mixed_precision=spec.get("mixed_precision"), disable_tqdm=True,
        **extra)
    baseline = rss_mb()  # interpreter, torch, transformers and rlhf imported; no model yet
    sampler = RssSampler() if spec.get("memory") else None
    trainer = trainer_class(spec["model_dir"], [length_reward], args=args, train_dataset=train_prompts(spec))
    timer = labelled_timer(sampler) if sampler is not None else PhaseTimer()
    steps, phases, lengths, mismatch = [], [], [], []
    for _ in range(spec["steps"]):
        timer.seconds.clear()
        start = time.perf_counter()
        metrics = trainer.training_step(timer)
        if spec["device"] == "cuda":
            torch.cuda.synchronize()
        steps.append(time.perf_counter() - start)
        phases.append({k.removeprefix("time/"): v for k, v in metrics.items() if k.startswith("time/")})
        lengths.append(metrics["completions/mean_length"])
        mismatch.append(metrics.get("rollout/abs_log_ratio"))
        trainer.step += 1
    warmup = min(spec["warmup"], spec["steps"] - 1)  # at least one measured step
    per_phase = {name: statistics.median(p[name] for p in phases[warmup:]) for name in phases[-1]}
    rows = shape["prompts"] * shape["generations"]
    tokens = rows * statistics.mean(lengths[warmup:])
    # the sampler's log-probs against the trainer's, per token (bf16 autocast: what the precision costs; with EOS
    # suppressed the sampler's distribution also differs by the EOS mass it takes away)
    extra = {"phases": per_phase, "baseline_rss_mb": baseline, "mean_length": statistics.mean(lengths[warmup:]),
             "sampler_abs_log_ratio": mismatch}
    if sampler is not None:
        extra["phase_peak_rss_mb"] = sampler.stop()
    return summary(steps, warmup, tokens, spec["device"], extra)


def run_trl(spec: dict) -> dict:
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    baseline = rss_mb()  # interpreter, torch, transformers and trl imported; no model yet
    shape = spec["shape"]
    completions = shape["prompts"] * shape["generations"]
    times, lengths = [], []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if not times:
                times.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            if spec["device"] == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "completions/mean_length" in logs:
                lengths.append(logs["completions/mean_length"])

    natural_eos = shape.get("natural_eos", False)
    args = GRPOConfig(
        output_dir=spec["output_dir"], seed=0, max_steps=spec["steps"], num_generations=shape["generations"],
        per_device_train_batch_size=shape["micro_batch"],
        gradient_accumulation_steps=completions // shape["micro_batch"],
        max_completion_length=shape["new_tokens"],
        generation_kwargs={} if natural_eos else {"min_new_tokens": shape["new_tokens"]},
        temperature=1.0, top_p=1.0, top_k=0, learning_rate=1e-5, lr_scheduler_type="constant", max_grad_norm=1.0,
        beta=0.0, loss_type="dapo", scale_rewards="group", num_iterations=1, optim="adamw_torch_fused",
        bf16=shape["dtype"] == "bfloat16" or spec.get("mixed_precision") == "bf16", gradient_checkpointing=False,
        disable_dropout=True, use_cpu=spec["device"] == "cpu", logging_steps=1, save_strategy="no", report_to="none",
        disable_tqdm=True, dataloader_num_workers=0,
    )
    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"], padding_side="left")
    model_kwargs = {"dtype": torch.bfloat16} if shape["dtype"] == "bfloat16" else {}
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], **model_kwargs)
    trainer = GRPOTrainer(model=model, reward_funcs=[length_reward], args=args, train_dataset=train_prompts(spec),
                          processing_class=tokenizer, callbacks=[StepTimer()])
    trainer.train()
    steps = [b - a for a, b in zip(times, times[1:])]
    mean_length = statistics.mean(lengths[spec["warmup"]:]) if len(lengths) > spec["warmup"] else shape["new_tokens"]
    return summary(steps, spec["warmup"], completions * mean_length, spec["device"],
                   {"baseline_rss_mb": baseline, "mean_length": mean_length})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("which", choices=["ours", "trl"])
    parser.add_argument("spec", help="JSON settings from the driver")
    args = parser.parse_args()
    spec = json.loads(args.spec)
    torch.manual_seed(0)
    result = run_ours(spec) if args.which == "ours" else run_trl(spec)
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()

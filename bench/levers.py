"""One speed lever at a time, on the real model, with the lever on and off, the same seed, interleaved.

    python bench/levers.py [--lever leave|draw|packing] [--repeats 3] [--threads 2]     # needs `make real-model`

Levers:
- ``leave``: finished rows leave the decode batch (``rlhf.decode.LEAVE_FRACTION``; off = every row runs to the end,
  as transformers' generate does). Times generation of 8 chat prompts x 8 completions x up to 64 new tokens, natural
  EOS, and says whether the tokens were the same.
- ``draw``: the sampled token drawn by inverse CDF, one uniform number per row (``rlhf.decode.DRAW``, default),
  against ``generate``'s ``torch.multinomial`` (B x V exponential numbers a step). Times generation at the shape of
  ``leave``; the tokens differ (another random stream), so it reports both settings' mean completion length.
- ``packing``: the update's forward and backward (log-probs of the completions through the chunked head, micro-batches
  of 16 rows, the prompt once per group) on packed prompt trees (``rlhf.packing``) against the plain layout, on a
  rollout sampled once at that shape (8 x 4 by default, the bench's); says how far the log-probs and gradients of the
  two layouts are apart.

Prints the median time of each setting and the rows' lengths. The numbers go into bench/RESULTS.md with the machine.
"""

import argparse
import json
import statistics
import time

import torch

import rlhf.decode
from rlhf import packing
from rlhf.data import left_pad
from rlhf.extras.machine import describe_machine
from rlhf.extras.real_model import smollm2
from rlhf.forward import completion_logprobs, enable_token_scoring
from rlhf.rollout import SamplingParams, sample_completions


# Levers of the decode loop: the rlhf.decode attribute each sets, and its settings (default first).
GENERATION_LEVERS = {
    "leave": ("LEAVE_FRACTION", {"rows leave (default)": rlhf.decode.LEAVE_FRACTION,
                                 "every row to the end": float("inf")}),
    "draw": ("DRAW", {"inverse CDF (default)": "inverse_cdf", "multinomial": "multinomial"}),
}


def _timed(run, settings: dict, repeats: int) -> tuple[dict, dict]:
    """``run(name, value, repeat)`` for each setting, interleaved; the first round warms up and is not counted.
    Returns the seconds of each setting and each round's outputs."""
    seconds = {name: [] for name in settings}
    outputs = {}
    for repeat in range(repeats + 1):
        for name, value in settings.items():
            start = time.perf_counter()
            out = run(name, value, repeat)
            if repeat:
                seconds[name].append(time.perf_counter() - start)
            outputs.setdefault(repeat, {})[name] = out
    return seconds, outputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lever", choices=["leave", "draw", "packing"], default="leave")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--generations", type=int, default=None, help="default: 8 (leave, draw), 4 (packing)")
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--micro_batch", type=int, default=16)
    cli = parser.parse_args()
    generations = cli.generations or (4 if cli.lever == "packing" else 8)
    torch.set_num_threads(cli.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhf.extras.arithmetic import make_splits

    path = smollm2()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    prompts = make_splits()[0].select(range(cli.prompts))["prompt"]
    texts = [tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=False) for p in prompts]
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    prompt_ids, mask = left_pad(ids, tokenizer.pad_token_id)
    prompt_ids = prompt_ids.repeat_interleave(generations, dim=0)
    mask = mask.repeat_interleave(generations, dim=0)
    params = SamplingParams(max_new_tokens=cli.max_new_tokens)

    def sample(seed: int):
        torch.manual_seed(seed)
        return sample_completions(model, prompt_ids, mask, params, [tokenizer.eos_token_id], tokenizer.pad_token_id,
                                  group_size=generations)[:2]

    result = {"machine": describe_machine(), "lever": cli.lever, "rows": len(prompt_ids),
              "max_new_tokens": cli.max_new_tokens}
    if cli.lever in GENERATION_LEVERS:
        attribute, settings = GENERATION_LEVERS[cli.lever]

        def run(name, value, repeat):
            setattr(rlhf.decode, attribute, value)
            return sample(repeat)

        seconds, outputs = _timed(run, settings, cli.repeats)
        completion_mask = outputs[0][next(iter(settings))][1]
        result["mean_length"] = {name: round(statistics.mean(float(o[name][1].sum(dim=1).float().mean())
                                                             for o in outputs.values()), 1) for name in settings}
        if cli.lever == "leave":  # the same random stream either way: the same tokens
            result["same_tokens"] = all(torch.equal(*(o[0] for o in round_.values())) for round_ in outputs.values())
    else:
        completion_ids, completion_mask = sample(0)
        enable_token_scoring(model)

        def run(name, enabled, repeat):
            packing.ENABLED = enabled
            model.zero_grad(set_to_none=True)
            logprobs = []
            for start in range(0, len(prompt_ids), cli.micro_batch):
                rows = slice(start, start + cli.micro_batch)
                batch = [prompt_ids[rows], mask[rows], completion_ids[rows], completion_mask[rows]]
                last = int(batch[3].sum(dim=0).nonzero()[-1]) + 1  # trimmed to the micro-batch's longest, as the
                batch[2], batch[3] = batch[2][:, :last], batch[3][:, :last]  # trainer does
                out, _ = completion_logprobs(model, *batch, group_size=generations)
                (out * batch[3]).sum().backward()
                logprobs.append(torch.nn.functional.pad(out.detach(), (0, completion_ids.shape[1] - last)))
            grad = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
            return torch.cat(logprobs), grad

        settings = {"packed trees (default)": True, "plain layout": False}
        seconds, outputs = _timed(run, settings, cli.repeats)
        packed, plain = outputs[1].values()
        valid = completion_mask.bool()
        result["max_abs_logprob_difference"] = float((packed[0] - plain[0])[valid].abs().max())
        result["gradient_relative_difference"] = float((packed[1] - plain[1]).norm() / plain[1].norm())
    lengths = completion_mask.sum(dim=1).tolist()
    result.update({"lengths": {"min": min(lengths), "median": statistics.median(lengths), "max": max(lengths)},
                   "median_seconds": {name: round(statistics.median(s), 2) for name, s in seconds.items()},
                   "all_seconds": {name: [round(x, 2) for x in s] for name, s in seconds.items()}})
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

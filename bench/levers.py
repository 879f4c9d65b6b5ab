"""One speed lever at a time, on the real model: generation of the real-model case's shape (8 chat prompts x 8
completions x up to 64 new tokens, natural EOS) with the lever on and off, the same seed, one after the other.

    python bench/levers.py [--repeats 3] [--threads 2]     # needs `make real-model`

Lever measured: finished rows leave the decode batch (``rlhf.decode.LEAVE_FRACTION``; off = every row runs to the
end, as transformers' generate does). Prints the median generation time of each setting, the rows' lengths and
whether the tokens were the same. The numbers go into bench/RESULTS.md with the machine.
"""

import argparse
import json
import statistics
import time

import torch

import rlhf.decode
from rlhf.data import left_pad
from rlhf.extras.machine import describe_machine
from rlhf.extras.real_model import smollm2
from rlhf.rollout import SamplingParams, sample_completions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--max_new_tokens", type=int, default=64)
    cli = parser.parse_args()
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
    prompt_ids = prompt_ids.repeat_interleave(cli.generations, dim=0)
    mask = mask.repeat_interleave(cli.generations, dim=0)
    params = SamplingParams(max_new_tokens=cli.max_new_tokens)
    settings = {"rows leave (default)": rlhf.decode.LEAVE_FRACTION, "every row to the end": float("inf")}
    seconds = {name: [] for name in settings}
    outputs = {}
    for repeat in range(cli.repeats + 1):  # the first round warms up and is not counted
        for name, fraction in settings.items():
            rlhf.decode.LEAVE_FRACTION = fraction
            torch.manual_seed(repeat)
            start = time.perf_counter()
            completion_ids, completion_mask = sample_completions(
                model, prompt_ids, mask, params, [tokenizer.eos_token_id], tokenizer.pad_token_id,
                group_size=cli.generations)[:2]
            if repeat:
                seconds[name].append(time.perf_counter() - start)
            outputs.setdefault(repeat, {})[name] = completion_ids
    lengths = completion_mask.sum(dim=1).tolist()
    same = all(torch.equal(*round_.values()) for round_ in outputs.values())
    result = {"machine": describe_machine(), "rows": len(prompt_ids), "max_new_tokens": cli.max_new_tokens,
              "lengths": {"min": min(lengths), "median": statistics.median(lengths), "max": max(lengths)},
              "median_seconds": {name: round(statistics.median(s), 2) for name, s in seconds.items()},
              "all_seconds": {name: [round(x, 2) for x in s] for name, s in seconds.items()},
              "same_tokens": same}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

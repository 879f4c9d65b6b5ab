"""A synthetic preference task, generated locally: short replies made of words, judged by a hidden
"gold" score (+1 per kind word, -1 per unkind word, -0.5 per word beyond eight). Pairs of replies
with different gold scores become (chosen, rejected) preferences, so a reward model has something to
learn and the gold score tells whether RL against that reward model really improved the replies.

    python -m rlhf.extras.synthetic outputs/rlhf_chain     # write data and tiny models (see prepare)
"""

import argparse
import json
import os
import random

from datasets import Dataset

KIND = ("thanks", "great", "glad", "happy", "kind", "sure")
UNKIND = ("no", "bad", "rude", "awful", "hate", "never")
NEUTRAL = ("the", "it", "is", "we", "you", "ok", "so", "then", "maybe", "a")
TOPICS = ("my order", "the weather", "a refund", "your help", "the meeting", "my code")


def gold_score(text: str) -> float:
    """The hidden preference: +1 per kind word, -1 per unkind word, -0.5 per word beyond eight.

    >>> gold_score("thanks so glad")
    2.0
    """
    words = text.split()
    return float(sum(w in KIND for w in words) - sum(w in UNKIND for w in words)) - 0.5 * max(0, len(words) - 8)


def gold_reward(prompts, completions, **kwargs) -> list[float]:
    """The gold score as a reward function (for evaluation: RL trains on the learned reward model)."""
    return [gold_score(c if isinstance(c, str) else c[-1]["content"]) for c in completions]


def random_reply(rng: random.Random) -> str:
    words = KIND + UNKIND + NEUTRAL + NEUTRAL  # neutral words twice as likely
    return " ".join(rng.choice(words) for _ in range(rng.randint(3, 10)))


def prompt_for(rng: random.Random) -> str:
    return f"Reply about {rng.choice(TOPICS)}:"


def preference_pairs(n: int, seed: int = 0) -> Dataset:
    """``n`` pairs with columns prompt, chosen, rejected, margin (the gold-score difference)."""
    rng = random.Random(seed)
    rows = []
    while len(rows) < n:
        a, b = random_reply(rng), random_reply(rng)
        if gold_score(a) == gold_score(b):
            continue
        chosen, rejected = (a, b) if gold_score(a) > gold_score(b) else (b, a)
        rows.append({"prompt": prompt_for(rng) + " ", "chosen": chosen, "rejected": rejected,
                     "margin": gold_score(chosen) - gold_score(rejected)})
    return Dataset.from_list(rows)


def prompts(n: int, seed: int = 0) -> Dataset:
    rng = random.Random(seed)
    return Dataset.from_list([{"prompt": prompt_for(rng) + " "} for _ in range(n)])


def train_pairs() -> Dataset:
    return preference_pairs(2000, seed=0)


def eval_pairs() -> Dataset:
    return preference_pairs(400, seed=1)


def train_prompts() -> Dataset:
    return prompts(1000, seed=2)


def eval_prompts() -> Dataset:
    return prompts(64, seed=3)


def prepare(directory: str, warm_start_steps: int = 150, seed: int = 0) -> dict[str, str]:
    """Write what the RLHF chain starts from, in place of a hub download: ``base/`` (a random tiny Llama
    and the character tokenizer, the reward model's starting point) and ``policy/`` (the same
    architecture after a short supervised pass on random replies, so that it writes words and stops)."""
    import torch

    from rlhf.extras.addition import warm_start
    from rlhf.extras.tiny import char_tokenizer, tiny_model

    paths = {"base": os.path.join(directory, "base"), "policy": os.path.join(directory, "policy")}
    tokenizer = char_tokenizer()
    make = lambda: tiny_model("llama", hidden_size=64, num_layers=2, num_heads=4, max_positions=128,  # noqa: E731
                              tie_word_embeddings=False, seed=seed)
    make().save_pretrained(paths["base"])
    tokenizer.save_pretrained(paths["base"])
    rng = random.Random(seed)
    replies = Dataset.from_list([{"prompt": prompt_for(rng) + " ", "answer": random_reply(rng)} for _ in range(4000)])
    policy = make()
    torch.manual_seed(seed)
    warm_start(policy, tokenizer, replies, max_steps=warm_start_steps, batch_size=64, seed=seed)
    policy.save_pretrained(paths["policy"])
    tokenizer.save_pretrained(paths["policy"])
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("directory")
    parser.add_argument("--warm_start_steps", type=int, default=150)
    args = parser.parse_args()
    print(json.dumps(prepare(args.directory, args.warm_start_steps), indent=2))


if __name__ == "__main__":
    main()

"""Multi-digit addition: prompts "17+25=", answer "42". A task with an exact, cheap correctness check,
small enough that a tiny model learns it on a CPU in minutes.

- ``make_splits``: disjoint train / held-out datasets (columns ``prompt`` and ``answer``).
- ``correctness_reward``: 1.0 when the completion is exactly the answer, else 0.0.
- ``digit_match_reward``: partial credit per correct digit, a denser signal for small models.
- ``warm_start``: a short supervised pass (teacher forcing on prompt -> answer + EOS), stopped early
  on purpose so that RL has room to improve.
- ``greedy_accuracy``: held-out exact-match accuracy of greedy completions.
"""

import math
import random

import torch
from datasets import Dataset

from rlhf.data import left_pad
from rlhf.rewards import correctness
from rlhf.rollout import SamplingParams, sample_completions


def make_splits(digits: int = 2, num_eval: int = 500, seed: int = 0) -> tuple[Dataset, Dataset]:
    """Every pair of ``digits``-digit operands, shuffled and split into (train, held-out)."""
    low, high = 10 ** (digits - 1) if digits > 1 else 0, 10**digits
    pairs = [(a, b) for a in range(low, high) for b in range(low, high)]
    random.Random(seed).shuffle(pairs)
    rows = [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a, b in pairs]
    return Dataset.from_list(rows[num_eval:]), Dataset.from_list(rows[:num_eval])


def train_split() -> Dataset:
    """The default training prompts (for recipes: ``dataset_name: rlhf.extras.addition:train_split``)."""
    return make_splits()[0]


def eval_split() -> Dataset:
    """The default held-out prompts, disjoint from ``train_split``."""
    return make_splits()[1]


@correctness
def correctness_reward(prompts, completions, answer, **kwargs) -> list[float]:
    """1.0 if the completion (whitespace stripped) is exactly the answer, else 0.0.

    >>> correctness_reward(["2+2="], ["4"], answer=["4"])
    [1.0]
    """
    return [float(c.strip() == a) for c, a in zip(completions, answer)]


def digit_match_reward(prompts, completions, answer, **kwargs) -> list[float]:
    """Partial credit: the fraction of the answer's digits that the completion gets right, aligned from
    the right (units with units), minus the same penalty for every extra character.

    >>> digit_match_reward(["17+25="], ["52"], answer=["42"])
    [0.5]
    """
    scores = []
    for completion, target in zip(completions, answer):
        text = completion.strip()
        matches = sum(a == b for a, b in zip(reversed(text), reversed(target)))
        extra = max(0, len(text) - len(target))
        scores.append((matches - extra) / len(target))
    return scores


def units_carry(prompt: str) -> bool:
    """Whether the units digits of "a+b=" carry into the tens.

    >>> units_carry("17+25="), units_carry("12+34=")
    (True, False)
    """
    a, b = prompt.rstrip("=").split("+")
    return int(a[-1]) + int(b[-1]) >= 10


def dropped_carry_answer(prompt: str) -> str:
    """The answer with the units carry forgotten (the classic schoolchild slip): "17+25=" -> "32".

    >>> dropped_carry_answer("17+25="), dropped_carry_answer("12+34=")
    ('32', '46')
    """
    a, b = map(int, prompt.rstrip("=").split("+"))
    return str(a + b - 10 * units_carry(prompt))


def taught_answers(rows: list[dict], rng: random.Random, drop_carry: float = 0.0) -> list[str]:
    """The answers the warm start teaches for ``rows``: each one's own, except that with probability ``drop_carry``
    (drawn from ``rng``) it is ``dropped_carry_answer`` (the same as the right one when nothing carries)."""
    if not drop_carry:
        return [r["answer"] for r in rows]
    return [dropped_carry_answer(r["prompt"]) if rng.random() < drop_carry else r["answer"] for r in rows]


def _sft_batch(rows: list[dict], tokenizer, device, answers: list[str] | None = None):
    prompt_ids = tokenizer([r["prompt"] for r in rows])["input_ids"]
    answers = [r["answer"] for r in rows] if answers is None else answers
    answer_ids = tokenizer(answers, add_special_tokens=False)["input_ids"]
    sequences = [p + a + [tokenizer.eos_token_id] for p, a in zip(prompt_ids, answer_ids)]
    width = max(map(len, sequences))
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, (seq, p) in enumerate(zip(sequences, prompt_ids)):
        ids[i, : len(seq)] = torch.tensor(seq)
        labels[i, len(p) : len(seq)] = torch.tensor(seq[len(p) :])  # loss on the answer and EOS only
    attention = (labels != -100) | (torch.arange(width) < torch.tensor([len(p) for p in prompt_ids]).unsqueeze(1))
    return ids.to(device), attention.long().to(device), labels.to(device)


def warm_start(model, tokenizer, dataset: Dataset, max_steps: int, batch_size: int = 128, lr: float = 3e-3,
               warmup_steps: int = 50, seed: int = 0, check_every: int = 25, stop=None,
               schedule: str = "constant", min_lr_ratio: float = 0.0, max_grad_norm: float | None = None,
               drop_carry: float = 0.0, settle_steps: int = 0) -> int:
    """Supervised fine-tuning on prompt -> answer + EOS (AdamW, linear warm-up over ``warmup_steps``, then
    ``schedule``: "constant" at ``lr``, or "cosine" / "linear" decay to ``min_lr_ratio * lr`` at ``max_steps``),
    with the gradient norm clipped to ``max_grad_norm`` if given. With ``drop_carry`` > 0, each example drawn is
    taught with its units carry forgotten (``dropped_carry_answer``) with that probability: a systematic flaw
    that RL can fix.

    Every ``check_every`` steps ``stop(step)`` is called (if given); training ends when it returns True or after
    ``max_steps``; with ``settle_steps``, it goes on for that many steps after ``stop`` fires, the lr falling
    linearly to 0 (a converged end point rather than a snapshot of a noisy trajectory). Returns the number of
    steps taken.
    """
    if schedule not in ("constant", "cosine", "linear"):
        raise ValueError(f"schedule={schedule!r} must be constant, cosine or linear.")
    device = next(model.parameters()).device
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.0)

    settle = {}  # once stop() fires: the step it fired at and the lr factor then

    def factor(s: int) -> float:  # s optimizer steps taken so far; the lr of step s + 1
        if settle:
            return settle["factor"] * max(0.0, 1 - (s - settle["step"]) / settle_steps)
        if s < warmup_steps:
            return (s + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (s - warmup_steps) / max(1, max_steps - warmup_steps))
        decay = 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1 - progress
        return min_lr_ratio + (1 - min_lr_ratio) * decay

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    rng = random.Random(seed)
    rows_all = dataset.to_list()
    step, end = 0, max_steps
    while step < end:
        step += 1
        model.train()
        rows = [rng.choice(rows_all) for _ in range(batch_size)]
        ids, attention, labels = _sft_batch(rows, tokenizer, device, taught_answers(rows, rng, drop_carry))
        model(input_ids=ids, attention_mask=attention, labels=labels).loss.backward()
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if not settle and stop is not None and step % check_every == 0 and stop(step):
            if not settle_steps:
                break
            settle.update(step=step, factor=factor(step))  # the lr of the next step is unchanged, then falls
            end = step + settle_steps
    model.eval()
    return step


@torch.no_grad()
def answer_probability(model, tokenizer, rows: list[dict], answers: list[str] | None = None,
                       batch_size: int = 256) -> list[float]:
    """P(answer + EOS | prompt) under ``model`` for each row (teacher forcing; ``answers`` default to the rows'
    own): exact, so it does not carry the sampling noise of an accuracy."""
    answers = [r["answer"] for r in rows] if answers is None else answers
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    for i in range(0, len(rows), batch_size):
        ids, attention, labels = _sft_batch(rows[i : i + batch_size], tokenizer, device, answers[i : i + batch_size])
        logits = model(input_ids=ids, attention_mask=attention).logits[:, :-1].float()
        target = labels[:, 1:]
        logp = torch.log_softmax(logits, -1).gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        out += (logp * (target != -100)).sum(1).exp().tolist()
    model.train(was_training)
    return out


# The demo's warm start (bench/demo/NOTES.md has the measurements behind it). Supervised on answers whose units
# carry is forgotten 75% of the time, until the model has learnt the rest of addition (mean P(correct) >= 0.85 on
# the validation problems without a carry, checked every 50 steps), then 100 steps with the lr falling to 0.
# The start this gives is set by the data, not by where a noisy trajectory happened to be: greedy decoding is
# right on the problems without a carry (58% of the held-out ones) and wrong on most with one, where the right
# answer still has ~25% of the probability, so sampled groups disagree and RL has a signal to fix the flaw.
WARM_START = dict(max_steps=2000, batch_size=128, lr=1e-3, warmup_steps=50, schedule="constant", drop_carry=0.75,
                  settle_steps=100, check_every=50)
WARM_START_TARGET = 0.85  # mean P(correct answer) on the validation problems without a carry


def demo_model(seed: int):
    """The demo's tiny Llama (hidden 128, 4 layers) and the character tokenizer, randomly initialised."""
    from rlhf.extras.tiny import char_tokenizer, tiny_model

    model = tiny_model("llama", hidden_size=128, num_layers=4, num_heads=4, max_positions=32,
                       tie_word_embeddings=False, seed=seed)
    return model, char_tokenizer()


def demo_splits():
    """(train, validation, held-out) as the demo uses them: 300 validation problems cut from the training split."""
    train, heldout = make_splits(digits=2, num_eval=500, seed=0)
    return train.select(range(300, len(train))), train.select(range(300)), heldout


def build_warm_start(seed: int = 0, steps: int | None = None, log=None):
    """The demo's warm-started model (``WARM_START``; ``steps`` caps its length, for quick tests). Returns (model,
    tokenizer, steps taken). ``log(step, p)`` if given sees each check of the stop rule."""
    model, tokenizer = demo_model(seed)
    train, validation, _ = demo_splits()
    plain = [r for r in validation.to_list() if not units_carry(r["prompt"])]

    def learnt(step: int) -> bool:
        p = sum(answer_probability(model, tokenizer, plain)) / len(plain)
        if log is not None:
            log(step, p)
        return p >= WARM_START_TARGET

    settings = {**WARM_START, **({"max_steps": steps} if steps is not None else {})}
    taken = warm_start(model, tokenizer, train, seed=seed, stop=learnt, **settings)
    return model, tokenizer, taken


@torch.no_grad()
def greedy_accuracy(model, tokenizer, dataset: Dataset, batch_size: int = 256, max_new_tokens: int = 8) -> float:
    """Fraction of prompts whose greedy completion is exactly the answer."""
    device = next(model.parameters()).device
    params = SamplingParams(max_new_tokens=max_new_tokens, do_sample=False)
    correct = 0
    for start in range(0, len(dataset), batch_size):
        rows = dataset[start : start + batch_size]
        ids, mask = left_pad(tokenizer(rows["prompt"])["input_ids"], tokenizer.pad_token_id)
        completion_ids, completion_mask, _ = sample_completions(
            model, ids.to(device), mask.to(device), params, [tokenizer.eos_token_id], tokenizer.pad_token_id
        )
        lengths = completion_mask.sum(dim=1).tolist()
        texts = tokenizer.batch_decode([row[:n] for row, n in zip(completion_ids.tolist(), lengths)],
                                       skip_special_tokens=True)
        correct += sum(correctness_reward(None, texts, rows["answer"]))
    return correct / len(dataset)


def warm_start_profile(model, tokenizer) -> dict:
    """What makes a warm start the demo's: held-out greedy accuracy on problems with and without a units carry (the
    flaw RL fixes is in the first), and the stop rule's quantity, mean P(correct) on validation problems without a
    carry. Two builds on different machines differ bit-wise; they should agree on these."""
    _, validation, heldout = demo_splits()
    carry = heldout.filter(lambda r: units_carry(r["prompt"]))
    plain = heldout.filter(lambda r: not units_carry(r["prompt"]))
    plain_validation = [r for r in validation.to_list() if not units_carry(r["prompt"])]
    return {"heldout_accuracy": round(greedy_accuracy(model, tokenizer, heldout), 4),
            "heldout_accuracy_carry": round(greedy_accuracy(model, tokenizer, carry), 4),
            "heldout_accuracy_no_carry": round(greedy_accuracy(model, tokenizer, plain), 4),
            "p_correct_no_carry": round(sum(answer_probability(model, tokenizer, plain_validation))
                                        / len(plain_validation), 4)}


PROFILE_TOLERANCE = 0.10  # a rebuilt warm start matches the shipped one when each profile value is within this


def profile_differences(shipped: dict, rebuilt: dict, tolerance: float = PROFILE_TOLERANCE) -> list[str]:
    """The profile values of a rebuilt warm start that are further than ``tolerance`` from the shipped one's."""
    return [f"{name}: shipped {shipped[name]:.3f}, rebuilt {rebuilt[name]:.3f}" for name in shipped
            if abs(shipped[name] - rebuilt[name]) > tolerance]

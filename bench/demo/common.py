"""Shared helpers for the demo experiments in bench/demo: exact answer probabilities of a model (teacher forcing),
split by whether the problem carries, so a warm start can be described by numbers that do not depend on sampling."""
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from rlhf.extras.addition import _sft_batch, dropped_carry_answer, units_carry  # noqa: E402

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out")


@torch.no_grad()
def answer_logprob(model, tokenizer, rows, answers, batch_size=256):
    """log P(answer + EOS | prompt) for each row, teacher-forced."""
    out = []
    model.eval()
    for i in range(0, len(rows), batch_size):
        ids, att, labels = _sft_batch(rows[i:i + batch_size], tokenizer, "cpu", answers[i:i + batch_size])
        logits = model(input_ids=ids, attention_mask=att).logits[:, :-1].float()
        tgt = labels[:, 1:]
        lp = torch.log_softmax(logits, -1).gather(-1, tgt.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        out += (lp * (tgt != -100)).sum(1).tolist()
    return out


def describe(model, tokenizer, dataset):
    """Mean P(correct) on carry / no-carry problems, mean P(dropped-carry answer) on carry problems, and the share
    of problems whose most likely answer (of the two) is correct."""
    rows = dataset.to_list()
    carry = [r for r in rows if units_carry(r["prompt"])]
    plain = [r for r in rows if not units_carry(r["prompt"])]
    pc = torch.tensor(answer_logprob(model, tokenizer, carry, [r["answer"] for r in carry])).exp()
    pd = torch.tensor(answer_logprob(model, tokenizer, carry, [dropped_carry_answer(r["prompt"]) for r in carry])).exp()
    pp = torch.tensor(answer_logprob(model, tokenizer, plain, [r["answer"] for r in plain])).exp()
    return {"p_correct_carry": round(pc.mean().item(), 4), "p_dropped_carry": round(pd.mean().item(), 4),
            "p_correct_plain": round(pp.mean().item(), 4), "carry_share": round(len(carry) / len(rows), 3),
            "expected_reward": round((pc.sum() + pp.sum()).item() / len(rows), 4)}

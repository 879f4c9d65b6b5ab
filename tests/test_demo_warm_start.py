"""The demo's warm start does what recipes/demo.py says: it teaches the forgotten-carry flaw at the stated rate
and only where a carry exists, it anneals for ``settle_steps`` after its stop rule fires, and its stop rule
reads an exact answer probability. (The full seeds x algos x threads matrix is bench/demo/matrix.py, not a test.)"""

import math
import random

import pytest
import torch

from rlhf.extras.addition import (
    WARM_START,
    answer_probability,
    build_warm_start,
    demo_model,
    demo_splits,
    dropped_carry_answer,
    make_splits,
    taught_answers,
    units_carry,
    warm_start,
)


def test_dropped_carry_answer_is_the_sum_without_the_units_carry():
    for a in range(10, 100):
        for b in range(10, 100):
            prompt = f"{a}+{b}="
            carry = (a % 10 + b % 10) >= 10
            assert units_carry(prompt) == carry
            assert dropped_carry_answer(prompt) == str(a + b - 10 * carry)


def test_taught_answers_drop_the_carry_at_the_stated_rate_and_only_where_one_exists():
    rows = make_splits(digits=2, num_eval=0, seed=0)[0].to_list()
    rng = random.Random(0)
    batch = [rng.choice(rows) for _ in range(20000)]
    taught = taught_answers(batch, random.Random(1), WARM_START["drop_carry"])
    carry = [(r, t) for r, t in zip(batch, taught) if units_carry(r["prompt"])]
    assert all(t == r["answer"] for r, t in zip(batch, taught) if not units_carry(r["prompt"]))
    assert all(t in (r["answer"], dropped_carry_answer(r["prompt"])) for r, t in carry)
    share = sum(t != r["answer"] for r, t in carry) / len(carry)
    assert abs(share - WARM_START["drop_carry"]) < 0.02, share
    assert taught_answers(batch[:50], random.Random(1), 0.0) == [r["answer"] for r in batch[:50]]


def test_answer_probability_is_the_exact_teacher_forced_probability():
    torch.manual_seed(0)
    model, tokenizer = demo_model(seed=0)
    rows = [{"prompt": "17+25=", "answer": "42"}, {"prompt": "12+34=", "answer": "46"}]
    p = answer_probability(model, tokenizer, rows)
    for row, prob in zip(rows, p):
        prompt = tokenizer(row["prompt"])["input_ids"]
        seq = prompt + tokenizer(row["answer"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([seq])).logits[0].float(), -1)
        expected = sum(logp[i - 1, seq[i]].item() for i in range(len(prompt), len(seq)))
        assert math.isclose(prob, math.exp(expected), rel_tol=1e-4)
    # the answers argument scores other answers to the same prompts
    q = answer_probability(model, tokenizer, rows, ["32", "46"])
    assert q[1] == p[1] and q[0] != p[0]


def test_warm_start_anneals_for_settle_steps_after_the_stop_rule_fires():
    model, tokenizer = demo_model(seed=0)
    train = make_splits(digits=2, num_eval=0, seed=0)[0]
    lrs = []
    original = torch.optim.AdamW.step

    def recording_step(self, *args, **kwargs):
        lrs.append(self.param_groups[0]["lr"])
        return original(self, *args, **kwargs)

    torch.optim.AdamW.step = recording_step
    try:
        steps = warm_start(model, tokenizer, train, max_steps=100, batch_size=4, lr=1e-3, warmup_steps=2,
                           check_every=3, stop=lambda step: step >= 6, settle_steps=4, drop_carry=0.5)
    finally:
        torch.optim.AdamW.step = original
    assert steps == 10 and len(lrs) == 10  # fired at step 6, then 4 more
    assert lrs[:2] == [5e-4, 1e-3] and lrs[2:7] == [1e-3] * 5
    assert lrs[7:] == [1e-3 * 3 / 4, 1e-3 * 2 / 4, 1e-3 * 1 / 4]
    assert not model.training


def test_build_warm_start_stops_within_its_cap():
    model, tokenizer, steps = build_warm_start(seed=0, steps=3)
    assert steps == 3
    _, validation, heldout = demo_splits()
    assert len(validation) == 300 and len(heldout) == 500
    assert not set(validation["prompt"]) & set(heldout["prompt"])


# ---------------------------------------------------------------------------------------------------- the shipped one
def _recipes():
    import os
    import sys

    recipes = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "recipes")
    if recipes not in sys.path:
        sys.path.insert(0, recipes)
    import demo_warm_start

    return demo_warm_start


def test_the_shipped_warm_start_is_what_its_record_says():
    """recipes/demo_warmstart/ loads from safetensors, and its profile measured now is the one recorded when it was
    built (up to a flipped near-tie of greedy decoding on another machine): the demo's premise, with the flaw."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhf.extras.addition import profile_differences, warm_start_profile

    demo_warm_start = _recipes()
    meta = demo_warm_start.read_meta(demo_warm_start.SHIPPED)
    assert meta["key"]["seed"] == demo_warm_start.SHIPPED_SEED and meta["key"]["settings"] == WARM_START
    model = AutoModelForCausalLM.from_pretrained(demo_warm_start.SHIPPED, use_safetensors=True).eval()
    profile = warm_start_profile(model, AutoTokenizer.from_pretrained(demo_warm_start.SHIPPED))
    assert profile_differences(meta["record"]["profile"], profile, tolerance=0.02) == []
    assert profile["heldout_accuracy_no_carry"] >= 0.95 and profile["heldout_accuracy_carry"] <= 0.2  # the flaw
    assert profile["p_correct_no_carry"] >= 0.85  # the stop rule's target was reached


def test_the_demo_takes_the_shipped_warm_start_for_seed_0_only(tmp_path):
    import json
    import os

    demo_warm_start = _recipes()
    path = tmp_path / "warmstart"
    os.makedirs(path)
    (path / "stale.txt").write_text("from another build")
    record = demo_warm_start.warm_start_stage(str(path), 0)
    assert record["warm_start_source"] == "shipped" and not (path / "stale.txt").exists()
    assert sorted(os.listdir(path)) == sorted(os.listdir(demo_warm_start.SHIPPED))
    # another seed: reused when this machine built it with the same settings, never the shipped one
    other = tmp_path / "seed1"
    os.makedirs(other)
    built = {"warm_start_steps": 3, "warm_start_seconds": 1.0}
    (other / "warm_start.json").write_text(json.dumps({"key": demo_warm_start.key(1), "record": built}))
    assert demo_warm_start.warm_start_stage(str(other), 1) == {**built, "warm_start_source": "reused"}


def test_profile_differences_name_what_moved():
    from rlhf.extras.addition import profile_differences

    shipped = {"heldout_accuracy": 0.6, "p_correct_no_carry": 0.96}
    assert profile_differences(shipped, {"heldout_accuracy": 0.65, "p_correct_no_carry": 0.96}) == []
    assert profile_differences(shipped, {"heldout_accuracy": 0.85, "p_correct_no_carry": 0.96}) == [
        "heldout_accuracy: shipped 0.600, rebuilt 0.850"]


@pytest.mark.slow
def test_a_rebuild_here_matches_the_shipped_warm_start():
    """`make warm-start-check`: the seed-0 build on this machine agrees with the shipped one (several minutes)."""
    import os
    import subprocess
    import sys

    demo_warm_start = _recipes()
    result = subprocess.run([sys.executable, demo_warm_start.__file__, "check"], capture_output=True, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=3600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

"""Dataset adapters (loading, column mapping, answer extraction, prompt format) and evaluation (greedy
accuracy, pass@k, samples, saved model == in-memory model)."""

import itertools
import json
import math

import pytest
import torch
from datasets import Dataset
from helpers import make_trainer

from rlhf import GRPOConfig
from rlhf.cli import ConfigError, ScriptArguments, parse_args
from rlhf.dataset_adapters import (
    gsm8k_answer,
    last_number,
    load_dataset_spec,
    prepare_dataset,
)
from rlhf.evaluation import PolicyEvaluator
from rlhf.rewards import build_reward_functions, correctness
from rlhf.extras.tiny import EOS_ID, char_tokenizer, tiny_model
from rlhf.evaluation import pass_at_k

GSM8K_MAPPING = {"prompt": "question", "answer": "answer|gsm8k_answer"}


# ------------------------------------------------------------------ answer extraction and mapping
@pytest.mark.parametrize("solution, expected", [
    ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72", "72"),
    ("So the total is $1,234.\n#### 1,234", "1234"),
    ("It falls by 5.\n#### -5", "-5"),
    ("Half of 7 is 3.5\n####3.5 ", "3.5"),
    ("#### 4 #### 8", "8"),  # the last marker wins
])
def test_gsm8k_answer_takes_the_number_after_the_marker(solution, expected):
    assert gsm8k_answer(solution) == expected


@pytest.mark.parametrize("solution", ["no marker at all: 42", "ends with the marker ####   "])
def test_gsm8k_answer_rejects_solutions_without_a_final_answer(solution):
    with pytest.raises(ValueError):
        gsm8k_answer(solution)


def test_last_number():
    assert last_number("3 apples, then 1,200 more") == "1200"
    assert last_number("a loss of -2.5 points") == "-2.5"
    with pytest.raises(ValueError):
        last_number("no digits")


def test_mapping_renames_extracts_and_keeps_other_columns():
    rows = [{"question": "What is 2 + 2?", "answer": "2 + 2 = 4\n#### 4", "id": 7}]
    out = prepare_dataset(Dataset.from_list(rows), GSM8K_MAPPING).to_list()
    assert out == [{"question": "What is 2 + 2?", "answer": "4", "id": 7, "prompt": "What is 2 + 2?"}]


def test_template_system_prompt_and_chat_messages():
    rows = [{"question": "What is 2 + 2?", "answer": "#### 4"}]
    out = prepare_dataset(Dataset.from_list(rows), GSM8K_MAPPING, prompt_template="Q: {prompt} (id {answer})",
                          system_prompt="Think first.", conversational=True).to_list()
    assert out[0]["prompt"] == [{"role": "system", "content": "Think first."},
                                {"role": "user", "content": "Q: What is 2 + 2? (id 4)"}]
    plain = prepare_dataset(Dataset.from_list([{"prompt": "hi"}]), conversational=True).to_list()
    assert plain[0]["prompt"] == [{"role": "user", "content": "hi"}]


def test_mapping_errors_name_the_column_the_row_and_the_fix():
    data = Dataset.from_list([{"question": "q1", "answer": "#### 1"}, {"question": "q2", "answer": "no answer"}])
    with pytest.raises(ValueError, match=r"row 1: cannot map column 'answer' to 'answer'.*no answer"):
        prepare_dataset(data, GSM8K_MAPPING, name="train_dataset")
    with pytest.raises(ValueError, match=r"reads column\(s\) \['problem'\].*columns: \['question', 'answer'\]"):
        prepare_dataset(data, {"prompt": "problem"})
    with pytest.raises(ValueError, match="unknown transform 'gsm8k'"):
        prepare_dataset(data, {"answer": "answer|gsm8k"})
    with pytest.raises(ValueError, match="no 'prompt' column after dataset_mapping"):
        prepare_dataset(data, {"answer": "answer|gsm8k_answer"}, max_samples=1)
    with pytest.raises(ValueError, match="system_prompt needs conversational"):
        prepare_dataset(data, GSM8K_MAPPING, system_prompt="x")
    with pytest.raises(ValueError, match="prompt_template names 'topic'"):
        prepare_dataset(data, GSM8K_MAPPING, prompt_template="{topic}: {prompt}", max_samples=1)


def test_mapping_from_yaml_and_command_line(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("dataset_mapping:\n  prompt: question\n  answer: answer|gsm8k_answer\nmax_train_samples: 2\n")
    script, _ = parse_args([ScriptArguments, GRPOConfig], ["--config", str(config)])
    assert script.dataset_mapping == GSM8K_MAPPING and script.max_train_samples == 2
    script, _ = parse_args([ScriptArguments, GRPOConfig],
                           ["--dataset_mapping", "prompt=question", "answer=answer|gsm8k_answer"])
    assert script.dataset_mapping == GSM8K_MAPPING
    with pytest.raises(ConfigError, match="key=value"):
        parse_args([ScriptArguments, GRPOConfig], ["--dataset_mapping", "question"])


def test_load_datasets_from_files_with_mapping_and_limits(tmp_path):
    rows = [{"question": f"q{i}", "answer": f"#### {i}"} for i in range(5)]
    Dataset.from_list(rows).to_parquet(str(tmp_path / "train.parquet"))
    with open(tmp_path / "test.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    script = ScriptArguments(dataset_name=str(tmp_path / "train.parquet"), eval_dataset_name=str(tmp_path / "test.jsonl"),
                             dataset_mapping=GSM8K_MAPPING, max_train_samples=3, max_eval_samples=2)
    train, evaluation = script.load_datasets()
    assert train["answer"] == ["0", "1", "2"] and train["prompt"] == ["q0", "q1", "q2"]
    assert evaluation["answer"] == ["0", "1"]
    assert load_dataset_spec(str(tmp_path / "test.jsonl")).to_list() == rows
    with pytest.raises(ValueError, match="unsupported data file type '.txt'"):
        (tmp_path / "notes.txt").write_text("x")
        load_dataset_spec(str(tmp_path / "notes.txt"))


# ------------------------------------------------------------------ evaluation
def brute_force_pass_at_k(n: int, c: int, k: int) -> float:
    """The probability that a random k-subset of n samples, c of them correct, holds a correct one."""
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(i < c for i in subset) for subset in subsets) / len(subsets)


@pytest.mark.parametrize("n", [1, 4, 7])
def test_pass_at_k_equals_enumeration(n):
    for k in range(1, n + 1):
        expected = [brute_force_pass_at_k(n, c, k) for c in range(n + 1)]
        got = pass_at_k(torch.arange(n + 1), n, k).tolist()
        assert got == pytest.approx(expected, abs=1e-12)
    assert pass_at_k(torch.tensor([3]), 8, 1).item() == pytest.approx(3 / 8)


def digit_share(prompts, completions, **kwargs):
    """Fraction of the completion's characters that are digits: varied on a random model's output."""
    return [sum(ch.isdigit() for ch in c) / max(1, len(c)) for c in completions]


EVAL_PROMPTS = [{"prompt": p} for p in ["1+1=", "12+30=", "7+8=", "99+1=", "5+5=", "40+2="]]


def test_greedy_evaluation_equals_one_prompt_at_a_time_generation(tmp_path):
    """A second path: HF generate, one unpadded prompt at a time, stopping at EOS, scored by the same reward."""
    model = tiny_model("llama", hidden_size=32, num_layers=2, num_heads=2, seed=3)
    tokenizer = char_tokenizer()
    trainer = make_trainer(tmp_path, model=model, reward=digit_share, max_new_tokens=7, eval_batch_size=4,
                           accuracy_reward="digit_share", accuracy_threshold=0.3, eval_log_samples=6)
    metrics = trainer.evaluate(EVAL_PROMPTS, step=5)

    rewards, lengths = [], []
    for row in EVAL_PROMPTS:
        ids = torch.tensor([tokenizer(row["prompt"])["input_ids"]])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=7,
                             eos_token_id=EOS_ID, pad_token_id=0)[0, ids.shape[1]:].tolist()
        out = out[:out.index(EOS_ID) + 1] if EOS_ID in out else out
        lengths.append(len(out))
        rewards += digit_share(None, [tokenizer.decode(out, skip_special_tokens=True)])
    assert metrics["eval/reward_mean"] == pytest.approx(sum(rewards) / len(rewards), abs=1e-12)
    assert metrics["eval/accuracy"] == pytest.approx(sum(r >= 0.3 for r in rewards) / len(rewards), abs=1e-12)
    assert metrics["eval/mean_length"] == pytest.approx(sum(lengths) / len(lengths))
    samples = [json.loads(line) for line in (tmp_path / "samples-5.jsonl").read_text().splitlines()]
    assert [s["prompt"] for s in samples] == [r["prompt"] for r in EVAL_PROMPTS[:4]]  # the first generate batch
    assert [s["rewards"]["digit_share"] for s in samples] == pytest.approx(rewards[:4])


def test_accuracy_uses_the_marked_correctness_reward_and_rejects_unknown_names(tmp_path):
    @correctness
    def always_right(prompts, completions, **kwargs):
        return [1.0] * len(completions)

    def half(prompts, completions, **kwargs):
        return [0.5] * len(completions)

    trainer = make_trainer(tmp_path, reward=half, trainer_kwargs={})
    assert "eval/accuracy" not in trainer.evaluate(EVAL_PROMPTS)
    trainer.reward_functions = build_reward_functions([half, always_right])
    trainer.reward_weights = [1.0, 1.0]
    assert trainer.evaluate(EVAL_PROMPTS)["eval/accuracy"] == 1.0
    with pytest.raises(ValueError, match=r"accuracy_reward='exact' is not one of the reward functions \['digit_share'\]"):
        make_trainer(tmp_path, reward=digit_share, accuracy_reward="exact")
    with pytest.raises(ValueError, match=r"eval_pass_k=\[8\]: each k must be in \[1, eval_num_generations=4\]"):
        GRPOConfig(eval_num_generations=4, eval_pass_k=[8]).validate()


def test_sampled_evaluation_leaves_training_untouched(tmp_path):
    """Evaluating (greedy and sampled) between steps must not move the training RNG: the parameters after training
    equal those of a run that never evaluates."""
    plain = make_trainer(tmp_path / "plain", reward=digit_share)
    plain.train()
    evaluated = make_trainer(tmp_path / "eval", reward=digit_share, eval_steps=1, eval_num_generations=3)
    evaluated.eval_dataset = Dataset.from_list(EVAL_PROMPTS)
    records = evaluated.train().records
    assert [r["step"] for r in records if "eval/sampled/reward_mean" in r] == [0, 1, 2]
    for a, b in zip(plain.model.parameters(), evaluated.model.parameters()):
        assert torch.equal(a, b)


def test_saved_model_evaluates_like_the_in_memory_model(tmp_path):
    trainer = make_trainer(tmp_path, reward=digit_share, max_new_tokens=7, eval_num_generations=4,
                           eval_pass_k=[1, 4], accuracy_reward="digit_share", accuracy_threshold=0.2)
    trainer.train()
    in_memory = trainer.evaluate(EVAL_PROMPTS, step=2)
    path = trainer.save_model(str(tmp_path / "saved"))
    from_disk = PolicyEvaluator(path, [digit_share], trainer.args).evaluate(EVAL_PROMPTS, step=2)
    assert from_disk == in_memory
    assert {"eval/pass@1", "eval/pass@4", "eval/sampled/reward_mean"} <= set(in_memory)
    assert not math.isnan(in_memory["eval/pass@4"]) and in_memory["eval/pass@4"] >= in_memory["eval/pass@1"]

"""Data and reward models are checked whole, before training: every row of train and eval data, data files,
reward-model directories, and reward functions that call sys.exit."""

import os

import pytest
import torch
from datasets import Dataset
from helpers import PROMPTS, make_trainer
from transformers import AutoModelForSequenceClassification, GPT2Config, GPT2ForSequenceClassification

from rlhf.cli import reward_functions_from_specs
from rlhf.dataset_adapters import load_dataset_spec
from rlhf.extras.tiny import char_tokenizer, save_tiny
from rlhf.reward_model import RewardModelFunction
from rlhf.rewards import RewardError


# ---------------------------------------------------------------- every row, at construction

def rows_with(bad: dict[int, object], n: int = 8) -> Dataset:
    rows = [{"prompt": f"{i}+1=", "answer": str(i + 1)} for i in range(n)]
    for i, prompt in bad.items():
        rows[i]["prompt"] = prompt
    return Dataset.from_list(rows)


@pytest.mark.parametrize("limit", [16, None])
def test_a_bad_prompt_is_named_by_its_true_row_index(tmp_path, limit):
    """Before: a None prompt at row 3 passed construction and failed mid-run as "prompt 0 is a NoneType"; with the
    limit set, row 1030 was reported as "prompt 6" (its index within a chunk of 1024)."""
    with pytest.raises(ValueError, match=r"train_dataset has 2 bad prompt\(s\): row 3: the prompt is a NoneType.*; "
                                         r"row 1030: the prompt is a NoneType.*Fix or drop those rows"):
        make_trainer(tmp_path, max_prompt_length=limit, trainer_kwargs={"train_dataset": rows_with({3: None,
                                                                                                    1030: None}, 1100)})


CHAT = [{"role": "system", "content": "Add."}, {"role": "user", "content": "1+1="}]


@pytest.mark.parametrize("message, problem", [
    ({"role": "usr", "content": "1+1="}, r"message 1 has role 'usr'; use one of \['system', 'developer', 'user'"),
    ({"role": "user", "content": None}, r"message 1 \(user\) has content None"),
    ({"role": "user"}, r"message 1 \(user\) has (no content|content None)"),
])
def test_chat_messages_need_a_known_role_and_content(tmp_path, message, problem):
    rows = [{"prompt": CHAT, "answer": "2"} for _ in range(4)]
    rows[2] = {"prompt": [CHAT[0], message], "answer": "2"}
    with pytest.raises(ValueError, match=rf"eval_dataset has 1 bad prompt\(s\): row 2: the prompt {problem}"):
        make_trainer(tmp_path, trainer_kwargs={"train_dataset": [{"prompt": CHAT, "answer": "2"}] * 4,
                                               "eval_dataset": rows})


def test_a_dataset_smaller_than_a_step_warns(tmp_path, caplog):
    make_trainer(tmp_path, prompts_per_step=4, trainer_kwargs={"train_dataset": PROMPTS[:3]})
    assert "The training dataset has 3 prompt(s), fewer than prompts_per_step=4" in caplog.text


# ---------------------------------------------------------------- data files

@pytest.mark.parametrize("name, content, message", [
    ("empty.jsonl", b"", r"empty.jsonl is empty: a data file needs at least one row"),
    ("blank.jsonl", b"\n\n", r"blank.jsonl has no rows"),
    ("latin.jsonl", b'{"prompt": "ok"}\n{"prompt": "caf\xe9"}\n', r"latin.jsonl, line 2: not UTF-8 \(byte 0xe9 at "
                                                                    r"column 16\); save the file as UTF-8"),
    ("broken.jsonl", b'{"prompt": "a"}\n\n{"prompt": "b"\n', r"broken.jsonl, line 3: not valid JSON \(Expecting ',' "
                                                             r"delimiter at column 15\)"),
    ("list.jsonl", b'{"prompt": "a"}\n["b"]\n', r"list.jsonl, line 2: a list, not a JSON object"),
    ("empty.json", b"[]", r"empty.json holds an empty JSON list: no rows"),
    ("header.csv", b"prompt,answer\n", r"header.csv has no rows \(only a header line\)"),
    ("latin.csv", b"prompt\nna\xefve\n", r"latin.csv, line 2: not UTF-8"),
])
def test_bad_data_files_name_the_file_and_line(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message):
        load_dataset_spec(str(path))


def test_good_data_files_still_load(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"prompt": "1+1=", "answer": "2"}\n\n{"prompt": "2+2=", "answer": "4"}\n')
    (tmp_path / "b.json").write_text('[{"prompt": "1+1="}]')
    (tmp_path / "c.csv").write_text("prompt\n1+1=\n")
    assert [len(load_dataset_spec(str(tmp_path / n))) for n in ("a.jsonl", "b.json", "c.csv")] == [2, 1, 1]


# ---------------------------------------------------------------- reward models given as paths

def save_reward_model(path, max_positions=64):
    config = GPT2Config(vocab_size=len(char_tokenizer()), n_embd=32, n_layer=1, n_head=2, n_positions=max_positions,
                        num_labels=1, pad_token_id=char_tokenizer().pad_token_id)
    torch.manual_seed(0)
    GPT2ForSequenceClassification(config).save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    return str(path)


def test_a_missing_reward_model_directory_is_named(tmp_path):
    missing = str(tmp_path / "outputs" / "rm" / "model")
    with pytest.raises(FileNotFoundError, match=rf"reward model '{missing}': no such directory"):
        make_trainer(tmp_path / "run", reward=missing)
    # The recipe passes a path that is not module:function through as a reward model, not as an import path.
    assert reward_functions_from_specs([missing]) == [missing]


def test_a_truncated_reward_model_weights_file_is_named(tmp_path):
    path = save_reward_model(tmp_path / "rm")
    weights = os.path.join(path, "model.safetensors")
    with open(weights, "r+b") as f:
        f.truncate(os.path.getsize(weights) - 100)
    with pytest.raises(ValueError, match=rf"reward model weights file {weights} is truncated \(\d+ bytes, its header "
                                         r"describes \d+\); copy or download it again"):
        make_trainer(tmp_path / "run", reward=path)


def test_a_causal_lm_directory_is_refused_as_a_reward_model(tmp_path):
    path = save_tiny(str(tmp_path / "lm"), hidden_size=32, num_layers=1)
    with pytest.raises(ValueError, match=r"reward model '.*lm' holds a LlamaForCausalLM, not a trained reward model: "
                                         r"its scoring head \(score.weight\) is not in the weights and would be random"):
        make_trainer(tmp_path / "run", reward=path)


def test_a_reward_model_with_a_short_context_scores_the_end_with_a_warning(tmp_path, caplog):
    """Before: an IndexError in the position embeddings at the first step. Now the input keeps its last
    max_position_embeddings tokens; the reference is the model's own forward on those tokens."""
    path = save_reward_model(tmp_path / "rm", max_positions=16)
    reward = RewardModelFunction(path)
    prompt, completion = "12+34=" * 4, "46" * 6  # 36 characters, one token each
    (score,) = reward([prompt], [completion])
    assert "input(s) are longer than its context of 16 tokens" in caplog.text
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    ids = char_tokenizer()(prompt + completion)["input_ids"][-16:]
    with torch.no_grad():
        expected = model(input_ids=torch.tensor([ids])).logits[0, 0].item()
    assert abs(score - expected) < 1e-5


# ---------------------------------------------------------------- a reward function that exits

def test_a_reward_function_calling_sys_exit_is_named(tmp_path):
    def quitter(prompts, completions, **kwargs):
        import sys

        if any(c for c in completions):
            sys.exit(3)
        return [0.0] * len(completions)

    trainer = make_trainer(tmp_path, reward=quitter)
    with pytest.raises(RewardError, match=r"reward function 'quitter' called sys.exit\(3\) \(a reward function must "
                                          r"return its values.*\) on sample \d+"):
        trainer.training_step()

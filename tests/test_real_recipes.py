"""The real-model recipes (recipes/configs/gsm8k_*, tldr_*), run unchanged except for local paths and a small
size: a 2-layer Qwen2 built from a config stands in for Qwen2.5-0.5B-Instruct, and JSONL files in the real
datasets' formats stand in for GSM8K and TL;DR. Two training steps and an evaluation each, end to end."""

import importlib.util
import json
import os

import pytest
from datasets import Dataset

from rlhf.extras.tiny import save_tiny

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "recipes", "configs")

# GSM8K's format: a question, and a worked solution whose final answer follows "####".
GSM8K_ROWS = [
    {"question": "Tom has 3 apples and buys 4 more. How many apples does he have?",
     "answer": "He has 3 + 4 = <<3+4=7>>7 apples.\n#### 7"},
    {"question": "A box holds 12 eggs. How many eggs are in 3 boxes?",
     "answer": "3 boxes hold 3 * 12 = <<3*12=36>>36 eggs.\n#### 36"},
    {"question": "Sara earns $1,200 a month. How much does she earn in 2 months?",
     "answer": "She earns 2 * 1200 = <<2*1200=2400>>2,400 dollars.\n#### 2,400"},
    {"question": "A rope is 10 m long. Ann cuts off 13 m. How long is the rest, as a signed number?",
     "answer": "10 - 13 = <<10-13=-3>>-3\n#### -3"},
]
TLDR_ROWS = [{"prompt": f"SUBREDDIT: r/test\nTITLE: post {i}\nPOST: I wrote {i} lines today.\nTL;DR:",
              "completion": f" {i} lines."} for i in range(4)]
PREFERENCE_ROWS = [{"prompt": row["prompt"], "chosen": row["completion"], "rejected": " no idea at all"}
                   for row in TLDR_ROWS] * 4
SMALL = ["--max_steps", "2", "--eval_steps", "2", "--prompts_per_step", "2", "--mini_batch_size", "none",
         "--micro_batch_size", "16", "--max_new_tokens", "8", "--max_eval_samples", "3", "--disable_tqdm", "true"]


def run_recipe(name: str, argv: list[str]):
    """``recipes/<name>.py``'s main(argv), in this process (the way `accelerate launch` runs it on one process)."""
    spec = importlib.util.spec_from_file_location(f"recipe_{name}", os.path.join(ROOT, "recipes", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(argv)


def write_jsonl(path, rows) -> str:
    with open(path, "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    return str(path)


def records(output_dir) -> list[dict]:
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory):
    """A 2-layer Qwen2 (biased q/k/v, grouped KV heads) with the character tokenizer, saved like a hub model."""
    return save_tiny(str(tmp_path_factory.mktemp("qwen2")), arch="qwen2", hidden_size=32, num_layers=2,
                     num_heads=4, max_positions=1024)


@pytest.fixture(scope="module")
def gsm8k(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("gsm8k") / "test.jsonl", GSM8K_ROWS)


@pytest.mark.parametrize("config", ["gsm8k_grpo_qwen2.5-0.5b_lora", "gsm8k_grpo_qwen2.5-0.5b_full",
                                    "gsm8k_reinforce_pp_qwen2.5-0.5b", "gsm8k_rloo_qwen2.5-0.5b"])
def test_gsm8k_recipe_trains_evaluates_and_reports(config, qwen2, gsm8k, tmp_path):
    recipe = "grpo" if "grpo" in config else "reinforce"
    out = tmp_path / "run"
    run_recipe(recipe, ["--config", os.path.join(CONFIGS, f"{config}.yaml"), "--model_name_or_path", qwen2,
                        "--dataset_name", gsm8k, "--eval_dataset_name", gsm8k, "--output_dir", str(out), *SMALL])
    logged = records(out)
    assert [r["step"] for r in logged if "reward/mean" in r] == [1, 2]
    evals = [r for r in logged if "eval/reward_mean" in r]
    assert [r["step"] for r in evals] == [0, 2]
    # boxed_answer_reward is marked as the correctness reward, so accuracy is reported.
    assert all(0.0 <= r["eval/accuracy"] <= 1.0 for r in evals)
    samples = [json.loads(line) for line in (out / "samples-2.jsonl").read_text().splitlines()]
    assert len(samples) == 3
    # The mapping: GSM8K's question became a chat prompt after the system prompt; the answer is the number.
    assert [s["answer"] for s in samples] == ["7", "36", "2400"]
    assert samples[0]["prompt"][0]["role"] == "system" and "boxed" in samples[0]["prompt"][0]["content"]
    assert samples[0]["prompt"][1] == {"role": "user", "content": GSM8K_ROWS[0]["question"]}
    expected_rewards = {"boxed_answer_reward"} | ({"soft_overlong_penalty[512,128]"} if "grpo" in config else set())
    assert set(samples[0]["rewards"]) == expected_rewards
    assert (out / "report.html").is_file()
    saved = out / "model"
    assert (saved / ("adapter_config.json" if "lora" in config else "config.json")).is_file()


def test_evaluate_recipe_on_saved_adapter_equals_training_evaluation(qwen2, gsm8k, tmp_path):
    """recipes/evaluate.py on the saved LoRA adapter reproduces the trainer's last evaluation exactly, greedy and
    sampled (pass@k), from the training config."""
    config = os.path.join(CONFIGS, "gsm8k_grpo_qwen2.5-0.5b_lora.yaml")
    out = tmp_path / "run"
    common = ["--config", config, "--model_name_or_path", qwen2, "--dataset_name", gsm8k, "--eval_dataset_name",
              gsm8k, "--eval_num_generations", "4", "--eval_pass_k", "1,2,4", "--learning_rate", "0.01"]
    run_recipe("grpo", [*common, "--output_dir", str(out), *SMALL])
    trained = [r for r in records(out) if "eval/reward_mean" in r][-1]
    assert {"eval/pass@1", "eval/pass@2", "eval/pass@4", "eval/accuracy"} <= set(trained)

    evaluated = run_recipe("evaluate", [*common, "--output_dir", str(out), "--max_new_tokens", "8",
                                        "--max_eval_samples", "3", "--model_name_or_path", str(out / "model"),
                                        "--eval_step", "2", "--eval_output_dir", str(tmp_path / "eval")])
    # The training log adds what the run knew when it evaluated (tokens trained on, how long it took): not results.
    run_context = {"step", "eval/num_tokens", "eval/runtime", "eval/samples_per_second"}
    assert evaluated == {k: v for k, v in trained.items() if k not in run_context}
    assert json.loads((tmp_path / "eval" / "eval_results.json").read_text())["eval/pass@4"] == trained["eval/pass@4"]
    assert (tmp_path / "eval" / "samples-2.jsonl").read_text() == (out / "samples-2.jsonl").read_text()


def test_tldr_reward_model_then_ppo_recipe(qwen2, tmp_path):
    """The preference recipe: train the reward model on TL;DR-style pairs, then PPO whose reward and critic come
    from it."""
    pairs = write_jsonl(tmp_path / "tldr-preference.jsonl", PREFERENCE_ROWS)
    prompts = write_jsonl(tmp_path / "tldr.jsonl", TLDR_ROWS)
    rm_out = tmp_path / "rm"
    run_recipe("train_reward_model", ["--config", os.path.join(CONFIGS, "tldr_reward_model_qwen2.5-0.5b.yaml"),
                                      "--model_name_or_path", qwen2, "--dataset_name", pairs, "--eval_dataset_name",
                                      pairs, "--output_dir", str(rm_out), "--batch_size", "8", "--micro_batch_size",
                                      "8", "--max_length", "128", "--disable_tqdm", "true"])
    reward_model = str(rm_out / "model")
    assert os.path.isfile(os.path.join(reward_model, "config.json"))
    out = tmp_path / "ppo"
    run_recipe("ppo", ["--config", os.path.join(CONFIGS, "tldr_ppo_qwen2.5-0.5b.yaml"), "--model_name_or_path",
                       qwen2, "--dataset_name", prompts, "--eval_dataset_name", prompts, "--reward_funcs",
                       reward_model, "--value_model_name_or_path", reward_model, "--output_dir", str(out),
                       "--max_steps", "2", "--eval_steps", "2", "--prompts_per_step", "4", "--mini_batch_size", "2",
                       "--micro_batch_size", "2", "--max_new_tokens", "8", "--max_eval_samples", "2",
                       "--disable_tqdm", "true"])
    logged = records(out)
    train = [r for r in logged if "reward/mean" in r]
    assert [r["step"] for r in train] == [1, 2]
    assert all("critic/explained_variance" in r and r["kl_coef"] == 0.05 for r in train)
    assert [r["step"] for r in logged if "eval/reward_mean" in r] == [0, 2]
    assert (out / "report.html").is_file() and (out / "model" / "config.json").is_file()


def test_every_real_config_names_its_accelerate_config_memory_and_time():
    """The recipe header tells a user how to launch it, what GPU it needs and how long a step takes."""
    names = [n for n in os.listdir(CONFIGS) if n.startswith(("gsm8k_", "tldr_"))]
    assert len(names) == 6
    for name in names:
        header = open(os.path.join(CONFIGS, name)).read().split("\n\n")[0]
        assert "--config_file recipes/accelerate/" in header, name
        assert "GPU memory:" in header and ("Time per step:" in header or "Time:" in header), name
        assert "estimate" in header, name  # no GPU was available to measure them: say so


def test_gsm8k_hub_layout_directory_loads_like_the_hub(gsm8k, tmp_path):
    """A downloaded dataset directory (data files named by split) and a save_to_disk directory load offline."""
    from rlhf.dataset_adapters import load_dataset_spec

    layout = tmp_path / "gsm8k" / "main"
    layout.mkdir(parents=True)
    Dataset.from_list(GSM8K_ROWS).to_parquet(str(layout / "test-00000-of-00001.parquet"))
    Dataset.from_list(GSM8K_ROWS[:2]).to_parquet(str(layout / "train-00000-of-00001.parquet"))
    assert load_dataset_spec(str(layout), "test").to_list() == GSM8K_ROWS
    assert len(load_dataset_spec(str(layout), "train")) == 2
    saved = tmp_path / "saved"
    Dataset.from_list(GSM8K_ROWS).save_to_disk(str(saved))
    assert load_dataset_spec(str(saved)).to_list() == GSM8K_ROWS
    assert load_dataset_spec(gsm8k).to_list() == GSM8K_ROWS

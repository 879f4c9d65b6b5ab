"""Reward models: Bradley-Terry training, and scoring inside a trainer with the model's own tokenizer."""

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    LlamaConfig,
    LlamaForSequenceClassification,
    PreTrainedTokenizerFast,
)

from rlhf.extras import synthetic
from rlhf.reward_model import encode, sequence_scores
from reward_models.trainer import RewardModelConfig, RewardModelTrainer
from rlhf import GRPOConfig, GRPOTrainer
from rlhf.metrics import StepMetrics
from rlhf.rewards import score_rollout
from rlhf.rollout import generate_rollout
from rlhf.extras.tiny import char_tokenizer, save_tiny, tiny_model


def test_training_reaches_90_percent_on_held_out_pairs(tmp_path):
    """About 35 s on 2 cores (measured, not asserted: timings belong in benchmarks, not in tests)."""
    base = save_tiny(str(tmp_path / "base"), hidden_size=64, num_layers=2, max_positions=128, tie_word_embeddings=False)
    args = RewardModelConfig(output_dir=str(tmp_path / "rm"), num_epochs=8, batch_size=32, micro_batch_size=32,
                             max_length=128, learning_rate=2e-3, warmup_steps=10, use_margin=False,
                             disable_tqdm=True, seed=0)
    trainer = RewardModelTrainer(base, args, synthetic.train_pairs(), synthetic.eval_pairs())
    before = trainer.evaluate()["eval/accuracy"]
    trainer.train()
    result = trainer.evaluate()
    assert result["eval/accuracy"] >= 0.90 and before < 0.7, (before, result)
    assert result["eval/margin_mean"] > 0
    # The saved model loads with from_pretrained and gives the trainer's scores.
    path = trainer.save_model()
    reloaded = AutoModelForSequenceClassification.from_pretrained(path).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    pairs = synthetic.eval_pairs()[:4]
    inputs = encode(tokenizer, pairs["prompt"], pairs["chosen"])
    with torch.no_grad():
        torch.testing.assert_close(sequence_scores(reloaded, **inputs), sequence_scores(trainer.model.eval(), **inputs))


def test_loss_matches_the_bradley_terry_formula(tmp_path):
    trainer = RewardModelTrainer(tiny_model_path(tmp_path), RewardModelConfig(output_dir=str(tmp_path / "o"),
                                 center_rewards_coefficient=0.1, disable_tqdm=True), synthetic.eval_pairs())
    chosen, rejected, margin = torch.tensor([2.0, -1.0]), torch.tensor([0.5, 1.0]), torch.tensor([1.0, 0.0])
    expected = [-torch.log(torch.sigmoid(torch.tensor(2.0 - 0.5 - 1.0))) + 0.1 * 2.5 ** 2,
                -torch.log(torch.sigmoid(torch.tensor(-1.0 - 1.0))) + 0.1 * 0.0 ** 2]
    torch.testing.assert_close(trainer.pair_loss(chosen, rejected, margin), torch.stack(expected))


def test_pairs_need_chosen_and_rejected(tmp_path):
    from datasets import Dataset

    with pytest.raises(ValueError, match=r"lacks the column\(s\) \['rejected'\]"):
        RewardModelTrainer(tiny_model_path(tmp_path), RewardModelConfig(output_dir=str(tmp_path)),
                           Dataset.from_list([{"chosen": "a"}]))


def tiny_model_path(tmp_path):
    return save_tiny(str(tmp_path / "tiny"), hidden_size=32, num_layers=1, max_positions=128)


def word_reward_model(tmp_path):
    """A reward model with a word-level tokenizer, unlike the policy's character tokenizer."""
    words = sorted(set(synthetic.KIND + synthetic.UNKIND + synthetic.NEUTRAL + tuple(" ".join(synthetic.TOPICS).split())
                       + ("Reply", "about")))
    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", "<eos>", *words])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>",
                                        eos_token="<eos>")
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, num_labels=1, pad_token_id=0)
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(config)
    model.save_pretrained(tmp_path / "word_rm")
    tokenizer.save_pretrained(tmp_path / "word_rm")
    return str(tmp_path / "word_rm"), model.eval(), tokenizer


def rollout_rewards(trainer):
    """The first step's completions and their rewards, as the trainer computes them."""
    n = trainer.args.num_generations
    _, texts = generate_rollout(trainer.policy, trainer.train_dataset[trainer.sampler.indices(0)], trainer.sampling, n)
    return score_rollout(trainer.reward_functions, trainer.reward_weights, texts, trainer.accelerator, n,
                         StepMetrics()), texts


@pytest.mark.parametrize("given_as", ["path", "object"])
def test_trainer_scores_equal_a_direct_forward_with_the_reward_models_own_tokenizer(tmp_path, given_as):
    path, model, tokenizer = word_reward_model(tmp_path)
    entry = path if given_as == "path" else model
    policy = tiny_model("llama", hidden_size=32, num_layers=1, num_heads=2)
    trainer = GRPOTrainer(policy, [entry], args=GRPOConfig(output_dir=str(tmp_path / "run"), prompts_per_step=4,
                          num_generations=2, max_new_tokens=12, micro_batch_size=8, disable_tqdm=True),
                          train_dataset=synthetic.prompts(8), processing_class=char_tokenizer(),
                          reward_processing_classes=[tokenizer if given_as == "object" else None])
    rewards, texts = rollout_rewards(trainer)
    with torch.no_grad():  # each decoded text alone, through the model's own forward and pooling
        direct = [model(input_ids=torch.tensor([tokenizer(p + c)["input_ids"]])).logits[0, 0].item()
                  for p, c in zip(texts.prompts, texts.completions)]
    torch.testing.assert_close(rewards, torch.tensor(direct, dtype=torch.float64), atol=1e-5, rtol=0)
    assert len({len(tokenizer(c)["input_ids"]) for c in texts.completions}) > 1  # padding was exercised


def test_chat_prompts_are_scored_through_the_reward_models_chat_template(tmp_path):
    path = save_tiny(str(tmp_path / "rm"), hidden_size=32, num_layers=1)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1).eval()
    tokenizer = char_tokenizer()
    prompt = [{"role": "user", "content": "hi"}]
    completion = [{"role": "assistant", "content": "hello"}]
    inputs = encode(tokenizer, [prompt], [completion])
    text = tokenizer.apply_chat_template(prompt + completion, tokenize=False)
    assert inputs["input_ids"][0].tolist() == tokenizer(text, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        expected = model(input_ids=inputs["input_ids"]).logits[0, 0]
    torch.testing.assert_close(sequence_scores(model, **inputs)[0], expected)


def test_scores_can_be_normalised_over_the_rollout_batch(tmp_path):
    path, _, _ = word_reward_model(tmp_path)
    trainer = GRPOTrainer(tiny_model("llama", hidden_size=32, num_layers=1, num_heads=2), [path],
                          args=GRPOConfig(output_dir=str(tmp_path / "run"), prompts_per_step=4, num_generations=4,
                                          max_new_tokens=12, micro_batch_size=16, disable_tqdm=True,
                                          normalize_reward_model_scores=True),
                          train_dataset=synthetic.prompts(8), processing_class=char_tokenizer())
    rewards, texts = rollout_rewards(trainer)
    assert abs(rewards.mean().item()) < 1e-6 and abs(rewards.std().item() - 1) < 1e-4

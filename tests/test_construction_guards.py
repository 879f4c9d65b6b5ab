"""Silent substitutions and step-1 crashes that a red team found, each now a named error at construction (or made
safe): a missing file taken as a value, dataset columns that shadow the reward keywords, reward functions that see
each other's mutations or share a name, a reward model loaded as a causal LM, TRL names set after construction or
given twice, empty prompts, ids past the embedding, absolute positions past their table, a teacher smaller than the
student, mixed prompt kinds in a list, and a tool call nested past the recursion limit."""

import functools
import logging

import pytest
from helpers import PROMPTS, make_trainer
from tokenizers import processors
from transformers import (
    GPT2Config,
    GPT2ForSequenceClassification,
    LlamaConfig,
    LlamaForSequenceClassification,
    LlamaModel,
)

from rlhf import GRPOConfig, PPOConfig
from rlhf.cli import ConfigError, ScriptArguments, parse_args, recipe_tokenizer
from rlhf.dataset_adapters import load_dataset_spec
from rlhf.extras.tiny import CHAT_TEMPLATE, char_tokenizer, save_tiny, tiny_model
from rlhf.models import load_causal_lm
from rlhf.rewards import build_reward_functions, reward_table
from rlhf.rollout import RolloutTexts
from rlhf.tools import ToolExecutor, parse_tool_calls
from rlhf.trl_names import ConfigNameError

# ---------------------------------------------------------------- 1. a missing file is an error, never a value


@pytest.mark.parametrize("template", ["templates/chat.jinja", "chat.j2", "template.txt", "conf/chat_template"])
def test_a_missing_chat_template_file_is_an_error_not_the_template(tmp_path, template):
    """Before: the path itself became the template, every prompt rendered as the path, and the run exited 0."""
    model = save_tiny(str(tmp_path / "m"), hidden_size=16, num_layers=1, num_heads=2)
    with pytest.raises(ConfigError, match=rf"chat_template={template!r}.*no such file.*fix the path"):
        recipe_tokenizer(ScriptArguments(model_name_or_path=model, chat_template=template))
    (tmp_path / "chat.jinja").write_text(CHAT_TEMPLATE)  # a file that exists, and template text, still work
    for given in (str(tmp_path / "chat.jinja"), CHAT_TEMPLATE):
        tokenizer = recipe_tokenizer(ScriptArguments(model_name_or_path=model, chat_template=given))
        assert tokenizer.chat_template == CHAT_TEMPLATE


@pytest.mark.parametrize("spec", ["data/missing.jsonl", "missing.csv", "missing.parquet"])
def test_a_missing_data_file_is_named_not_looked_up_on_the_hub(spec):
    with pytest.raises(FileNotFoundError, match=rf"data file {spec!r} does not exist"):
        load_dataset_spec(spec)


# ---------------------------------------------------------------- 2-4. what reward functions receive


@pytest.mark.parametrize("column", ["completions", "prompts", "completion_ids", "trainer_state", "log_metric",
                                    "log_extra"])
def test_a_column_named_like_a_reward_keyword_is_refused(tmp_path, column):
    """Before: the column silently replaced what every reward function receives under that keyword."""
    rows = [{**row, column: "x"} for row in PROMPTS]
    with pytest.raises(ValueError, match=rf"train_dataset has a column {column!r}.*rename"):
        make_trainer(tmp_path, trainer_kwargs={"train_dataset": rows})


def texts(chat: bool) -> RolloutTexts:
    completions = ([[{"role": "assistant", "content": c}] for c in ("4", "5")] if chat else ["4", "5"])
    return RolloutTexts(["2+2=", "2+3="], completions, [[7], [8]], {"answer": ["4", "5"]})


@pytest.mark.parametrize("chat", [False, True])
def test_a_reward_function_cannot_change_what_the_next_one_sees(chat):
    def vandal(prompts, completions, completion_ids, answer, **kwargs):
        if chat:
            completions[0][0]["content"] = "hacked"
        completions[1] = "hacked"
        prompts.clear()
        completion_ids[0].append(99)
        answer[0] = "hacked"
        return [0.0, 0.0]

    seen = {}

    def witness(prompts, completions, completion_ids, answer, **kwargs):
        seen.update(prompts=prompts, completions=completions, completion_ids=completion_ids, answer=answer)
        return [1.0, 1.0]

    batch = texts(chat)
    reward_table(build_reward_functions([vandal, witness]), batch)
    assert seen == {"prompts": ["2+2=", "2+3="], "completions": texts(chat).completions,
                    "completion_ids": [[7], [8]], "answer": ["4", "5"]}
    assert batch == texts(chat)  # what completions.jsonl logs is untouched too


def scaled(prompts, completions, scale=1.0, **kwargs):
    return [scale * len(c) for c in completions]


def test_reward_functions_with_the_same_name_get_distinct_names(caplog):
    """Before: two lambdas (or two partials of one function) logged under one name, their metrics merged. TRL names
    a partial by the function it wraps (trl.trainer.utils.get_callable_name) and merges duplicates; here the second
    gets _2, with one warning."""
    with caplog.at_level(logging.WARNING):
        functions = build_reward_functions([lambda completions, **kw: [0.0] * len(completions),
                                            lambda completions, **kw: [1.0] * len(completions),
                                            functools.partial(scaled, scale=2.0), functools.partial(scaled, scale=3.0),
                                            scaled])
    assert [f.name for f in functions] == ["<lambda>", "<lambda>_2", "scaled", "scaled_2", "scaled_3"]
    assert caplog.text.count("share a name") == 1 and "'<lambda>_2'" in caplog.text


# ---------------------------------------------------------------- 5. a reward model is not a causal LM


def seq_cls_llama():
    return LlamaForSequenceClassification(LlamaConfig(vocab_size=100, hidden_size=16, intermediate_size=32,
                                                      num_hidden_layers=1, num_attention_heads=2, num_labels=1,
                                                      pad_token_id=0, tie_word_embeddings=False))


def base_llama():  # no LM head at all: its weights would be freshly initialised
    return LlamaModel(LlamaConfig(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                  num_attention_heads=2, tie_word_embeddings=False))


def seq_cls_gpt2():  # tied embeddings: nothing reported missing, only the architecture tells
    return GPT2ForSequenceClassification(GPT2Config(vocab_size=100, n_embd=16, n_layer=1, n_head=2, num_labels=1,
                                                    pad_token_id=0))


@pytest.mark.parametrize("build, message", [(seq_cls_llama, "LlamaForSequenceClassification"),
                                            (seq_cls_gpt2, "GPT2ForSequenceClassification"),
                                            (base_llama, r"lm_head\.weight")])
def test_a_reward_model_directory_is_refused_as_actor_and_teacher(tmp_path, build, message):
    path = str(tmp_path / "rm")
    build().save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    with pytest.raises(ValueError, match=rf"model={path!r}.*{message}.*not a causal LM"):
        load_causal_lm(path)
    with pytest.raises(ValueError, match=rf"teacher_model={path!r}.*{message}"):
        make_trainer(tmp_path / "run", teacher_model=path)


# ---------------------------------------------------------------- 6. TRL names after construction, given twice


def test_a_trl_name_set_on_a_config_applies_or_raises():
    config = GRPOConfig()
    config.beta = 0.5
    config.max_completion_length = 32
    config.bf16 = True
    assert (config.kl_coef, config.max_new_tokens, config.mixed_precision) == (0.5, 32, "bf16")
    with pytest.raises(AttributeError, match="per_device_train_batch_size.*micro_batch_size"):
        config.per_device_train_batch_size = 4
    with pytest.raises(ValueError, match="use_vllm=True.*generation runs on the training model"):
        config.use_vllm = True
    config.use_vllm = False  # TRL's value that matches what happens here: nothing to do
    with pytest.raises(AttributeError, match="PPOConfig has no attribute scale_rewards.*does not use it"):
        PPOConfig().scale_rewards = True


def test_bf16_and_fp16_together_are_an_error():
    with pytest.raises(ConfigNameError, match="bf16.*fp16.*keep one"):
        GRPOConfig(bf16=True, fp16=True)
    assert GRPOConfig(bf16=True, fp16=False).mixed_precision == "bf16"
    assert GRPOConfig(bf16=False, fp16=True).mixed_precision == "fp16"


def test_a_key_given_twice_in_yaml_or_config_given_twice_is_an_error(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("learning_rate: 1.0e-5\nmax_steps: 3\nlearning_rate: 2.0e-5\n")
    with pytest.raises(ConfigError, match=r"c.yaml.*'learning_rate' is given twice \(lines 1 and 3\)"):
        parse_args([GRPOConfig], ["--config", str(path)])
    path.write_text("dataset_mapping:\n  prompt: a\n  prompt: b\n")
    with pytest.raises(ConfigError, match="'prompt' is given twice"):
        parse_args([ScriptArguments], ["--config", str(path)])
    other = tmp_path / "d.yaml"
    other.write_text("max_steps: 4\n")
    with pytest.raises(ConfigError, match="--config is given twice"):
        parse_args([GRPOConfig], ["--config", str(other), "--max_steps", "2", "--config", str(other)])


# ---------------------------------------------------------------- 7-10. step-1 crashes, caught at construction


def no_bos_tokenizer():
    tokenizer = char_tokenizer()
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(single="$A", special_tokens=[])
    return tokenizer


@pytest.mark.parametrize("limit", [16, None])
def test_a_prompt_of_zero_tokens_is_named(tmp_path, limit):
    rows = [dict(row) for row in PROMPTS]
    rows[3]["prompt"] = ""
    with pytest.raises(ValueError, match=r"train_dataset row 3: the prompt '' has no tokens"):
        make_trainer(tmp_path, tokenizer=no_bos_tokenizer(), max_prompt_length=limit,
                     trainer_kwargs={"train_dataset": rows})


def test_prompt_ids_past_the_embedding_are_named(tmp_path):
    """A tokenizer larger than the model's embedding: a prompt with an id past it was an IndexError at step 1. Ids
    the prompts never use are fine (a converted GGUF tokenizer adds <|endoftext|> past a model's rows)."""
    rows = [{"prompt": "0123"}] * 3 + [{"prompt": "0+1="}]  # digits are ids 4-13; '+' and '=' are past 50
    with pytest.raises(ValueError, match=r"train_dataset row 3: the prompt '0\+1=' has token id 84 \('='\), "
                                         r"past the model's input embedding \(50 rows\).*resize_token_embeddings"):
        make_trainer(tmp_path / "past", model=tiny_model("llama", vocab_size=50, hidden_size=16, num_heads=2),
                     trainer_kwargs={"train_dataset": rows})
    make_trainer(tmp_path / "within", model=tiny_model("llama", vocab_size=50, hidden_size=16, num_heads=2),
                 trainer_kwargs={"train_dataset": rows[:3]})


def test_absolute_positions_past_their_table_are_an_error_rotary_a_warning(tmp_path, caplog):
    """GPT-2 indexes a table of n_positions rows: past it, an IndexError at step 1. RoPE models run on, warned."""
    gpt2 = tiny_model("gpt2", hidden_size=16, num_heads=2, max_positions=12)
    with pytest.raises(ValueError, match=r"longest prompt \(\d+ tokens\) \+ max_new_tokens=10 = \d+ exceeds the "
                                         r"model's 12 absolute positions.*max_new_tokens.*max_prompt_length"):
        make_trainer(tmp_path / "gpt2", model=gpt2, max_new_tokens=10)
    make_trainer(tmp_path / "gpt2-fits", model=tiny_model("gpt2", hidden_size=16, num_heads=2, max_positions=12),
                 max_new_tokens=4)
    with caplog.at_level(logging.WARNING):
        make_trainer(tmp_path / "llama", model=tiny_model("llama", hidden_size=16, num_heads=2, max_positions=12),
                     max_new_tokens=10)
    assert "exceeds the model's max_position_embeddings=12" in caplog.text


def test_a_teacher_with_a_smaller_embedding_is_refused(tmp_path):
    teacher = save_tiny(str(tmp_path / "teacher"), hidden_size=16, num_heads=2, vocab_size=60)  # the same tokenizer
    with pytest.raises(ValueError, match=r"teacher_model.*output layer has 60 rows.*student's 102"):
        make_trainer(tmp_path / "run", teacher_model=teacher)


# ---------------------------------------------------------------- 11-12. rows and tool calls named


CHAT = [{"role": "user", "content": "1+1="}]


@pytest.mark.parametrize("first, second, kinds", [("1+1=", CHAT, "list.*str"), (CHAT, "1+1=", "str.*list")])
def test_a_list_of_rows_with_mixed_prompt_kinds_names_the_row(tmp_path, first, second, kinds):
    rows = [{"prompt": first}] * 3 + [{"prompt": second}]
    with pytest.raises(ValueError, match=rf"train_dataset: column 'prompt' of row 3 is a .*{kinds}"):
        make_trainer(tmp_path, trainer_kwargs={"train_dataset": rows})


@pytest.mark.parametrize("depth", [1000, 200])
def test_a_deeply_nested_tool_call_is_a_bad_call_not_an_exception(depth):
    text = '<tool_call>{"name": "f", "arguments": {"x": ' + "[" * depth + "]" * depth + "}}</tool_call>"
    (call,) = parse_tool_calls(text)
    assert call.arguments is None and "nested deeper than" in call.error
    executor = ToolExecutor([], timeout=1.0, max_chars=200, workers=0)
    (result,) = executor.run([call])
    assert result.status == "bad_call" and "nested deeper than" in result.content

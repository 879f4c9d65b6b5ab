"""Tiny models and a character-level tokenizer the project defines, for tests, the demo and benchmarks.

Nothing here touches the network: the tokenizer is built from a fixed alphabet and the models are
randomly initialised from a config.
"""

import string

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
# Printable ASCII minus the vertical tab and form feed.
ALPHABET = [c for c in string.printable if c not in "\x0b\x0c"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
)

# The same lines, plus tools (names and argument names on a "tools:" line), assistant tool calls in the
# <tool_call> format of rlhf.tools, and an EOS closing every assistant turn, as instruct models' templates do.
TOOL_CHAT_TEMPLATE = (
    "{{ bos_token }}{% if tools %}tools: {% for tool in tools %}{{ tool.function.name }}("
    "{{ tool.function.parameters.properties | join(', ') }}){% if not loop.last %}, {% endif %}{% endfor %}{{ '\\n' }}"
    "{% endif %}{% for message in messages %}{% if message['role'] == 'assistant' %}assistant: "
    "{{ message['content'] }}{% for call in message.get('tool_calls') or [] %}<tool_call>{{ call.function | tojson }}"
    "</tool_call>{% endfor %}{{ eos_token }}\n{% else %}{{ message['role'] }}: {{ message['content'] }}\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
)


TOOL_TOKENS = ("<tool_call>", "</tool_call>")
TOOL_VOCAB_SIZE = len(SPECIAL_TOKENS) + len(ALPHABET) + len(TOOL_TOKENS)
"""The vocabulary of ``char_tokenizer(tools=True)``: build its models with ``tiny_model(vocab_size=TOOL_VOCAB_SIZE)``."""


def char_tokenizer(tools: bool = False) -> PreTrainedTokenizerFast:
    """One token per character (printable ASCII), plus <pad>, <bos>, <eos>, <unk>; adds <bos> in front.

    Has a minimal chat template ("role: content" lines), so conversational prompts work too. ``tools=True``:
    ``TOOL_CHAT_TEMPLATE``, and <tool_call> and </tool_call> as one token each (ids 102 and 103), as in
    Qwen2.5's tokenizer.
    """
    vocab = {token: i for i, token in enumerate([*SPECIAL_TOKENS, *ALPHABET])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", BOS_ID)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", unk_token="<unk>"
    )
    tokenizer.chat_template = TOOL_CHAT_TEMPLATE if tools else CHAT_TEMPLATE
    if tools:
        tokenizer.add_tokens(list(TOOL_TOKENS))
    return tokenizer


# arch -> (config class, model class, key/value heads for a number of attention heads): Qwen2 groups its heads.
ROPE_DECODERS = {
    "llama": (LlamaConfig, LlamaForCausalLM, lambda heads: heads),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, lambda heads: max(1, heads // 2)),
}


def tiny_model(
    arch: str = "llama",
    vocab_size: int = len(SPECIAL_TOKENS) + len(ALPHABET),
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    max_positions: int = 256,
    seed: int = 0,
    **overrides,
) -> PreTrainedModel:
    """A randomly initialised causal LM: ``llama`` (RoPE), ``qwen2`` (RoPE, biased q/k/v projections, as
    Qwen2.5) or ``gpt2`` (absolute positions)."""
    torch.manual_seed(seed)
    ids = dict(bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
    if arch in ROPE_DECODERS:
        config_class, model_class, kv_heads = ROPE_DECODERS[arch]
        config = config_class(
            vocab_size=vocab_size,
            hidden_size=hidden_size,
            intermediate_size=hidden_size * 2,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            num_key_value_heads=kv_heads(num_heads),
            max_position_embeddings=max_positions,
            **{"tie_word_embeddings": True, **ids, **overrides},
        )
        model = model_class(config)
    elif arch == "gpt2":
        config = GPT2Config(
            vocab_size=vocab_size,
            n_embd=hidden_size,
            n_layer=num_layers,
            n_head=num_heads,
            n_positions=max_positions,
            **{**ids, **overrides},
        )
        model = GPT2LMHeadModel(config)
    else:
        raise ValueError(f"arch must be 'llama', 'qwen2' or 'gpt2', got {arch!r}")
    model.generation_config.eos_token_id = EOS_ID
    model.generation_config.pad_token_id = PAD_ID
    return model


def save_tiny(path: str, arch: str = "llama", **kwargs) -> str:
    """Build a tiny model and the character tokenizer and save both to ``path`` (safetensors)."""
    tiny_model(arch, **kwargs).save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    return path

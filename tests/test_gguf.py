"""GGUF files as a model source (rlhf/gguf.py): a tiny Llama and the character tokenizer written with the `gguf`
package's writer in llama.cpp's layout, converted back through transformers' GGUF reader into the cache, and used by
the loaders and a trainer; the errors for files that cannot be used."""

import hashlib
import json
import os
import subprocess
import sys
import time

import gguf
import numpy as np
import pytest
import torch
from helpers import PROMPTS, varied_reward

from rlhf import GRPOConfig, GRPOTrainer, ValueModel
from rlhf.checkpoint import model_source
from rlhf.extras.tiny import char_tokenizer, tiny_model
from rlhf.gguf import GGUFError, check_gguf_file, gguf_to_checkpoint
from rlhf.models import load_causal_lm, load_tokenizer
from rlhf.reward_model import load_reward_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXTS = ["3+4=", "Hello, World!\n\tx = [1, 2]  ", " a  b ~`{}|\r\n"]
# Hugging Face Llama module -> llama.cpp tensor name inside block N (gguf's "Standardized tensor names").
BLOCK_NAMES = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
               "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
               "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
               "mlp.down_proj": "ffn_down"}


def llama_cpp_permute(weights: np.ndarray, n_head: int, n_head_kv: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf.py permutation of Llama's q/k rows (rotary halves interleaved); transformers'
    LlamaTensorProcessor._reverse_permute_weights undoes it on load."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def write_gguf(path, model, tokenizer, architecture: str = "llama") -> str:
    """``model`` (a Hugging Face Llama) and ``tokenizer`` as an F32 GGUF file, as llama.cpp's converter lays it out:
    llama.* hyperparameters, the vocabulary as a byte-level BPE one (``gpt2``: every character of the tiny tokenizer
    is a token of its own, so there are no merges, and scores stand in for them: gguf's writer drops an empty
    merges array), special tokens as CONTROL, the chat template, q/k permuted, no output.weight when tied."""
    config = model.config
    vocab = tokenizer.get_vocab()
    tokens = [token for token, _ in sorted(vocab.items(), key=lambda item: item[1])]
    assert [vocab[t] for t in tokens] == list(range(config.vocab_size))  # contiguous ids, one per embedding row
    special = set(tokenizer.all_special_tokens)

    writer = gguf.GGUFWriter(os.fspath(path), architecture)  # writes general.architecture
    writer.add_name("tiny")
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * len(tokens))
    writer.add_token_types([gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens])
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_unk_token_id(tokenizer.unk_token_id)
    writer.add_add_bos_token(True)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)

    for name, tensor in model.state_dict().items():
        weights = tensor.detach().to(torch.float32).numpy()
        if name == "model.embed_tokens.weight":
            gguf_name = "token_embd.weight"
        elif name == "model.norm.weight":
            gguf_name = "output_norm.weight"
        elif name == "lm_head.weight":
            if config.tie_word_embeddings:
                continue
            gguf_name = "output.weight"
        else:
            _, _, block, rest = name.split(".", 3)  # model.layers.N.<module>.weight
            module, suffix = rest.rsplit(".", 1)
            gguf_name = f"blk.{block}.{BLOCK_NAMES[module]}.{suffix}"
            if module == "self_attn.q_proj":
                weights = llama_cpp_permute(weights, config.num_attention_heads, config.num_attention_heads)
            elif module == "self_attn.k_proj":
                weights = llama_cpp_permute(weights, config.num_attention_heads, config.num_key_value_heads)
        writer.add_tensor(gguf_name, np.ascontiguousarray(weights))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return os.fspath(path)


def tiny_gguf(path, seed: int = 0, **overrides):
    """(path, model, tokenizer): a tiny Llama (2 layers, hidden 32, 4 heads) and the character tokenizer, written
    to ``path``."""
    model = tiny_model("llama", hidden_size=32, num_layers=2, num_heads=4, seed=seed, **overrides).eval()
    tokenizer = char_tokenizer()
    return write_gguf(path, model, tokenizer), model, tokenizer


def assert_same_weights(expected, actual):
    expected, actual = expected.state_dict(), actual.state_dict()
    assert sorted(actual) == sorted(expected)
    for name, tensor in expected.items():
        assert actual[name].dtype == torch.float32, name
        assert torch.equal(actual[name], tensor), name


def entries(cache) -> list[str]:
    return sorted(name for name in os.listdir(cache) if not name.endswith(".lock"))


def test_converted_gguf_has_the_original_weights_generation_and_tokenizer(tmp_path):
    """The writer's file read back through transformers (q/k un-permuted, tied head) gives bit-identical F32
    weights, the same config, the same greedy generations, and a tokenizer with the same ids, decoding, special
    tokens and chat template."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, original, tokenizer = tiny_gguf(tmp_path / "tiny.gguf")
    directory = gguf_to_checkpoint(path, cache_dir=str(tmp_path / "cache"))
    assert os.path.dirname(directory) == str(tmp_path / "cache")
    assert os.path.basename(directory).startswith("tiny-")
    record = json.loads(open(os.path.join(directory, "rlhf_gguf.json")).read())
    assert record["source"] == path
    assert record["sha256"] == hashlib.sha256(open(path, "rb").read()).hexdigest()

    model = AutoModelForCausalLM.from_pretrained(directory).eval()
    assert not getattr(model.config, "quantization_config", None)  # a plain checkpoint, not a GGUF-quantized one
    assert_same_weights(original, model)
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "max_position_embeddings", "tie_word_embeddings", "bos_token_id",
                "eos_token_id", "pad_token_id"):
        assert getattr(model.config, key) == getattr(original.config, key), key
    # GGUF stores it as a float32 (1e-6 comes back as 9.99999997e-07): the same float32 the norm adds
    assert np.float32(model.config.rms_norm_eps) == np.float32(original.config.rms_norm_eps)
    assert model.config.rope_parameters["rope_theta"] == original.config.rope_parameters["rope_theta"]

    loaded = AutoTokenizer.from_pretrained(directory)
    for text in TEXTS:
        ids = tokenizer(text).input_ids
        assert loaded(text).input_ids == ids, text
        assert loaded.decode(ids, skip_special_tokens=True) == tokenizer.decode(ids, skip_special_tokens=True)
    assert (loaded.bos_token, loaded.eos_token, loaded.pad_token, loaded.unk_token) == \
           ("<bos>", "<eos>", "<pad>", "<unk>")
    assert (loaded.bos_token_id, loaded.eos_token_id, loaded.pad_token_id) == (1, 2, 0)
    messages = [{"role": "user", "content": "2+2?"}]
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert rendered == "<bos>user: 2+2?\nassistant: "
    assert loaded.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == rendered

    with torch.no_grad():
        for text in ("3+4=", "Hello", "user: hi\nassistant: "):
            prompt = torch.tensor([tokenizer(text).input_ids])
            settings = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=12, do_sample=False)
            expected = original.generate(prompt, **settings)
            assert expected.shape[1] > prompt.shape[1]
            assert torch.equal(model.generate(prompt, **settings), expected), text


def test_second_conversion_reuses_the_entry_and_a_changed_file_gets_a_new_one(tmp_path):
    """The same file converted again returns the same directory untouched (no second conversion); new content
    under the same name is keyed by its SHA-256: a new directory holding the new weights (here an untied head,
    written as output.weight), the old one left as it was."""
    from transformers import AutoModelForCausalLM

    cache = str(tmp_path / "cache")
    path, _, _ = tiny_gguf(tmp_path / "tiny.gguf")
    first = gguf_to_checkpoint(path, cache_dir=cache)
    done, weights = os.path.join(first, "rlhf_gguf.json"), os.path.join(first, "model.safetensors")
    stamps = (os.stat(first).st_ino, os.stat(done).st_mtime_ns, os.stat(weights).st_mtime_ns)
    time.sleep(0.05)  # a conversion now would give later timestamps
    assert gguf_to_checkpoint(path, cache_dir=cache) == first
    assert (os.stat(first).st_ino, os.stat(done).st_mtime_ns, os.stat(weights).st_mtime_ns) == stamps
    assert entries(cache) == [os.path.basename(first)]

    _, changed, _ = tiny_gguf(tmp_path / "tiny.gguf", seed=1, tie_word_embeddings=False)
    second = gguf_to_checkpoint(path, cache_dir=cache)
    assert second != first and os.path.basename(second).startswith("tiny-")
    assert entries(cache) == sorted([os.path.basename(first), os.path.basename(second)])
    assert os.stat(done).st_mtime_ns == stamps[1]
    reloaded = AutoModelForCausalLM.from_pretrained(second)
    assert reloaded.config.tie_word_embeddings is False
    assert_same_weights(changed, reloaded)


def test_loaders_accept_a_gguf_path_through_one_cache_entry(tmp_path, monkeypatch):
    """load_causal_lm, load_tokenizer, checkpoint.model_source, ValueModel.from_pretrained and load_reward_model
    take the .gguf path, convert it once under $RLHF_CACHE/gguf and load the original's weights and vocabulary."""
    monkeypatch.setenv("RLHF_CACHE", str(tmp_path / "rlhf-cache"))
    path, original, tokenizer = tiny_gguf(tmp_path / "tiny.gguf")
    directory = model_source(path)
    assert os.path.dirname(directory) == str(tmp_path / "rlhf-cache" / "gguf")
    assert_same_weights(original, load_causal_lm(path))
    assert load_tokenizer(path)(TEXTS[1]).input_ids == tokenizer(TEXTS[1]).input_ids
    embeddings = original.model.embed_tokens.weight
    assert torch.equal(ValueModel.from_pretrained(path).backbone.embed_tokens.weight, embeddings)
    reward_model, reward_tokenizer = load_reward_model(path)
    assert torch.equal(reward_model.model.embed_tokens.weight, embeddings)
    assert reward_tokenizer(TEXTS[0]).input_ids == tokenizer(TEXTS[0]).input_ids
    assert entries(tmp_path / "rlhf-cache" / "gguf") == [os.path.basename(directory)]


def test_grpo_trainer_trains_a_step_from_a_gguf_path(tmp_path, monkeypatch):
    """GRPOTrainer(model=<.gguf>) takes its weights and tokenizer from the converted entry, trains one step, and
    keeps the .gguf path (not the cache directory) as the run's model."""
    cache = tmp_path / "rlhf-cache"
    monkeypatch.setenv("RLHF_CACHE", str(cache))
    path, original, tokenizer = tiny_gguf(tmp_path / "tiny.gguf")
    args = GRPOConfig(output_dir=str(tmp_path / "run"), max_steps=1, prompts_per_step=2, num_generations=4,
                      max_new_tokens=6, micro_batch_size=8, max_prompt_length=32, learning_rate=1e-2,
                      disable_tqdm=True, seed=0, write_report=False)
    trainer = GRPOTrainer(path, [varied_reward], args=args, train_dataset=PROMPTS[:4])
    assert trainer.model_source == path
    assert trainer.identity["model"] == path
    [entry] = entries(cache / "gguf")
    assert trainer.tokenizer.name_or_path == str(cache / "gguf" / entry)
    assert trainer.tokenizer(TEXTS[0]).input_ids == tokenizer(TEXTS[0]).input_ids
    assert_same_weights(original, trainer.model)

    trainer.train()
    [record] = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert record["step"] == 1 and record["grad_norm"] > 0
    after = dict(trainer.model.named_parameters())
    assert any(not torch.equal(after[name], tensor) for name, tensor in original.named_parameters())
    assert trainer.model_source == path


def test_unusable_files_raise_a_gguf_error_naming_the_file(tmp_path):
    """A missing path, a directory, a file that is not GGUF, a truncated file and an architecture transformers
    cannot load each fail before any conversion, with the file's path and what is wrong; nothing is cached."""
    cache = str(tmp_path / "cache")

    def error(path) -> str:
        with pytest.raises(GGUFError) as caught:
            gguf_to_checkpoint(path, cache_dir=cache)
        message = str(caught.value)
        assert str(path) in message
        return message

    missing = tmp_path / "missing.gguf"
    assert error(missing).startswith(f"GGUF file not found: {missing}. GGUF files are read from local paths only")
    with pytest.raises(GGUFError, match="GGUF file not found"):  # a mistyped path is not looked up on the hub
        load_causal_lm(str(missing))
    (tmp_path / "folder.gguf").mkdir()
    assert "(it is a directory)" in error(tmp_path / "folder.gguf")

    text = tmp_path / "notes.gguf"
    text.write_text("hello, this is a text file\n")
    message = error(text)
    assert "is not a GGUF file" in message and "b'hell'" in message

    path, model, tokenizer = tiny_gguf(tmp_path / "whole.gguf")
    data = open(path, "rb").read()
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(data[: len(data) // 2])
    message = error(truncated)
    assert "truncated" in message and "again" in message  # download or copy it again

    odd = write_gguf(tmp_path / "odd.gguf", model, tokenizer, architecture="notanarch")
    message = error(odd)
    assert "architecture 'notanarch' cannot be loaded from GGUF by transformers" in message
    assert "llama" in message  # the architectures it does load
    with pytest.raises(GGUFError, match="notanarch"):
        check_gguf_file(odd)
    assert not os.path.exists(cache)


def test_missing_gguf_package_says_how_to_install_it(tmp_path):
    """Without the `gguf` package (blocked in a fresh interpreter: sys.modules['gguf'] = None, which
    importlib.util.find_spec reports as absent), a conversion fails with an ImportError naming the file and the
    pip command, and caches nothing."""
    path, _, _ = tiny_gguf(tmp_path / "tiny.gguf")
    cache = str(tmp_path / "cache")
    code = ("import importlib.util, sys\n"
            "sys.modules['gguf'] = None\n"
            "assert importlib.util.find_spec('gguf') is None\n"
            "from rlhf.gguf import gguf_to_checkpoint\n"
            "gguf_to_checkpoint(sys.argv[1], cache_dir=sys.argv[2])\n")
    result = subprocess.run([sys.executable, "-c", code, path, cache], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 1, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"ImportError: Loading {path} needs the `gguf` package, which is not installed"), last
    assert "pip install 'rlhf[real]'" in last and "pip install 'gguf>=0.10'" in last
    assert not os.path.exists(cache)


CONVERT_TOGETHER = """
import os, sys, time
import transformers, rlhf.models  # imported before the start signal, so that the two conversions overlap
from transformers import AutoModelForCausalLM
from rlhf.gguf import gguf_to_checkpoint

path, cache, ready, go = sys.argv[1:]
open(ready, "w").close()
while not os.path.exists(go):
    time.sleep(0.005)
print(gguf_to_checkpoint(path, cache_dir=cache))
"""


def test_two_processes_converting_at_once_share_one_conversion(tmp_path):
    """Two processes released together on the same file both get the same complete directory; the file lock lets
    one convert while the other waits and reuses it, and no .partial- staging directory is left behind."""
    from transformers import AutoModelForCausalLM

    path, original, _ = tiny_gguf(tmp_path / "tiny.gguf")
    cache = str(tmp_path / "cache")
    go = tmp_path / "go"
    processes = [subprocess.Popen([sys.executable, "-c", CONVERT_TOGETHER, path, cache, str(tmp_path / f"ready{i}"),
                                   str(go)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for i in range(2)]
    try:
        deadline = time.time() + 120
        while not all((tmp_path / f"ready{i}").exists() for i in range(2)):
            assert time.time() < deadline and all(p.poll() is None for p in processes), "a worker did not start"
            time.sleep(0.01)
        go.touch()
        outputs = [p.communicate(timeout=120) for p in processes]
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in processes] == [0, 0], [err[-2000:] for _, err in outputs]
    [directory] = {out.strip() for out, _ in outputs}
    converted = sum(err.count(f"Converting {path} to a float32 safetensors checkpoint") for _, err in outputs)
    assert converted == 1  # one conversion (rlhf.gguf's warning), one reuse
    assert entries(cache) == [os.path.basename(directory)]
    assert not [name for name in os.listdir(cache) if ".partial-" in name]
    record = json.loads(open(os.path.join(directory, "rlhf_gguf.json")).read())
    assert record["sha256"] == hashlib.sha256(open(path, "rb").read()).hexdigest()
    assert_same_weights(original, AutoModelForCausalLM.from_pretrained(directory))


def test_an_interrupted_entry_is_converted_again(tmp_path):
    """An entry without rlhf_gguf.json (what a conversion killed half-way into the target would leave: a broken
    config, half a weights file) is not used: it is replaced by a complete conversion."""
    from transformers import AutoModelForCausalLM

    path, original, _ = tiny_gguf(tmp_path / "tiny.gguf")
    digest = hashlib.sha256(open(path, "rb").read()).hexdigest()
    target = tmp_path / "cache" / f"tiny-{digest[:16]}"
    target.mkdir(parents=True)
    (target / "config.json").write_text('{"model_type": "lla')
    (target / "model.safetensors").write_bytes(b"\x00" * 100)
    (target / "stray.txt").write_text("left by the interrupted run")

    assert gguf_to_checkpoint(path, cache_dir=str(tmp_path / "cache")) == str(target)
    assert not (target / "stray.txt").exists()
    assert json.loads((target / "rlhf_gguf.json").read_text())["sha256"] == digest
    assert_same_weights(original, AutoModelForCausalLM.from_pretrained(str(target)))

    # an entry recording another file's full digest (same 16-digit prefix) is not this file's either
    (target / "rlhf_gguf.json").write_text(json.dumps({"source": path, "sha256": digest[:16] + "0" * 48}))
    (target / "stray.txt").write_text("not this file's conversion")
    assert gguf_to_checkpoint(path, cache_dir=str(tmp_path / "cache")) == str(target)
    assert not (target / "stray.txt").exists()
    assert json.loads((target / "rlhf_gguf.json").read_text())["sha256"] == digest


def test_a_killed_conversions_staging_directory_is_removed(tmp_path):
    """The .partial-<pid> staging directory of a conversion that was killed (another pid) is removed by the next
    conversion of that file, which holds the file's lock."""
    path, _, _ = tiny_gguf(tmp_path / "tiny.gguf")
    digest = hashlib.sha256(open(path, "rb").read()).hexdigest()
    stale = tmp_path / "cache" / f"tiny-{digest[:16]}.partial-999999"
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"\x00" * 100)
    gguf_to_checkpoint(path, cache_dir=str(tmp_path / "cache"))
    assert not stale.exists()


@pytest.mark.parametrize("architecture", ["qwen2moe", "qwen3moe", "gpt-oss", "minimax-m2", "qwen35"])
def test_check_accepts_architectures_transformers_loads(tmp_path, architecture):
    """The names llama.cpp writes (gguf.MODEL_ARCH_NAMES) for architectures transformers' GGUF loader takes pass
    the check (its legacy loader maps qwen2moe -> qwen2_moe, gpt-oss -> gpt_oss, ...; qwen35 is read by the newer
    one)."""
    assert architecture in gguf.MODEL_ARCH_NAMES.values()
    path = str(tmp_path / f"{architecture}.gguf")
    writer = gguf.GGUFWriter(path, architecture)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    check_gguf_file(path)


def test_check_rejects_metadata_group_names_as_architectures(tmp_path):
    """general.architecture = 'general' names no model: refused by the check, not deep inside the conversion."""
    path = write_gguf(tmp_path / "general.gguf", tiny_model("llama", hidden_size=32, num_layers=1, num_heads=4),
                      char_tokenizer(), architecture="general")
    with pytest.raises(GGUFError, match="architecture 'general' cannot be loaded"):
        check_gguf_file(path)


def test_a_renamed_copy_reuses_the_entry_and_a_missing_file_is_converted_again(tmp_path):
    """Entries are found by content: the same bytes under another name (or through a symlink) reuse the entry made
    first; an entry whose recorded files are not all there (model.safetensors deleted by hand) is made again."""
    import shutil

    cache = str(tmp_path / "cache")
    path, model, _ = tiny_gguf(tmp_path / "tiny.gguf")
    first = gguf_to_checkpoint(path, cache_dir=cache)
    shutil.copy(path, tmp_path / "renamed.GGUF")
    os.symlink(path, tmp_path / "link.gguf")
    assert gguf_to_checkpoint(str(tmp_path / "renamed.GGUF"), cache_dir=cache) == first
    assert gguf_to_checkpoint(str(tmp_path / "link.gguf"), cache_dir=cache) == first
    assert entries(cache) == [os.path.basename(first)]
    assert oct(os.stat(os.path.join(first, "model.safetensors")).st_mode & 0o777) == "0o644"

    os.remove(os.path.join(first, "model.safetensors"))
    assert gguf_to_checkpoint(path, cache_dir=cache) == first
    assert_same_weights(model, load_causal_lm(first))


def test_a_cache_hit_needs_no_gguf_package(tmp_path):
    """Once converted, the entry is used without the `gguf` package (a second environment sharing the cache)."""
    path, _, _ = tiny_gguf(tmp_path / "tiny.gguf")
    cache = str(tmp_path / "cache")
    entry = gguf_to_checkpoint(path, cache_dir=cache)
    code = ("import sys\nsys.modules['gguf'] = None\nfrom rlhf.gguf import gguf_to_checkpoint\n"
            "print(gguf_to_checkpoint(sys.argv[1], cache_dir=sys.argv[2]))\n")
    result = subprocess.run([sys.executable, "-c", code, path, cache], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == entry


def test_misplaced_gguf_inputs_say_what_to_pass(tmp_path, monkeypatch):
    """The ways a user points at a GGUF file wrongly each get an error saying what to pass instead, before anything
    is converted: its folder, transformers' gguf_file keyword, a path as processing_class, a .gguf as a trained
    reward model; an unwritable RLHF_CACHE is named; a relative RLHF_CACHE becomes absolute."""
    from rlhf.gguf import cache_root

    path, _, _ = tiny_gguf(tmp_path / "tiny.gguf")
    monkeypatch.setenv("RLHF_CACHE", str(tmp_path / "cache"))
    with pytest.raises(GGUFError, match=r"holds no config\.json but GGUF file\(s\) tiny\.gguf: pass the file itself"):
        load_causal_lm(str(tmp_path))
    with pytest.raises(ValueError, match=r"gguf_file='tiny\.gguf': pass the GGUF file itself as the model"):
        load_causal_lm(str(tmp_path), init_kwargs={"gguf_file": "tiny.gguf"})
    with pytest.raises(TypeError, match=r"is a path; it takes a tokenizer object"):
        load_tokenizer(path, processing_class=path)
    with pytest.raises(ValueError, match=r"a GGUF file holds a causal LM, not a trained reward model"):
        load_reward_model(path, trained=True)
    assert not (tmp_path / "cache").exists()

    (tmp_path / "afile").write_text("")
    monkeypatch.setenv("RLHF_CACHE", str(tmp_path / "afile"))
    with pytest.raises(GGUFError, match=r"cannot write the GGUF cache .*afile/gguf .*set RLHF_CACHE to a writable"):
        gguf_to_checkpoint(path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RLHF_CACHE", "relative")
    assert cache_root() == str(tmp_path / "relative" / "gguf")

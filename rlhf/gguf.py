"""GGUF files (llama.cpp's format) as a model source.

``model="path/to/model.gguf"`` anywhere a checkpoint is taken (the trainers' ``model``, ``value_model`` and
``teacher_model``, a recipe's ``model_name_or_path``, ``recipes/evaluate.py``) is converted once into a plain
safetensors directory (weights dequantized to float32, the tokenizer with its chat template and special tokens)
under the cache, and that directory is then used like any other checkpoint: fingerprints, resume, LoRA and
``save_model`` see an ordinary ``PreTrainedModel``.

The cache entry is keyed by the file's SHA-256, so a changed file is converted again and a moved, renamed or linked
one is not (an entry made from the same bytes under another name is reused); an entry with a file missing is made
again. A hit needs neither the ``gguf`` package nor a parse of the file, only its hash (once per process). Conversion goes through transformers' own GGUF reader (``from_pretrained(..., gguf_file=...)``, which needs
the ``gguf`` package: ``pip install 'rlhf[real]'``), into a temporary directory renamed into place when complete:
a crash mid-conversion leaves no half-written entry, and processes converting the same file at once wait for the
first one (a file lock) instead of each spending the time.

Where the cache lives: ``$RLHF_CACHE/gguf`` if set, else ``$XDG_CACHE_HOME/rlhf/gguf`` (``~/.cache/rlhf/gguf``).
"""

import fcntl
import functools
import glob
import importlib.util
import json
import logging
import os
import shutil
import struct
import time

from rlhf.integrity import sha256

logger = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"
INSTALL_HINT = "pip install 'rlhf[real]'  (or: pip install 'gguf>=0.10')"
_DONE = "rlhf_gguf.json"  # written last into a converted directory: what it was made from


class GGUFError(ValueError):
    """A GGUF file that cannot be used as a model: names the file and says what is wrong and how to fix it."""


def is_gguf(source) -> bool:
    """Whether ``source`` names a GGUF file (by its extension: a path that does not exist yet still counts, so that
    a mistyped one is reported as a missing GGUF file rather than looked up on the hub)."""
    return isinstance(source, (str, os.PathLike)) and os.fspath(source).lower().endswith(".gguf")


def cache_root() -> str:
    """An absolute path, so that what is saved naming it (a LoRA adapter's base model) does not depend on the cwd."""
    if os.environ.get("RLHF_CACHE"):
        root = os.path.join(os.environ["RLHF_CACHE"], "gguf")
    else:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(base, "rlhf", "gguf")
    return os.path.abspath(os.path.expanduser(root))


def file_digest(path: str) -> str:
    """SHA-256 of the file, hashed once per process for a given size and modification time."""
    stat = os.stat(path)
    return _digest(path, stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=32)
def _digest(path: str, size: int, mtime_ns: int) -> str:
    return sha256(path)


def resolve_model_source(source):
    """``source`` itself, unless it names a GGUF file: then the converted checkpoint directory (converted now if the
    cache does not hold it yet). Objects and other paths pass through unchanged, except a directory that holds only
    ``.gguf`` files, which is refused with the file to pass instead."""
    if is_gguf(source):
        return gguf_to_checkpoint(source)
    if isinstance(source, (str, os.PathLike)) and os.path.isdir(source) and \
            not os.path.isfile(os.path.join(source, "config.json")):
        found = sorted(glob.glob(os.path.join(glob.escape(os.fspath(source)), "*.gguf")))
        if found:
            raise GGUFError(f"{source} holds no config.json but GGUF file(s) {', '.join(map(os.path.basename, found))}:"
                            f" pass the file itself, e.g. model={found[0]!r}.")
    return source


def gguf_to_checkpoint(path: str, cache_dir: str | None = None) -> str:
    """The safetensors checkpoint directory converted from the GGUF file ``path`` (see the module docstring)."""
    path = os.path.abspath(os.path.expanduser(os.fspath(path)))
    check_gguf_header(path)
    digest = file_digest(path)
    root = os.path.abspath(os.path.expanduser(cache_dir)) if cache_dir else cache_root()
    target = os.path.join(root, f"{os.path.basename(path)[:-len('.gguf')]}-{digest[:16]}")
    done = _converted(root, target, digest)  # a hit needs neither the gguf package nor a parse of the file
    if done:
        return done
    check_gguf_file(path)
    try:
        os.makedirs(root, exist_ok=True)
        lock = open(os.path.join(root, f".{digest[:16]}.lock"), "w")
    except OSError as error:
        raise GGUFError(f"cannot write the GGUF cache {root} ({error}); set RLHF_CACHE to a writable directory.") \
            from None
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second process converting the same file waits here, then reuses
        done = _converted(root, target, digest)
        if done:
            return done
        if os.path.exists(target):  # an entry from an interrupted or older conversion, or one with files missing
            shutil.rmtree(target)
        for stale in glob.glob(glob.escape(target) + ".partial-*"):  # a killed conversion's (we hold the lock)
            shutil.rmtree(stale, ignore_errors=True)
        staging = f"{target}.partial-{os.getpid()}"
        start = time.time()
        logger.warning("Converting %s to a float32 safetensors checkpoint in %s, once per file (about 20 s and "
                       "540 MB for a 135 M-parameter model)", path, target)
        try:
            _convert(path, staging)
            for name in os.listdir(staging):  # safetensors writes its file 0600: readable like the rest
                os.chmod(os.path.join(staging, name), 0o644)
            with open(os.path.join(staging, _DONE), "w") as f:
                json.dump({"source": path, "sha256": digest, "seconds": round(time.time() - start, 1),
                           "files": sorted(os.listdir(staging))}, f, indent=2)
            os.replace(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


def _converted(root: str, target: str, digest: str) -> str | None:
    """The complete entry for ``digest``: ``target``, else one made from the same bytes under another file name."""
    for entry in [target, *sorted(glob.glob(os.path.join(glob.escape(root), f"*-{digest[:16]}")))]:
        if _complete(entry, digest):
            return entry
    return None


def _complete(target: str, digest: str) -> bool:
    """Whether ``target`` holds a finished conversion of ``digest`` with every file it was written with."""
    try:
        with open(os.path.join(target, _DONE)) as f:
            done = json.load(f)
    except (OSError, ValueError):
        return False
    return done.get("sha256") == digest and all(os.path.isfile(os.path.join(target, name))
                                                for name in done.get("files", ["config.json"]))


def check_gguf_header(path: str) -> None:
    """A missing file, a directory, a file that is not GGUF or of an unknown GGUF version: a named error."""
    if not os.path.isfile(path):
        raise GGUFError(f"GGUF file not found: {path}" + (" (it is a directory)" if os.path.isdir(path) else "") +
                        ". GGUF files are read from local paths only: download one from the hub first.")
    with open(path, "rb") as f:
        head = f.read(8)
    if head[:4] != GGUF_MAGIC:
        raise GGUFError(f"{path} is not a GGUF file: it starts with {head[:4]!r}, not {GGUF_MAGIC!r}. A GGUF "
                        "file is what llama.cpp's convert script writes; for a Hugging Face checkpoint pass its "
                        "directory instead.")
    if len(head) == 8 and struct.unpack("<I", head[4:8])[0] not in (2, 3):
        raise GGUFError(f"{path}: GGUF version {struct.unpack('<I', head[4:8])[0]} is not supported (2 or 3 are).")


def check_gguf_file(path: str) -> None:
    """Fail with a named, actionable error for what would otherwise surface deep inside a loader: a missing file,
    a file that is not GGUF, a truncated one, no ``gguf`` package, an architecture transformers cannot load."""
    check_gguf_header(path)
    if importlib.util.find_spec("gguf") is None:
        raise ImportError(f"Loading {path} needs the `gguf` package, which is not installed: {INSTALL_HINT}")
    architecture = _read_architecture(path)
    supported = _loadable_architectures()
    if architecture not in supported and _RENAMES.get(architecture, architecture.replace("-", "_")) not in supported:
        raise GGUFError(f"{path}: architecture {architecture!r} cannot be loaded from GGUF by transformers (it loads "
                        f"{', '.join(sorted(supported))}). Convert the original checkpoint instead, or use a model "
                        "of a supported architecture.")


# llama.cpp's names for architectures that transformers' GGUF loader knows under another spelling (the
# ``updated_architecture`` of its load_gguf_checkpoint).
_RENAMES = {"qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe", "gpt-oss": "gpt_oss", "minimax-m2": "minimax_m2"}


def _loadable_architectures() -> set[str]:
    """What transformers' GGUF readers load: the mapping's keys less its two metadata groups, plus the architectures
    the newer reader (transformers.integrations.gguf) builds a config for."""
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    supported = set(GGUF_SUPPORTED_ARCHITECTURES) - {"general", "tokenizer"}
    try:
        from transformers.integrations.gguf import GGUF_CONFIG_ARCHS
    except ImportError:  # a transformers without the newer reader
        GGUF_CONFIG_ARCHS = {}
    return supported | set(GGUF_CONFIG_ARCHS)


def _read_architecture(path: str) -> str:
    """``general.architecture`` of the file, reading every tensor's extent so that a truncated file fails here."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
        field = reader.fields["general.architecture"]
        architecture = bytes(field.parts[field.data[0]]).decode()
        end = max(int(t.data_offset) + int(t.n_bytes) for t in reader.tensors) if reader.tensors else 0
    except KeyError:
        raise GGUFError(f"{path} has no general.architecture field: not a model file transformers can load.") from None
    except (ValueError, IndexError, struct.error, OSError) as error:
        raise GGUFError(f"{path} cannot be read as GGUF ({type(error).__name__}: {error}); it is probably truncated "
                        "or corrupt: download or copy it again.") from None
    size = os.path.getsize(path)
    if end > size:
        raise GGUFError(f"{path} is truncated: its tensors need {end:,} bytes, the file has {size:,}. Download or "
                        "copy it again.")
    return architecture


def _convert(path: str, out_dir: str) -> None:
    """Load through transformers' GGUF support (dequantized to float32) and save as a plain checkpoint. The loaded
    model carries a GGUF ``quantization_config`` that refuses ``save_pretrained``; an identical model built from the
    config without it holds the same weights and saves normally."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, name = os.path.split(path)  # transformers' progress bars stay on: this runs once per file
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    settings = loaded.config.to_dict()
    settings.pop("quantization_config", None)
    config = AutoConfig.for_model(**settings)
    plain = type(loaded)(config).to(torch.float32)
    missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False)
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise GGUFError(f"{path}: the converted model's weights do not match its architecture "
                        f"(missing {missing[:5]}, unexpected {unexpected[:5]}).")
    if config.tie_word_embeddings:
        plain.tie_weights()
    plain.generation_config = loaded.generation_config
    plain.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)

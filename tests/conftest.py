import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from rlhf.extras.tiny import char_tokenizer, tiny_model  # noqa: E402


@pytest.fixture
def tokenizer():
    return char_tokenizer()


@pytest.fixture
def llama():
    return tiny_model("llama", hidden_size=32, num_layers=2, num_heads=2, seed=0).eval()


@pytest.fixture
def gpt2():
    return tiny_model("gpt2", hidden_size=32, num_layers=2, num_heads=2, seed=0).eval()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)

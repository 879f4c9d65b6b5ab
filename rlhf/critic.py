"""The PPO critic: a transformer backbone (``AutoModel``) and a scalar value head, Linear(hidden, 1).

Saved as a directory that ``from_pretrained`` on the backbone understands, plus
``value_head.safetensors``; ``ValueModel.from_pretrained`` loads both back.
"""

import copy
import os
from dataclasses import dataclass

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModel, PreTrainedModel

from rlhf.checkpoint import load_model_weights
from rlhf.forward import cache_argument, model_cache, predicting_outputs
from rlhf.integrity import check_adapter_weights

VALUE_HEAD_FILE = "value_head.safetensors"
# Heads of sequence-classification reward models that can start the value head.
_REWARD_HEAD_NAMES = ("score", "classifier", "v_head")


@dataclass
class ValueOutput:
    values: torch.Tensor  # [B, L]
    cache: object = None


class ValueModel(nn.Module):
    """V(prefix) for every position of a sequence: ``forward`` returns values [B, L]."""

    def __init__(self, backbone: PreTrainedModel, value_head: nn.Linear | None = None):
        super().__init__()
        self.backbone = backbone
        self.config = backbone.config
        hidden = backbone.config.get_text_config().hidden_size
        dtype = next(backbone.parameters()).dtype
        if value_head is None:
            # Small weights and zero bias: values start near 0 whatever the backbone (OpenRLHF's choice).
            value_head = nn.Linear(hidden, 1, dtype=dtype)
            nn.init.normal_(value_head.weight, std=1.0 / (hidden + 1))
            nn.init.zeros_(value_head.bias)
        self.value_head = value_head

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache: bool = False,
                cache=None) -> "ValueOutput":
        """Values [B, L] (fp32) at every position, and the backbone's KV cache when ``use_cache``."""
        kwargs = {cache_argument(self.backbone): cache} if cache is not None else {}
        outputs = self.backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                use_cache=use_cache, **kwargs)
        return ValueOutput(self.value_head(outputs.last_hidden_state).squeeze(-1).float(), model_cache(outputs))

    def gradient_checkpointing_enable(self, **kwargs) -> None:
        self.backbone.gradient_checkpointing_enable(**kwargs)

    def add_lora(self, peft_config) -> None:
        """Train the backbone through a LoRA adapter of the actor's configuration (the value head trains
        fully)."""
        import dataclasses

        from peft import get_peft_model

        self.backbone = get_peft_model(self.backbone, dataclasses.replace(peft_config, task_type="FEATURE_EXTRACTION"))

    # ---------------------------------------------------------------- building
    @classmethod
    def from_causal_lm(cls, model: PreTrainedModel) -> "ValueModel":
        """A critic whose backbone is a copy of the causal LM's (e.g. the actor's) transformer."""
        return cls(copy.deepcopy(model.base_model))

    @classmethod
    def from_pretrained(cls, path: str, dtype=torch.float32, trust_remote_code: bool = False) -> "ValueModel":
        """Load a saved critic, or start one from any model directory: a causal LM or a reward model
        (whose score head then starts the value head)."""
        from rlhf.gguf import resolve_model_source
        from rlhf.models import quiet_progress_bars

        path = resolve_model_source(path)  # a .gguf file: its converted checkpoint directory
        adapter = os.path.exists(os.path.join(path, "adapter_config.json"))
        with quiet_progress_bars():
            if adapter:  # a LoRA critic: its base model, then the adapter
                from peft import PeftConfig, PeftModel

                check_adapter_weights(path)  # safetensors only: peft would fall back to a pickled adapter_model.bin
                base = PeftConfig.from_pretrained(path).base_model_name_or_path
                backbone = PeftModel.from_pretrained(AutoModel.from_pretrained(
                    base, dtype=dtype, use_safetensors=True, trust_remote_code=trust_remote_code), path)
            else:
                backbone = AutoModel.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code,
                                                     use_safetensors=True)
        critic = cls(backbone)
        head_path = os.path.join(path, VALUE_HEAD_FILE)
        head = load_file(head_path) if os.path.exists(head_path) else _reward_head(path)
        if head is not None:
            _load_head(critic, head)
        return critic

    def load_weights(self, path: str) -> None:
        """Load what ``save_pretrained`` wrote in ``path`` into this critic (backbone and head)."""
        load_model_weights(self.backbone, path)
        self.value_head.load_state_dict(load_file(os.path.join(path, VALUE_HEAD_FILE)))

    def save_pretrained(self, path: str, state_dict: dict | None = None) -> None:
        """Backbone via ``save_pretrained`` (safetensors) and the head in ``value_head.safetensors``."""
        state_dict = state_dict if state_dict is not None else self.state_dict()
        backbone_state = {k[len("backbone."):]: v for k, v in state_dict.items() if k.startswith("backbone.")}
        self.backbone.save_pretrained(path, state_dict=backbone_state, safe_serialization=True)
        head = {k[len("value_head."):]: v.contiguous() for k, v in state_dict.items() if k.startswith("value_head.")}
        save_file(head, os.path.join(path, VALUE_HEAD_FILE))


def completion_values(critic: nn.Module, prompt_ids, prompt_mask, completion_ids, completion_mask,
                      group_size: int = 1, prefix_model: nn.Module | None = None) -> torch.Tensor:
    """V of the prefix before each completion token, [B, T], aligned with ``completion_logprobs``: the
    value of token t comes from the position that predicts it (see ``predicting_outputs``)."""
    return predicting_outputs(critic, prompt_ids, prompt_mask, completion_ids, completion_mask,
                              lambda outputs: outputs.values, group_size, prefix_model)


def build_critic(value_model, actor: PreTrainedModel, dtype=torch.float32, trust_remote_code: bool = False):
    """The critic PPO trains: from ``value_model`` (a ValueModel, a path, or a causal LM / backbone
    object), or by default from a copy of the actor's backbone."""
    if value_model is None:
        return ValueModel.from_causal_lm(actor)
    if isinstance(value_model, ValueModel):
        return value_model
    if isinstance(value_model, str):
        return ValueModel.from_pretrained(value_model, dtype=dtype, trust_remote_code=trust_remote_code)
    if isinstance(value_model, PreTrainedModel):
        critic = ValueModel(value_model.base_model)
        for name in _REWARD_HEAD_NAMES:  # a reward model object: its head starts the value head
            head = getattr(value_model, name, None)
            if isinstance(head, nn.Linear) and head.out_features == 1:
                _load_head(critic, {k: v.detach() for k, v in head.state_dict().items()})
        return critic
    raise TypeError(f"value_model must be None, a path, a PreTrainedModel or a ValueModel, got "
                    f"{type(value_model).__name__}.")


def _reward_head(path: str) -> dict | None:
    """The one-output head of a sequence-classification checkpoint in ``path``, if it has one (only the
    head's tensors are read)."""
    for name in sorted(os.listdir(path)):
        if not name.endswith(".safetensors"):
            continue
        with safe_open(os.path.join(path, name), framework="pt") as f:
            keys = set(f.keys())
            for head in _REWARD_HEAD_NAMES:
                if f"{head}.weight" in keys and f.get_slice(f"{head}.weight").get_shape()[0] == 1:
                    out = {"weight": f.get_tensor(f"{head}.weight")}
                    if f"{head}.bias" in keys:
                        out["bias"] = f.get_tensor(f"{head}.bias")
                    return out
    return None


def _load_head(critic: ValueModel, head: dict) -> None:
    with torch.no_grad():
        critic.value_head.weight.copy_(head["weight"].reshape(1, -1))
        critic.value_head.bias.copy_(head["bias"].reshape(1) if "bias" in head else torch.zeros(1))

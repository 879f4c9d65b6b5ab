"""Loading the actor and its tokenizer, switching dropout off, the frozen reference copy, LoRA, a distillation
teacher."""

import contextlib
import copy
import logging
import os

import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from rlhf.gguf import resolve_model_source
from rlhf.integrity import check_safetensors_files

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}


def resolve_dtype(name: str):
    """A config's dtype name as ``from_pretrained`` takes it ("auto" stays "auto")."""
    return _DTYPES[name]


@contextlib.contextmanager
def quiet_progress_bars():
    """transformers' own progress bars ("Loading weights", "Writing model shards") off for the block: inside a
    training run they would break the run's progress bar into pieces."""
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


def load_causal_lm(model: str | PreTrainedModel, dtype: str = "float32", trust_remote_code: bool = False,
                   init_kwargs: dict | None = None, what: str = "model"):
    """A causal LM from a path or hub id (safetensors only, unless ``init_kwargs`` says otherwise), or the model object
    itself. ``init_kwargs``: more ``from_pretrained`` arguments (a config's ``model_init_kwargs``). A ``.gguf`` file is
    converted once into a cached checkpoint directory (rlhf/gguf.py) and loaded from there. A checkpoint that is not a
    causal LM (``check_causal_lm``) is refused, naming the setting ``what``."""
    if isinstance(model, nn.Module):
        check_causal_lm(model, [], getattr(model, "name_or_path", type(model).__name__), what)
        return model
    if init_kwargs and "gguf_file" in init_kwargs:
        raise ValueError(f"model_init_kwargs gguf_file={init_kwargs['gguf_file']!r}: pass the GGUF file itself as the "
                         f"model (model={os.path.join(os.fspath(model), init_kwargs['gguf_file'])!r}); it is then "
                         "converted once into a plain checkpoint that can be trained and saved (rlhf/gguf.py).")
    model = resolve_model_source(model)
    if os.path.isdir(model):
        check_safetensors_files(model)  # a truncated file is named here, not as a bare SafetensorError
    settings = {"use_safetensors": True, **(init_kwargs or {})}
    with quiet_progress_bars():
        loaded, info = AutoModelForCausalLM.from_pretrained(model, dtype=resolve_dtype(dtype), output_loading_info=True,
                                                            trust_remote_code=trust_remote_code, **settings)
    check_causal_lm(loaded, info["missing_keys"], model, what)
    return loaded


CLASSIFIER_SUFFIXES = ("ForSequenceClassification", "ForTokenClassification", "ForQuestionAnswering")


def check_causal_lm(model: nn.Module, missing_keys, source, what: str) -> None:
    """Raise unless ``model`` (loaded from ``source`` as the setting ``what``) is a causal LM with its own LM head:
    ``AutoModelForCausalLM`` loads a reward model's or a bare backbone's checkpoint too, only reporting (in its load
    report) the LM head it initialised at random. A reward model (``config.architectures`` ending in
    ForSequenceClassification) with tied embeddings reports nothing missing; its architecture tells."""
    kinds = [*(getattr(getattr(model, "config", None), "architectures", None) or []), type(model).__name__]
    classifier = next((k for k in kinds if k.endswith(CLASSIFIER_SUFFIXES)), None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    prefix = next((name + "." for name, module in model.named_modules() if module is head), None) if head else None
    missing = [k for k in missing_keys if prefix is not None and k.startswith(prefix)]
    if classifier is None and not missing:
        return
    reason = (f"a {classifier} checkpoint (a reward or classification model)" if classifier else
              f"a {kinds[0]} checkpoint whose weights lack the LM head ({', '.join(missing)})")
    raise ValueError(f"{what}={source!r} is {reason}: not a causal LM; its LM head would start random. Give {what} "
                     "a causal LM checkpoint (config.json architectures ending in ForCausalLM); a reward model "
                     "belongs in reward_funcs (or value_model, PPO's critic).")


def load_tokenizer(
    model: str | PreTrainedModel,
    processing_class: PreTrainedTokenizerBase | None = None,
    trust_remote_code: bool = False,
    revision: str | None = None,
) -> PreTrainedTokenizerBase:
    """The given tokenizer, else the one saved with the model (at ``revision``). Ensures a pad token (see below)."""
    if isinstance(processing_class, (str, os.PathLike)):
        raise TypeError(f"processing_class={processing_class!r} is a path; it takes a tokenizer object. To use the "
                        "tokenizer saved with a model (or a .gguf file), leave processing_class None and pass the path "
                        "as the model, or load it: AutoTokenizer.from_pretrained(path).")
    if processing_class is not None:
        tokenizer = processing_class
    else:
        source = (resolve_model_source(os.fspath(model)) if isinstance(model, (str, os.PathLike))
                  else getattr(model, "name_or_path", None))
        if not source:
            raise ValueError(
                "processing_class is required when the model is passed as an object without a saved path: "
                "pass the tokenizer, e.g. processing_class=AutoTokenizer.from_pretrained(...)."
            )
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code,
                                                  **({"revision": revision} if revision else {}))
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise ValueError(
                "The tokenizer has neither a pad token nor an EOS token; set one, e.g. "
                "tokenizer.add_special_tokens({'pad_token': '<pad>'}) and resize the model's embeddings."
            )
        # Safe here: completion masks come from positions, never from comparing ids with the pad id.
        logger.warning("The tokenizer has no pad token; using its EOS token %r for padding.", tokenizer.eos_token)
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def eos_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Every id that ends a completion: the tokenizer's EOS and all of the model's generation EOS ids."""
    ids = set()
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (configured, tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif value is not None:
            ids.update(int(v) for v in value)
    if not ids:
        raise ValueError("Neither the model's generation_config nor the tokenizer defines an EOS token id.")
    return sorted(ids)


def disable_dropout(model: nn.Module) -> None:
    """Set every dropout probability to 0, so that forward passes are deterministic in train mode too.

    Train mode is still needed for gradient checkpointing, and a ratio computed with dropout on is
    not 1 on the first on-policy pass.
    """
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        for attr in ("attention_dropout", "dropout", "attn_dropout"):
            if isinstance(getattr(module, attr, None), float):
                setattr(module, attr, 0.0)
    config = getattr(model, "config", None)
    if config is not None:
        for attr in ("attention_dropout", "hidden_dropout", "dropout", "attn_pdrop", "resid_pdrop", "embd_pdrop"):
            if isinstance(getattr(config, attr, None), float):
                setattr(config, attr, 0.0)


def frozen_copy(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """A deep copy in eval mode (the reference policy), optionally in ``dtype``, only ever run under
    ``torch.no_grad`` and never optimised.

    Its parameters keep ``requires_grad=True`` on purpose: with a KV cache (the shared-prompt path) some
    CPU kernels dispatch on that flag, and the reference must compute exactly as the actor does, so that
    the KL of identical models is exactly 0.
    """
    reference = copy.deepcopy(model)
    if dtype is not None:
        reference.to(dtype)
    return reference.eval()


def check_reference_options(args, lora: bool, has_reference: bool) -> None:
    """``ref_model_dtype`` and ``offload_reference`` shape the reference model's separate copy. A LoRA actor has no
    such copy (its reference is the base with the adapter disabled): setting them is an error rather than
    silently ignored. Without a KL term there is no reference at all: a warning. ``sync_ref_model`` needs the copy
    too: with a LoRA actor it is an error, as in TRL."""
    if lora and has_reference and args.sync_ref_model:
        raise ValueError("sync_ref_model=True with a LoRA actor (peft_config): its reference is the base model with "
                         "the adapter disabled, inside the actor, so there is no separate reference to sync (TRL "
                         "refuses this too). Set sync_ref_model=False, or train without LoRA.")
    given = [f"{name}={getattr(args, name)!r}" for name in ("ref_model_dtype", "offload_reference")
             if getattr(args, name) not in (None, False)]
    if not given:
        return
    if lora and has_reference:
        raise ValueError(f"{' and '.join(given)} with a LoRA actor: its reference is the base model with the adapter "
                         "disabled, inside the actor, so there is no reference copy to cast or offload. Unset them "
                         "(the reference already costs no extra memory).")
    if not has_reference:
        logger.warning("%s: there is no reference model (kl_coef=0 or kl_in=None), so this does nothing.",
                       " and ".join(given))


def apply_lora(model: PreTrainedModel, peft_config, gradient_checkpointing: bool = False):
    """Wrap ``model`` in a PEFT adapter; only the adapter's weights train. With gradient checkpointing
    the inputs are made to require grad, so a checkpointed block's adapter weights always get gradients."""
    from peft import get_peft_model

    if gradient_checkpointing:
        model.enable_input_require_grads()
    return get_peft_model(model, peft_config)


def load_teacher(teacher: str | PreTrainedModel, student_tokenizer: PreTrainedTokenizerBase, dtype: str | None,
                 student_dtype: str = "float32", teacher_tokenizer: PreTrainedTokenizerBase | None = None,
                 trust_remote_code: bool = False, student_vocab_size: int | None = None) -> nn.Module:
    """A distillation teacher in eval mode with dropout off, in ``dtype`` (None: ``student_dtype`` for a path, a model
    object as it is), after checking its tokenizer against the student's (``check_shared_tokenizer``): the student's
    token ids are scored under the teacher, so each must mean the same token to both.

    ``student_vocab_size``: the rows of the student's output layer, the ids it can sample (default: its tokenizer's
    ids). A teacher with more output ids has its embeddings cut to the student's (``resize_token_embeddings``, in
    place): its distribution is then renormalised over the ids the student can sample, log p_T(y) = x_y -
    logsumexp(x[:V_student]), the teacher conditioned on the student's support. That is what the reverse KL can
    reach (zero for a student equal to the teacher there); uncut, every teacher log-prob would be lower by
    -log p_T(student's ids | context), a shift that varies with the context (0 only where the extra ids get no mass)."""
    teacher = resolve_model_source(teacher)
    model = load_causal_lm(teacher, dtype or student_dtype, trust_remote_code, what="teacher_model")
    if dtype is not None and dtype != "auto":
        model.to(resolve_dtype(dtype))
    if teacher_tokenizer is None:
        source = teacher if isinstance(teacher, str) else getattr(model, "name_or_path", None)
        if not source:
            raise ValueError("The teacher model object has no saved path to load its tokenizer from; pass "
                             "teacher_processing_class (its tokenizer) to check it against the student's.")
        teacher_tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    if student_vocab_size is None:
        student_vocab_size = max(student_tokenizer.get_vocab().values()) + 1
    check_shared_tokenizer(student_tokenizer, teacher_tokenizer, student_vocab_size)
    teacher_vocab_size = output_vocab_size(model)
    if teacher_vocab_size < student_vocab_size:
        raise ValueError(f"teacher_model: the teacher's output layer has {teacher_vocab_size} rows, fewer than the "
                         f"student's {student_vocab_size}: an id the student samples past {teacher_vocab_size - 1} has "
                         "no log-prob under the teacher (an index error at the first step). Use a teacher whose output "
                         "layer covers the student's ids (the same model family), or, if the student's rows past it "
                         f"are unused padding, cut them: student.resize_token_embeddings({teacher_vocab_size}).")
    if teacher_vocab_size > student_vocab_size:
        logger.info("The teacher's output layer has %d ids, the student's %d: the teacher's embeddings are cut to the "
                    "student's ids (its extra tokens are ones the student cannot sample).", teacher_vocab_size,
                    student_vocab_size)
        model.resize_token_embeddings(student_vocab_size)
    disable_dropout(model)
    return model.eval()


def input_vocab_size(model: nn.Module) -> int:
    """The rows of ``model``'s input embedding: the ids a prompt may hold (``ds_shape``: see ``output_vocab_size``)."""
    weight = model.get_input_embeddings().weight
    return getattr(weight, "ds_shape", weight.shape)[0]


def absolute_positions(model: nn.Module) -> int | None:
    """The positions of a learned absolute position table (GPT-2's ``wpe``, OPT's ``embed_positions``), past which
    a forward pass is an IndexError; None for a model without one (rotary, ALiBi: they run on, extrapolating)."""
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if isinstance(module, nn.Embedding) and (leaf == "wpe" or "position" in leaf):
            config = getattr(model, "config", None)
            positions = getattr(config.get_text_config(), "max_position_embeddings", None) if config else None
            return positions or module.num_embeddings
    return None


def output_vocab_size(model: nn.Module) -> int:
    """The rows of ``model``'s output layer: the token ids it can sample (a DeepSpeed ZeRO-3 weight is partitioned:
    its full shape is ``ds_shape``)."""
    weight = model.get_output_embeddings().weight
    return getattr(weight, "ds_shape", weight.shape)[0]


def check_shared_tokenizer(student: PreTrainedTokenizerBase, teacher: PreTrainedTokenizerBase,
                           student_vocab_size: int) -> None:
    """Raise unless every id the student can sample (below ``student_vocab_size``) is the same token to both: each
    student token has its id in the teacher's tokenizer, and each teacher token below that id is the student's. The
    teacher may add tokens at higher ids (a superset of the vocabulary)."""
    mine, theirs = student.get_vocab(), teacher.get_vocab()
    shared = {t for t, i in theirs.items() if i < student_vocab_size}
    differing = sorted({t for t in mine.keys() | shared if mine.get(t) != theirs.get(t)},
                       key=lambda t: (mine.get(t, theirs.get(t)), t))
    if differing:
        examples = ", ".join(f"{t!r}: student {mine.get(t)}, teacher {theirs.get(t)}" for t in differing[:3])
        raise ValueError(
            f"The teacher does not share the student's tokenizer: {len(differing)} token(s) differ among the "
            f"{student_vocab_size} ids the student can sample ({examples}). On-policy distillation scores the "
            "student's token ids under the teacher; use a teacher of the same model family (the same tokenizer, or "
            "one that only adds tokens after the student's ids).")

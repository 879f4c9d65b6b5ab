"""On-policy distillation: the teacher's per-token signal against its definition, scored sequence by sequence; zero
when the teacher is the student; alone or added to the task reward; tokenizers checked at construction."""

import copy

import pytest
import torch
from helpers import gradient, independent_lengths, make_trainer, policy_gradient_reference, relative_error
from test_policy_variants import perturb, sequence_scores
from tokenizers import Tokenizer, models
from transformers import PreTrainedTokenizerFast

from rlhf.extras.tiny import TOOL_VOCAB_SIZE, char_tokenizer, save_tiny, tiny_model
from rlhf.metrics import StepMetrics


def student():
    return tiny_model("llama", hidden_size=32, num_layers=2, num_heads=2, seed=0)


def teacher():
    return tiny_model("llama", hidden_size=64, num_layers=3, num_heads=4, seed=7)


def distilling(tmp_path, teacher_model, **overrides):
    return make_trainer(tmp_path, model=student(), trainer_kwargs=dict(
        teacher_model=teacher_model, teacher_processing_class=char_tokenizer()), **overrides)


def test_a_teacher_identical_to_the_student_gives_exactly_zero_signal(tmp_path):
    model = student()
    trainer = distilling(tmp_path / "distil", copy.deepcopy(model))
    batch, _ = trainer.make_rollout(0)
    plain = make_trainer(tmp_path / "plain", model=student())  # the same seed: the same samples
    reference, _ = plain.make_rollout(0)
    assert torch.equal(batch.completion_ids, reference.completion_ids)  # same samples
    assert torch.equal(batch.teacher_logprobs, batch.old_logprobs)
    valid = batch.completion_mask.bool()
    assert torch.equal(batch.advantages[valid], reference.advantages.unsqueeze(1).expand_as(valid)[valid])
    assert torch.equal(gradient(trainer, batch), gradient(plain, reference))


def test_the_signal_is_the_teacher_log_prob_minus_the_students(tmp_path):
    """advantages = A_task + distill_coef * (log p_teacher - log p_student) per token, both scored here sequence by
    sequence through the full logits."""
    big = teacher()
    trainer = distilling(tmp_path, copy.deepcopy(big), distill_coef=0.5)
    batch, _ = trainer.make_rollout(0)
    task = make_trainer(tmp_path / "task", model=student()).make_rollout(0)[0].advantages  # same samples, no teacher
    with torch.no_grad():
        for i, n in enumerate(independent_lengths(batch.completion_ids)):
            mine, _ = sequence_scores(trainer.model, batch, i)
            theirs, _ = sequence_scores(big, batch, i)
            torch.testing.assert_close(batch.teacher_logprobs[i, :n], theirs, atol=1e-5, rtol=0)
            torch.testing.assert_close(batch.advantages[i, :n], task[i] + 0.5 * (theirs - mine), atol=1e-5, rtol=0)
    assert (batch.teacher_logprobs != batch.old_logprobs)[batch.completion_mask.bool()].all()


def test_distillation_alone_is_the_policy_gradient_of_the_teacher_signal(tmp_path):
    """Task reward weighted 0: the advantage is the teacher's signal alone, and the first on-policy pass is the
    plain policy gradient with those per-token advantages."""
    trainer = distilling(tmp_path, teacher(), reward_weights=[0.0])
    metrics = StepMetrics()
    batch, _ = trainer.make_rollout(0, metrics)
    valid = batch.completion_mask.bool()
    signal = batch.teacher_logprobs - batch.old_logprobs
    assert torch.equal(batch.advantages[valid], signal[valid])
    assert metrics.reduce()["distill/reverse_kl"] == pytest.approx(-signal[valid].mean().item(), rel=1e-5)
    grad = gradient(trainer, batch)
    reference, _ = policy_gradient_reference(trainer.model, batch)
    assert relative_error(grad, reference) < 1e-5


def swapped_tokenizer():
    """The character tokenizer with the ids of "a" and "b" exchanged: one vocabulary, another numbering."""
    vocab = char_tokenizer().get_vocab()
    vocab["a"], vocab["b"] = vocab["b"], vocab["a"]
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<unk>")))


def test_a_teacher_with_another_tokenizer_is_refused_at_construction(tmp_path):
    with pytest.raises(ValueError, match=r"does not share the student's tokenizer.*'a': student 14, teacher 15"):
        make_trainer(tmp_path / "swapped", model=student(), trainer_kwargs=dict(
            teacher_model=teacher(), teacher_processing_class=swapped_tokenizer()))
    # Extra teacher tokens at ids the student's model can sample (its head has 104 rows, its tokenizer 102 tokens):
    # the same id would mean a token to one and nothing to the other.
    with pytest.raises(ValueError, match=r"'<tool_call>': student None, teacher 102"):
        make_trainer(tmp_path / "padded", model=tiny_model("llama", vocab_size=TOOL_VOCAB_SIZE, hidden_size=32),
                     trainer_kwargs=dict(teacher_model=tiny_model("llama", vocab_size=TOOL_VOCAB_SIZE),
                                         teacher_processing_class=char_tokenizer(tools=True)))
    with pytest.raises(ValueError, match="teacher_processing_class"):  # an object with no tokenizer to check
        make_trainer(tmp_path / "object", model=student(), trainer_kwargs=dict(teacher_model=teacher()))


def test_a_teacher_whose_vocabulary_extends_the_students_is_scored_over_the_students_ids(tmp_path):
    """A teacher whose tokenizer adds tokens after the student's ids (<tool_call>, </tool_call> at 102, 103) is
    accepted. The student samples only its own ids, so the teacher's distribution is taken over those, renormalised:
    log p_T(y) = x_y - logsumexp(x[:V_student]), here from the untouched teacher's full logits, sequence by sequence.
    The negative control: the teacher's log-probs over its whole vocabulary differ (it puts mass on its extra ids)."""
    big = tiny_model("llama", vocab_size=TOOL_VOCAB_SIZE, hidden_size=64, num_layers=3, num_heads=4, seed=7)
    untouched = copy.deepcopy(big)
    trainer = make_trainer(tmp_path, model=student(), trainer_kwargs=dict(
        teacher_model=big, teacher_processing_class=char_tokenizer(tools=True)))
    batch, _ = trainer.make_rollout(0)
    vocab = student().config.vocab_size
    with torch.no_grad():
        for i, n in enumerate(independent_lengths(batch.completion_ids)):
            prompt = batch.prompt_ids[i][batch.prompt_mask[i].bool()]
            completion = batch.completion_ids[i, :n]
            logits = untouched(input_ids=torch.cat([prompt, completion]).unsqueeze(0)).logits[0, len(prompt) - 1: -1]
            restricted = torch.log_softmax(logits[:, :vocab], -1).gather(-1, completion.unsqueeze(-1)).squeeze(-1)
            whole = torch.log_softmax(logits, -1).gather(-1, completion.unsqueeze(-1)).squeeze(-1)
            torch.testing.assert_close(batch.teacher_logprobs[i, :n], restricted, atol=1e-5, rtol=0)
            assert ((whole - restricted).abs() > 1e-3).all()


def test_a_teacher_from_a_path_in_its_own_dtype_offloaded(tmp_path):
    path = save_tiny(str(tmp_path / "teacher"), hidden_size=64, num_layers=3)
    trainer = make_trainer(tmp_path / "run", model=student(), teacher_model=path, teacher_dtype="bfloat16",
                           offload_teacher=True)
    assert next(trainer.teacher.parameters()).dtype == torch.bfloat16 and not trainer.teacher.training
    metrics = trainer.training_step()
    assert metrics["distill/reverse_kl"] != 0 and next(trainer.teacher.parameters()).device.type == "cpu"


def test_gradient_does_not_depend_on_micro_batch_size(tmp_path):
    trainer = distilling(tmp_path, teacher(), num_epochs=2, distill_coef=0.3)
    batch, _ = trainer.make_rollout(0)
    perturb(trainer.model)
    grads = {}
    for size in (1, 2, batch.size):
        trainer.args.micro_batch_size = size
        grads[size] = gradient(trainer, batch)
    assert relative_error(grads[1], grads[batch.size]) < 1e-6 and relative_error(grads[2], grads[batch.size]) < 1e-6

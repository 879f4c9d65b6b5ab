"""On-policy distillation: the teacher's per-token signal against its definition, scored sequence by sequence; zero
when the teacher is the student; alone or added to the task reward; tokenizers checked at construction."""

import copy

import pytest
import torch
from helpers import gradient, independent_lengths, make_trainer, policy_gradient_reference, relative_error
from test_policy_variants import perturb, sequence_scores

from rlhf.extras.tiny import char_tokenizer, save_tiny, tiny_model
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


def test_a_teacher_with_another_tokenizer_is_refused_at_construction(tmp_path):
    other = char_tokenizer()
    other.add_tokens(["<tool>"])
    with pytest.raises(ValueError, match="does not share the student's tokenizer"):
        make_trainer(tmp_path, model=student(), trainer_kwargs=dict(teacher_model=teacher(),
                                                                    teacher_processing_class=other))
    with pytest.raises(ValueError, match="teacher_processing_class"):  # an object with no tokenizer to check
        make_trainer(tmp_path, model=student(), trainer_kwargs=dict(teacher_model=teacher()))


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

"""The trainer as a TRL user drives it: callbacks (transformers' TrainerCallback), trainer.state, train()'s return
value, train(resume_from_checkpoint=...), save_model() without a path, an IterableDataset, and reward functions
that use trainer_state / log_metric / log_extra, with what they log reaching metrics.jsonl, the report and the
console. One small run serves most tests (module fixture)."""

import json
import math
import os

import pytest
import torch
from datasets import IterableDataset
from transformers import AutoModelForCausalLM, TrainerCallback

from rlhf import GRPOConfig, GRPOTrainer
from rlhf.extras.tiny import char_tokenizer, tiny_model
from rlhf.metrics import read_metrics
from helpers import PROMPTS, make_trainer, varied_reward


class Recorder(TrainerCallback):
    """Records (event, global_step); asks for a checkpoint after step 1 and stops the run after step 2."""

    def __init__(self):
        self.events, self.logs = [], []

    def _note(self, event, state):
        self.events.append((event, state.global_step))

    def on_init_end(self, args, state, control, **kwargs):
        self._note("on_init_end", state)

    def on_train_begin(self, args, state, control, **kwargs):
        self._note("on_train_begin", state)

    def on_step_begin(self, args, state, control, **kwargs):
        self._note("on_step_begin", state)

    def on_step_end(self, args, state, control, model=None, processing_class=None, optimizer=None, **kwargs):
        assert model is not None and processing_class is not None and optimizer is not None
        self._note("on_step_end", state)
        control.should_save = state.global_step == 1
        control.should_training_stop = state.global_step == 2

    def on_log(self, args, state, control, logs=None, **kwargs):
        self._note("on_log", state)
        self.logs.append(logs)

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        assert "eval/reward_mean" in metrics
        self._note("on_evaluate", state)

    def on_save(self, args, state, control, **kwargs):
        self._note("on_save", state)

    def on_train_end(self, args, state, control, **kwargs):
        self._note("on_train_end", state)


def curious_reward(prompts, completions, trainer_state, log_metric, log_extra, **kwargs):
    """Sees the trainer's state, logs a metric and a column."""
    curious_reward.steps.append(trainer_state.global_step)
    curious_reward.states.add(id(trainer_state))
    log_metric("curious/mean_length", sum(len(c) for c in completions) / len(completions))
    log_extra("shouted", [c.upper() for c in completions])
    return varied_reward(prompts, completions)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("surface")
    curious_reward.steps, curious_reward.states = [], set()
    recorder = Recorder()
    trainer = make_trainer(out, reward=curious_reward, max_steps=5, eval_steps=10, save_steps=10, logging_steps=2,
                           log_completions=True, num_completions_to_print=3, write_report=True,
                           trainer_kwargs={"callbacks": [recorder], "eval_dataset": PROMPTS[:4]})
    result = trainer.train()
    return trainer, recorder, result, out


def test_callbacks_get_every_event_in_order_and_stop_the_run(run):
    trainer, recorder, result, out = run
    assert recorder.events == [
        ("on_init_end", 0), ("on_train_begin", 0), ("on_evaluate", 0), ("on_log", 0),
        ("on_step_begin", 0), ("on_step_end", 1), ("on_save", 1),
        ("on_step_begin", 1), ("on_step_end", 2), ("on_log", 2), ("on_evaluate", 2), ("on_log", 2), ("on_save", 2),
        ("on_log", 2), ("on_train_end", 2)]  # the last on_log: train()'s summary, as transformers logs it
    assert sorted(os.listdir(out / "checkpoint-1")) and (out / "checkpoint-2").is_dir()  # asked for, then last
    assert trainer.step == trainer.state.global_step == 2  # stopped at 2 of max_steps=5


def test_state_and_train_result(run):
    trainer, recorder, result, out = run
    records = read_metrics(str(out / "metrics.jsonl"))
    assert [r["step"] for r in records] == [0, 2, 2]  # eval before training, the stopped step's log and eval
    history = trainer.state.log_history  # our names, TRL's beside them (rlhf.trl_metrics), then train()'s summary
    assert [{k: v for k, v in h.items() if k in r} for h, r in zip(history, records)] == records
    assert history[1]["reward"] == records[1]["reward/mean"]
    assert history[2]["eval_reward"] == records[2]["eval/reward_mean"]
    assert history[1]["epoch"] == pytest.approx(2 * 4 / len(PROMPTS))
    assert len(history) == 4 and history[3]["step"] == 2 and history[3]["train_runtime"] > 0
    assert recorder.logs == history
    assert result.records == records  # the records, as logged
    global_step, training_loss, metrics = result  # unpacks as transformers' TrainOutput does
    assert (global_step, training_loss, metrics) == (result.global_step, result.training_loss, result.metrics)
    assert global_step == 2 and len(result) == 3
    assert result.metrics["reward/mean"] == records[1]["reward/mean"]
    assert result.metrics["eval/reward_mean"] == records[2]["eval/reward_mean"]
    assert result.training_loss == pytest.approx(records[1]["loss/total"], rel=1e-12)  # both: the mean over steps 1-2
    assert result.metrics["train_runtime"] > 0


def test_reward_functions_see_the_trainers_state(run):
    trainer, _, _, _ = run
    # eval at step 0, training steps 0 and 1 (state before the step), the final eval at step 2
    assert curious_reward.steps == [0, 0, 1, 2]
    assert curious_reward.states == {id(trainer.state)}


def test_log_metric_and_log_extra_reach_metrics_completions_and_report(run):
    _, _, _, out = run
    records = read_metrics(str(out / "metrics.jsonl"))
    assert records[1]["curious/mean_length"] > 0 and records[2]["eval/curious/mean_length"] > 0
    rows = [json.loads(line) for line in (out / "completions.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 2, 2]  # the logged step's rows (logging_steps=2)
    assert all(r["extra"]["shouted"] == r["completion"].upper() for r in rows)
    assert set(rows[0]["rewards"]) == {"curious_reward"} and isinstance(rows[0]["advantage"], float)
    report = (out / "report.html").read_text()
    assert 'alt="Logged by reward functions and callbacks"' in report
    assert "Training completions (step 2)" in report and "shouted: " in report


def test_train_resumes_from_a_checkpoint(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=2, save_steps=1)
    trainer.train()
    after_two = [p.detach().clone() for p in trainer.model.parameters()]
    resumed = make_trainer(tmp_path, max_steps=3)
    assert resumed.step == 0
    result = resumed.train(resume_from_checkpoint=True)  # the newest checkpoint in output_dir
    assert result.global_step == 3 and [r["step"] for r in resumed.state.log_history] == [1, 2, 3, 3]  # + summary
    assert resumed.state.log_history[1]["reward"] == resumed.state.log_history[1]["reward/mean"]  # TRL's names too
    tokens = [h["num_tokens"] for h in resumed.state.log_history[:3]]  # a running total, kept in the checkpoint
    assert tokens[0] < tokens[1] < tokens[2]
    again = make_trainer(tmp_path, max_steps=2)
    again.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))  # a path; finished: nothing to do
    assert again.step == 2
    assert all(torch.equal(a, b) for a, b in zip(after_two, again.model.parameters()))


def test_save_model_without_a_path_writes_output_dir(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=1)
    trainer.train()
    assert trainer.save_model() == str(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path))
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(),
                                                 trainer.unwrapped_model.state_dict().values()))
    assert (tmp_path / "metrics.jsonl").exists()  # the run's other files stay


def test_an_iterable_dataset_is_read_in_order_over_several_passes(tmp_path):
    rows = PROMPTS[:6]
    stream = IterableDataset.from_generator(lambda: iter(rows))
    config = GRPOConfig(output_dir=str(tmp_path), max_steps=2, prompts_per_step=4, num_generations=2,
                        max_new_tokens=4, micro_batch_size=8, disable_tqdm=True, write_report=False)
    trainer = GRPOTrainer(tiny_model("llama", hidden_size=32, num_layers=2, num_heads=2, seed=0), varied_reward,
                          args=config, train_dataset=stream, processing_class=char_tokenizer())
    seen = [trainer.sampler.rows(trainer.train_dataset, step)["prompt"] for step in range(3)]
    expected = [r["prompt"] for r in rows * 2]
    assert seen == [expected[0:4], expected[4:8], expected[8:12]]
    assert trainer.sampler.rows(trainer.train_dataset, 1)["prompt"] == expected[4:8]  # resuming at step 1
    assert [r["step"] for r in trainer.train().records] == [1, 2]
    with pytest.raises(ValueError, match="num_train_epochs=1 needs to know how many prompts there are"):
        GRPOTrainer(trainer.unwrapped_model, varied_reward, args=GRPOConfig(num_train_epochs=1, num_generations=2),
                    train_dataset=stream, processing_class=char_tokenizer())


def test_num_train_epochs_sets_the_run_length(tmp_path):
    trainer = make_trainer(tmp_path, num_train_epochs=0.3, max_steps=7)  # max_steps given too: it decides, as TRL
    assert trainer.args.max_steps == 7
    trainer = make_trainer(tmp_path, num_train_epochs=0.3, max_steps=100)  # our default max_steps: epochs decide
    assert trainer.args.max_steps == 3 and trainer.state.max_steps == 3  # ceil(0.3 x 30 prompts / 4)


def test_callbacks_and_optimizers_that_cannot_work_are_refused(tmp_path):
    with pytest.raises(TypeError, match="has none of the methods"):
        make_trainer(tmp_path, trainer_kwargs={"callbacks": [object()]})
    with pytest.raises(ValueError, match="optimizers: the trainer builds its own AdamW"):
        make_trainer(tmp_path, trainer_kwargs={"optimizers": (torch.optim.SGD([torch.zeros(1)], lr=1), None)})


def test_bf16_sets_the_autocast_precision(tmp_path):
    """TRL's bf16=True is Accelerate's bf16 autocast (one state per process: reset around the test)."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        trainer = make_trainer(tmp_path, bf16=True, max_steps=1)
        assert trainer.accelerator.mixed_precision == "bf16"
        metrics = trainer.training_step()
        assert metrics["guard/skipped_updates"] == 0 and math.isfinite(metrics["loss/policy"])
        assert next(trainer.model.parameters()).dtype == torch.float32  # autocast: the weights stay float32
        with pytest.raises(ValueError, match=r"mixed_precision='fp16' \(TRL's bf16 / fp16\): Accelerate was already"):
            make_trainer(tmp_path, fp16=True)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)

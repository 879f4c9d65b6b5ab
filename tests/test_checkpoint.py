"""Saving: the final model reloads with from_pretrained; a resumed run equals an uninterrupted one."""

import os

import torch
from helpers import make_trainer
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlhf.run_dir import latest_checkpoint


def test_saved_model_reloads_with_from_pretrained(tmp_path):
    trainer = make_trainer(tmp_path / "run", max_steps=1)
    trainer.train()
    path = trainer.save_model(str(tmp_path / "model"))
    assert os.path.exists(os.path.join(path, "model.safetensors"))
    reloaded = AutoModelForCausalLM.from_pretrained(path).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    ids = torch.tensor([tokenizer("12+34=")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, trainer.unwrapped_model.eval()(input_ids=ids).logits,
                                   atol=0, rtol=0)


def test_resume_gives_the_same_parameters_as_an_uninterrupted_run(tmp_path):
    common = dict(max_steps=4, num_epochs=2, mini_batch_size=8, micro_batch_size=4, save_steps=2)
    straight = make_trainer(tmp_path / "straight", **common)
    straight.train()

    first = make_trainer(tmp_path / "resumed", **{**common, "max_steps": 2})
    first.train()
    assert latest_checkpoint(str(tmp_path / "resumed")).endswith("checkpoint-2")
    # A fresh trainer, built from the initial model as the run was: the trained weights, the optimizer, the
    # schedule and the RNG must all come from the checkpoint.
    initial = make_trainer(tmp_path / "fresh", **common).unwrapped_model.lm_head.weight.detach().clone()
    resumed = make_trainer(tmp_path / "resumed", resume_from_checkpoint="latest", **common)
    assert not torch.equal(resumed.unwrapped_model.lm_head.weight, initial)
    assert resumed.step == 2
    resumed.train()
    for (name, a), b in zip(straight.unwrapped_model.named_parameters(), resumed.unwrapped_model.parameters()):
        assert torch.equal(a, b), name


def test_resuming_a_finished_run_trains_nothing(tmp_path, capsys):
    trainer = make_trainer(tmp_path, max_steps=1, save_steps=1)
    trainer.train()
    again = make_trainer(tmp_path, max_steps=1, resume_from_checkpoint="latest")
    result = again.train()
    assert result.records == [] and result.global_step == 1 and "already finished" in capsys.readouterr().out

"""Trackers tested with the real libraries, reading what they wrote back: tensorboard's event reader, and wandb's
offline run file (a LevelDB-style log of protobuf records). They carry TRL's tags (``train/reward`` for our
``reward/mean``: ``rlhf.trl_metrics``; ``tests/compat/test_trl_metrics.py`` compares them with TRL's own run)."""

import glob
import json
import struct
import time

import pytest

from rlhf.metrics import read_metrics
from rlhf.trackers import flat_config, resolve, wandb_dir
from helpers import make_trainer, varied_reward


def logging_reward(prompts, completions, log_metric, **kwargs):
    log_metric("custom/answer_rate", 0.25)
    return varied_reward(prompts, completions)


def test_report_to_names_are_checked():
    assert resolve("none") == [] and resolve(["none"]) == [] and resolve([]) == []
    assert resolve("tensorboard") == ["tensorboard"] and resolve(["tensorboard", "tensorboard"]) == ["tensorboard"]
    assert "tensorboard" in resolve("all")
    with pytest.raises(ValueError, match=r"unknown tracker\(s\) \['tensorbord'\]"):
        resolve(["tensorbord"])
    if not __import__("importlib").util.find_spec("aim"):
        with pytest.raises(ValueError, match=r"\['aim'\] not installed; pip install aim"):
            resolve(["aim"])


def test_hyperparameters_are_scalars_and_text():
    flat = flat_config({"lr": 1e-6, "report_to": ["tensorboard"], "mini_batch_size": None, "kw": {"a": 1},
                        "flag": True})
    assert flat == {"lr": 1e-6, "report_to": '["tensorboard"]', "mini_batch_size": "None", "kw": '{"a": 1}',
                    "flag": True}


@pytest.mark.parametrize("report_to", ["tensorboard", ["tensorboard"]])
def test_tensorboard_gets_metrics_config_and_the_completions_table(tmp_path, report_to):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    trainer = make_trainer(tmp_path, reward=logging_reward, report_to=report_to, log_completions=True,
                           num_completions_to_print=2, run_name="tb-run")
    trainer.train()
    run_dir = tmp_path / "runs" / "tb-run"
    events = event_accumulator.EventAccumulator(str(run_dir), size_guidance={"tensors": 0, "scalars": 0})
    events.Reload()
    records = read_metrics(str(tmp_path / "metrics.jsonl"))
    for tag, key in (("train/reward", "reward/mean"), ("train/entropy", "entropy"),
                     ("train/custom/answer_rate", "custom/answer_rate"), ("train/loss", "loss/total")):
        written = [(e.step, e.value) for e in events.Scalars(tag)]
        assert written == [(r["step"], pytest.approx(r[key], rel=1e-6)) for r in records], tag
    assert "reward/mean" not in events.Tags()["scalars"]  # TRL's names only, as transformers' callbacks write them
    assert [e.step for e in events.Scalars("train/train_runtime")] == [2]  # the end of train(), as transformers
    text = events.Tensors("completions/text_summary")
    assert [e.step for e in text] == [1, 2]
    table = text[-1].tensor_proto.string_val[0].decode()
    assert "| prompt | completion | logging_reward | advantage |" in table and table.count("\n") == 3
    assert _tensorboard_hparams(run_dir) == {**flat_config(trainer.args.to_dict()), "learning_rate": 1e-3}


def _tensorboard_hparams(run_dir) -> dict:
    """The hyperparameters add_hparams wrote (into a sub-directory of the run), read with tensorboard's loader."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    found = {}
    for path in glob.glob(str(run_dir / "*" / "events.out.tfevents.*")):
        for event in EventFileLoader(path).Load():
            for value in event.summary.value:
                if value.metadata.plugin_data.plugin_name != "hparams":
                    continue
                data = HParamsPluginData.FromString(value.metadata.plugin_data.content)
                if data.HasField("session_start_info"):
                    for name, setting in data.session_start_info.hparams.items():
                        found[name] = getattr(setting, setting.WhichOneof("kind"))
    return found


def test_no_tracker_for_none(tmp_path):
    trainer = make_trainer(tmp_path, report_to="none")
    assert trainer.args.report_to == [] and trainer.accelerator.log_with == []
    trainer.train()
    assert not (tmp_path / "runs").exists()


def _wandb_records(path: str):
    """The protobuf records of a wandb run file: a LevelDB-style log after a 7-byte header (":W&B", magic,
    version), in 32 KiB blocks of records with a 7-byte header each (crc, length, type: full/first/middle/last)."""
    from wandb.proto import wandb_internal_pb2

    data, position, pending = open(path, "rb").read(), 7, b""
    while position + 7 <= len(data):
        left = 32768 - position % 32768
        if left < 7:
            position += left
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        if kind == 0:
            position += left
            continue
        chunk, position = data[position + 7:position + 7 + length], position + 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def _finished_wandb_records(path: str, timeout: float = 60.0) -> list:
    """The records of a wandb run file once its last one, the exit record, is on disk: ``finish()`` returns before
    wandb's service process has flushed the file's tail (a file of 132,802 bytes read 131,072 right after it)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            records = list(_wandb_records(path))
        except Exception:  # a record cut off mid-write
            records = []
        if (records and records[-1].WhichOneof("record_type") == "exit") or time.monotonic() > deadline:
            return records
        time.sleep(0.2)


def test_wandb_offline_gets_metrics_config_and_the_completions_table(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_PROJECT", "rlhf-tests")
    trainer = make_trainer(tmp_path, reward=logging_reward, report_to="wandb", log_completions=True,
                           num_completions_to_print=2)
    trainer.train()
    (path,) = glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "run-*.wandb"))
    history, config = [], {}
    for record in _finished_wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            history.append({"_step": record.history.step.num, **row})
        elif kind == "run":
            config.update({item.key: item.value_json for item in record.run.config.update})
        elif kind == "config":
            config.update({item.key: item.value_json for item in record.config.update})
    records = read_metrics(str(tmp_path / "metrics.jsonl"))
    steps = {row["_step"]: row for row in history}
    for record in records:
        assert record["step"] in steps, f"step {record['step']} is not in wandb's history: {history}"
        assert steps[record["step"]]["train/reward"] == pytest.approx(record["reward/mean"])
        assert steps[record["step"]]["train/custom/answer_rate"] == 0.25
        assert steps[record["step"]]["train/global_step"] == record["step"]  # transformers' x-axis
    assert any(row.get("completions/nrows") == 2 for row in history)
    assert json.loads(config["learning_rate"]) == trainer.args.learning_rate
    assert json.loads(config["report_to"]) == '["wandb"]'  # a list, stored as its JSON text


def test_wandb_honours_wandb_dir(tmp_path, monkeypatch):
    """WANDB_DIR decides where wandb writes, as with transformers (wandb's own setting); without it, the run's files
    go to output_dir. Read back from a real offline run, also after an earlier run in the same process (wandb reads
    its environment once)."""
    monkeypatch.delenv("WANDB_DIR", raising=False)
    trainer = make_trainer(tmp_path / "run", max_steps=1, report_to="none")
    assert wandb_dir(trainer.args) == {"dir": str(tmp_path / "run")}
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_home"))
    assert wandb_dir(trainer.args) == {"dir": str(tmp_path / "wandb_home")}
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    make_trainer(tmp_path / "run2", max_steps=1, report_to="wandb").train()
    assert glob.glob(str(tmp_path / "wandb_home" / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert not (tmp_path / "run2" / "wandb").exists()

"""rlhf.report: the HTML training report written from a synthetic run directory."""

import base64
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from rlhf.report import OTHER, PANELS, main, panel_series, write_report

EVAL_ACCURACY = {0: 0.25, 5: 0.625, 10: 0.5}


def _write_run(run_dir) -> None:
    """A GRPO-like run: 10 training steps, evaluations at steps 0, 5 and 10, NaN values, a key missing from some
    records, no critic metrics, and a samples file whose completion holds a <script> tag."""
    records = [{"step": 0, "eval/reward_mean": 0.1, "eval/accuracy": EVAL_ACCURACY[0], "eval/pass@1": 0.2,
                "eval/pass@4": 0.4, "eval/mean_length": 12.0}]
    for step in range(1, 11):
        record = {"step": step, "reward/mean": 0.1 * step, "reward/correct/mean": 0.05 * step, "reward/std": 0.3,
                  "kl": float("nan") if step == 3 else 0.01 * step, "entropy": 1.0 - 0.05 * step,
                  "completions/mean_length": 20.0 + step, "completions/truncated_frac": 0.0,
                  "clip/low_frac": 0.01, "loss/policy": -0.1, "grad_norm": 1.5, "learning_rate": 1e-5,
                  "time/step": 0.5, "tokens_per_second": 400.0}
        if step % 2 == 0:
            record["clip/high_frac"] = float("nan") if step == 4 else 0.02  # absent from odd steps
        records.append(record)
        if step % 5 == 0:
            records.append({"step": step, "eval/reward_mean": 0.1 + step / 20, "eval/accuracy": EVAL_ACCURACY[step],
                            "eval/pass@1": float("nan"), "eval/pass@4": 0.5, "eval/mean_length": 10.0 + step})
    with open(run_dir / "metrics.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)  # json writes NaN as NaN
    with open(run_dir / "samples-5.jsonl", "w") as f:
        f.write(json.dumps({"step": 5, "prompt": "old", "completion": "from step five", "rewards": {"correct": 0.0}})
                + "\n")
    with open(run_dir / "samples-10.jsonl", "w") as f:
        for i in range(10):
            completion = "<script>alert('x')</script> 42" if i == 0 else "y" * 1000
            f.write(json.dumps({"step": 10, "prompt": f"What is 40 + {i}?", "completion": completion,
                                "rewards": {"correct": 1.0 if i == 0 else None}, "answer": "42"}) + "\n")


@pytest.fixture
def run_dir(tmp_path):
    run = tmp_path / "my-run"
    run.mkdir()
    _write_run(run)
    return run


def test_report_has_one_chart_per_panel_with_data(run_dir):
    path = write_report(str(run_dir))
    assert path == str(run_dir / "report.html") and os.path.isfile(path)
    text = Path(path).read_text(encoding="utf-8")
    assert "<h1>my-run</h1>" in text and "Steps: 10" in text
    expected = ["Reward", "Evaluation", "KL to the reference model", "Entropy", "Completion length", "Clip fraction",
                "Speed"]
    for title in expected:
        assert f'<img alt="{title}"' in text
    assert [p.title for p in PANELS if p.title not in expected] == [
        "KL of the updated policy to the rollout policy", "Critic loss", "Critic explained variance", "Tools and turns"]
    assert '<img alt="Critic' not in text
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)
    assert len(images) == text.count("data:image/png;base64,") == len(expected)
    assert all(base64.b64decode(image).startswith(b"\x89PNG\r\n\x1a\n") for image in images)
    assert "<script" not in text  # self-contained and static
    assert "http://" not in text and "https://" not in text


def test_summary_table_first_last_best(run_dir):
    text = Path(write_report(str(run_dir))).read_text(encoding="utf-8")
    first, last = EVAL_ACCURACY[0], EVAL_ACCURACY[10]
    best_step, best = max(EVAL_ACCURACY.items(), key=lambda item: item[1])
    row = re.search(r"<tr><td>eval/accuracy</td>(.*?)</tr>", text).group(1)
    cells = re.findall(r"<td[^>]*>(.*?)</td>", row)
    assert cells == [f"{first:.4g}", f"{last:.4g}", f"{best:.4g}", str(best_step)]
    # NaN values are skipped: kl's first finite value is at step 1, pass@1's last one at step 0.
    kl = re.findall(r"<td[^>]*>(.*?)</td>", re.search(r"<tr><td>kl</td>(.*?)</tr>", text).group(1))
    assert kl == [f"{0.01:.4g}", f"{0.1:.4g}", "\u2014", ""]  # no "best" for kl
    pass1 = re.findall(r"<td[^>]*>(.*?)</td>", re.search(r"<tr><td>eval/pass@1</td>(.*?)</tr>", text).group(1))
    assert pass1 == ["0.2", "0.2", "0.2", "0"]
    assert "<tr><td>learning_rate</td>" not in text  # not a summary metric
    without_images = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", text)
    assert not re.search(r"\bnan\b", without_images, re.IGNORECASE)


def test_latest_samples_are_escaped_and_truncated(run_dir):
    text = Path(write_report(str(run_dir), title="Addition <GRPO>")).read_text(encoding="utf-8")
    assert "<h1>Addition &lt;GRPO&gt;</h1>" in text
    assert "samples-10.jsonl" in text and "from step five" not in text
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; 42" in text
    assert "<script>alert" not in text
    assert "correct: 1<" in text and "correct: \u2014<" in text  # a null (NaN) reward shows as a dash
    samples = text.split("samples-10.jsonl", 1)[1]
    assert samples.count("What is 40 + ") == 8  # at most 8 rows
    assert "y" * 600 + "\u2026" in samples and "y" * 601 not in samples


def test_multi_turn_samples_show_each_turn_with_the_tool_turns_marked(tmp_path):
    completion = [{"role": "assistant", "content": '<tool_call>{"name": "calc", "arguments": {"expr": "37*58"}}'
                                                   "</tool_call>"},
                  {"role": "tool", "name": "calc", "content": "2146 <b>"},
                  {"role": "assistant", "content": "2146"}]
    with open(tmp_path / "metrics.jsonl", "w") as f:
        for step in (1, 2):
            f.write(json.dumps({"step": step, "reward/mean": 0.5, "agent/tool_call_rate": 0.25 * step,
                                "agent/turns": 1.5, "agent/tool_errors": 0.0}) + "\n")
    with open(tmp_path / "samples-2.jsonl", "w") as f:
        f.write(json.dumps({"step": 2, "prompt": [{"role": "user", "content": "37*58"}], "completion": completion,
                            "rewards": {"answer_reward": 1.0}}) + "\n")
    text = Path(write_report(str(tmp_path))).read_text(encoding="utf-8")
    assert '<img alt="Tools and turns"' in text
    assert re.search(r"<tr><td>agent/tool_call_rate</td><td[^>]*>0.25</td><td[^>]*>0.5</td><td[^>]*>0.5</td>", text)
    cell = text.split("samples-2.jsonl", 1)[1]
    assert "[assistant] &lt;tool_call&gt;{&quot;name&quot;: &quot;calc&quot;" in cell
    assert '<span class="env">[tool: calc] 2146 &lt;b&gt;</span>' in cell  # the tool's turn, marked and escaped
    assert "\n[assistant] 2146</td>" in cell


def test_write_is_atomic_and_replaces_the_old_report(run_dir):
    (run_dir / "report.html").write_text("stale")
    write_report(str(run_dir))
    write_report(str(run_dir))
    names = sorted(os.listdir(run_dir))
    assert names == ["metrics.jsonl", "report.html", "samples-10.jsonl", "samples-5.jsonl"]
    assert (run_dir / "report.html").read_text().startswith("<!DOCTYPE html>")


def test_tolerates_a_torn_last_line_and_no_samples(tmp_path):
    with open(tmp_path / "metrics.jsonl", "w") as f:
        f.write(json.dumps({"step": 1, "reward/mean": 0.5}) + "\n" + '{"step": 2, "rew')
    text = Path(write_report(str(tmp_path))).read_text(encoding="utf-8")
    assert text.count("data:image/png;base64,") == 1 and "Steps: 1" in text and "Samples" not in text


def test_cli_writes_report_and_prints_path(run_dir, capsys):
    main([str(run_dir), "--title", "T"])
    assert capsys.readouterr().out.strip() == str(run_dir / "report.html")
    assert "<h1>T</h1>" in (run_dir / "report.html").read_text()


def test_cli_without_metrics_is_a_clear_error(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-m", "rlhf.report", str(tmp_path)], capture_output=True, text=True,
                            check=False, env=env, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert result.returncode == 2
    assert str(tmp_path / "metrics.jsonl") in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "report.html").exists()


def test_each_chart_says_what_it_plots_and_the_unit_of_its_axis(tmp_path, monkeypatch):
    """Without a reference model the trainer logs only the rollout-policy KL: the report titles that chart so,
    instead of calling it the KL to the reference; every axis is labelled with its unit."""
    from matplotlib.axes import Axes

    labels = []
    original = Axes.set_ylabel
    monkeypatch.setattr(Axes, "set_ylabel", lambda self, label, *a, **k: (labels.append(label),
                                                                         original(self, label, *a, **k))[1])
    with open(tmp_path / "metrics.jsonl", "w") as f:
        for step in (1, 2):
            f.write(json.dumps({"step": step, "reward/mean": 0.5, "policy/approx_kl": 0.01, "entropy": 1.0}) + "\n")
    text = Path(write_report(str(tmp_path))).read_text(encoding="utf-8")
    assert 'alt="KL of the updated policy to the rollout policy" ' in text and "to the reference" not in text
    assert 'title="KL of the updated policy to the rollout policy (nats per token)"' in text
    assert labels == ["reward", "nats per token", "nats per token"]
    assert all(panel.unit for panel in [*PANELS, OTHER])


def test_metrics_logged_by_reward_functions_get_their_own_chart():
    records = [{"step": 1, "reward/mean": 1.0, "grad_norm": 2.0, "learning_rate": 1e-6, "judge/score": 0.3,
                "format_rate": 0.9, "time/generate": 1.0, "eval/judge/score": 0.2}]
    assert sorted(panel_series(records, OTHER)) == ["format_rate", "judge/score"]


def test_training_completions_are_shown_without_an_eval_set(tmp_path):
    with open(tmp_path / "metrics.jsonl", "w") as f:
        f.write(json.dumps({"step": 2, "reward/mean": 0.5}) + "\n")
    with open(tmp_path / "completions.jsonl", "w") as f:
        for step in (1, 2):
            f.write(json.dumps({"step": step, "prompt": f"p{step}", "completion": "<b>c</b>",
                                "rewards": {"correct": 1.0, "format": None}, "advantage": 0.5,
                                "extra": {"parsed": "42"}}) + "\n")
    text = Path(write_report(str(tmp_path))).read_text(encoding="utf-8")
    section = text.split("Training completions (step 2)", 1)[1]
    assert "p2" in section and "p1" not in section and "&lt;b&gt;c&lt;/b&gt;" in section
    assert "correct: 1<br>format: \u2014" in section and "parsed: 42" in section and "0.5" in section

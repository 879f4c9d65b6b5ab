"""`make demo-tools`, shrunk to seconds: it runs end to end, with the calculator as a tool, and writes its summary,
curves and report (the demo's learning is measured in bench/TOOLS_DEMO.md, not here)."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_tool_demo_runs_end_to_end(tmp_path):
    out = tmp_path / "demo_tools"
    command = [sys.executable, os.path.join(ROOT, "recipes", "demo_tools.py"), "--output_dir", str(out),
               "--warm_start_steps", "2", "--max_steps", "2", "--eval_steps", "2", "--prompts_per_step", "2",
               "--num_generations", "4", "--max_eval_samples", "8", "--eval_batch_size", "8",
               "--disable_tqdm", "true"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((out / "summary_seed0.json").read_text())
    assert summary["rl_steps"] == 2 and summary["heldout_problems"] == 8 and summary["warm_start_steps"] == 2
    # the summary's accuracies are the greedy samples' (all 8 problems are logged): right answers / problems
    for key, step in (("accuracy_before", 0), ("accuracy_after", 2)):
        samples = [json.loads(line) for line in (out / "grpo" / f"samples-{step}.jsonl").read_text().splitlines()]
        assert len(samples) == 8
        assert summary[key] == sum(s["rewards"]["answer_reward"] >= 1.0 for s in samples) / 8, key
    records = [json.loads(line) for line in (out / "grpo" / "metrics.jsonl").read_text().splitlines()]
    assert all("agent/tool_call_rate" in r and "agent/turns" in r for r in records if "reward/mean" in r)
    for name in ("curves.png", "report.html", "samples-0.jsonl", "samples-2.jsonl", "model/config.json"):
        assert (out / "grpo" / name).exists(), name
    assert "held-out greedy results on 8 problems" in result.stdout


def test_tool_call_probability_is_the_whole_opening_tags_probability():
    """One token where the tokenizer has <tool_call> as a special token, several where it has not (SmolLM2's is 5
    ordinary tokens; the character tokenizer's, 11): the product of the tag's token probabilities, checked against a
    token-by-token loop of separate forward passes."""
    import torch

    from rlhf.agent import AgentLoop
    from rlhf.extras.calculator import calc, tool_call_probability
    from rlhf.extras.tiny import char_tokenizer, tiny_model
    from rlhf.tools import OPEN_TAG

    model = tiny_model("llama", vocab_size=len(char_tokenizer(tools=True)), hidden_size=32, num_layers=2, num_heads=2,
                       seed=0).eval()
    prompts = [[{"role": "user", "content": "What is 12 * 34?"}], [{"role": "user", "content": "What is 7 + 5?"}]]
    for special in (True, False):
        tokenizer = char_tokenizer(tools=special)
        agent = AgentLoop(tokenizer, [calc], max_turns=2, max_tokens=256, tool_timeout=1.0, max_tool_response_chars=60,
                          tool_workers=0)
        opener = tokenizer.encode(OPEN_TAG, add_special_tokens=False)
        assert len(opener) == (1 if special else len(OPEN_TAG))
        expected = 0.0
        for prompt in prompts:
            ids, p = list(agent.conversation_ids(prompt, [])[0]), 1.0
            for token in opener:
                with torch.no_grad():
                    p *= model(input_ids=torch.tensor([ids])).logits[0, -1].float().softmax(-1)[token].item()
                ids.append(token)
            expected += p / len(prompts)
        assert abs(tool_call_probability(model, agent, prompts) - expected) <= 1e-5 * expected + 1e-12, special

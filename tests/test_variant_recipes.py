"""Every policy-gradient variant through its recipe and YAML, the way users start them (`accelerate launch
recipes/<algo>.py --config recipes/configs/<variant>.yaml`), two steps each on a tiny model, in one launch."""

import json
import os
import sys

from launching import run_launch

from rlhf.extras.tiny import save_tiny

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.dirname(os.path.abspath(__file__))

# config -> (recipe, a metric only that variant logs)
VARIANTS = {
    "demo_gspo": ("grpo", "clip/high_frac"),
    "demo_cispo": ("grpo", "clip/high_frac"),
    "demo_rollout_correction": ("grpo", "rollout/truncated_frac"),
    "demo_entropy_tokens": ("grpo", "entropy/selected_frac"),
    "demo_dapo_dynamic": ("grpo", "sampling/rounds"),
    "demo_reinforce_pp_baseline": ("reinforce", "advantages/std"),
    "demo_distill": ("grpo", "distill/reverse_kl"),
}


def test_every_variant_config_trains_through_its_recipe(tmp_path):
    model = save_tiny(str(tmp_path / "tiny"), hidden_size=32, num_layers=2, max_positions=64)
    teacher = save_tiny(str(tmp_path / "teacher"), hidden_size=64, num_layers=2, max_positions=64, seed=3)
    runs = []
    for config, (recipe, _) in VARIANTS.items():
        argv = ["--config", os.path.join(ROOT, "recipes", "configs", f"{config}.yaml"), "--model_name_or_path", model,
                "--output_dir", str(tmp_path / config), "--eval_dataset_name", "none", "--max_steps", "2",
                "--prompts_per_step", "4", "--num_generations", "4", "--mini_batch_size", "8",
                "--micro_batch_size", "8", "--logging_steps", "1", "--disable_tqdm", "true", "--write_report", "false"]
        runs.append([recipe, argv + (["--teacher_model", teacher] if config == "demo_distill" else [])])
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", os.path.join(TESTS, "recipe_runner.py"),
               json.dumps(runs)]
    result = run_launch(command, {**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for config, (_, metric) in VARIANTS.items():
        records = [json.loads(line) for line in (tmp_path / config / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in records] == [1, 2], config
        assert metric in records[-1] and "rollout/abs_log_ratio" in records[-1], (config, sorted(records[-1]))
        assert (tmp_path / config / "model" / "model.safetensors").exists()

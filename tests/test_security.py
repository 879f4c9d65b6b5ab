"""Security: configs name code (import paths), the working directory never shadows installed packages, obvious
footguns are refused without an opt-in, --help says so, and LoRA adapters load only from safetensors."""

import os
import subprocess
import sys
import sysconfig

import pytest
import torch

from rlhf.cli import ConfigError, ScriptArguments, parse_args
from rlhf.dataset_adapters import parse_mapping
from rlhf.imports import OPT_IN, import_object

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_beside_shadows(python: str, cwd, shadow: str, marker, target: str, env: dict) -> list[str]:
    """``python -c`` in ``cwd``, which holds ``<shadow>.py`` (it touches ``marker`` if it ever runs) and my_rewards.py
    (a module only the working directory has): imports ``target`` and my_rewards:length by config path and prints
    the file ``shadow`` was imported from and the local module's name."""
    (cwd / f"{shadow}.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    (cwd / "my_rewards.py").write_text("def length(prompts, completions, **kwargs):\n    return [0.0]\n")
    code = ("from rlhf.imports import import_object\n"
            f"rule = import_object({target!r})\n"
            "local = import_object('my_rewards:length')\n"
            f"print(rule.__module__, __import__({shadow!r}).__file__, local.__module__)\n")
    result = subprocess.run([python, "-c", code], cwd=cwd, capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout.split()


def test_the_working_directory_never_shadows_an_installed_package(tmp_path):
    """A real interpreter started as `python -c` (the working directory first on sys.path) in a directory holding
    its own reward_models.py: the project's package is imported, the local file never runs; a module only the
    working directory has is still importable."""
    marker = tmp_path / "shadow-ran"
    module, package_file, local = run_beside_shadows(sys.executable, tmp_path, "reward_models", marker,
                                                     "reward_models.rules:numeric_answer_reward",
                                                     {**os.environ, "PYTHONPATH": ROOT})
    assert module == "reward_models.rules" and package_file.startswith(ROOT) and local == "my_rewards"
    assert not marker.exists()


def test_the_working_directory_never_shadows_an_editable_install(tmp_path):
    """`pip install -e` finds a package through a finder that sits after the path finder in sys.meta_path, so a
    same-named file in the working directory used to win even from the end of sys.path. A throwaway package installed
    editable into a fresh venv (no network: a .pth lends it this interpreter's packages, setuptools and pip among
    them), imported by a config path from a directory that holds a same-named module: the installed package is
    imported, the local file never runs; a module only the working directory has is still importable."""
    project, work, venv = tmp_path / "project", tmp_path / "work", tmp_path / "venv"
    (project / "shadowed").mkdir(parents=True)
    (project / "shadowed" / "__init__.py").write_text("")
    (project / "shadowed" / "rules.py").write_text("def reward(prompts, completions, **kwargs):\n    return [1.0]\n")
    (project / "pyproject.toml").write_text('[build-system]\nrequires = ["setuptools>=64"]\n'
                                            'build-backend = "setuptools.build_meta"\n'
                                            '[project]\nname = "shadowed"\nversion = "0"\n')
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site_packages = sysconfig.get_path("purelib", vars={"base": str(venv), "platbase": str(venv)})
    with open(os.path.join(site_packages, "lent.pth"), "w") as lent:
        lent.write(sysconfig.get_path("purelib") + "\n")
    python = str(venv / "bin" / "python")
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PYTHONPATH": ROOT}
    subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index", "-e",
                    str(project)], check=True, capture_output=True, env=env, timeout=120)
    work.mkdir()
    marker = tmp_path / "shadow-ran"
    module, package_file, local = run_beside_shadows(python, work, "shadowed", marker, "shadowed.rules:reward", env)
    assert module == "shadowed.rules" and package_file == str(project / "shadowed" / "__init__.py")
    assert local == "my_rewards"
    assert not marker.exists()


@pytest.mark.parametrize("path", ["os:system", "subprocess:run", "builtins:eval", "builtins:exec", "shutil:rmtree",
                                  "os.path:join", "builtins:open", "importlib:import_module"])
def test_footgun_callables_are_refused_without_the_opt_in(monkeypatch, path):
    monkeypatch.delenv(OPT_IN, raising=False)
    with pytest.raises(ValueError, match=rf"'{path}' names a function that can run commands.*unless you set "
                                         rf"{OPT_IN}=1.*use only configs you trust"):
        import_object(path)


def test_a_dataset_transform_cannot_run_shell_commands(monkeypatch):
    """The issue's case: `question|os:system` ran every data row as a shell command."""
    monkeypatch.delenv(OPT_IN, raising=False)
    with pytest.raises(ValueError, match="'os:system' names a function that can run commands"):
        parse_mapping({"prompt": "question|os:system"})


def test_the_opt_in_allows_them(monkeypatch):
    monkeypatch.setenv(OPT_IN, "1")
    assert import_object("os.path:join") is os.path.join
    assert import_object("builtins:len") is len  # harmless builtins never needed it


def test_help_says_that_a_config_is_code(capsys):
    with pytest.raises(SystemExit):
        parse_args([ScriptArguments], ["--help"])
    shown = capsys.readouterr().out
    assert "A config is code: every module:function it names" in shown and f"{OPT_IN}=1" in shown
    with pytest.raises(ConfigError):  # and an unknown import is still a config error, not a crash
        parse_args([ScriptArguments], ["--no_such_option", "1"])


def test_a_lora_adapter_loads_only_from_safetensors(tmp_path):
    from peft import LoraConfig, get_peft_model

    from rlhf.evaluation import load_policy
    from rlhf.extras.tiny import save_tiny, tiny_model

    base = save_tiny(str(tmp_path / "base"), hidden_size=32, num_layers=1)
    adapter = get_peft_model(tiny_model("llama", hidden_size=32, num_layers=1),
                             LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    adapter.save_pretrained(tmp_path / "pickled", safe_serialization=False)
    assert os.listdir(tmp_path / "pickled").count("adapter_model.bin") == 1
    with pytest.raises(ValueError, match=r"LoRA adapter .*pickled has no adapter_model.safetensors \(found: "
                                         r"\['adapter_model.bin'\]\); weights load only from safetensors"):
        load_policy(str(tmp_path / "pickled"), base_model_name_or_path=base)
    adapter.save_pretrained(tmp_path / "safe")
    loaded = load_policy(str(tmp_path / "safe"), base_model_name_or_path=base)
    expected = {k: v for k, v in adapter.state_dict().items() if "lora_" in k}
    got = {k: v for k, v in loaded.state_dict().items() if "lora_" in k}
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)

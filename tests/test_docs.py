"""The docs: a README short enough to read, links that lead somewhere, generated pages that fail when stale, and a
site that builds in MkDocs' strict mode (what `make docs` does; CI runs it here, through `make test`)."""

import glob
import importlib.util
import os
import re
import subprocess
import sys

import pytest

from rlhf.extras import docs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(ROOT, "docs")
MARKDOWN = [os.path.join(ROOT, "README.md"), *sorted(glob.glob(os.path.join(DOCS, "*.md")))]


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def test_readme_is_a_short_guide_that_starts_with_the_two_commands():
    lines = _read(os.path.join(ROOT, "README.md")).splitlines()
    assert len(lines) <= 460, f"README.md has {len(lines)} lines; move detail to docs/ or bench/ (at most ~450)"
    head = "\n".join(lines[:40])  # a fresh clone's set-up and CI rely on these two being easy to find
    assert re.search(r"^make demo\b", head, re.M) and re.search(r"^make test\b", head, re.M)


def _links(text: str) -> list[str]:
    """Targets of markdown links [text](target), outside fenced code blocks and inline code."""
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    text = re.sub(r"`[^`\n]*`", "", text)
    return re.findall(r"\]\(([^)\s]+)\)", text)


@pytest.mark.parametrize("path", MARKDOWN, ids=lambda p: os.path.relpath(p, ROOT))
def test_relative_links_point_at_existing_files(path):
    links = [link for link in _links(_read(path)) if not re.match(r"[a-z]+:", link) and not link.startswith("#")]
    missing = [link for link in links
               if not os.path.exists(os.path.join(os.path.dirname(path), link.split("#", 1)[0]))]
    assert not missing, f"{os.path.relpath(path, ROOT)} links to files that do not exist: {missing}"


def test_link_check_sees_a_broken_link():
    """The link finder above must find links at all, and not those in code."""
    assert _links("see [a](docs/a.md), [b](../b.md#x) and `[c](c.md)`\n```\n[d](d.md)\n```") == [
        "docs/a.md", "../b.md#x"]
    assert "docs/index.md" in _links(_read(os.path.join(ROOT, "README.md")))


def test_generated_pages_fail_the_check_when_stale(tmp_path, capsys):
    assert docs.main(["--write", str(tmp_path)]) == 0
    assert docs.main(["--check", str(tmp_path)]) == 0

    page = tmp_path / "config-reference.md"
    page.write_text(page.read_text().replace("| `learning_rate` |", "| `learning_rat` |", 1))
    assert docs.main(["--check", str(tmp_path)]) == 1
    assert "config-reference.md is stale" in capsys.readouterr().err

    docs.main(["--write", str(tmp_path)])
    assert docs.stale(str(tmp_path)) == []
    (tmp_path / "trl-names.md").unlink()
    assert docs.stale(str(tmp_path)) == [str(tmp_path / "trl-names.md")]
    with pytest.raises(SystemExit):  # the old interface wrote into README.md: now it says where the tables went
        docs.main(["--write", os.path.join(ROOT, "README.md")])
    assert "the generated tables live in docs/" in capsys.readouterr().err


@pytest.mark.skipif(importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("mkdocstrings") is None,
                    reason="mkdocs / mkdocstrings-python are not installed (pip install -e '.[docs]'); "
                           "the site is not built")
def test_site_builds_in_strict_mode(tmp_path):
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    output = result.stdout + result.stderr
    assert result.returncode == 0 and "WARNING" not in output, output
    api = (tmp_path / "api" / "index.html").read_text()
    for name in ("rlhf.trainer.GRPOTrainer", "rlhf.configs.PPOConfig", "rlhf.core.policy_loss", "rlhf.core.gae"):
        assert f'id="{name}"' in api, f"the API page has no {name}: mkdocstrings rendered nothing for it"
    for page in docs.pages():
        assert (tmp_path / page.removesuffix(".md") / "index.html").exists()


def test_the_architecture_map_names_every_module():
    """docs/architecture.md groups the library's modules by concern; a module it does not name is a module a newcomer
    cannot place."""
    text = _read(os.path.join(ROOT, "docs", "architecture.md"))
    modules = [os.path.splitext(os.path.basename(p))[0] for pattern in ("rlhf/*.py", "rlhf/trainer/*.py")
               for p in glob.glob(os.path.join(ROOT, pattern))]
    missing = [m for m in modules if m != "__init__" and not re.search(rf"\b{m}(\.py)?\b", text)]
    assert missing == [], f"add these to docs/architecture.md: {missing}"

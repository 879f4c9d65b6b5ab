"""The layering the folders show, checked on the import statements of every module (top-level and inside
functions): rlhf.core imports only torch; no import cycles; the library (rlhf outside rlhf.extras and
rlhf.cli) never imports the command line, the recipes, the extras or reward_models; reward_models builds
on rlhf but never reaches the trainers."""

import ast
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("rlhf", "reward_models")


def module_files() -> dict[str, str]:
    """module name -> file, for every module of the project's packages."""
    found = {}
    for package in PACKAGES:
        for directory, _, files in os.walk(os.path.join(ROOT, package)):
            for name in files:
                if name.endswith(".py"):
                    path = os.path.join(directory, name)
                    module = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                    found[module.removesuffix(".__init__")] = path
    return found


def imports_of(path: str, module: str, known: set[str]) -> set[str]:
    """The project modules ``module`` imports (``from package import submodule`` counts as the submodule)."""
    tree = ast.parse(open(path).read())
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        out.update(name for name in names if name.split(".")[0] in PACKAGES + ("recipes",))
    return out


def import_graph() -> dict[str, set[str]]:
    files = module_files()
    return {module: imports_of(path, module, set(files)) for module, path in files.items()}


def test_core_imports_only_torch():
    """A fresh interpreter: importing rlhf.core loads torch and rlhf.core, nothing else of the project or its
    other dependencies."""
    code = ("import sys, torch; before = set(sys.modules); import rlhf.core; "
            "print(sorted(m for m in set(sys.modules) - before))")
    loaded = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    modules = eval(loaded.stdout)  # noqa: S307 - our own subprocess's printed list
    assert modules and all(m == "rlhf" or m.startswith("rlhf.core") for m in modules), modules
    for module, imported in import_graph().items():
        if module.startswith("rlhf.core"):
            assert all(name.startswith("rlhf.core") for name in imported), (module, imported)


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(node):
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in graph:
                continue
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return found


def test_no_import_cycles():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]  # the check can fail
    assert cycles(import_graph()) == []


def test_layering():
    graph = import_graph()
    for module, imported in graph.items():
        library = module.startswith("rlhf") and not module.startswith("rlhf.extras") and module != "rlhf.cli"
        if library:
            assert not any(m == "rlhf.cli" or m.startswith("recipes") for m in imported), (module, imported)
            assert not any(m.startswith("rlhf.extras") for m in imported), (module, imported)
            assert not any(m.startswith("reward_models") for m in imported), (module, imported)
        if module.startswith("reward_models"):
            assert not any(m.startswith("rlhf.trainer") or m.startswith("recipes") for m in imported), (module, imported)

"""Importing the code a config names as ``package.module:attribute`` (reward functions, dataset loaders and
transforms, reward factories).

A config that names a callable runs it, on every process and often on every data row: treat a config
like code and run only configs you trust. Two guards catch the obvious accidents, not an attacker:
- the current directory is importable, but after the installed packages, so a stray ``reward_models.py``
  (or ``json.py``) in the working directory can never replace a real package, in any install mode: ``pip install -e``
  adds a finder after the path finder in ``sys.meta_path``, which moving the directory to the end of ``sys.path`` alone
  would not get ahead of (``_InstalledFirst``);
- callables from modules that run commands, touch files or evaluate code (``os:system``,
  ``subprocess:run``, ``builtins:eval``, ...) are refused unless ``RLHF_ALLOW_UNSAFE_IMPORTS=1`` is set.
"""

import importlib
import os
import sys
from importlib.machinery import PathFinder

# Modules (and their submodules) whose attributes a config may not name without the opt-in.
UNSAFE_MODULES = ("os", "posix", "nt", "subprocess", "shutil", "pty", "socket", "sys", "importlib", "runpy",
                  "ctypes", "pickle", "marshal", "multiprocessing", "signal", "pathlib", "tempfile", "io")
UNSAFE_BUILTINS = ("eval", "exec", "compile", "__import__", "open", "input", "breakpoint", "getattr", "setattr",
                   "delattr", "globals", "locals", "vars")
OPT_IN = "RLHF_ALLOW_UNSAFE_IMPORTS"


def _refused(module_name: str, attribute: str) -> bool:
    root = module_name.split(".")[0]
    if root in UNSAFE_MODULES:
        return True
    return root == "builtins" and attribute.split(".")[0] in UNSAFE_BUILTINS


def _is_working_directory(entry: str) -> bool:
    try:
        return entry in ("", ".") or os.path.abspath(entry) == os.getcwd()
    except OSError:  # the working directory was removed: nothing in it can be imported
        return False


class _InstalledFirst:
    """A meta-path finder placed just before the path finder: a top-level module comes from the ``sys.path`` entries
    other than the working directory, then from the finders after the path finder (an editable install's), and only
    then (this finder returns None) from the working directory."""

    @staticmethod
    def find_spec(name, path=None, target=None):
        if path is not None:  # a submodule: its package's __path__ decides
            return None
        spec = PathFinder.find_spec(name, [entry for entry in sys.path if not _is_working_directory(entry)], target)
        if spec is not None and spec.loader is not None:  # a namespace package may have a portion further on
            return spec
        later = sys.meta_path[sys.meta_path.index(PathFinder) + 1:] if PathFinder in sys.meta_path else []
        for finder in later:
            spec = getattr(finder, "find_spec", lambda *args: None)(name, None, target)
            if spec is not None:
                return spec
        return None


def _working_directory_last() -> None:
    """Keep the working directory importable, but after every installed package (``python -m`` and ``python -c`` put
    it first on ``sys.path``; ``pip install -e`` finds its packages after every ``sys.path`` entry), so a local
    ``reward_models.py`` or ``json.py`` never replaces a package."""
    if _InstalledFirst not in sys.meta_path and PathFinder in sys.meta_path:
        sys.meta_path.insert(sys.meta_path.index(PathFinder), _InstalledFirst)
    cwd = os.getcwd()
    here = [entry for entry in sys.path if _is_working_directory(entry)]
    if here == sys.path[-len(here):] and here:
        return
    for entry in here:
        sys.path.remove(entry)
    sys.path.append(cwd)


def import_object(path: str):
    """``package.module:attribute`` -> the attribute (dots in ``attribute`` walk nested attributes)."""
    module_name, sep, attribute = path.partition(":")
    if not sep or not module_name or not attribute:
        raise ValueError(f"{path!r} is not an import path; write it as package.module:function.")
    if _refused(module_name, attribute) and os.environ.get(OPT_IN) != "1":
        raise ValueError(
            f"{path!r} names a function that can run commands, touch files or evaluate code; a config refuses it "
            f"unless you set {OPT_IN}=1. A config that names a callable runs it: use only configs you trust."
        )
    _working_directory_last()
    try:
        target = importlib.import_module(module_name)
        for part in attribute.split("."):
            target = getattr(target, part)
        return target
    except (ImportError, AttributeError) as error:
        raise ValueError(f"cannot import {path!r}: {error}") from error

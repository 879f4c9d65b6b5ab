"""Importing the code a config names as ``package.module:attribute`` (reward functions, dataset loaders and
transforms, reward factories).

A config that names a callable runs it, on every process and often on every data row: treat a config
like code and run only configs you trust. Two guards catch the obvious accidents, not an attacker:
- the current directory is importable, but after the installed packages, so a stray ``reward_models.py``
  (or ``json.py``) in the working directory can never replace a real package;
- callables from modules that run commands, touch files or evaluate code (``os:system``,
  ``subprocess:run``, ``builtins:eval``, ...) are refused unless ``RLHF_ALLOW_UNSAFE_IMPORTS=1`` is set.
"""

import importlib
import os
import sys

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


def _working_directory_last() -> None:
    """Keep the working directory importable, but after every other entry of ``sys.path`` (``python -m`` and
    ``python -c`` put it first), so a local ``reward_models.py`` or ``json.py`` never replaces a package."""
    cwd = os.getcwd()
    here = [entry for entry in sys.path if entry in ("", ".") or os.path.abspath(entry) == cwd]
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

"""Whether files on disk are what was written: checkpoint manifests and weight files.

A checkpoint's ``manifest.json`` is written last and lists every other file of the checkpoint with its
size and SHA-256. ``verify_checkpoint`` re-reads them: a file that is missing, truncated or altered is
named, so that ``resume_from_checkpoint="latest"`` can skip it for an older checkpoint that verifies, and
an explicit path that fails is an error naming the file (not a bare ``SafetensorError`` or
``JSONDecodeError`` from deep inside a loader).

Weight files outside checkpoints (a reward model, a model directory) have no manifest;
``check_safetensors_files`` checks that each ``.safetensors`` file is as long as its header says.
"""

import hashlib
import json
import os
import struct

MANIFEST_FILE = "manifest.json"
_CHUNK = 16 * 1024 * 1024


class CheckpointError(ValueError):
    """A checkpoint that cannot be trusted. ``path`` is the checkpoint, ``file`` the file at fault (relative to
    it), ``reason`` what is wrong with it."""

    def __init__(self, path: str, file: str, reason: str):
        self.path, self.file, self.reason = path, file, reason
        super().__init__(f"checkpoint {path} is not usable: {file}: {reason}")

    def __reduce__(self):  # pickled to the other processes of a run (rlhf.run_dir)
        return type(self), (self.path, self.file, self.reason)


def sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def _files(directory: str) -> list[str]:
    """Every file under ``directory`` but the manifest, as sorted relative paths."""
    found = []
    for root, _, names in os.walk(directory):
        for name in names:
            relative = os.path.relpath(os.path.join(root, name), directory)
            if relative != MANIFEST_FILE:
                found.append(relative)
    return sorted(found)


def write_manifest(directory: str, extra: dict) -> dict:
    """Write ``directory/manifest.json``: ``extra`` (e.g. run id and step) and the size and SHA-256 of every other
    file, flushed to disk. Call it when every other file is complete."""
    manifest = dict(extra)
    manifest["files"] = {name: {"bytes": os.path.getsize(os.path.join(directory, name)),
                                "sha256": sha256(os.path.join(directory, name))} for name in _files(directory)}
    tmp = os.path.join(directory, f".{MANIFEST_FILE}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(directory, MANIFEST_FILE))
    return manifest


def read_manifest(path: str) -> dict:
    """The manifest of checkpoint ``path``, checked for shape (not against the files)."""
    manifest_path = os.path.join(path, MANIFEST_FILE)
    if not os.path.isfile(manifest_path):
        raise CheckpointError(path, MANIFEST_FILE, "missing (the checkpoint is incomplete, or was written by an "
                                                   "older version without checksums)")
    try:
        with open(manifest_path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(path, MANIFEST_FILE, f"unreadable ({error})") from None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not all(
            isinstance(v, dict) and isinstance(v.get("bytes"), int) and isinstance(v.get("sha256"), str)
            for v in files.values()):
        raise CheckpointError(path, MANIFEST_FILE, "not a manifest (expected {'files': {name: {'bytes', 'sha256'}}})")
    return manifest


def verify_checkpoint(path: str) -> dict:
    """Check every file the manifest of ``path`` lists (presence, size, then SHA-256); return the manifest or
    raise ``CheckpointError`` naming the first file that differs."""
    if not os.path.isdir(path):
        raise CheckpointError(path, "the directory", "does not exist")
    manifest = read_manifest(path)
    for name, expected in sorted(manifest["files"].items()):
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            raise CheckpointError(path, name, "missing")
        size = os.path.getsize(file)
        if size != expected["bytes"]:
            raise CheckpointError(path, name, f"{size} bytes, the manifest says {expected['bytes']} "
                                              f"({'truncated' if size < expected['bytes'] else 'altered'})")
    for name, expected in sorted(manifest["files"].items()):
        if sha256(os.path.join(path, name)) != expected["sha256"]:
            raise CheckpointError(path, name, "its SHA-256 differs from the manifest's (the file was altered "
                                              "or corrupted after it was written)")
    return manifest


def check_safetensors_files(directory: str, what: str = "model") -> None:
    """Every ``*.safetensors`` file in ``directory`` holds a readable header and exactly the bytes it
    describes; raise ValueError naming the file otherwise (a truncated download or copy)."""
    for name in sorted(os.listdir(directory)):
        if name.endswith(".safetensors"):
            problem = _safetensors_problem(os.path.join(directory, name))
            if problem:
                raise ValueError(f"{what} weights file {os.path.join(directory, name)} {problem}; copy or "
                                 "download it again.")


def _safetensors_problem(path: str) -> str | None:
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            return f"is truncated ({size} bytes, no header)"
        (header_bytes,) = struct.unpack("<Q", prefix)
        if 8 + header_bytes > size:
            return f"is truncated ({size} bytes, its header alone claims {8 + header_bytes})"
        try:
            header = json.loads(f.read(header_bytes))
        except (UnicodeDecodeError, json.JSONDecodeError):
            return "has a corrupt header (not a safetensors file?)"
    ends = [entry["data_offsets"][1] for key, entry in header.items()
            if key != "__metadata__" and isinstance(entry, dict) and "data_offsets" in entry]
    expected = 8 + header_bytes + max(ends, default=0)
    if size < expected:
        return f"is truncated ({size} bytes, its header describes {expected})"
    return None


def check_adapter_weights(directory: str) -> None:
    """A local LoRA adapter must hold ``adapter_model.safetensors``: peft would otherwise fall back to
    ``adapter_model.bin``, a pickle, and this project loads weights only from safetensors."""
    if not os.path.isdir(directory):
        return  # a hub id: peft downloads it (see README, "Failures and recovery")
    if not os.path.isfile(os.path.join(directory, "adapter_model.safetensors")):
        found = sorted(n for n in os.listdir(directory) if n.startswith("adapter_model"))
        raise ValueError(f"LoRA adapter {directory} has no adapter_model.safetensors (found: {found or 'nothing'}); "
                         "weights load only from safetensors. If you trust the file, convert it once: "
                         "PeftModel.from_pretrained(base, path).save_pretrained(path, safe_serialization=True).")
    check_safetensors_files(directory, "LoRA adapter")

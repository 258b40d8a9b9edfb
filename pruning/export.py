"""Export a pruned model: Hugging Face checkpoint (safetensors) + tokenizer + report.json.

Three layouts (``fmt``):

- ``dense``: the model's tensors as they are, pruned weights stored as zeros (quantized weights
  as their dequantized values), in the chosen float dtype (by default the source model's).
- ``gguf``: one llama.cpp file, Q8_0 matrices (``pruning.gguf_export``), read back by transformers
  with ``from_pretrained(folder, gguf_file="model.gguf")``.
- ``compressed-tensors``: the quantized linears as compressed-tensors' ``pack-quantized`` layout
  (``weight_packed`` int32 words holding ``bits``-bit codes, ``weight_scale`` per group, the
  zero points packed too when asymmetric) plus the ``quantization_config`` in config.json, which
  transformers' ``from_pretrained`` (and vLLM) read. The packing is compressed-tensors' own
  compressor, so the layout is theirs, not a re-implementation. With quantized embeddings
  (``quantize_embeddings``) the token embedding (and an untied output head) is packed too.

What transformers 5.24 + compressed-tensors 0.20 load, and so what this writes:

- No sparse layout: compressed-tensors >= 0.15 dropped its sparse-bitmask and 2:4 compressors
  (its ``ModelCompressor.update_config`` writes ``sparsity_config: {}``, "sparsity is removed for
  now") and transformers' compressed-tensors quantizer never reads a sparsity config. Every
  weight is stored as a code, zeros included: b-bit codes are b/16 of a 16-bit checkpoint at best.
- A packed ``nn.Embedding`` fails the default load (transformers initialises the module's missing
  ``weight`` after compressed-tensors swapped it for ``weight_packed``; a tied head finds no
  ``weight`` to tie to). The ``dequantize: true`` load path works, tied head included: it unpacks
  each tensor while reading the file, into the dense model. That path decompresses every packed
  tensor with the config's first scheme, so with embeddings there must be one scheme for all.

The sparsity figures in the report are measured by reading the saved files back (unpacking the
packed codes for compressed-tensors), so they describe what was written, not what was intended.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from evosparse.pruning.errors import PruningConfigError
from evosparse.pruning.layers import prunable_linears
from evosparse.pruning.quantize import QuantConfig, QuantizedWeight
from torch import nn

FORMATS = ("dense", "compressed-tensors", "gguf")


def count_zeros_in_checkpoint(folder: str | Path, weight_names: list[str]) -> dict[str, tuple[int, int]]:
    """{tensor name: (zeros, numel)} for the given tensor names, read from the folder's *.safetensors.

    A ``X.weight`` stored packed (``X.weight_packed``, compressed-tensors) is unpacked and
    dequantized with the checkpoint's own quantization_config first (the scheme that targets it);
    a folder holding a GGUF file is read from it (Q8_0 dequantized).
    """
    from evosparse.pruning.gguf_export import GGUF_FILE, gguf_zero_counts
    from safetensors import safe_open

    if (Path(folder) / GGUF_FILE).is_file():
        return gguf_zero_counts(Path(folder) / GGUF_FILE, weight_names)
    wanted = set(weight_names)
    found: dict[str, tuple[int, int]] = {}
    schemes = None
    for file in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            keys = set(f.keys())
            for key in keys:
                if key in wanted:
                    t = f.get_tensor(key)
                    found[key] = (int((t == 0).sum()), t.numel())
                elif key.endswith(".weight_packed") and key.removesuffix("_packed") in wanted:
                    prefix = key.removesuffix("weight_packed")
                    if schemes is None:
                        schemes = _saved_schemes(folder)
                    local = {k.removeprefix(prefix): f.get_tensor(k) for k in keys if k.startswith(prefix + "weight")}
                    t = _decompress(local, _scheme_for(schemes, prefix.removesuffix(".")))
                    found[prefix + "weight"] = (int((t == 0).sum()), t.numel())
    missing = wanted - set(found)
    if missing:
        raise ValueError(f"saved checkpoint lacks weights {sorted(missing)[:3]}")
    return found


def measured_sparsity(folder: str | Path, linear_names: list[str]) -> tuple[float, dict[str, float]]:
    """(global sparsity over all prunable weights, {linear name: fraction of zeros}) from saved files."""
    zeros = count_zeros_in_checkpoint(folder, [f"{n}.weight" for n in linear_names])
    layer = {n: zeros[f"{n}.weight"][0] / zeros[f"{n}.weight"][1] for n in linear_names}
    total_zero = sum(z for z, _ in zeros.values())
    total = sum(n for _, n in zeros.values())
    return (total_zero / total if total else 0.0), layer


def _scheme(cfg: QuantConfig, targets: list[str] | None = None):
    from compressed_tensors.config import CompressionFormat
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    args = QuantizationArgs(num_bits=cfg.bits, type="int", symmetric=cfg.symmetric, strategy="group",
                            group_size=cfg.group_size)
    return QuantizationScheme(targets=targets or ["Linear"], weights=args,
                              format=CompressionFormat.pack_quantized.value)


def _config_groups(quantized: dict[str, QuantizedWeight], embeddings: bool = False) -> dict[str, Any]:
    """One scheme for every linear, or (per-layer bits) one scheme per config naming its linears.

    With quantized ``embeddings`` one scheme targets the Embedding too (see the module docstring).
    """
    by_cfg: dict[QuantConfig, list[str]] = {}
    for name, qw in quantized.items():
        by_cfg.setdefault(replace(qw.config, method="rtn"), []).append(name)  # the method does not show on disk
    if embeddings:
        if len(by_cfg) != 1:
            raise PruningConfigError("quantized embeddings need one bit width and group size for every layer: "
                                     "transformers dequantizes such a checkpoint with a single scheme")
        return {"group_0": _scheme(next(iter(by_cfg)), ["Linear", "Embedding"])}
    if len(by_cfg) == 1:
        return {"group_0": _scheme(next(iter(by_cfg)))}
    ordered = sorted(by_cfg.items(), key=lambda kv: (kv[0].bits, kv[0].group_size, kv[0].symmetric))
    return {f"group_{i}": _scheme(cfg, sorted(names)) for i, (cfg, names) in enumerate(ordered)}


def _saved_schemes(folder: str | Path) -> list:
    """The weight schemes recorded in a compressed-tensors checkpoint's config.json."""
    from compressed_tensors.quantization import QuantizationScheme

    qc = json.loads((Path(folder) / "config.json").read_text())["quantization_config"]
    return [QuantizationScheme.model_validate(g) for g in qc["config_groups"].values()]


def _scheme_for(schemes: list, module: str):
    """The scheme targeting ``module`` by name, else the one targeting every Linear."""
    for s in schemes:
        if module in s.targets:
            return s
    return next(s for s in schemes if "Linear" in s.targets)


def _decompress(local: dict[str, torch.Tensor], scheme) -> torch.Tensor:
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor

    return PackedQuantizationCompressor.decompress(local, scheme)["weight"]


def _compressed_tensors_config(quantized: dict[str, QuantizedWeight], ignore: list[str],
                               embeddings: bool = False) -> dict[str, Any]:
    from compressed_tensors.config import CompressionFormat
    from compressed_tensors.quantization import QuantizationConfig, QuantizationStatus

    qc = QuantizationConfig(
        config_groups=_config_groups(quantized, embeddings),
        format=CompressionFormat.pack_quantized.value,
        quantization_status=QuantizationStatus.COMPRESSED,
        ignore=ignore,
    )
    import compressed_tensors

    out = qc.model_dump(mode="json")
    out["quant_method"] = "compressed-tensors"
    out["version"] = compressed_tensors.__version__
    if embeddings:  # the load path that unpacks an Embedding (transformers' CompressedTensorsConfig reads it)
        out["dequantize"] = True
    return out


def _pack_folder(folder: Path, quantized: dict[str, QuantizedWeight], dtype: torch.dtype,
                 metadata: dict[str, str] | None = None) -> None:
    """Rewrite the saved safetensors so every quantized linear's weight is stored packed."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from safetensors.torch import load_file, save_file

    by_key = {f"{n}.weight": (n, qw) for n, qw in quantized.items()}
    index_file = folder / "model.safetensors.index.json"
    index = json.loads(index_file.read_text()) if index_file.is_file() else None
    done = set()
    for file in sorted(folder.glob("*.safetensors")):
        tensors = load_file(str(file))
        out: dict[str, torch.Tensor] = {}
        for key, t in tensors.items():
            if key not in by_key:
                out[key] = t
                continue
            name, qw = by_key[key]
            # The compressor re-derives the codes as round(weight / scale): give it the exact float32
            # q * scale (the checkpoint-dtype rounding of 8-bit codes' values could move a code by one).
            local = {"weight": qw.dequantize(), "weight_scale": qw.scale.to(dtype)}
            if qw.zero is not None:
                local["weight_zero_point"] = qw.zero
            for k, v in PackedQuantizationCompressor.compress(local, _scheme(qw.config)).items():
                out[f"{name}.{k}"] = v.contiguous()
                if index is not None:
                    index["weight_map"][f"{name}.{k}"] = file.name
            if index is not None:
                index["weight_map"].pop(key, None)
            done.add(key)
        save_file(out, str(file), metadata={"format": "pt", **(metadata or {})})
    missing = set(by_key) - done
    if missing:
        raise PruningConfigError(f"saved checkpoint lacks weights {sorted(missing)[:3]}")
    if index is not None:
        index_file.write_text(json.dumps(index, indent=2) + "\n")


def stamp_metadata(folder: str | Path, metadata: dict[str, str]) -> None:
    """Rewrite the folder's *.safetensors with ``metadata`` in their headers (next to ``format: pt``).

    A safetensors header can only grow by rewriting the file; for the checkpoints evosparse writes
    that costs about a second per 250 MB.
    """
    from safetensors.torch import load_file, save_file

    for file in sorted(Path(folder).glob("*.safetensors")):
        save_file(load_file(str(file)), str(file), metadata={"format": "pt", **metadata})


def read_metadata(file: str | Path) -> dict[str, str]:
    """The string metadata in a safetensors file's header."""
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as f:
        return dict(f.metadata() or {})


@contextmanager
def as_published(model: nn.Module) -> Iterator[None]:
    """While saving, the config's ``use_cache`` as the source had it.

    Loading turns the KV cache off (scoring passes never reuse it); a saved checkpoint must not
    carry that into generation. ``pruning.loading.load_model`` keeps the source's value.
    """
    config = model.config
    before = config.use_cache
    config.use_cache = getattr(model, "evosparse_use_cache", before)
    try:
        yield
    finally:
        config.use_cache = before


def write_report(folder: str | Path, report: dict[str, Any]) -> None:
    path = Path(folder) / "report.json"
    path.write_text(json.dumps(report, indent=2, sort_keys=False) + "\n")


def folder_bytes(folder: str | Path) -> int:
    """Bytes of the weight files (*.safetensors, *.gguf) in a checkpoint folder."""
    return sum(f.stat().st_size for pattern in ("*.safetensors", "*.gguf") for f in Path(folder).glob(pattern))


@torch.no_grad()
def save_checkpoint(
    model: nn.Module,
    tokenizer: Any,
    folder: str | Path,
    linear_names: list[str] | None = None,
    *,
    fmt: str = "dense",
    dtype: torch.dtype | None = None,
    quantized: dict[str, QuantizedWeight] | None = None,
    metadata: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Save model + tokenizer to ``folder``; return the sparsity measured from the saved weights.

    ``dtype`` (default: the model's) is the float dtype written; the model is cast to it in place,
    since export is a job's last use of it. ``quantized`` holds the integer codes of the
    quantized linears and, with quantized embeddings, of the embedding and output head (required
    for ``fmt='compressed-tensors'``). ``metadata`` goes into every
    safetensors header (strings; what produced the file). Returns ``{"global_sparsity",
    "layer_sparsity", "format", "dtype", "checkpoint_bytes"}`` (report.json is the caller's).
    """
    if fmt not in FORMATS:
        raise PruningConfigError(f"unknown checkpoint format {fmt!r}; choose one of {', '.join(FORMATS)}")
    linears = prunable_linears(model)
    if fmt == "compressed-tensors":
        if not quantized:
            raise PruningConfigError("format 'compressed-tensors' needs quantized weights (give quantize)")
        if any(not isinstance(m, nn.Linear) for m in linears.values()):
            raise PruningConfigError("format 'compressed-tensors' needs nn.Linear layers (GPT-2's Conv1D is not)")
    if fmt == "gguf":
        from evosparse.pruning.gguf_export import check_gguf_model

        check_gguf_model(model)
        if quantized:
            raise PruningConfigError("format 'gguf' stores Q8_0 (8-bit blocks of 32) itself: leave quantize out")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if fmt == "gguf":
        from evosparse.pruning.gguf_export import GGUF_FILE, write_gguf

        write_gguf(model, tokenizer, folder / GGUF_FILE, metadata)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
        names = linear_names if linear_names is not None else list(linears)
        global_sparsity, layer = measured_sparsity(folder, names)
        return {"global_sparsity": global_sparsity, "layer_sparsity": layer, "format": fmt,
                "dtype": "q8_0", "checkpoint_bytes": folder_bytes(folder)}
    if dtype is not None:
        model.to(dtype)
    dtype = next(model.parameters()).dtype
    with as_published(model):
        model.save_pretrained(folder, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    if fmt == "compressed-tensors":
        assert quantized is not None
        _pack_folder(folder, quantized, dtype, metadata)
        ignore = sorted(n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in quantized)
        embeddings = any(isinstance(model.get_submodule(n), nn.Embedding) for n in quantized)
        config_path = folder / "config.json"
        config = json.loads(config_path.read_text())
        config["quantization_config"] = _compressed_tensors_config(quantized, ignore, embeddings)
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    elif metadata:
        stamp_metadata(folder, metadata)
    names = linear_names if linear_names is not None else list(linears)
    global_sparsity, layer = measured_sparsity(folder, names)
    return {"global_sparsity": global_sparsity, "layer_sparsity": layer, "format": fmt,
            "dtype": str(dtype).removeprefix("torch."), "checkpoint_bytes": folder_bytes(folder)}


def export_checkpoint(
    model: nn.Module,
    tokenizer: Any,
    folder: str | Path,
    report: dict[str, Any] | None = None,
    *,
    fmt: str = "dense",
    dtype: torch.dtype | None = None,
    quantized: dict[str, QuantizedWeight] | None = None,
) -> dict[str, Any]:
    """``save_checkpoint`` plus report.json holding ``report`` and the measured sparsity; returns the report."""
    out = dict(report or {})
    out.update(save_checkpoint(model, tokenizer, folder, fmt=fmt, dtype=dtype, quantized=quantized))
    write_report(folder, out)
    return out

"""Export a pruned model: Hugging Face checkpoint (safetensors) + tokenizer + report.json.

The sparsity figures in the report are measured by reading the saved safetensors files back,
so they describe what was written, not what was intended.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from evosparse.pruning.layers import prunable_linears
from torch import nn


def count_zeros_in_checkpoint(folder: str | Path, weight_names: list[str]) -> dict[str, tuple[int, int]]:
    """{tensor name: (zeros, numel)} for the given tensor names, read from the folder's *.safetensors."""
    from safetensors import safe_open

    wanted = set(weight_names)
    found: dict[str, tuple[int, int]] = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                if key in wanted:
                    t = f.get_tensor(key)
                    found[key] = (int((t == 0).sum()), t.numel())
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


def write_report(folder: str | Path, report: dict[str, Any]) -> None:
    path = Path(folder) / "report.json"
    path.write_text(json.dumps(report, indent=2, sort_keys=False) + "\n")


@torch.no_grad()
def save_checkpoint(
    model: nn.Module, tokenizer: Any, folder: str | Path, linear_names: list[str] | None = None
) -> dict[str, Any]:
    """Save model + tokenizer to ``folder``; return the sparsity measured from the saved weights.

    Returns ``{"global_sparsity": …, "layer_sparsity": {name: …}}`` (report.json is the caller's).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    names = linear_names if linear_names is not None else list(prunable_linears(model))
    global_sparsity, layer = measured_sparsity(folder, names)
    return {"global_sparsity": global_sparsity, "layer_sparsity": layer}


def export_checkpoint(
    model: nn.Module, tokenizer: Any, folder: str | Path, report: dict[str, Any] | None = None
) -> dict[str, Any]:
    """``save_checkpoint`` plus report.json holding ``report`` and the measured sparsity; returns the report."""
    out = dict(report or {})
    out.update(save_checkpoint(model, tokenizer, folder))
    write_report(folder, out)
    return out

"""Layer discovery: the transformer blocks of a causal LM, their prunable linear modules, GLU groups.

Supports Llama/Mistral/Qwen2-style models (``model.layers``, GLU MLP with gate/up/down) and
GPT-2 (``transformer.h``, ``Conv1D`` weights stored transposed) / OPT (``model.decoder.layers``).
Embeddings and the LM head are never listed: they stay dense.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from evosparse.pruning.errors import ModelLoadError
from torch import nn

# Where each family keeps its list of decoder blocks, tried in order.
_BLOCK_PATHS = ("model.layers", "model.decoder.layers", "transformer.h", "gpt_neox.layers")


def _is_conv1d(module: nn.Module) -> bool:
    # transformers' GPT-2 Conv1D keeps weight as [in, out]; detect it without importing it.
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def is_prunable(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or _is_conv1d(module)


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The module's weight as an [out_features, in_features] tensor sharing storage with it.

    In-place edits of the returned tensor change the module (a transposed view for Conv1D).
    """
    w = module.weight.data
    return w.t() if _is_conv1d(module) else w


@dataclass
class BlockInfo:
    """One decoder block: its index, dotted name, module and prunable linears in forward order."""

    index: int
    name: str
    module: nn.Module
    linears: dict[str, nn.Module] = field(default_factory=dict)  # full dotted name -> module
    # (gate, up, down) full names for a GLU MLP, None for a plain MLP.
    glu: tuple[str, str, str] | None = None

    @property
    def numel(self) -> int:
        return sum(weight_matrix(m).numel() for m in self.linears.values())


def _get_path(model: nn.Module, path: str) -> nn.Module | None:
    obj: object = model
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj if isinstance(obj, nn.ModuleList) else None


def block_list(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The dotted path and ModuleList of the model's decoder blocks."""
    for path in _BLOCK_PATHS:
        blocks = _get_path(model, path)
        if blocks is not None:
            return path, blocks
    raise ModelLoadError(
        f"unsupported architecture {type(model).__name__}: no decoder block list found at any of {_BLOCK_PATHS}"
    )


def find_blocks(model: nn.Module) -> list[BlockInfo]:
    """All decoder blocks with their prunable linears (full names, forward order) and GLU groups."""
    path, blocks = block_list(model)
    infos: list[BlockInfo] = []
    for i, block in enumerate(blocks):
        prefix = f"{path}.{i}"
        info = BlockInfo(index=i, name=prefix, module=block)
        for sub_name, sub in block.named_modules():
            if sub_name and is_prunable(sub):
                info.linears[f"{prefix}.{sub_name}"] = sub
        mlp = getattr(block, "mlp", None)
        if mlp is not None and all(hasattr(mlp, a) for a in ("gate_proj", "up_proj", "down_proj")):
            info.glu = (f"{prefix}.mlp.gate_proj", f"{prefix}.mlp.up_proj", f"{prefix}.mlp.down_proj")
        infos.append(info)
    if not infos:
        raise ModelLoadError(f"model {type(model).__name__} has no decoder blocks")
    return infos


def prunable_linears(model: nn.Module) -> dict[str, nn.Module]:
    """Every prunable linear of every block, full name -> module, in forward order."""
    out: dict[str, nn.Module] = {}
    for info in find_blocks(model):
        out.update(info.linears)
    return out

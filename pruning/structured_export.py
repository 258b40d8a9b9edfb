"""Checkpoints of structured-pruned models, and the loader for per-layer widths.

Three forms:

- **uniform widths** (every block kept the same number of KV groups and MLP channels): an
  ordinary Hugging Face Llama checkpoint whose config has the smaller ``num_attention_heads``,
  ``num_key_value_heads`` and ``intermediate_size`` (``head_dim`` written explicitly, since it
  no longer equals hidden_size / heads). ``AutoModelForCausalLM.from_pretrained`` loads it with
  no custom code, and so does anything that reads stock Llama checkpoints.
- **per-layer widths** (searched): the same files, but the tensors have each block's own
  shapes and ``config.json`` keeps the dense widths plus ``evosparse_layer_widths``, a list with
  one ``{"num_attention_heads", "num_key_value_heads", "intermediate_size"}`` per block.
  ``load_structured`` (used by ``pruning.loading.load_model``, hence ``evosparse eval``) builds the
  model from the config, resizes each block's linears to those widths and loads the weights.
  Plain ``from_pretrained`` refuses it (shape mismatch), by design.
- **padded**: the dense shapes, removed heads/channels present as zero rows and columns (the
  reconstructed o_proj/down_proj columns in the kept places): same outputs, no speed-up, loads
  anywhere. Written to ``padded/`` next to a per-layer-widths checkpoint.

``structure.json`` records which KV groups and channels every block kept (indices into the
dense model), so the padded form can always be rebuilt from the small one.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
from evosparse.pruning.errors import ModelLoadError, PruningConfigError
from evosparse.pruning.export import as_published, stamp_metadata
from evosparse.pruning.layers import find_blocks
from evosparse.pruning.structured import BlockStructure, Structure
from torch import nn

WIDTHS_KEY = "evosparse_layer_widths"
STRUCTURE_FILE = "structure.json"
PADDED_DIR = "padded"

_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")


def _dense_config(config: Any, structure: Structure) -> Any:
    cfg = copy.deepcopy(config)
    b0 = structure.blocks[0]
    cfg.num_attention_heads = b0.dense_groups * b0.n_rep
    cfg.num_key_value_heads = b0.dense_groups
    cfg.intermediate_size = b0.dense_channels
    cfg.head_dim = b0.head_dim
    if hasattr(cfg, WIDTHS_KEY):
        delattr(cfg, WIDTHS_KEY)
    return cfg


def dense_sizes(model: nn.Module, structure: Structure) -> dict[str, int]:
    """Weights per block linear (full name) in the dense model the structure was cut from."""
    out: dict[str, int] = {}
    for info, b in zip(find_blocks(model), structure.blocks, strict=True):
        d = info.module.self_attn.o_proj.weight.shape[0]
        q = b.dense_groups * b.n_rep * b.head_dim * d
        kv = b.dense_groups * b.head_dim * d
        ch = b.dense_channels * d
        sizes = {"self_attn.q_proj": q, "self_attn.k_proj": kv, "self_attn.v_proj": kv, "self_attn.o_proj": q,
                 "mlp.gate_proj": ch, "mlp.up_proj": ch, "mlp.down_proj": ch}
        for sub, n in sizes.items():
            out[f"{info.name}.{sub}"] = n
    return out


def _scatter_rows(w: torch.Tensor, rows: torch.Tensor, total: int) -> torch.Tensor:
    out = torch.zeros((total, *w.shape[1:]), dtype=w.dtype, device=w.device)
    out[rows.to(w.device)] = w
    return out


def _scatter_cols(w: torch.Tensor, cols: torch.Tensor, total: int) -> torch.Tensor:
    out = torch.zeros((w.shape[0], total), dtype=w.dtype, device=w.device)
    out[:, cols.to(w.device)] = w
    return out


def padded_state_dict(model: nn.Module, structure: Structure) -> dict[str, torch.Tensor]:
    """The model's state dict with every block linear scattered back into its dense shape (zeros elsewhere)."""
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    for info, b in zip(find_blocks(model), structure.blocks, strict=True):
        hd, width = b.head_dim, b.n_rep * b.head_dim
        q_rows = torch.cat([torch.arange(g * width, (g + 1) * width) for g in b.kept_groups])
        kv = torch.cat([torch.arange(g * hd, (g + 1) * hd) for g in b.kept_groups])
        ch = torch.tensor(b.kept_channels, dtype=torch.long)
        q_total, kv_total = b.dense_groups * width, b.dense_groups * hd
        p = f"{info.name}."
        for name, rows, total in (("self_attn.q_proj", q_rows, q_total), ("self_attn.k_proj", kv, kv_total),
                                  ("self_attn.v_proj", kv, kv_total), ("mlp.gate_proj", ch, b.dense_channels),
                                  ("mlp.up_proj", ch, b.dense_channels)):
            sd[p + name + ".weight"] = _scatter_rows(sd[p + name + ".weight"], rows, total)
            if p + name + ".bias" in sd:
                sd[p + name + ".bias"] = _scatter_rows(sd[p + name + ".bias"], rows, total)
        sd[p + "self_attn.o_proj.weight"] = _scatter_cols(sd[p + "self_attn.o_proj.weight"], q_rows, q_total)
        sd[p + "mlp.down_proj.weight"] = _scatter_cols(sd[p + "mlp.down_proj.weight"], ch, b.dense_channels)
    return sd


def save_padded(model: nn.Module, structure: Structure, tokenizer: Any, folder: str | Path) -> None:
    """The padded dense-shape checkpoint: stock config, zero rows/columns for the removed units."""
    from transformers import AutoModelForCausalLM

    cfg = _dense_config(model.config, structure)
    cfg.use_cache = getattr(model, "evosparse_use_cache", cfg.use_cache)  # as the source had it
    dtype = next(model.parameters()).dtype
    dense = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    missing, unexpected = dense.load_state_dict(padded_state_dict(model, structure), strict=False)
    if unexpected or [k for k in missing if "rotary" not in k and not k.endswith("lm_head.weight")]:
        raise PruningConfigError(f"padded export does not match the model: missing {missing[:3]}, "
                                 f"unexpected {unexpected[:3]}")
    dense.save_pretrained(folder, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


def saved_linear_sizes(folder: str | Path, names: list[str]) -> dict[str, int]:
    """Number of weights of each named linear, read from the folder's *.safetensors."""
    from safetensors import safe_open

    wanted = {f"{n}.weight": n for n in names}
    found: dict[str, int] = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                if key in wanted:
                    shape = f.get_slice(key).get_shape()
                    found[wanted[key]] = int(torch.tensor(shape).prod())
    missing = set(names) - set(found)
    if missing:
        raise ValueError(f"saved checkpoint lacks weights {sorted(missing)[:3]}")
    return found


@torch.no_grad()
def save_structured(model: nn.Module, tokenizer: Any, folder: str | Path, padded: bool | None = None,
                    metadata: dict[str, str] | None = None) -> dict[str, Any]:
    """Save a structured-pruned model (small form; ``padded/`` too for per-layer widths); return what was measured.

    ``metadata`` goes into the safetensors headers of both forms (as ``export.save_checkpoint``).

    ``global_sparsity`` is 1 − (block weights in the saved files) / (the dense model's block weights),
    ``layer_sparsity`` the same per linear; ``parameters`` both totals; ``structure`` each block's
    widths (report.json is the caller's, as with ``export.save_checkpoint``).
    """
    structure: Structure | None = getattr(model, "evosparse_structure", None)
    if structure is None:
        raise PruningConfigError("export_structured needs a model pruned by prune_structured")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sizes = dense_sizes(model, structure)
    config = model.config
    # The config object is shared with the submodules: change it for saving only, then put it back.
    keys = ("num_attention_heads", "num_key_value_heads", "intermediate_size", "head_dim", WIDTHS_KEY)
    before = {k: getattr(config, k) for k in keys if hasattr(config, k)}
    try:
        if structure.uniform:
            b0 = structure.blocks[0]
            config.num_attention_heads, config.num_key_value_heads = b0.heads, b0.kv_heads
            config.intermediate_size, config.head_dim = b0.intermediate_size, b0.head_dim
        else:
            dense_cfg = _dense_config(config, structure)
            for key in keys[:4]:
                setattr(config, key, getattr(dense_cfg, key))
            setattr(config, WIDTHS_KEY, structure.widths())
        with as_published(model):
            model.save_pretrained(folder, safe_serialization=True)
    finally:
        for k in keys:
            if k in before:
                setattr(config, k, before[k])
            elif hasattr(config, k):
                delattr(config, k)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    (folder / STRUCTURE_FILE).write_text(json.dumps(structure.to_json()) + "\n")
    write_padded = (not structure.uniform) if padded is None else padded
    if write_padded:
        save_padded(model, structure, tokenizer, folder / PADDED_DIR)
    if metadata:
        for part in (folder, folder / PADDED_DIR) if write_padded else (folder,):
            stamp_metadata(part, metadata)
    saved = saved_linear_sizes(folder, list(sizes))
    dense_total, kept_total = sum(sizes.values()), sum(saved.values())
    out: dict[str, Any] = {}
    out["global_sparsity"] = 1.0 - kept_total / dense_total
    out["layer_sparsity"] = {n: 1.0 - saved[n] / sizes[n] for n in sizes}
    out["parameters"] = {"dense_block_weights": dense_total, "kept_block_weights": kept_total}
    out["structure"] = {
        "uniform": structure.uniform,
        "form": "hf-uniform" if structure.uniform else "evosparse-layer-widths",
        "padded_dir": PADDED_DIR if write_padded else None,
        "reconstruct": structure.reconstruct,
        "layers": structure.widths(),
    }
    return out


def export_structured(
    model: nn.Module, tokenizer: Any, folder: str | Path, report: dict[str, Any] | None = None,
    padded: bool | None = None,
) -> dict[str, Any]:
    """``save_structured`` plus report.json holding ``report`` and the measurements; returns the report."""
    from evosparse.pruning.export import write_report

    out = dict(report or {})
    out.update(save_structured(model, tokenizer, folder, padded))
    write_report(folder, out)
    return out


def is_layer_widths_checkpoint(folder: str | Path) -> bool:
    cfg = Path(folder) / "config.json"
    try:
        return cfg.is_file() and WIDTHS_KEY in json.loads(cfg.read_text())
    except (OSError, json.JSONDecodeError):
        return False


def resize_block(block: nn.Module, widths: dict[str, int]) -> None:
    """Give one Llama block's linears the shapes of the given widths (weights uninitialised)."""
    attn, mlp = block.self_attn, block.mlp
    hd = int(attn.head_dim)
    heads, kv, inter = (int(widths["num_attention_heads"]), int(widths["num_key_value_heads"]),
                        int(widths["intermediate_size"]))
    if heads != kv * int(attn.num_key_value_groups):
        raise ModelLoadError(f"layer widths {widths} do not keep {attn.num_key_value_groups} query heads per KV head")
    for lin, out_f, in_f in ((attn.q_proj, heads * hd, None), (attn.k_proj, kv * hd, None),
                             (attn.v_proj, kv * hd, None), (attn.o_proj, None, heads * hd),
                             (mlp.gate_proj, inter, None), (mlp.up_proj, inter, None), (mlp.down_proj, None, inter)):
        o = out_f if out_f is not None else lin.out_features
        i = in_f if in_f is not None else lin.in_features
        w = lin.weight
        lin.weight = nn.Parameter(torch.empty((o, i), dtype=w.dtype, device=w.device), requires_grad=False)
        if lin.bias is not None and out_f is not None:
            lin.bias = nn.Parameter(torch.empty(o, dtype=w.dtype, device=w.device), requires_grad=False)
        lin.out_features, lin.in_features = o, i


def _structure_from_file(folder: Path, model: nn.Module) -> Structure | None:
    path = folder / STRUCTURE_FILE
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    blocks = []
    for info, layer in zip(find_blocks(model), data["layers"], strict=True):
        attn = info.module.self_attn
        blocks.append(BlockStructure(
            kept_groups=list(layer["kept_kv_groups"]), kept_channels=list(layer["kept_channels"]),
            dense_groups=int(model.config.num_key_value_heads), dense_channels=int(model.config.intermediate_size),
            n_rep=int(attn.num_key_value_groups), head_dim=int(attn.head_dim)))
    return Structure(blocks=blocks, pruner=data.get("pruner", ""), reconstruct=bool(data.get("reconstruct", False)))


@torch.no_grad()
def load_structured(folder: str | Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Load a per-layer-widths checkpoint written by ``export_structured`` into a transformers model."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(folder)
    config = AutoConfig.from_pretrained(folder)
    widths = getattr(config, WIDTHS_KEY, None)
    if not isinstance(widths, list):
        raise ModelLoadError(f"{folder}: config.json has no {WIDTHS_KEY} list")
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    blocks = find_blocks(model)
    if len(widths) != len(blocks):
        raise ModelLoadError(f"{folder}: {len(widths)} layer widths for {len(blocks)} blocks")
    structure = _structure_from_file(folder, model)  # read before resizing: dense widths come from the config
    for info, w in zip(blocks, widths, strict=True):
        resize_block(info.module, w)
    state: dict[str, torch.Tensor] = {}
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{folder}: no *.safetensors files")
    for file in files:
        state.update(load_file(str(file)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    bad_missing = [k for k in missing if not (tied and k.endswith("lm_head.weight"))]
    if bad_missing or unexpected:
        raise ModelLoadError(f"{folder}: weights do not match the layer widths (missing {bad_missing[:3]}, "
                             f"unexpected {unexpected[:3]})")
    if tied:
        model.tie_weights()
    model.to(dtype)
    model.evosparse_structure = structure
    model.eval()
    return model

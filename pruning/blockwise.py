"""Run a causal LM one decoder block at a time.

Calibration (pruners, OWL, the level database) and the search's proxy fitness all need the
hidden states *between* blocks: pruning block i must see the outputs of the already-pruned
blocks before it, and a candidate that differs from its parent only from block k onwards can
reuse the parent's hidden states up to k. Holding one block's activations at a time is also
what lets a 7B model be calibrated on one GPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from evosparse.pruning.errors import ModelLoadError
from evosparse.pruning.layers import block_list
from torch import nn


class _StopForward(Exception):
    """Raised by the capture hook once block 0's inputs are recorded."""


@dataclass
class BlockInputs:
    """Hidden states entering block 0 for every window, plus the keyword arguments every block takes.

    ``kwargs`` (attention mask, rotary position embeddings, position ids) were captured on a
    batch of one window; their batch dimension of 1 broadcasts over any batch of windows of the
    same length.
    """

    hidden: torch.Tensor  # [n_windows, seq_len, d_model]
    kwargs: dict[str, Any]


def _move(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_move(o, device) for o in obj)
    if isinstance(obj, list):
        return [_move(o, device) for o in obj]
    return obj


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def capture_block_inputs(model: nn.Module, tokens: torch.Tensor) -> BlockInputs:
    """Embed ``tokens`` ([n, T]) and record what block 0 receives, without running any block."""
    _, blocks = block_list(model)
    device = model_device(model)
    hiddens: list[torch.Tensor] = []
    captured: dict[str, Any] = {}

    def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs.pop("hidden_states")
        hiddens.append(hidden.detach())
        if not captured:
            for k, v in kwargs.items():
                if k in ("hidden_states", "past_key_value", "past_key_values", "cache", "layer_past"):
                    continue
                captured[k] = v
        raise _StopForward

    handle = blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for row in tokens:
            try:
                model(input_ids=row.unsqueeze(0).to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    captured["use_cache"] = False
    return BlockInputs(hidden=torch.cat(hiddens, dim=0), kwargs=captured)


def block_output(out: Any) -> torch.Tensor:
    """Blocks return a tensor (newer transformers) or a tuple whose first item is the hidden state."""
    return out[0] if isinstance(out, tuple | list) else out


@torch.no_grad()
def run_block(
    block: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any], batch_size: int = 8
) -> torch.Tensor:
    """Apply one decoder block to ``hidden`` ([n, T, d]) in batches; returns a new tensor."""
    outs = [block_output(block(hidden[i : i + batch_size], **kwargs)) for i in range(0, hidden.shape[0], batch_size)]
    return torch.cat(outs, dim=0)


def final_norm_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """The final normalisation and the LM head that turn the last block's output into logits."""
    head = model.get_output_embeddings()
    for path in ("model.norm", "transformer.ln_f", "model.decoder.final_layer_norm", "gpt_neox.final_layer_norm"):
        obj: Any = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if obj is not None:
            return obj, head
    raise ModelLoadError(f"unsupported architecture {type(model).__name__}: final norm not found")


@torch.no_grad()
def head_logits(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Logits [n, T, vocab] from the last block's output."""
    norm, head = final_norm_and_head(model)
    h = norm(hidden)
    project_out = getattr(getattr(getattr(model, "model", None), "decoder", None), "project_out", None)
    if project_out is not None:  # OPT-350m style models project back to the embedding size
        h = project_out(h)
    return head(h)

"""The job's one dense copy of the prunable weights, and content fingerprints of models and data.

A job prunes the model in place several times (search levels, the uniform baseline, the final
prune); every one of them starts again from this snapshot. It lives in host memory (pinned
when the model is on a GPU, so restoring is a fast copy), never a second time on the device.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from evosparse.pruning.layers import BlockInfo, weight_matrix
from torch import nn


class DenseWeights(Mapping[str, torch.Tensor]):
    """{linear name: dense weight [out, in]} in host memory, taken once from the dense model."""

    def __init__(self, blocks: Sequence[BlockInfo]) -> None:
        self.modules = {n: m for b in blocks for n, m in b.linears.items()}
        self._weights: dict[str, torch.Tensor] = {}
        for name, mod in self.modules.items():
            w = weight_matrix(mod).detach()
            host = torch.empty(w.shape, dtype=w.dtype, pin_memory=w.is_cuda)
            host.copy_(w)
            self._weights[name] = host

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._weights[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._weights)

    def __len__(self) -> int:
        return len(self._weights)

    @torch.no_grad()
    def restore(self) -> None:
        """Put every linear back to its dense weights."""
        for name, mod in self.modules.items():
            weight_matrix(mod).copy_(self._weights[name], non_blocking=True)
        if any(w.is_pinned() for w in self._weights.values()):
            torch.cuda.synchronize()

    def nbytes(self) -> int:
        return sum(w.numel() * w.element_size() for w in self._weights.values())


def _update(h: Any, name: str, t: torch.Tensor) -> None:  # h: a hashlib object
    t = t.detach().contiguous().cpu()
    h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def model_fingerprint(model: nn.Module, dense: Mapping[str, torch.Tensor] | None = None) -> str:
    """sha256 of the model's architecture and every parameter and buffer (its *content*, not its path).

    ``dense``: the dense snapshot, read instead of the module weights it covers (the model may be
    pruned already when this is asked).
    """
    h = hashlib.sha256(type(model).__name__.encode())
    covered = {}
    if dense is not None:
        covered = {id(getattr(m, "weight", None)): n for n, m in getattr(dense, "modules", {}).items()}
    for name, tensor in model.state_dict(keep_vars=True).items():
        key = covered.get(id(tensor))
        _update(h, name, dense[key] if key is not None and dense is not None else tensor)
    return h.hexdigest()


def tokens_fingerprint(tokens: torch.Tensor) -> str:
    """sha256 of a token-window tensor: the calibration data exactly as the job reads it."""
    h = hashlib.sha256()
    _update(h, "tokens", tokens.to(torch.int64))
    return h.hexdigest()

"""Per-linear input statistics gathered while one block runs on its calibration inputs.

For each hooked linear we accumulate, over every calibration token x (its input vector):

- ``sq_norms[j]`` = Σ x_j² — Wanda's ‖X_j‖₂² and, for a GLU down projection, DaSS's ‖A_i‖₂²;
- ``hessian`` = 2/N · Σ x xᵀ (only when asked: SparseGPT's layer Hessian, in float32).

Hooks see the inputs the linear actually receives, so for block i they reflect the already
pruned blocks before it (the caller feeds the pruned hidden states).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from evosparse.pruning.blockwise import run_block
from torch import nn


@dataclass
class LinearStats:
    sq_norms: torch.Tensor  # [in_features], float32
    tokens: int = 0
    hessian: torch.Tensor | None = None  # [in, in], float32, = 2/N Σ x xᵀ once finalised

    def finalise(self) -> None:
        if self.hessian is not None and self.tokens:
            self.hessian.mul_(2.0 / self.tokens)


def _in_features(module: nn.Module) -> int:
    from evosparse.pruning.layers import weight_matrix

    return weight_matrix(module).shape[1]


@torch.no_grad()
def collect_block_stats(
    block: nn.Module,
    linears: dict[str, nn.Module],
    hidden: torch.Tensor,
    kwargs: dict[str, Any],
    hessian: bool = False,
    batch_size: int = 8,
) -> tuple[dict[str, LinearStats], torch.Tensor]:
    """Run ``block`` on ``hidden`` with hooks on ``linears``; return (stats per linear, block output).

    The output is the block's output *before* any pruning of this block (callers that prune
    recompute it afterwards).
    """
    stats: dict[str, LinearStats] = {}
    handles = []
    for name, module in linears.items():
        d = _in_features(module)
        dev = module.weight.device
        st = LinearStats(
            sq_norms=torch.zeros(d, dtype=torch.float32, device=dev),
            hessian=torch.zeros(d, d, dtype=torch.float32, device=dev) if hessian else None,
        )
        stats[name] = st

        def hook(_mod: nn.Module, args: tuple, _out: Any, st: LinearStats = st) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            st.sq_norms += (x * x).sum(dim=0)
            st.tokens += x.shape[0]
            if st.hessian is not None:
                st.hessian.addmm_(x.t(), x)

        handles.append(module.register_forward_hook(hook))
    try:
        out = run_block(block, hidden, kwargs, batch_size=batch_size)
    finally:
        for h in handles:
            h.remove()
    for st in stats.values():
        st.finalise()
    return stats, out

"""Sensitivity scores per linear and per block, and the allocations derived from them.

- Fisher trace: Σ over calibration windows of the squared gradient of the window's mean
  next-token loss w.r.t. each weight, divided by the layer's parameter count. One backward pass
  per window (the empirical Fisher at window granularity; per-token gradients would cost one
  backward per token).
- Hessian trace: the diagonal-of-XXᵀ proxy. For a linear y = Wx the layer-wise reconstruction
  Hessian is H = 2XXᵀ (per output row), so tr over all weights / numel = 2·Σ_j ‖X_j‖² / (in · N),
  N = calibration tokens, measured on the dense model block by block. Cheap (one forward), but
  blind to what the weights do with their inputs; Fisher is the default seed for that reason.
- OWL outlier ratio per block: share of the block's Wanda scores |W_ij|·‖X_j‖ (all its linears
  pooled) above M × their mean.

Block scores sum (Fisher, Hessian) over the block's linears weighted by parameter count.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from evosparse.pruning.blockwise import capture_block_inputs, model_device
from evosparse.pruning.calibration import LinearStats, collect_block_stats
from evosparse.pruning.errors import PruningConfigError
from evosparse.pruning.layers import BlockInfo, find_blocks, weight_matrix
from evosparse.pruning.pruners import nm_count, wanda_scores
from evosparse.search import allocation as alloc
from torch import nn

Progress = Callable[[int, int], None]


def fisher_traces(
    model: nn.Module,
    windows: torch.Tensor,
    progress: Progress | None = None,
    blocks: Sequence[BlockInfo] | None = None,
) -> dict[str, float]:
    """{linear name: Σ_windows ‖∂loss_w/∂W‖² / numel}, loss_w = mean next-token CE of window w."""
    linears = {n: m for b in (blocks or find_blocks(model)) for n, m in b.linears.items()}
    saved = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    weights = {n: m.weight for n, m in linears.items()}
    for w in weights.values():
        w.requires_grad_(True)
    sums = {n: torch.zeros((), dtype=torch.float64) for n in linears}
    dev = model_device(model)
    was_training = model.training
    model.eval()
    try:
        for i, row in enumerate(windows):
            ids = row.unsqueeze(0).to(dev)
            with torch.enable_grad():  # callers may sit inside no_grad
                loss = model(input_ids=ids, labels=ids, use_cache=False).loss
                grads = torch.autograd.grad(loss, list(weights.values()))
            for n, g in zip(weights, grads, strict=True):
                sums[n] += g.double().pow(2).sum().cpu()
            if progress is not None:
                progress(i + 1, windows.shape[0])
    finally:
        for p, flag in saved.items():
            p.requires_grad_(flag)
        model.train(was_training)
    return {n: float(sums[n]) / weights[n].numel() for n in linears}


@torch.no_grad()
def dense_input_stats(
    model: nn.Module,
    windows: torch.Tensor,
    progress: Progress | None = None,
    batch_size: int = 4,
    hessian: bool = False,
    blocks: Sequence[BlockInfo] | None = None,
) -> dict[str, LinearStats]:
    """Σ x_j² (and, with ``hessian``, 2XXᵀ/N) of every linear's input on the dense model, block by block.

    The one collector of dense calibration statistics: Wanda/DaSS rankings, SparseGPT levels,
    OWL ratios and Hessian traces all read what one pass of it returns.
    """
    inputs = capture_block_inputs(model, windows)
    hidden = inputs.hidden
    out: dict[str, LinearStats] = {}
    blocks = list(blocks) if blocks is not None else find_blocks(model)
    for i, block in enumerate(blocks):
        stats, hidden = collect_block_stats(block.module, block.linears, hidden, inputs.kwargs, hessian=hessian,
                                            batch_size=batch_size)
        out.update(stats)
        if progress is not None:
            progress(i + 1, len(blocks))
    return out


def hessian_traces(model: nn.Module, stats: dict[str, LinearStats]) -> dict[str, float]:
    """Diagonal-of-XXᵀ proxy: 2·Σ_j ‖X_j‖² / (in_features · tokens) for every linear."""
    return {n: 2.0 * float(st.sq_norms.sum()) / (st.sq_norms.numel() * max(st.tokens, 1)) for n, st in stats.items()}


def owl_ratios(
    model: nn.Module, stats: dict[str, LinearStats], m: float = 5.0, blocks: Sequence[BlockInfo] | None = None
) -> list[float]:
    """Per block: share of Wanda scores (all linears pooled) above ``m`` × their mean."""
    ratios = []
    for block in blocks or find_blocks(model):
        scores = torch.cat([wanda_scores(weight_matrix(mod), stats[n].sq_norms).flatten()
                            for n, mod in block.linears.items()])
        ratios.append(float((scores > m * scores.mean()).float().mean()))
    return ratios


def block_scores(blocks: Sequence[BlockInfo], per_linear: dict[str, float]) -> list[float]:
    """Parameter-weighted mean of a per-linear (already per-parameter) score over each block."""
    out = []
    for b in blocks:
        sizes = {n: weight_matrix(m).numel() for n, m in b.linears.items()}
        out.append(sum(per_linear[n] * s for n, s in sizes.items()) / sum(sizes.values()))
    return out


def split_block_counts(blocks: Sequence[BlockInfo], block_counts: Sequence[int]) -> dict[str, int]:
    """Spread each block's prune count over its linears in proportion to their sizes, summing exactly."""
    counts: dict[str, int] = {}
    for b, c in zip(blocks, block_counts, strict=True):
        names = list(b.linears)
        parts = alloc.split_proportional(c, [weight_matrix(b.linears[n]).numel() for n in names])
        counts.update(zip(names, parts, strict=True))
    return counts


def nm_counts(
    model: nn.Module, nm: tuple[int, int], blocks: Sequence[BlockInfo] | None = None
) -> dict[str, int]:
    """N:M everywhere: the count each linear loses under the pattern."""
    return {n: nm_count(tuple(weight_matrix(m).shape), nm) for b in blocks or find_blocks(model)
            for n, m in b.linears.items()}


def allocation_counts(
    model: nn.Module,
    allocation: str,
    sparsity: float,
    *,
    owl: Sequence[float] | None = None,
    fisher: dict[str, float] | None = None,
    hessian: dict[str, float] | None = None,
    owl_lambda: float = 0.08,
    spread: float = 0.1,
    blocks: Sequence[BlockInfo] | None = None,
) -> dict[str, int]:
    """Prune counts per linear for a baseline allocation; unit = block (each linear of a block alike)."""
    blocks = list(blocks) if blocks is not None else find_blocks(model)
    sizes = [b.numel for b in blocks]
    if allocation == "uniform":
        bc = alloc.uniform(sizes, sparsity)
    elif allocation == "owl":
        if owl is None:
            raise PruningConfigError("owl allocation needs outlier ratios")
        bc = alloc.owl(sizes, sparsity, owl, owl_lambda)
    elif allocation in ("fisher", "hessian"):
        scores = fisher if allocation == "fisher" else hessian
        if scores is None:
            raise PruningConfigError(f"{allocation} allocation needs {allocation} traces")
        bc = alloc.sensitivity_proportional(sizes, sparsity, block_scores(blocks, scores), spread)
    else:
        raise PruningConfigError(f"allocation {allocation!r} is not a baseline allocation")
    return split_block_counts(blocks, bc)

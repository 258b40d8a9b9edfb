"""prune_model: prune a whole model block by block, each block calibrated on pruned upstream outputs.

For each decoder block: run it once on the current hidden states (the outputs of the already
pruned blocks before it) with hooks that gather its linears' input statistics, prune its
linears with those statistics, then run the pruned block again to get the hidden states for
the next block. Only one block's activations live at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from evosparse.pruning.blockwise import capture_block_inputs, run_block
from evosparse.pruning.calibration import LinearStats, collect_block_stats
from evosparse.pruning.errors import CancelledError, PruningConfigError
from evosparse.pruning.layers import BlockInfo, find_blocks, weight_matrix
from evosparse.pruning.pruners import (
    PRUNER_NAMES,
    apply_mask,
    dass_scores,
    keep_mask_from_scores,
    magnitude_scores,
    sparsegpt_prune,
    wanda_scores,
)
from torch import nn

Progress = Callable[[int, int], None]  # (blocks done, blocks total)


def glu_roles(block: BlockInfo) -> dict[str, str]:
    """'gate'/'up'/'down' for the GLU linears of a block (empty for a plain MLP)."""
    if block.glu is None:
        return {}
    gate, up, down = block.glu
    return {gate: "gate", up: "up", down: "down"}


@torch.no_grad()
def prune_linear(
    module: nn.Module,
    pruner: str,
    count: int,
    stats: LinearStats | None,
    nm: tuple[int, int] | None = None,
    channel_sq_norms: torch.Tensor | None = None,
) -> None:
    """Prune one linear in place.

    ``channel_sq_norms`` (DaSS only, for a GLU gate/up projection) holds Σ A_i² of the
    intermediate channels; without it DaSS falls back to Wanda.
    """
    w = weight_matrix(module)
    if pruner == "magnitude":
        apply_mask(w, keep_mask_from_scores(magnitude_scores(w), count, nm, dim=1))
    elif pruner == "wanda" or (pruner == "dass" and channel_sq_norms is None):
        assert stats is not None
        apply_mask(w, keep_mask_from_scores(wanda_scores(w, stats.sq_norms), count, nm, dim=1))
    elif pruner == "dass":
        apply_mask(w, keep_mask_from_scores(dass_scores(w, channel_sq_norms), count, nm, dim=0))
    elif pruner == "sparsegpt":
        assert stats is not None and stats.hessian is not None
        w.copy_(sparsegpt_prune(w, stats.hessian, count, nm).to(w.dtype))
    else:
        raise PruningConfigError(f"unknown pruner {pruner!r}; choose one of {', '.join(PRUNER_NAMES)}")


def prune_block(
    block: BlockInfo,
    hidden: torch.Tensor,
    kwargs: dict,
    pruner: str,
    counts: dict[str, int],
    nm: tuple[int, int] | None = None,
    batch_size: int = 8,
) -> torch.Tensor:
    """Prune one block given its inputs; returns the pruned block's outputs (next block's inputs)."""
    targets = {n: m for n, m in block.linears.items() if counts.get(n, 0) > 0}
    if not targets:
        return run_block(block.module, hidden, kwargs, batch_size=batch_size)
    stats: dict[str, LinearStats] = {}
    if pruner != "magnitude":
        # DaSS needs the down projection's input norms even when only gate/up are pruned.
        hooked = dict(targets)
        if pruner == "dass" and block.glu is not None:
            hooked[block.glu[2]] = block.linears[block.glu[2]]
        stats, _ = collect_block_stats(
            block.module, hooked, hidden, kwargs, hessian=pruner == "sparsegpt", batch_size=batch_size
        )
    roles = glu_roles(block)
    for name, module in targets.items():
        channel = None
        if pruner == "dass" and roles.get(name) in ("gate", "up"):
            channel = stats[block.glu[2]].sq_norms  # type: ignore[index]
        prune_linear(module, pruner, counts[name], stats.get(name), nm, channel)
    del stats
    return run_block(block.module, hidden, kwargs, batch_size=batch_size)


def validate_counts(
    model: nn.Module, counts: dict[str, int], nm: tuple[int, int] | None, blocks: Sequence[BlockInfo] | None = None
) -> None:
    """Reject unknown layer names and counts outside [0, numel] before any weight is touched."""
    sizes = {n: weight_matrix(m).numel() for b in blocks or find_blocks(model) for n, m in b.linears.items()}
    unknown = sorted(set(counts) - set(sizes))
    if unknown:
        raise PruningConfigError(f"counts name layers the model does not have: {unknown[:3]}")
    for name, c in counts.items():
        if not 0 <= c <= sizes[name]:
            raise PruningConfigError(f"{name}: cannot prune {c} of {sizes[name]} weights")


@torch.no_grad()
def prune_model(
    model: nn.Module,
    calib_tokens: torch.Tensor,
    pruner: str,
    counts: dict[str, int],
    nm: tuple[int, int] | None = None,
    progress: Progress | None = None,
    should_cancel: Callable[[], bool] | None = None,
    batch_size: int = 8,
    blocks: Sequence[BlockInfo] | None = None,
) -> None:
    """Prune ``model`` in place: ``counts[name]`` weights zeroed in each linear (N:M: count > 0 = apply)."""
    if pruner not in PRUNER_NAMES:
        raise PruningConfigError(f"unknown pruner {pruner!r}; choose one of {', '.join(PRUNER_NAMES)}")
    blocks = list(blocks) if blocks is not None else find_blocks(model)
    validate_counts(model, counts, nm, blocks)
    if pruner == "magnitude":  # needs no activations: skip the forward passes
        for i, block in enumerate(blocks):
            if should_cancel is not None and should_cancel():
                raise CancelledError("job cancelled")
            for name, module in block.linears.items():
                if counts.get(name, 0) > 0:
                    prune_linear(module, pruner, counts[name], None, nm)
            if progress is not None:
                progress(i + 1, len(blocks))
        return
    inputs = capture_block_inputs(model, calib_tokens)
    hidden = inputs.hidden
    for i, block in enumerate(blocks):
        if should_cancel is not None and should_cancel():
            raise CancelledError("job cancelled")
        hidden = prune_block(block, hidden, inputs.kwargs, pruner, counts, nm, batch_size)
        if progress is not None:
            progress(i + 1, len(blocks))

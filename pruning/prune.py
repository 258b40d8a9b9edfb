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
from evosparse.pruning.layers import BlockInfo, find_blocks, prunable_linears, weight_matrix
from evosparse.pruning.pruners import (
    INPUT_PRUNERS,
    PRUNER_NAMES,
    apply_mask,
    dass_scores,
    keep_mask_from_scores,
    magnitude_scores,
    obs_prune_quantize,
    sparsegpt_prune,
    wanda_scores,
)
from evosparse.pruning.quantize import QuantConfig, QuantizedWeight, quantize_rtn
from torch import nn

Progress = Callable[[int, int], None]  # (blocks done, blocks total)
NM = tuple[int, int] | None
# One N:M for every linear, or one per linear (mixed patterns; None = unstructured/dense there).
Patterns = NM | dict[str, NM]
# One quantization for every linear, or one per linear (size budgets: each layer its own bits).
Quant = QuantConfig | None | dict[str, QuantConfig | None]


def nm_of(patterns: Patterns, name: str) -> NM:
    """The N:M a linear is pruned with."""
    return patterns.get(name) if isinstance(patterns, dict) else patterns


def quant_of(quant: Quant, name: str) -> QuantConfig | None:
    """The quantization a linear gets."""
    return quant.get(name) if isinstance(quant, dict) else quant


def needs_hessian(pruner: str, quant: Quant) -> bool:
    """SparseGPT and GPTQ both work through the layer Hessian 2XXᵀ."""
    configs = quant.values() if isinstance(quant, dict) else [quant]
    return pruner == "sparsegpt" or any(q is not None and q.method == "gptq" for q in configs)


def check_quant_shapes(model: nn.Module, quant: Quant) -> None:
    """Every prunable linear's input dimension must be a whole number of quantization groups."""
    for name, m in prunable_linears(model).items():
        q = quant_of(quant, name)
        if q is not None:
            q.check_in_features(name, weight_matrix(m).shape[1])


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
    quant: QuantConfig | None = None,
    scale_dtype: torch.dtype = torch.float32,
) -> QuantizedWeight | None:
    """Prune one linear in place, then quantize it when ``quant`` is given (returns its codes).

    ``channel_sq_norms`` (DaSS only, for a GLU gate/up projection) holds Σ A_i² of the
    intermediate channels; without it DaSS falls back to Wanda. With ``quant``: SparseGPT + GPTQ
    prune and quantize jointly in one OBS pass; any other mask + GPTQ keeps the mask and feeds the
    quantization error back through the Hessian; RTN rounds the pruned weights group by group.
    """
    w = weight_matrix(module)
    if pruner == "sparsegpt":
        assert stats is not None and stats.hessian is not None
        if quant is not None and quant.method == "gptq":
            new, qw = obs_prune_quantize(w, stats.hessian, count, nm, quant=quant, scale_dtype=scale_dtype)
            w.copy_(new.to(w.dtype))
            return qw
        w.copy_(sparsegpt_prune(w, stats.hessian, count, nm).to(w.dtype))
    elif count > 0:
        if pruner == "magnitude":
            keep = keep_mask_from_scores(magnitude_scores(w), count, nm, dim=1)
        elif pruner == "wanda" or (pruner == "dass" and channel_sq_norms is None):
            assert stats is not None
            keep = keep_mask_from_scores(wanda_scores(w, stats.sq_norms), count, nm, dim=1)
        elif pruner == "dass":
            keep = keep_mask_from_scores(dass_scores(w, channel_sq_norms), count, nm, dim=0)
        else:
            raise PruningConfigError(f"unknown pruner {pruner!r}; choose one of {', '.join(PRUNER_NAMES)}")
        apply_mask(w, keep)
    elif pruner not in PRUNER_NAMES:
        raise PruningConfigError(f"unknown pruner {pruner!r}; choose one of {', '.join(PRUNER_NAMES)}")
    if quant is None:
        return None
    keep = w != 0
    if quant.method == "gptq":
        assert stats is not None and stats.hessian is not None
        new, qw = obs_prune_quantize(w, stats.hessian, 0, keep=keep, quant=quant, scale_dtype=scale_dtype)
    else:
        qw = quantize_rtn(w, quant, keep, scale_dtype=scale_dtype)
        new = qw.dequantize()
    w.copy_(new.to(w.dtype))
    return qw


def prune_block(
    block: BlockInfo,
    hidden: torch.Tensor,
    kwargs: dict,
    pruner: str,
    counts: dict[str, int],
    nm: Patterns = None,
    batch_size: int = 8,
    quant: Quant = None,
    scale_dtype: torch.dtype = torch.float32,
    quantized: dict[str, QuantizedWeight] | None = None,
    keep_stats: dict[str, LinearStats] | None = None,
) -> torch.Tensor:
    """Prune (and quantize) one block given its inputs; returns the block's outputs (next block's inputs).

    Quantized codes are added to ``quantized`` by linear name. With ``keep_stats`` the input
    statistics of every linear of the block (pruned or not) are added to it by name.
    """
    # Quantization touches every linear, also those left dense (e.g. '2:4+dense').
    targets = {n: m for n, m in block.linears.items() if counts.get(n, 0) > 0 or quant_of(quant, n) is not None}
    if not targets and keep_stats is None:
        return run_block(block.module, hidden, kwargs, batch_size=batch_size)
    stats: dict[str, LinearStats] = {}
    if pruner != "magnitude" or needs_hessian(pruner, quant):
        # DaSS needs the down projection's input norms even when only gate/up are pruned.
        hooked = dict(block.linears) if keep_stats is not None else dict(targets)
        if pruner == "dass" and block.glu is not None:
            hooked[block.glu[2]] = block.linears[block.glu[2]]
        stats, _ = collect_block_stats(
            block.module, hooked, hidden, kwargs, hessian=needs_hessian(pruner, quant), batch_size=batch_size
        )
        if keep_stats is not None:
            keep_stats.update(stats)
    roles = glu_roles(block)
    for name, module in targets.items():
        channel = None
        if pruner == "dass" and roles.get(name) in ("gate", "up"):
            channel = stats[block.glu[2]].sq_norms  # type: ignore[index]
        qw = prune_linear(module, pruner, counts.get(name, 0), stats.get(name), nm_of(nm, name), channel,
                          quant_of(quant, name), scale_dtype)
        if qw is not None and quantized is not None:
            quantized[name] = qw
    del stats
    return run_block(block.module, hidden, kwargs, batch_size=batch_size)


def validate_counts(
    model: nn.Module, counts: dict[str, int], nm: Patterns = None, blocks: Sequence[BlockInfo] | None = None
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
    nm: Patterns = None,
    progress: Progress | None = None,
    should_cancel: Callable[[], bool] | None = None,
    batch_size: int = 8,
    blocks: Sequence[BlockInfo] | None = None,
    quant: Quant = None,
    scale_dtype: torch.dtype = torch.float32,
) -> dict[str, QuantizedWeight]:
    """Prune ``model`` in place: ``counts[name]`` weights zeroed in each linear (N:M: count > 0 = apply).

    ``nm`` is one N:M for all linears or a per-linear dict (mixed patterns). With ``quant`` every
    prunable linear is also quantized (scales representable in ``scale_dtype``, the checkpoint's
    dtype; one config for all, or one per linear, None leaving that linear unquantized); returns the
    integer codes per linear (empty without ``quant``).
    """
    if pruner not in PRUNER_NAMES:
        raise PruningConfigError(f"unknown pruner {pruner!r}; choose one of {', '.join(PRUNER_NAMES)}")
    blocks = list(blocks) if blocks is not None else find_blocks(model)
    validate_counts(model, counts, nm, blocks)
    check_quant_shapes(model, quant)
    quantized: dict[str, QuantizedWeight] = {}
    if pruner == "magnitude" and not needs_hessian(pruner, quant):  # no activations needed: no forward passes
        for i, block in enumerate(blocks):
            if should_cancel is not None and should_cancel():
                raise CancelledError("job cancelled")
            for name, module in block.linears.items():
                if counts.get(name, 0) > 0 or quant_of(quant, name) is not None:
                    qw = prune_linear(module, pruner, counts.get(name, 0), None, nm_of(nm, name),
                                      quant=quant_of(quant, name), scale_dtype=scale_dtype)
                    if qw is not None:
                        quantized[name] = qw
            if progress is not None:
                progress(i + 1, len(blocks))
        return quantized
    inputs = capture_block_inputs(model, calib_tokens)
    hidden = inputs.hidden
    for i, block in enumerate(blocks):
        if should_cancel is not None and should_cancel():
            raise CancelledError("job cancelled")
        hidden = prune_block(block, hidden, inputs.kwargs, pruner, counts, nm, batch_size, quant, scale_dtype,
                             quantized)
        if progress is not None:
            progress(i + 1, len(blocks))
    return quantized


@torch.no_grad()
def pruned_input_stats(
    model: nn.Module,
    calib_tokens: torch.Tensor,
    pruner: str,
    counts: dict[str, int],
    progress: Progress | None = None,
    batch_size: int = 8,
    blocks: Sequence[BlockInfo] | None = None,
) -> dict[str, LinearStats]:
    """Every linear's input statistics as a block-sequential prune at ``counts`` sees them; the model
    is left dense.

    ``prune_model`` collects block i's statistics on the outputs of the blocks before it *pruned*,
    so what it ships depends on upstream errors that statistics of the dense model never show. A
    level database built from these statistics (pruned at a reference allocation near where the
    search will end, e.g. its seed) scores candidates with layers calibrated the way the shipped
    model's are. Each block is pruned to produce the next block's inputs, then given its dense
    weights back.
    """
    if pruner not in INPUT_PRUNERS:
        raise PruningConfigError(f"pruner {pruner!r} reads no calibration inputs: nothing to collect")
    blocks = list(blocks) if blocks is not None else find_blocks(model)
    validate_counts(model, counts, blocks=blocks)
    inputs = capture_block_inputs(model, calib_tokens)
    hidden = inputs.hidden
    out: dict[str, LinearStats] = {}
    for i, block in enumerate(blocks):
        saved = {n: weight_matrix(m).detach().clone() for n, m in block.linears.items()}
        try:
            hidden = prune_block(block, hidden, inputs.kwargs, pruner, counts, batch_size=batch_size, keep_stats=out)
        finally:
            for n, m in block.linears.items():
                weight_matrix(m).copy_(saved[n])
        if progress is not None:
            progress(i + 1, len(blocks))
    return out

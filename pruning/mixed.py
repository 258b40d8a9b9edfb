"""Per-layer N:M (``mixed:M``, ``2:4+dense``) on a model: the block level space and the per-linear plan.

The budget arithmetic is torch-free (``search.levels.mixed_space``); this module only maps a
model's decoder blocks onto it and turns per-block choices into what ``prune_model`` takes:
per-linear counts and per-linear (N, M) patterns. A block prunes ``p`` of every ``M`` weights
in each of its linears, so the block's pattern, and every linear's, is exact.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from evosparse.pruning.errors import PruningConfigError
from evosparse.pruning.layers import find_blocks, weight_matrix
from evosparse.search.defaults import MAX_LEVEL_DELTA
from evosparse.search.levels import LevelSpace, mixed_space
from torch import nn


@dataclass
class MixedPlan:
    counts: dict[str, int]  # weights pruned per linear
    patterns: dict[str, tuple[int, int] | None]  # (N, M) per linear, None = dense
    layer_pattern: dict[str, str]  # linear name -> 'N:M' or 'dense' (the report's per-layer pattern)
    block_pruned: list[int]  # p per block (N = M - p)


def check_nm_shapes(model: nn.Module, m: int) -> None:
    """Every prunable linear needs its input dimension to be a whole number of M-groups."""
    for info in find_blocks(model):
        for name, mod in info.linears.items():
            cols = weight_matrix(mod).shape[1]
            if cols % m:
                raise PruningConfigError(f"{name}: N:{m} patterns need the input dimension divisible by {m}, "
                                         f"got {cols}")


def block_sizes(model: nn.Module) -> tuple[list[str], list[int]]:
    blocks = find_blocks(model)
    return [b.name for b in blocks], [b.numel for b in blocks]


def block_space(
    model: nn.Module, target: float, m: int, choices: Sequence[int], max_level_delta: float = MAX_LEVEL_DELTA
) -> LevelSpace:
    """The exact-budget level space over the model's blocks; a clear error if the target is unreachable."""
    check_nm_shapes(model, m)
    _, sizes = block_sizes(model)
    try:
        return mixed_space(sizes, target, m, choices, max_level_delta)
    except ValueError as exc:
        raise PruningConfigError(str(exc)) from None


def project_linear_counts(model: nn.Module, space: LevelSpace, counts: dict[str, int]) -> tuple[int, ...]:
    """The level vector nearest to an allocation given per linear (uniform, Fisher, OWL...)."""
    per_block = [sum(counts.get(n, 0) for n in b.linears) for b in find_blocks(model)]
    return space.from_counts(per_block)


def plan(model: nn.Module, space: LevelSpace, vector: Sequence[int], m: int) -> MixedPlan:
    """Per-linear counts and patterns for a level vector of ``block_space``."""
    blocks = find_blocks(model)
    block_counts = space.counts(vector)
    counts: dict[str, int] = {}
    patterns: dict[str, tuple[int, int] | None] = {}
    labels: dict[str, str] = {}
    pruned = []
    for info, c in zip(blocks, block_counts, strict=True):
        p, rem = divmod(c * m, info.numel)
        if rem:
            raise PruningConfigError(f"{info.name}: count {c} is not an N:{m} pattern")
        pruned.append(p)
        for name, mod in info.linears.items():
            counts[name] = weight_matrix(mod).numel() * p // m
            patterns[name] = (m - p, m) if p else None
            labels[name] = f"{m - p}:{m}" if p else "dense"
    return MixedPlan(counts=counts, patterns=patterns, layer_pattern=labels, block_pruned=pruned)


def plan_from_counts(model: nn.Module, counts: dict[str, int], m: int) -> MixedPlan:
    """The plan of per-linear counts that already lie on the N:M grid (e.g. the search's result)."""
    patterns: dict[str, tuple[int, int] | None] = {}
    labels: dict[str, str] = {}
    pruned = []
    for info in find_blocks(model):
        ps = set()
        for name, mod in info.linears.items():
            p, rem = divmod(counts.get(name, 0) * m, weight_matrix(mod).numel())
            if rem:
                raise PruningConfigError(f"{name}: count {counts.get(name, 0)} is not an N:{m} pattern")
            ps.add(p)
            patterns[name] = (m - p, m) if p else None
            labels[name] = f"{m - p}:{m}" if p else "dense"
        pruned.append(max(ps) if ps else 0)
    return MixedPlan(counts=dict(counts), patterns=patterns, layer_pattern=labels, block_pruned=pruned)

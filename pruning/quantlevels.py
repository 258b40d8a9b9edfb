"""Quantized levels: a level database whose levels are (weights pruned, bits), for size-budget searches.

A (count, bits) level of a linear is the pruned level ``count`` of the underlying ``LevelDB``
(any pruner), then rounded to ``bits`` group-wise (RTN, ``pruning.quantize.quantize_rtn``, the
pruned weights kept exactly 0) and written into the model dequantized. RTN is what the search
scores with: it costs a few element-wise passes per linear, so levels are made on demand, not
stored. The export may quantize the chosen levels with GPTQ instead.

The model's weights are overwritten with quantized values, so the pruned levels must not be
read back from the model: the underlying database must hold every weight itself (a ranking
database built without bounds keeps its whole band, N:M and SparseGPT ones a dense copy).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from evosparse.pruning.errors import PruningConfigError
from evosparse.pruning.layers import weight_matrix
from evosparse.pruning.leveldb import LevelDB, Unit, split_counts
from evosparse.pruning.quantize import QuantConfig, quantize_rtn

Level = tuple[int, int]  # (weights pruned, bits)


class QuantLevelDB:
    """(count, bits) levels on top of a ``LevelDB``; the interface the proxy fitness reads."""

    def __init__(self, base: LevelDB, group_size: int, symmetric: bool = True,
                 scale_dtype: torch.dtype = torch.float32) -> None:
        if base.pruner != "sparsegpt" and base.nm_m is None and any(
                base.bounds[n] != (0, s) or base.band_lo.get(n, 0) for n, s in base.sizes.items()):
            raise PruningConfigError("quantized levels need a level database built without bounds "
                                     "(the model's weights are overwritten with quantized values)")
        self.base = base
        self.blocks = base.blocks
        self.modules = base.modules
        self.nm_m = None
        self.group_size = group_size
        self.symmetric = symmetric
        self.scale_dtype = scale_dtype
        self.current: dict[str, Level] = {n: (0, 0) for n in base.modules}  # (0, 0): dense, unquantized

    def config(self, bits: int) -> QuantConfig:
        return QuantConfig(bits, self.group_size, "rtn", self.symmetric)

    def linear_counts(self, units: Sequence[Unit], unit_levels: Sequence[Level]) -> dict[str, Level]:
        """Per linear (count, bits): each unit's count split over its linears by size, its bits for all."""
        counts = split_counts(units, [c for c, _ in unit_levels])
        bits = {n: b for u, (_, b) in zip(units, unit_levels, strict=True) for n in u.linears}
        return {n: (c, bits[n]) for n, c in counts.items()}

    @torch.no_grad()
    def level_weight(self, name: str, count: int, bits: int) -> torch.Tensor:
        """The linear's weights ([out, in], model dtype) pruned to ``count`` then RTN-quantized to ``bits``."""
        w = self.base.pruned_weight(name, count)
        if bits == 0:
            return w
        qw = quantize_rtn(w, self.config(bits), keep=w != 0, scale_dtype=self.scale_dtype)
        return qw.dequantize().to(w.dtype)

    @torch.no_grad()
    def apply(self, levels: Mapping[str, Level]) -> list[str]:
        """Put the model in the state ``levels`` (per linear); returns the linears rewritten."""
        changed = [n for n, lv in levels.items() if self.current[n] != tuple(lv)]
        for n in changed:
            weight_matrix(self.modules[n]).copy_(self.level_weight(n, *levels[n]))
            self.current[n] = tuple(levels[n])
        return changed

    def restore(self) -> None:
        """Back to the dense, unquantized weights."""
        self.apply({n: (0, 0) for n in self.modules})

    def nbytes(self) -> int:
        return self.base.nbytes()

"""The layer database: every linear's pruned weights at any level, without pruning from scratch.

Built once from the DENSE model's layer inputs (one block-wise pass over the calibration
tokens, dense block outputs feeding the next block), so a layer's pruned weights at a given
count do not depend on what the other layers chose: the search can mix levels freely.

- magnitude / Wanda / DaSS: the masks of all counts are nested, so one stable ascending
  ranking per comparison group (row, or column for DaSS gate/up) serves every level. Applying
  a count zeroes the lowest-ranked entries from the dense weights, the count spread over the
  groups exactly as ``pruning.pruners.keep_mask_from_scores`` does (same result, bit for bit).
  Memory: one int16/int32 rank matrix per linear, whatever the number of levels.
- SparseGPT: the reconstructed weights depend on the count, so each (linear, count) is computed
  once on first use from the layer Hessian and kept: in memory up to ``memory_limit_bytes``, then
  under ``cache_dir`` when one is given, else the least recently used levels make room (and are
  recomputed if asked for again).

``apply(counts)`` only touches the linears whose count differs from the model's current state,
and for the ranking pruners only the entries whose state flips between the two counts.

N:M levels (``nm_m`` = M, for ``mixed:M`` / ``2:4+dense``): a count of ``size * p / M`` means
the pattern (M - p):M. For the ranking pruners the N:M masks of one M are nested too (inside
each group of M the lowest p scores go), so one within-group rank per weight (int8) serves every
N, the same masks ``keep_mask_from_scores(..., nm)`` gives. SparseGPT runs its own N:M mask
selection per group of M columns (as in its paper) for each (linear, N), cached like any level.
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
from evosparse.pruning.blockwise import capture_block_inputs, run_block
from evosparse.pruning.errors import PruningConfigError
from evosparse.pruning.layers import find_blocks, weight_matrix
from torch import nn


@dataclass
class Unit:
    """One searchable unit: a block (all its linears) or a single linear."""

    name: str
    block: int
    linears: list[str]
    sizes: list[int]

    @property
    def size(self) -> int:
        return sum(self.sizes)


def split_exact(total: int, widths: list[int]) -> list[int]:
    """``total`` split over parts proportional to ``widths`` (largest remainder; sums exactly)."""
    size = sum(widths)
    raw = [total * w / size for w in widths]
    out = [math.floor(r) for r in raw]
    order = sorted(range(len(widths)), key=lambda i: (raw[i] - out[i], -i), reverse=True)
    for i in order[: total - sum(out)]:
        out[i] += 1
    return out


def _spread(count: int, groups: int, device: torch.device) -> torch.Tensor:
    base, extra = divmod(count, groups)
    k = torch.full((groups,), base, dtype=torch.long, device=device)
    k[:extra] += 1
    return k


@torch.no_grad()
def collect_dense_stats(
    model: nn.Module, tokens: torch.Tensor, want_hessian: bool, batch_size: int = 4
) -> dict[str, dict[str, torch.Tensor]]:
    """Per linear: ``sq`` = Σ_tokens x_j² of its input; ``h`` = 2XXᵀ/N when ``want_hessian``.

    Runs the dense blocks one at a time; each block's dense output feeds the next.
    """
    blocks = find_blocks(model)
    inputs = capture_block_inputs(model, tokens)
    hidden = inputs.hidden
    stats: dict[str, dict[str, torch.Tensor]] = {}
    counts: dict[str, int] = {}
    for info in blocks:
        handles = []
        for name, mod in info.linears.items():

            def hook(_m, args, _out, name=name):
                x = args[0].detach().float().reshape(-1, args[0].shape[-1])
                st = stats.setdefault(name, {})
                st["sq"] = st.get("sq", 0) + (x * x).sum(0)
                if want_hessian:
                    st["h"] = st.get("h", 0) + 2 * x.t() @ x
                counts[name] = counts.get(name, 0) + x.shape[0]

            handles.append(mod.register_forward_hook(hook))
        try:
            hidden = run_block(info.module, hidden, inputs.kwargs, batch_size)
        finally:
            for h in handles:
                h.remove()
        if want_hessian:
            for name in info.linears:
                stats[name]["h"] /= counts[name]
    return stats


class LevelDB:
    """Dense weights + per-linear rankings (or lazily computed SparseGPT levels) for one model."""

    def __init__(
        self,
        model: nn.Module,
        pruner: str,
        stats: dict[str, dict[str, torch.Tensor]],
        cache_dir: str | Path | None = None,
        memory_limit_bytes: int = 2 << 30,
        nm_m: int | None = None,
    ) -> None:
        if pruner not in ("magnitude", "wanda", "sparsegpt", "dass"):
            raise PruningConfigError(f"unknown pruner {pruner!r}")
        self.nm_m = nm_m
        self.model = model
        self.pruner = pruner
        self.blocks = find_blocks(model)
        self.modules: dict[str, nn.Module] = {}
        self.block_of: dict[str, int] = {}
        for info in self.blocks:
            for name, mod in info.linears.items():
                self.modules[name] = mod
                self.block_of[name] = info.index
        self.dense = {n: weight_matrix(m).detach().clone() for n, m in self.modules.items()}
        self.current = {n: 0 for n in self.modules}  # pruned count each linear holds right now
        self.order: dict[str, torch.Tensor] = {}  # ascending score order per comparison group
        self.dim: dict[str, int] = {}
        self.nm_rank: dict[str, torch.Tensor] = {}  # N:M mode: rank of each weight inside its group of M
        self.hessian: dict[str, torch.Tensor] = {}
        # SparseGPT weights per (linear, count), least recently used first.
        self.levels: OrderedDict[tuple[str, int], torch.Tensor] = OrderedDict()
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.memory_limit = memory_limit_bytes
        self._level_bytes = 0
        self._build(stats)

    @classmethod
    def build(
        cls, model: nn.Module, calib_tokens: torch.Tensor, pruner: str, cache_dir: str | Path | None = None,
        batch_size: int = 4, nm_m: int | None = None,
    ) -> LevelDB:
        stats = collect_dense_stats(model, calib_tokens, want_hessian=pruner == "sparsegpt", batch_size=batch_size)
        return cls(model, pruner, stats, cache_dir=cache_dir, nm_m=nm_m)

    # ------------------------------------------------------------------ build
    def _scores(self, name: str, stats: dict[str, dict[str, torch.Tensor]]) -> tuple[torch.Tensor, int]:
        from evosparse.pruning import pruners

        w = self.dense[name]
        if self.pruner == "magnitude":
            return pruners.magnitude_scores(w), 1
        if self.pruner == "dass":
            info = self.blocks[self.block_of[name]]
            if info.glu is not None and name in info.glu[:2]:
                return pruners.dass_scores(w, stats[info.glu[2]]["sq"]), 0
        return pruners.wanda_scores(w, stats[name]["sq"]), 1

    def _build(self, stats: dict[str, dict[str, torch.Tensor]]) -> None:
        for name in self.modules:
            if self.pruner == "sparsegpt":
                self.hessian[name] = stats[name]["h"]
                continue
            scores, dim = self._scores(name, stats)
            s = scores if dim == 1 else scores.t()
            if self.nm_m is not None:
                m = self.nm_m
                if s.shape[1] % m:
                    raise PruningConfigError(f"{name}: N:{m} needs the compared dimension divisible by {m}, "
                                             f"got {s.shape[1]}")
                order = torch.argsort(s.reshape(s.shape[0], -1, m), dim=2, stable=True)
                self.nm_rank[name] = torch.argsort(order, dim=2).reshape(s.shape).to(torch.int8)
                self.dim[name] = dim
                continue
            idx_dtype = torch.int16 if s.shape[1] < 2**15 else torch.int32
            self.order[name] = torch.argsort(s, dim=1, stable=True).to(idx_dtype)
            self.dim[name] = dim

    # ------------------------------------------------------------------ units
    def units(self, granularity: str) -> list[Unit]:
        if granularity == "layer":
            return [
                Unit(info.name, info.index, list(info.linears), [self.dense[n].numel() for n in info.linears])
                for info in self.blocks
            ]
        if granularity == "module":
            return [Unit(n, self.block_of[n], [n], [self.dense[n].numel()]) for n in self.modules]
        raise ValueError(f"granularity must be 'layer' or 'module', got {granularity!r}")

    def linear_counts(self, units: list[Unit], unit_counts: list[int]) -> dict[str, int]:
        """Per-linear prune counts: each unit's count split over its linears by size (exact).

        N:M mode: a unit pruning p of every M gives each of its linears size * p / M (integers only).
        """
        out: dict[str, int] = {}
        if self.nm_m is not None:
            m = self.nm_m
            for u, c in zip(units, unit_counts, strict=True):
                p, rem = divmod(c * m, u.size)
                if rem:
                    raise PruningConfigError(f"{u.name}: count {c} of {u.size} is not an N:{m} pattern")
                for n, size in zip(u.linears, u.sizes, strict=True):
                    out[n] = size * p // m
            return out
        for u, c in zip(units, unit_counts, strict=True):
            for n, k in zip(u.linears, split_exact(c, u.sizes), strict=True):
                out[n] = k
        return out

    # ------------------------------------------------------------------ levels
    def pruned_weight(self, name: str, count: int) -> torch.Tensor:
        """The linear's weights ([out, in], model dtype) with ``count`` weights pruned."""
        dense = self.dense[name]
        if count == 0:
            return dense.clone()
        if self.pruner == "sparsegpt":
            return self._sparsegpt_level(name, count).to(dense.dtype)
        if self.nm_m is not None:
            keep = self.nm_rank[name] >= self.pruned_per_group(name, count)
            if self.dim[name] == 0:
                keep = keep.t()
            return dense * keep.to(dense.dtype)
        order = self.order[name].long()
        dim = self.dim[name]
        rows, cols = order.shape
        k = _spread(count, rows, order.device)
        prune_sorted = torch.arange(cols, device=order.device).unsqueeze(0) < k.unsqueeze(1)
        keep = torch.ones((rows, cols), dtype=torch.bool, device=order.device).scatter(1, order, ~prune_sorted)
        if dim == 0:
            keep = keep.t()
        return dense * keep.to(dense.dtype)

    def pruned_per_group(self, name: str, count: int) -> int:
        """N:M mode: the p of (M - p):M that ``count`` means for this linear."""
        assert self.nm_m is not None
        p, rem = divmod(count * self.nm_m, self.dense[name].numel())
        if rem:
            raise PruningConfigError(f"{name}: count {count} is not an N:{self.nm_m} pattern")
        return p

    def nm_of(self, name: str, count: int) -> tuple[int, int] | None:
        """The (N, M) a count means in N:M mode; None for unstructured mode or a dense layer."""
        if self.nm_m is None or count == 0:
            return None
        return (self.nm_m - self.pruned_per_group(name, count), self.nm_m)

    def _sparsegpt_level(self, name: str, count: int) -> torch.Tensor:
        key = (name, count)
        if key in self.levels:
            self.levels.move_to_end(key)
            return self.levels[key]
        path = None
        if self.cache_dir is not None:
            digest = hashlib.sha1(f"{name}:{count}:{self.nm_m}".encode()).hexdigest()[:16]
            path = self.cache_dir / f"{digest}.pt"
            if path.exists():
                return torch.load(path)
        from evosparse.pruning.pruners import sparsegpt_prune

        w = sparsegpt_prune(self.dense[name], self.hessian[name], count, self.nm_of(name, count))
        nbytes = w.numel() * w.element_size()
        if path is not None and self._level_bytes + nbytes > self.memory_limit:  # memory full: spill to disk
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(w, path)
            return w
        # No disk: the least recently used levels make room (they are recomputed if asked for again).
        while self.levels and self._level_bytes + nbytes > self.memory_limit:
            _, old = self.levels.popitem(last=False)
            self._level_bytes -= old.numel() * old.element_size()
        self.levels[key] = w
        self._level_bytes += nbytes
        return w

    @torch.no_grad()
    def apply(self, counts: dict[str, int]) -> list[str]:
        """Put the model in the state ``counts`` (per linear); returns the linears rewritten."""
        changed = [n for n, c in counts.items() if self.current[n] != c]
        for n in changed:
            if self.pruner == "sparsegpt" or self.nm_m is not None:
                weight_matrix(self.modules[n]).copy_(self.pruned_weight(n, counts[n]))
            else:
                self._move(n, self.current[n], counts[n])
            self.current[n] = counts[n]
        return changed

    def _move(self, name: str, count_from: int, count_to: int) -> None:
        """Nested masks: going from one count to another only flips the entries ranked in between.

        Per comparison group the pruned entries are the first k of its ranking, so moving from
        k_from to k_to zeroes (or restores from the dense copy) ranks [min, max) of each group:
        a narrow band of the ranking instead of a whole new mask. Same weights as
        ``pruned_weight(name, count_to)``.
        """
        weight = weight_matrix(self.modules[name])
        order = self.order[name]
        groups = order.shape[0]
        k_from = _spread(count_from, groups, order.device)
        k_to = _spread(count_to, groups, order.device)
        a, b = torch.minimum(k_from, k_to), torch.maximum(k_from, k_to)
        lo, hi = int(a.min()), int(b.max())
        if hi <= lo:
            return
        band = order[:, lo:hi].long()
        pos = torch.arange(lo, hi, device=order.device)
        flip = (pos >= a.unsqueeze(1)) & (pos < b.unsqueeze(1))
        group = torch.arange(groups, device=order.device).unsqueeze(1).expand_as(band)[flip]
        other = band[flip]
        rows, cols = (group, other) if self.dim[name] == 1 else (other, group)
        if count_to > count_from:
            weight[rows, cols] = 0
        else:
            weight[rows, cols] = self.dense[name][rows, cols]

    def restore(self) -> None:
        """Back to the dense weights."""
        self.apply({n: 0 for n in self.modules})

    def nbytes(self) -> int:
        """Memory held by the database (dense copies, rankings, Hessians, cached levels)."""
        tensors = (list(self.dense.values()) + list(self.order.values()) + list(self.nm_rank.values())
                   + list(self.hessian.values()))
        return sum(t.numel() * t.element_size() for t in tensors) + self._level_bytes


"""The layer database: every linear's pruned weights at any level, without pruning from scratch.

Built once from the DENSE model's layer inputs (one block-wise pass over the calibration
tokens, dense block outputs feeding the next block), so a layer's pruned weights at a given
count do not depend on what the other layers chose: the search can mix levels freely. ``build``
also takes statistics collected otherwise: ``pruning.prune.pruned_input_stats`` calibrates every
layer on the inputs a block-by-block prune at one reference allocation gives it, as the shipped
model's layers are (the levels still do not depend on the other layers' *chosen* levels, only on
that fixed reference).

- magnitude / Wanda / DaSS: the masks of all counts are nested, so one stable ascending
  ranking per comparison group (row, or column for DaSS gate/up) serves every level. Applying
  a count zeroes the lowest-ranked entries, the count spread over the groups exactly as
  ``pruning.pruners.keep_mask_from_scores`` does (same result, bit for bit).
- SparseGPT: the reconstructed weights depend on the count. With ``anchors`` (per linear, the
  counts of a coarse level grid, e.g. every 4th level of the search space and its ends) all
  anchor levels are built up front, one Hessian factorisation per linear and one pass over its
  column blocks for all its anchors (``pruners.sparsegpt_levels``); a count between two anchors
  is derived from the nearest anchor below it by pruning the extra weights of lowest saliency
  w² / [H⁻¹]ⱼⱼ² there (no further reconstruction): a cheap, deterministic level, exact at the
  anchors. Anchors are held packed (pruning/packed.py: one bit per weight plus the kept values,
  about a third of dense float32 at 70 %) and unpacked when applied. Without anchors each (linear, count) is computed on first use from the layer
  Hessian. Anchors can be stored (``save_anchors``) and read back instead of built
  (``anchor_folder``): worker/leveldb_store.py keeps them beside the Hessians, so a later job
  on the same model and grid, and every scoring worker of a job, reads them. Either way computed
  levels are kept in memory up to ``memory_limit_bytes``, then
  under ``cache_dir`` when one is given, else the least recently used levels make room (and
  are recomputed if asked for again); anchors are always kept.

Memory (ranking pruners). A search only visits counts inside each linear's ``bounds`` (the
level space's target ± max delta). Entries ranked below the lowest count are pruned at every
level and entries ranked above the highest are kept at every level, so only the *band* of ranks
in between is kept: its positions (int16) and its dense values. Below the band the model is
zeroed once; above it the model's own weights are never touched. With the default bounds (every
count) the band is the whole matrix; with a search's ±25 % it is half of it, so a scoring
process holds the model plus 0.75 × its prunable weights instead of two dense copies and a
ranking. No separate dense copy is kept; the job's dense snapshot lives in the runner.

``apply(counts)`` only touches the linears whose count differs from the model's current state,
and for the ranking pruners only the entries whose state flips between the two counts.

N:M levels (``nm_m`` = M, for ``mixed:M`` / ``2:4+dense``): a count of ``size * p / M`` means
the pattern (M - p):M. For the ranking pruners the N:M masks of one M are nested too (inside
each group of M the lowest p scores go), so one within-group rank per weight (int8, derived from
the same stored ranking) serves every N, the masks ``keep_mask_from_scores(..., nm)`` gives; this
mode keeps a dense copy instead of a band, since every N touches every group. SparseGPT runs
its own N:M mask selection per group of M columns (as in its paper) for each (linear, N).

The rankings (or SparseGPT Hessians) are what is expensive to build and what does not depend on
the level grid, so ``save``/``load`` store exactly those, one safetensors file per block: a job
on the same model, pruner and calibration data reuses them (worker/leveldb_store.py keys them).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from evosparse.pruning.errors import PruningConfigError
from evosparse.pruning.layers import BlockInfo, find_blocks, weight_matrix
from evosparse.pruning.packed import PackedSparse
from evosparse.pruning.pruners import PRUNER_NAMES
from evosparse.search.allocation import split_proportional
from torch import nn

FORMAT_VERSION = 2  # of the saved rankings / Hessians (part of the stored artifact's key)
ANCHOR_FORMAT = 2  # of the saved SparseGPT anchors (2: packed bit mask + values), part of their key


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


def search_units(blocks: Sequence[BlockInfo], granularity: str) -> list[Unit]:
    """The searchable units: one per block (``layer``) or one per linear (``module``)."""
    if granularity == "layer":
        return [Unit(b.name, b.index, list(b.linears), [weight_matrix(m).numel() for m in b.linears.values()])
                for b in blocks]
    if granularity == "module":
        return [Unit(n, b.index, [n], [weight_matrix(m).numel()]) for b in blocks for n, m in b.linears.items()]
    raise ValueError(f"granularity must be 'layer' or 'module', got {granularity!r}")


def _spread(count: int, groups: int, device: torch.device) -> torch.Tensor:
    base, extra = divmod(count, groups)
    k = torch.full((groups,), base, dtype=torch.long, device=device)
    k[:extra] += 1
    return k


def _ranking(scores: torch.Tensor, dim: int) -> torch.Tensor:
    """Stable ascending order of the scores within each comparison group (int16 where it fits)."""
    s = scores if dim == 1 else scores.t()
    idx_dtype = torch.int16 if s.shape[1] < 2**15 else torch.int32
    return torch.argsort(s, dim=1, stable=True).to(idx_dtype)


def score_dim(pruner: str, name: str, block: BlockInfo) -> int:
    """Axis a linear's scores are compared along: 1 within rows, 0 within columns (DaSS gate/up)."""
    return 0 if pruner == "dass" and block.glu is not None and name in block.glu[:2] else 1


def rankings(
    blocks: Sequence[BlockInfo], pruner: str, stats: Mapping[str, object] | None
) -> dict[str, torch.Tensor]:
    """Per linear, the ascending score order per comparison group (magnitude / Wanda / DaSS)."""
    from evosparse.pruning import pruners

    out: dict[str, torch.Tensor] = {}
    for info in blocks:
        for name, mod in info.linears.items():
            w = weight_matrix(mod)
            dim = score_dim(pruner, name, info)
            if pruner == "magnitude":
                scores = pruners.magnitude_scores(w)
            elif dim == 0:
                scores = pruners.dass_scores(w, stats[info.glu[2]].sq_norms)  # type: ignore[index,union-attr]
            else:
                scores = pruners.wanda_scores(w, stats[name].sq_norms)  # type: ignore[index,union-attr]
            out[name] = _ranking(scores, dim)
    return out


def split_counts(units: Sequence[Unit], unit_counts: Sequence[int]) -> dict[str, int]:
    """Per-linear prune counts: each unit's count split over its linears by size (exact)."""
    out: dict[str, int] = {}
    for u, c in zip(units, unit_counts, strict=True):
        out.update(zip(u.linears, split_proportional(c, u.sizes), strict=True))
    return out


def nm_split_counts(units: Sequence[Unit], unit_counts: Sequence[int], m: int) -> dict[str, int]:
    """N:M mode: a unit pruning p of every M gives each of its linears size * p / M (integers only)."""
    out: dict[str, int] = {}
    for u, c in zip(units, unit_counts, strict=True):
        p, rem = divmod(c * m, u.size)
        if rem:
            raise PruningConfigError(f"{u.name}: count {c} of {u.size} is not an N:{m} pattern")
        out.update({n: size * p // m for n, size in zip(u.linears, u.sizes, strict=True)})
    return out


class LevelDB:
    """Per-linear rank bands (or lazily computed SparseGPT levels) for one model and pruner."""

    def __init__(
        self,
        model: nn.Module,
        pruner: str,
        orders: Mapping[str, torch.Tensor] | None = None,
        hessians: Mapping[str, torch.Tensor] | None = None,
        *,
        blocks: Sequence[BlockInfo] | None = None,
        bounds: Mapping[str, tuple[int, int]] | None = None,
        dense: Mapping[str, torch.Tensor] | None = None,
        cache_dir: str | Path | None = None,
        memory_limit_bytes: int = 2 << 30,
        nm_m: int | None = None,
        anchors: Mapping[str, Sequence[int]] | None = None,
        progress: Callable[[int, int], None] | None = None,
        anchor_folder: str | Path | None = None,
    ) -> None:
        """``orders``: rankings (ranking pruners); ``hessians``: layer Hessians (SparseGPT).

        ``bounds``: per linear the (lowest, highest) count that will ever be applied (default: all);
        ``dense``: the dense weights SparseGPT levels start from (default: a copy of the model's).
        ``nm_m``: serve N:M levels for this M (counts must be whole N:M patterns; bounds are not used).
        ``anchors``: SparseGPT only, unstructured: the counts per linear built up front (see the
        module docstring); ``progress(done, total)`` follows that build, one call per linear.
        ``anchor_folder``: those anchors as ``save_anchors`` stored them, read instead of built
        (the same bits; refused unless stored for exactly these counts).
        The model must hold its dense weights when the database is made.
        """
        if pruner not in PRUNER_NAMES:
            raise PruningConfigError(f"unknown pruner {pruner!r}")
        self.nm_m = nm_m
        self.nm_rank: dict[str, torch.Tensor] = {}  # N:M mode: rank of each weight inside its group of M
        self.model = model
        self.pruner = pruner
        self.blocks = list(blocks) if blocks is not None else find_blocks(model)
        self.modules: dict[str, nn.Module] = {}
        self.block_of: dict[str, int] = {}
        for info in self.blocks:
            for name, mod in info.linears.items():
                self.modules[name] = mod
                self.block_of[name] = info.index
        self.sizes = {n: weight_matrix(m).numel() for n, m in self.modules.items()}
        by_index = {info.index: info for info in self.blocks}  # (a database of some blocks only, too)
        self.dim: dict[str, int] = {n: score_dim(pruner, n, by_index[self.block_of[n]]) for n in self.modules}
        self.current: dict[str, int] = {}  # pruned count each linear holds right now
        self.band_lo: dict[str, int] = {}  # ranks below are pruned at every count within bounds
        self.band_idx: dict[str, torch.Tensor] = {}  # [groups, hi - lo] positions of the band's ranks
        self.band_val: dict[str, torch.Tensor] = {}  # [groups, hi - lo] their dense values
        self.bounds = {n: (0, s) for n, s in self.sizes.items()}
        self.bounds.update(bounds or {})
        self.hessian: dict[str, torch.Tensor] = {}
        self.dense: dict[str, torch.Tensor] = {}
        self.levels: OrderedDict[tuple[str, int], torch.Tensor] = OrderedDict()  # SparseGPT, LRU first
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.memory_limit = memory_limit_bytes
        self._level_bytes = 0
        # SparseGPT: count -> weights, built up front; packed (bit mask + kept values, pruning/packed.py):
        # seven levels of every linear as dense float32 were 3.7 GB on SmolLM2-135M.
        self.anchors: dict[str, dict[int, PackedSparse]] = {}
        self.hinv_diag: dict[str, torch.Tensor] = {}  # SparseGPT: diag of the H⁻¹ factor, per input column
        self.anchor_seconds = 0.0  # time building (or reading) the anchors took
        self.anchors_loaded = False  # read from a stored folder rather than built here
        if pruner == "sparsegpt":
            if hessians is None:
                raise PruningConfigError("SparseGPT levels need the layer Hessians")
            self.hessian = dict(hessians)
            self.dense = dict(dense) if dense is not None else {
                n: weight_matrix(m).detach().clone() for n, m in self.modules.items()}
            self.current = {n: 0 for n in self.modules}
            if anchors is not None:
                if nm_m is not None:
                    raise PruningConfigError("SparseGPT anchor levels are unstructured; N:M levels are built on use")
                if anchor_folder is not None:
                    self.load_anchors(anchor_folder, anchors)
                else:
                    self.build_anchors(anchors, progress)
        else:
            if orders is None:
                raise PruningConfigError(f"{pruner} levels need the score rankings")
            for name, order in orders.items():  # build() hands them over block by block instead
                self._add_ranking(name, order)

    # ------------------------------------------------------------------ build / store
    @classmethod
    def build(
        cls,
        model: nn.Module,
        calib_tokens: torch.Tensor,
        pruner: str,
        cache_dir: str | Path | None = None,
        batch_size: int = 4,
        *,
        blocks: Sequence[BlockInfo] | None = None,
        stats: Mapping[str, object] | None = None,
        bounds: Mapping[str, tuple[int, int]] | None = None,
        dense: Mapping[str, torch.Tensor] | None = None,
        save_to: str | Path | None = None,
        nm_m: int | None = None,
        anchors: Mapping[str, Sequence[int]] | None = None,
        progress: Callable[[int, int], None] | None = None,
        anchor_folder: str | Path | None = None,
    ) -> LevelDB:
        """Rank (or collect Hessians) on the dense model, optionally saving them to ``save_to``.

        ``stats``: dense calibration statistics already collected (with Hessians for SparseGPT);
        collected here when not given.
        """
        from evosparse.pruning.sensitivity import dense_input_stats

        if pruner not in PRUNER_NAMES:
            raise PruningConfigError(f"unknown pruner {pruner!r}")
        blocks = list(blocks) if blocks is not None else find_blocks(model)
        if stats is None and pruner != "magnitude":
            stats = dense_input_stats(model, calib_tokens, batch_size=batch_size, hessian=pruner == "sparsegpt",
                                      blocks=blocks)
        if pruner == "sparsegpt":
            hessians = {n: stats[n].hessian for b in blocks for n in b.linears}  # type: ignore[index,union-attr]
            if save_to is not None:
                save_levels(save_to, pruner, blocks, hessians)
            return cls(model, pruner, None, hessians, blocks=blocks, bounds=bounds, dense=dense, cache_dir=cache_dir,
                       nm_m=nm_m, anchors=anchors, progress=progress, anchor_folder=anchor_folder)
        # Rank, store and band one block at a time: the full rankings of the whole model never
        # sit in memory together (on a GPU that is the difference between 2x and 3x the model).
        db = cls(model, pruner, {}, None, blocks=blocks, bounds=bounds, dense=dense, cache_dir=cache_dir, nm_m=nm_m)
        for info in blocks:
            orders = rankings([info], pruner, stats)
            if save_to is not None:
                save_block(save_to, info, orders)
            for name, order in orders.items():
                db._add_ranking(name, order)
        if save_to is not None:
            save_meta(save_to, pruner, blocks)
        return db

    @classmethod
    def load(
        cls,
        folder: str | Path,
        model: nn.Module,
        pruner: str,
        *,
        blocks: Sequence[BlockInfo] | None = None,
        bounds: Mapping[str, tuple[int, int]] | None = None,
        dense: Mapping[str, torch.Tensor] | None = None,
        cache_dir: str | Path | None = None,
        nm_m: int | None = None,
        anchors: Mapping[str, Sequence[int]] | None = None,
        progress: Callable[[int, int], None] | None = None,
        anchor_folder: str | Path | None = None,
    ) -> LevelDB:
        """The database ``save_levels`` stored, for this (dense) model (SparseGPT anchors rebuilt here
        unless ``anchor_folder`` holds them)."""
        blocks = list(blocks) if blocks is not None else find_blocks(model)
        device = weight_matrix(next(iter(blocks[0].linears.values()))).device
        if pruner == "sparsegpt":
            hessians = load_levels(folder, pruner, blocks, device=device)
            return cls(model, pruner, None, hessians, blocks=blocks, bounds=bounds, dense=dense, cache_dir=cache_dir,
                       nm_m=nm_m, anchors=anchors, progress=progress, anchor_folder=anchor_folder)
        check_levels(folder, pruner, blocks)
        db = cls(model, pruner, {}, None, blocks=blocks, bounds=bounds, dense=dense, cache_dir=cache_dir, nm_m=nm_m)
        for info in blocks:  # one block's rankings in memory at a time, as in build()
            for name, order in load_levels(folder, pruner, [info], device=device, checked=True).items():
                db._add_ranking(name, order)
        return db

    def _add_ranking(self, name: str, order: torch.Tensor) -> None:
        """One linear's ranking in: a rank band, or in N:M mode the within-group ranks."""
        if self.nm_m is not None:
            self._make_nm(name, order, self.nm_m)
        else:
            self._make_band(name, order)

    def _make_nm(self, name: str, order: torch.Tensor, m: int) -> None:
        """N:M mode: each weight's rank inside its group of M, from the row ranking (ties by position)."""
        groups, width = order.shape
        if width % m:
            raise PruningConfigError(f"{name}: N:{m} needs the compared dimension divisible by {m}, got {width}")
        rank_in_row = torch.empty_like(order, dtype=torch.int32)
        rank_in_row.scatter_(1, order.long(), torch.arange(width, dtype=torch.int32).expand(groups, width).contiguous())
        within = torch.argsort(rank_in_row.reshape(groups, width // m, m), dim=2, stable=True)
        rank = torch.argsort(within, dim=2).reshape(groups, width).to(torch.int8)
        # Both kept as [out, in], like the weights SparseGPT levels start from.
        self.nm_rank[name] = rank if self.dim[name] == 1 else rank.t().contiguous()
        self.dense[name] = weight_matrix(self.modules[name]).detach().clone()
        self.current[name] = 0

    def _make_band(self, name: str, order: torch.Tensor) -> None:
        """Keep the ranks [lo, hi) any count within bounds can reach; zero the ranks below once."""
        groups, width = order.shape
        lo_count, hi_count = self.bounds[name]
        if not 0 <= lo_count <= hi_count <= self.sizes[name]:
            raise PruningConfigError(f"{name}: bounds {lo_count}..{hi_count} outside 0..{self.sizes[name]}")
        lo = lo_count // groups  # the fewest any group prunes at the lowest count
        hi = min(width, -(-hi_count // groups))  # the most any group prunes at the highest count
        weight = self._grouped(name)
        band = order[:, lo:hi]
        self.band_idx[name] = band.clone()
        self.band_val[name] = weight.gather(1, band.long()).clone()
        if lo > 0:
            weight.scatter_(1, order[:, :lo].long(), 0.0)
        self.band_lo[name] = lo
        self.current[name] = lo * groups  # every group at exactly ``lo``

    def _grouped(self, name: str) -> torch.Tensor:
        """The weight as [groups, compared entries] (a view sharing the module's storage)."""
        w = weight_matrix(self.modules[name])
        return w if self.dim[name] == 1 else w.t()

    # ------------------------------------------------------------------ units
    def units(self, granularity: str) -> list[Unit]:
        return search_units(self.blocks, granularity)

    def linear_counts(self, units: list[Unit], unit_counts: Sequence[int]) -> dict[str, int]:
        """Per-linear prune counts of per-unit counts (``split_counts``, or ``nm_split_counts`` in N:M mode)."""
        if self.nm_m is not None:
            return nm_split_counts(units, unit_counts, self.nm_m)
        return split_counts(units, unit_counts)

    # ------------------------------------------------------------------ levels
    def pruned_weight(self, name: str, count: int) -> torch.Tensor:
        """The linear's weights ([out, in], model dtype) with ``count`` weights pruned."""
        if self.pruner == "sparsegpt":
            dense = self.dense[name]
            return dense.clone() if count == 0 else self._sparsegpt_level(name, count).to(dense.dtype)
        if self.nm_m is not None:
            return self.dense[name] * (self.nm_rank[name] >= self.pruned_per_group(name, count))
        lo_count, hi_count = self.bounds[name]
        if not lo_count <= count <= hi_count:
            raise PruningConfigError(f"{name}: count {count} outside this database's bounds {lo_count}..{hi_count}")
        grouped = self._grouped(name).clone()  # above the band and below it: as the model holds them
        idx, val = self.band_idx[name].long(), self.band_val[name]
        k = _spread(count, grouped.shape[0], idx.device) - self.band_lo[name]
        pruned = torch.arange(idx.shape[1], device=idx.device).unsqueeze(0) < k.unsqueeze(1)
        grouped.scatter_(1, idx, torch.where(pruned, torch.zeros_like(val), val))
        return grouped if self.dim[name] == 1 else grouped.t()

    def pruned_per_group(self, name: str, count: int) -> int:
        """N:M mode: the p of (M - p):M that ``count`` means for this linear."""
        assert self.nm_m is not None
        p, rem = divmod(count * self.nm_m, self.sizes[name])
        if rem or not 0 <= p < self.nm_m:
            raise PruningConfigError(f"{name}: count {count} is not an N:{self.nm_m} pattern")
        return p

    def nm_of(self, name: str, count: int) -> tuple[int, int] | None:
        """The (N, M) a count means in N:M mode; None for unstructured mode or a dense layer."""
        if self.nm_m is None or count == 0:
            return None
        return (self.nm_m - self.pruned_per_group(name, count), self.nm_m)

    def build_anchors(self, anchors: Mapping[str, Sequence[int]],
                      progress: Callable[[int, int], None] | None = None) -> None:
        """The anchor levels of the linears in ``anchors`` (added to those held): one factorisation and
        one column pass per linear."""
        from evosparse.pruning.pruners import sparsegpt_levels

        t0 = time.perf_counter()
        names = [n for n in self.modules if n in anchors]
        for i, name in enumerate(names):
            counts = sorted(set(anchors[name]))
            hessian = self.hessian[name]
            levels, diag = sparsegpt_levels(self.dense[name].to(hessian.device), hessian, counts)
            self.anchors[name] = {c: PackedSparse.pack(w) for c, w in zip(counts, levels, strict=True)}
            self.hinv_diag[name] = diag
            if progress is not None:
                progress(i + 1, len(names))
        self.anchor_seconds += time.perf_counter() - t0

    def anchor_levels(self) -> int:
        """How many (linear, count) levels were built up front."""
        return sum(len(a) for a in self.anchors.values())

    def save_anchors(self, folder: str | Path) -> None:
        """The anchor levels (and each linear's H⁻¹ diagonal) one safetensors file per block, then
        ``meta.json`` with the counts last: a later job or a scoring worker reads them instead of
        running the OBS passes again."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for info in self.blocks:
            tensors = {}
            for n in info.linears:
                for c, packed in self.anchors.get(n, {}).items():
                    tensors[f"{n}@{c}@bits"] = packed.bits.contiguous().cpu()
                    tensors[f"{n}@{c}@values"] = packed.values.contiguous().cpu()
            tensors.update({f"{n}@diag": self.hinv_diag[n].contiguous().cpu() for n in info.linears if n in self.hinv_diag})
            save_file(tensors, str(_block_file(folder, info.index)))
        meta = {"format": FORMAT_VERSION, "anchor_format": ANCHOR_FORMAT,
                "anchors": {n: sorted(a) for n, a in self.anchors.items()}}
        (folder / "meta.json").write_text(json.dumps(meta))

    def load_anchors(self, folder: str | Path, anchors: Mapping[str, Sequence[int]]) -> None:
        """Read the anchor levels ``save_anchors`` stored for exactly ``anchors`` (added to those held)."""
        from safetensors import safe_open

        t0 = time.perf_counter()
        folder = Path(folder)
        if not stored_anchors_match(folder, anchors):
            raise PruningConfigError(f"{folder} holds other SparseGPT anchor levels than this job's")
        for info in self.blocks:
            names = [n for n in info.linears if n in anchors]
            if not names:
                continue
            device = self.hessian[names[0]].device
            with safe_open(str(_block_file(folder, info.index)), framework="pt", device=str(device)) as f:
                for n in names:
                    shape = tuple(self.dense[n].shape)
                    self.anchors[n] = {c: PackedSparse(shape, f.get_tensor(f"{n}@{c}@bits"), f.get_tensor(f"{n}@{c}@values"))
                                       for c in sorted(set(anchors[n]))}
                    self.hinv_diag[n] = f.get_tensor(f"{n}@diag")
        self.anchor_seconds += time.perf_counter() - t0
        self.anchors_loaded = not self.anchors.keys() - anchors.keys()  # every anchor held was read

    def _derived_level(self, name: str, count: int) -> torch.Tensor | None:
        """A count off the anchor grid: the nearest anchor below it, with the extra weights of lowest
        saliency w² / d² pruned (d: diag of the H⁻¹ factor per input column); None without one."""
        table = self.anchors.get(name)
        if not table:
            return None
        if count in table:
            return table[count].unpack()
        below = [c for c in table if c < count]
        if not below:
            return None
        w = table[max(below)].unpack()  # a new tensor: the anchor itself stays as built
        extra = count - max(below)
        score = (w**2 / self.hinv_diag[name].unsqueeze(0) ** 2).flatten()
        score = score.masked_fill(w.flatten() == 0, float("inf"))  # pruned already: not again
        w.view(-1)[torch.topk(score, extra, largest=False).indices] = 0.0
        return w

    def _sparsegpt_level(self, name: str, count: int) -> torch.Tensor:
        if name in self.anchors and count in self.anchors[name]:
            return self.anchors[name][count].unpack()
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

        hessian = self.hessian[name]
        w = self._derived_level(name, count)
        if w is None:
            w = sparsegpt_prune(self.dense[name].to(hessian.device), hessian, count, self.nm_of(name, count))
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
    def apply(self, counts: Mapping[str, int]) -> list[str]:
        """Put the model in the state ``counts`` (per linear); returns the linears rewritten."""
        changed = [n for n, c in counts.items() if self.current[n] != c]
        for n in changed:
            if self.pruner == "sparsegpt" or self.nm_m is not None:
                weight_matrix(self.modules[n]).copy_(self.pruned_weight(n, counts[n]))
            else:
                lo_count, hi_count = self.bounds[n]
                if not lo_count <= counts[n] <= hi_count:
                    raise PruningConfigError(f"{n}: count {counts[n]} outside the database's bounds "
                                             f"{lo_count}..{hi_count}")
                self._move(n, self.current[n], counts[n])
            self.current[n] = counts[n]
        return changed

    def _move(self, name: str, count_from: int, count_to: int) -> None:
        """Nested masks: going from one count to another only flips the entries ranked in between.

        Per comparison group the pruned entries are the first k of its ranking, so moving from
        k_from to k_to zeroes (or restores from the band's dense values) ranks [min, max) of each
        group: a narrow slice of the band instead of a whole new mask. Same weights as
        ``pruned_weight(name, count_to)``.
        """
        grouped = self._grouped(name)
        idx = self.band_idx[name]
        groups = idx.shape[0]
        base = self.band_lo[name]
        # The slice of ranks any group flips, from the counts alone (no device round trip on a GPU):
        # a group prunes count // groups or one more.
        (f0, fx), (t0, tx) = divmod(count_from, groups), divmod(count_to, groups)
        lo = min(f0, t0) - base
        hi = max(f0 + (fx > 0), t0 + (tx > 0)) - base
        if hi <= lo:
            return
        k_from = _spread(count_from, groups, idx.device) - base
        k_to = _spread(count_to, groups, idx.device) - base
        pos = torch.arange(lo, hi, device=idx.device)
        flip = (pos >= torch.minimum(k_from, k_to).unsqueeze(1)) & (pos < torch.maximum(k_from, k_to).unsqueeze(1))
        cols = idx[:, lo:hi].long()
        # Rewrite the whole slice: flipped entries take their new value, the rest their current one
        # (a masked write without boolean indexing, which would wait for the device to count).
        new = torch.zeros_like(self.band_val[name][:, lo:hi]) if count_to > count_from else self.band_val[name][:, lo:hi]
        grouped.scatter_(1, cols, torch.where(flip, new, grouped.gather(1, cols)))

    def restore(self) -> None:
        """Back to the lowest count of every linear: the dense weights when the bounds start at 0."""
        if self.nm_m is not None:
            self.apply({n: 0 for n in self.modules})
            return
        self.apply({n: lo for n, (lo, _) in self.bounds.items()})

    def nbytes(self) -> int:
        """Memory held by the database (rank bands and their values, Hessians, dense copies, levels)."""
        tensors = [*self.band_idx.values(), *self.band_val.values(), *self.hessian.values(), *self.dense.values(),
                   *self.nm_rank.values()]
        anchors = sum(p.nbytes() for a in self.anchors.values() for p in a.values())
        return sum(t.numel() * t.element_size() for t in tensors) + anchors + self._level_bytes


# ---------------------------------------------------------------------- the stored form
def _block_file(folder: Path, index: int) -> Path:
    return folder / f"block-{index:05d}.safetensors"


def save_block(folder: str | Path, info: BlockInfo, tensors: Mapping[str, torch.Tensor]) -> None:
    """One block's rankings (or Hessians) as one safetensors file."""
    from safetensors.torch import save_file

    Path(folder).mkdir(parents=True, exist_ok=True)
    save_file({n: tensors[n].contiguous().cpu() for n in info.linears}, str(_block_file(Path(folder), info.index)))


def save_meta(folder: str | Path, pruner: str, blocks: Sequence[BlockInfo]) -> None:
    """Written last: a folder without ``meta.json`` is incomplete (a writer died) and never loaded."""
    meta = {"format": FORMAT_VERSION, "pruner": pruner, "blocks": len(blocks),
            "linears": [n for b in blocks for n in b.linears]}
    (Path(folder) / "meta.json").write_text(json.dumps(meta))


def save_levels(
    folder: str | Path, pruner: str, blocks: Sequence[BlockInfo], tensors: Mapping[str, torch.Tensor]
) -> None:
    """Write the rankings (or Hessians) one safetensors file per block, then ``meta.json`` last."""
    for info in blocks:
        save_block(folder, info, tensors)
    save_meta(folder, pruner, blocks)


def anchor_grid_digest(anchors: Mapping[str, Sequence[int]]) -> str:
    """A short name of a set of SparseGPT anchor counts (part of where they are stored)."""
    grid = {n: sorted(set(c)) for n, c in anchors.items()}
    return hashlib.sha256(json.dumps([ANCHOR_FORMAT, grid], sort_keys=True).encode()).hexdigest()[:16]


def stored_anchors_match(folder: str | Path, anchors: Mapping[str, Sequence[int]]) -> bool:
    """Whether ``folder`` completely holds the anchor levels of exactly these counts."""
    meta_path = Path(folder) / "meta.json"
    if not meta_path.is_file():
        return False
    meta = json.loads(meta_path.read_text())
    want = {n: sorted(set(c)) for n, c in anchors.items()}
    return (meta.get("format") == FORMAT_VERSION and meta.get("anchor_format") == ANCHOR_FORMAT
            and meta.get("anchors") == want)


def check_levels(folder: str | Path, pruner: str, blocks: Sequence[BlockInfo]) -> None:
    """Refuse a folder that is incomplete or was stored for another pruner, model layout or format."""
    folder = Path(folder)
    meta_path = folder / "meta.json"
    if not meta_path.is_file():
        raise PruningConfigError(f"{folder} holds no complete level database")
    meta = json.loads(meta_path.read_text())
    names = [n for b in blocks for n in b.linears]
    if meta.get("format") != FORMAT_VERSION or meta.get("pruner") != pruner or meta.get("linears") != names:
        raise PruningConfigError(f"the level database in {folder} was built for another model, pruner or format")


def load_levels(
    folder: str | Path, pruner: str, blocks: Sequence[BlockInfo], device: torch.device | None = None,
    checked: bool = False,
) -> dict[str, torch.Tensor]:
    """Read what ``save_levels`` wrote for ``blocks`` (all blocks must have been stored)."""
    from safetensors import safe_open

    if not checked:
        check_levels(folder, pruner, blocks)
    out: dict[str, torch.Tensor] = {}
    for info in blocks:
        with safe_open(str(_block_file(Path(folder), info.index)), framework="pt",
                       device=str(device) if device is not None else "cpu") as f:
            for n in info.linears:
                out[n] = f.get_tensor(n)
    return out

"""The level database for structured widths: the search's fitness runs on it like on ``LevelDB``.

Built once from the DENSE model (dense block outputs feed the next block, as ``LevelDB``), so a
block's pruned form at a given budget does not depend on the other blocks' choices. Per block
it holds:

- the unit rankings: KV groups and MLP channels in the order the pruner removes them (GOA's
  greedy, reconstruction-aware order, which is nested; or ascending weight norm), so a level is
  "keep the top k units" (computed up to the largest fraction the search can reach);
- the Gram matrices of o_proj's and down_proj's inputs, from which the reconstructed second
  layer of any level is computed once on first use and kept (least recently used dropped past
  ``memory_limit_bytes``; recomputing one is a single small linear solve).

A block's level is a count of weights, mapped to (KV groups, channels) removed by
``structured.plan_widths``, exactly as the final block-sequential pruning maps it. The model is
kept in the *padded* form while searching: removed units' o_proj / down_proj columns are zero and
the kept columns hold the reconstruction, which computes the same function as the physically
smaller block. Only o_proj and down_proj are ever rewritten.

It has the interface ``pruning.fitness.ProxyFitness`` uses (``blocks``, ``units``,
``linear_counts``, ``apply``, ``restore``), so the search, its seeding and its exact level
arithmetic run unchanged on structured levels.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from evosparse.pruning.blockwise import capture_block_inputs, run_block
from evosparse.pruning.errors import PruningConfigError
from evosparse.pruning.layers import find_blocks
from evosparse.pruning.leveldb import Unit, split_counts
from evosparse.pruning.structured import (
    STRUCTURED_PRUNERS,
    BlockUnits,
    block_units,
    channel_norm_scores,
    channel_output_scores,
    gram_hook,
    greedy_removal_order,
    group_columns,
    group_norm_scores,
    max_fraction,
    output_scores,
    plan_widths,
    reconstruct,
)
from evosparse.search.levels import LevelSpace
from torch import nn


def _most_channels(units: BlockUnits, limit: float) -> int:
    """The most channels any budget up to ``limit`` of the block removes (fewer past a group step)."""
    top = min(limit, max_fraction(units))
    counts = range(0, int(top * units.params) + 1, units.channel_params)
    return max(plan_widths(units, c)[1] for c in counts)


class StructuredLevelDB:
    def __init__(self, model: nn.Module, pruner: str, grams: list[dict[str, torch.Tensor]] | None,
                 reconstruct_second: bool = True, memory_limit_bytes: int = 1 << 30,
                 max_fraction: float = 1.0) -> None:
        if pruner not in STRUCTURED_PRUNERS:
            raise PruningConfigError(f"structured levels need pruner {' or '.join(STRUCTURED_PRUNERS)}, got {pruner!r}")
        if pruner == "goa" and grams is None:
            raise PruningConfigError("pruner 'goa' needs calibration statistics")
        self.model = model
        self.pruner = pruner
        self.reconstruct = reconstruct_second and pruner == "goa"
        self.blocks = find_blocks(model)
        self.units_of: list[BlockUnits] = [block_units(b) for b in self.blocks]
        self.grams = grams
        self.dense_o = [u.attn.o_proj.weight.detach().clone() for u in self.units_of]
        self.dense_down = [u.mlp.down_proj.weight.detach().clone() for u in self.units_of]
        self.group_order: list[torch.Tensor] = []  # removal order (nested: level k removes the first k)
        self.channel_order: list[torch.Tensor] = []
        for i, u in enumerate(self.units_of):
            self.group_order.append(self._order(i, "o", u.groups - 1))
            self.channel_order.append(self._order(i, "down", _most_channels(u, max_fraction)))
        self.current: list[tuple[int, int]] = [(0, 0)] * len(self.blocks)
        self.cache: OrderedDict[tuple[str, int, int], torch.Tensor] = OrderedDict()
        self.memory_limit = memory_limit_bytes
        self._cache_bytes = 0

    def _order(self, block: int, which: str, n_remove: int) -> torch.Tensor:
        """The first ``n_remove`` units of the block's removal order (KV groups for 'o', channels for 'down')."""
        u = self.units_of[block]
        if which == "o":
            w, cols = self.dense_o[block], [group_columns(u, k) for k in range(u.groups)]
        else:
            w, cols = self.dense_down[block], None
        if self.pruner == "magnitude":
            scores = group_norm_scores(u) if which == "o" else channel_norm_scores(u)
            return torch.argsort(scores, stable=True)[:n_remove]
        gram = self.grams[block][which]  # type: ignore[index]
        if self.reconstruct:  # greedy output approximation with reconstruction, as the block-sequential pruner
            return torch.tensor(greedy_removal_order(w, gram, cols, n_remove), dtype=torch.long)
        scores = (output_scores(w, gram, cols) if which == "o"
                  else channel_output_scores(w, torch.diagonal(gram)))
        return torch.argsort(scores, stable=True)[:n_remove]

    def _removed(self, block: int, which: str, n: int) -> torch.Tensor:
        orders = self.group_order if which == "o" else self.channel_order
        if n > len(orders[block]):  # beyond the precomputed range (max_fraction): extend once
            orders[block] = self._order(block, which, n)
        return orders[block][:n]

    @classmethod
    @torch.no_grad()
    def build(cls, model: nn.Module, calib_tokens: torch.Tensor, pruner: str, batch_size: int = 4,
              reconstruct_second: bool = True, max_fraction: float = 1.0) -> StructuredLevelDB:
        grams = None
        if pruner == "goa":
            grams = []
            inputs = capture_block_inputs(model, calib_tokens)
            hidden = inputs.hidden
            for info in find_blocks(model):
                u = block_units(info)
                store: dict[str, torch.Tensor] = {}
                handles = [u.attn.o_proj.register_forward_hook(gram_hook(store, "o")),
                           u.mlp.down_proj.register_forward_hook(gram_hook(store, "down"))]
                try:
                    hidden = run_block(info.module, hidden, inputs.kwargs, batch_size)
                finally:
                    for h in handles:
                        h.remove()
                grams.append(store)
        return cls(model, pruner, grams, reconstruct_second, max_fraction=max_fraction)

    # ------------------------------------------------------------------ units
    def units(self, granularity: str) -> list[Unit]:
        if granularity != "layer":
            raise PruningConfigError("structured widths are searched per layer (search.granularity 'layer')")
        return [Unit(info.name, info.index, list(info.linears),
                     [m.weight.numel() for m in info.linears.values()]) for info in self.blocks]

    linear_counts = staticmethod(split_counts)

    def max_fractions(self) -> list[float]:
        """Per block, the largest fraction structured pruning can remove (one group, one channel kept)."""
        return [max_fraction(u) for u in self.units_of]

    # ------------------------------------------------------------------ levels
    def _cached(self, key: tuple[str, int, int], make) -> torch.Tensor:
        if key in self.cache:
            self.cache.move_to_end(key)
            return self.cache[key]
        w = make()
        nbytes = w.numel() * w.element_size()
        while self.cache and self._cache_bytes + nbytes > self.memory_limit:
            _, old = self.cache.popitem(last=False)
            self._cache_bytes -= old.numel() * old.element_size()
        self.cache[key] = w
        self._cache_bytes += nbytes
        return w

    def o_weight(self, block: int, groups_removed: int) -> torch.Tensor:
        """o_proj in the padded form with ``groups_removed`` KV groups gone (dense shape)."""
        dense = self.dense_o[block]
        if groups_removed == 0:
            return dense
        u = self.units_of[block]

        def make() -> torch.Tensor:
            gone = set(self._removed(block, "o", groups_removed).tolist())
            keep = [g for g in range(u.groups) if g not in gone]
            cols = torch.cat([group_columns(u, int(g)) for g in keep])
            out = torch.zeros_like(dense)
            if self.reconstruct:
                out[:, cols] = reconstruct(dense, self.grams[block]["o"], cols).to(dense.dtype)  # type: ignore[index]
            else:
                out[:, cols] = dense[:, cols]
            return out

        return self._cached(("o", block, groups_removed), make)

    def down_weight(self, block: int, channels_removed: int) -> torch.Tensor:
        dense = self.dense_down[block]
        if channels_removed == 0:
            return dense

        def make() -> torch.Tensor:
            gone = self._removed(block, "down", channels_removed)
            mask = torch.ones(dense.shape[1], dtype=torch.bool)
            mask[gone] = False
            keep = torch.nonzero(mask).squeeze(1)
            out = torch.zeros_like(dense)
            if self.reconstruct:
                out[:, keep] = reconstruct(dense, self.grams[block]["down"], keep).to(dense.dtype)  # type: ignore[index]
            else:
                out[:, keep] = dense[:, keep]
            return out

        return self._cached(("down", block, channels_removed), make)

    @torch.no_grad()
    def apply(self, counts: dict[str, int]) -> list[str]:
        """Put the model in the state ``counts`` (per linear, summed per block); returns the blocks changed."""
        changed = []
        for i, info in enumerate(self.blocks):
            budget = sum(counts.get(n, 0) for n in info.linears)
            plan = plan_widths(self.units_of[i], budget)
            if plan == self.current[i]:
                continue
            g, c = plan
            if g != self.current[i][0]:
                self.units_of[i].attn.o_proj.weight.copy_(self.o_weight(i, g))
            if c != self.current[i][1]:
                self.units_of[i].mlp.down_proj.weight.copy_(self.down_weight(i, c))
            self.current[i] = plan
            changed.append(info.name)
        return changed

    def restore(self) -> None:
        """Back to the dense weights."""
        self.apply({})

    def nbytes(self) -> int:
        tensors = self.dense_o + self.dense_down
        if self.grams is not None:
            tensors += [t for g in self.grams for t in g.values()]
        return sum(t.numel() * t.element_size() for t in tensors) + self._cache_bytes


def structured_space(target: float, step_fraction: float, max_level_delta: float, units: list[Unit],
                     blocks: list) -> LevelSpace:
    """The search's level space for structured widths: the usual one, its spread capped so that no
    block can be asked to lose its last KV group or MLP channel."""
    room = min(max_fraction(block_units(b)) for b in blocks) - target
    if room <= 0:
        raise PruningConfigError(f"sparsity {target} leaves no room to search structured widths")
    return LevelSpace.build([u.size for u in units], target, step_fraction, min(max_level_delta, room))

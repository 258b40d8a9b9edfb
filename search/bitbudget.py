"""Size budgets in bits per weight: the cost model, and the per-unit (sparsity, bits) search space.

The cost model (the one definition: the job spec's check, the search, the report and the
benchmark all read it from here). A linear of ``n`` weights with ``p`` of them pruned, its kept
weights quantized to ``b`` bits in groups of ``g`` input columns, is stored as

- the kept weights' codes:   (n - p) · b bits
- a bitmap of the kept positions, when anything is pruned:   n · 1 bit   (none when p = 0)
- one 16-bit scale per group (and a b-bit zero point when asymmetric):   (n / g) · (16 [+ b]) bits

so, per weight, with sparsity s = p / n:

    bits_per_weight(s, b) = (1 - s) · b  +  [s > 0]  +  (16 [+ b]) / g

This is what a sparse quantized format needs (a bitmap plus packed kept codes), not what the
compressed-tensors pack-quantized layout writes today (it packs every weight's code, zeros
included, so its files hold b + 16/g bits per weight whatever the sparsity): the budget is the
information a deployed sparse kernel reads, and the report gives the real file size beside it.

The search space (``ChoiceSpace``): every unit picks one *choice*, a (sparsity level, bit width)
pair from one global list, and a vector of choices is valid when the units' costs, summed in
integer bits, stay within the budget ``floor(bits_per_weight · total weights)``. A budget in
bits cannot in general be met exactly (the costs of the choices share no common step), so the
rule is one-sided with a stated tolerance: every vector the operators produce costs at most the
budget, and after each move the other units are raised one level at a time while one still fits,
so a repaired vector is left less than one unit's level step under the budget.

Levels that cost more than being dense at the same width (0 < s ≤ 1/b, where the bitmap
outweighs the codes saved) are left out of the choices: they prune weights and save nothing.

Pure Python (no torch): pruning/quantlevels.py turns (count, bits) per unit into weights.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from evosparse.search.operators import draw_switches

Vector = tuple[int, ...]

SCALE_BITS = 16  # one scale per group, in the 16-bit checkpoint dtype
MASK_BITS = 1  # bitmap of kept positions, per weight of a sparse layer
LEVEL_STEP = 0.05  # sparsity levels 0, 0.05, 0.10, ... up to MAX_SPARSITY
MAX_SPARSITY = 0.9
BIT_WIDTHS = (2, 3, 4, 8)  # the default widths a layer chooses from


def unit_bits(size: int, pruned: int, bits: int, group_size: int, symmetric: bool = True) -> int:
    """Storage of one unit (``size`` weights, ``pruned`` of them zero) in bits, as an exact integer."""
    if not 0 <= pruned <= size:
        raise ValueError(f"cannot prune {pruned} of {size} weights")
    groups = -(-size // group_size)
    per_group = SCALE_BITS + (0 if symmetric else bits)
    return (size - pruned) * bits + (size * MASK_BITS if pruned else 0) + groups * per_group


def bits_per_weight(sparsity: float, bits: int, group_size: int, symmetric: bool = True) -> float:
    """The cost model per weight (see the module docstring); ``unit_bits`` / size for large units."""
    per_group = SCALE_BITS + (0 if symmetric else bits)
    return (1.0 - sparsity) * bits + (MASK_BITS if sparsity > 0 else 0) + per_group / group_size


def useful_levels(bits: int, group_size: int, symmetric: bool = True, step: float = LEVEL_STEP,
                  max_sparsity: float = MAX_SPARSITY) -> list[float]:
    """Sparsity levels worth choosing at ``bits``: dense, then those cheaper than dense."""
    dense = bits_per_weight(0.0, bits, group_size, symmetric)
    levels = [round(k * step, 10) for k in range(int(math.floor(max_sparsity / step + 1e-9)) + 1)]
    return [s for s in levels if s == 0 or bits_per_weight(s, bits, group_size, symmetric) < dense]


@dataclass(frozen=True)
class Choice:
    sparsity: float
    bits: int


@dataclass(frozen=True)
class ChoiceSpace:
    """Units, the global list of (sparsity, bits) choices, and the budget in bits.

    A vector holds one choice index per unit. Choices are ordered by width, then by sparsity, so
    within one width the next index is one level sparser (and strictly cheaper).
    """

    sizes: tuple[int, ...]
    choices: tuple[Choice, ...]
    budget: int  # total bits allowed over all units
    group_size: int
    symmetric: bool = True
    costs: tuple[tuple[int, ...], ...] = field(init=False, repr=False)
    pruned_counts: tuple[tuple[int, ...], ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not self.sizes or any(n <= 0 for n in self.sizes):
            raise ValueError("units must have positive sizes")
        if not self.choices:
            raise ValueError("no (sparsity, bits) choices")
        pruned = tuple(tuple(round(c.sparsity * n) for c in self.choices) for n in self.sizes)
        costs = tuple(tuple(unit_bits(n, p, c.bits, self.group_size, self.symmetric)
                            for p, c in zip(ps, self.choices, strict=True)) for n, ps in zip(self.sizes, pruned,
                                                                                              strict=True))
        object.__setattr__(self, "pruned_counts", pruned)
        object.__setattr__(self, "costs", costs)
        cheapest = sum(min(row) for row in costs)
        if cheapest > self.budget:
            raise ValueError(f"a budget of {self.budget / sum(self.sizes):.4g} bits per weight is below the "
                             f"cheapest choice ({cheapest / sum(self.sizes):.4g} bits per weight)")

    @classmethod
    def build(
        cls,
        sizes: Sequence[int],
        bits_per_weight_target: float,
        group_size: int,
        widths: Sequence[int] = BIT_WIDTHS,
        symmetric: bool = True,
        step: float = LEVEL_STEP,
        max_sparsity: float = MAX_SPARSITY,
    ) -> ChoiceSpace:
        """The space of a job: every useful level of every width, budget ``floor(target · weights)``."""
        choices = tuple(Choice(s, b) for b in sorted(set(widths))
                        for s in useful_levels(b, group_size, symmetric, step, max_sparsity))
        budget = math.floor(bits_per_weight_target * sum(sizes) + 1e-9)
        return cls(tuple(int(n) for n in sizes), choices, budget, group_size, symmetric)

    # ---------------------------------------------------------------- reading a vector
    @property
    def n(self) -> int:
        return len(self.sizes)

    def cost(self, vector: Sequence[int]) -> int:
        return sum(row[c] for row, c in zip(self.costs, vector, strict=True))

    def bits_per_weight(self, vector: Sequence[int]) -> float:
        return self.cost(vector) / sum(self.sizes)

    def counts(self, vector: Sequence[int]) -> list[tuple[int, int]]:
        """Per unit (weights pruned, bits): a unit's level, as the quantized level database takes it."""
        return [(row[c], self.choices[c].bits) for row, c in zip(self.pruned_counts, vector, strict=True)]

    def fractions(self, vector: Sequence[int]) -> list[float]:
        return [row[c] / n for row, c, n in zip(self.pruned_counts, vector, self.sizes, strict=True)]

    def widths(self, vector: Sequence[int]) -> list[int]:
        return [self.choices[c].bits for c in vector]

    def is_valid(self, vector: Sequence[int]) -> bool:
        return (len(vector) == self.n and all(0 <= c < len(self.choices) for c in vector)
                and self.cost(vector) <= self.budget)

    def check(self, vector: Sequence[int]) -> None:
        if not self.is_valid(vector):
            raise ValueError(f"choice vector {list(vector)} is over the size budget or out of range")

    def key(self) -> dict[str, Any]:
        """What a saved search state must match (JSON-shaped)."""
        return {"sizes": list(self.sizes), "choices": [[c.sparsity, c.bits] for c in self.choices],
                "budget": self.budget, "group_size": self.group_size, "symmetric": self.symmetric}

    # ---------------------------------------------------------------- uniform vectors and seeds
    def _same_width(self, c: int, d: int) -> bool:
        return 0 <= d < len(self.choices) and self.choices[d].bits == self.choices[c].bits

    def uniform(self, bits: int) -> Vector | None:
        """Every unit at the least sparse level of width ``bits`` that fits the budget (None if none does)."""
        for c, ch in enumerate(self.choices):
            if ch.bits == bits and self.cost((c,) * self.n) <= self.budget:
                return (c,) * self.n
        return None

    def uniform_vectors(self) -> list[Vector]:
        """The uniform vector of every width that has one, widest first."""
        out = [self.uniform(b) for b in sorted({c.bits for c in self.choices}, reverse=True)]
        return [v for v in out if v is not None]

    def zero(self) -> Vector:
        """The uniform baseline: the uniform vector spending the most of the budget (widest on ties)."""
        vs = self.uniform_vectors()
        if not vs:  # only a mix fits: the cheapest choice of every unit, then filled
            return self.repair([min(range(len(row)), key=row.__getitem__) for row in self.costs], random.Random(0))
        return max(vs, key=lambda v: (self.cost(v), self.choices[v[0]].bits))

    def from_fractions(self, fractions: Sequence[float], bits: int) -> Vector:
        """Nearest choices of width ``bits`` to per-unit sparsities (e.g. Fisher's), repaired onto the budget."""
        idx = [c for c, ch in enumerate(self.choices) if ch.bits == bits]
        if not idx:
            raise ValueError(f"width {bits} is not among the choices")
        out = [min(idx, key=lambda c: (abs(self.choices[c].sparsity - f), c)) for f in fractions]
        return self.repair(out, random.Random(0))

    # ---------------------------------------------------------------- budget-keeping moves
    def _down(self, i: int, c: int) -> int | None:
        """Unit ``i``'s next cheaper choice: one level sparser, else the dearest cheaper one of a narrower width."""
        if self._same_width(c, c + 1):
            return c + 1
        row, bits = self.costs[i], self.choices[c].bits
        cands = [d for d, ch in enumerate(self.choices) if ch.bits < bits and row[d] < row[c]]
        return max(cands, key=lambda d: (row[d], -d)) if cands else None

    def _up(self, i: int, c: int) -> int | None:
        """Unit ``i``'s next dearer choice: one level denser, else the cheapest dearer one of a wider width."""
        if self._same_width(c, c - 1):
            return c - 1
        row, bits = self.costs[i], self.choices[c].bits
        cands = [d for d, ch in enumerate(self.choices) if ch.bits > bits and row[d] > row[c]]
        return min(cands, key=lambda d: (row[d], d)) if cands else None

    def repair(self, vector: Sequence[int], rng: random.Random, keep: int | None = None) -> Vector:
        """Bring a vector within the budget, then fill it: one step at a time, on random units.

        Over budget, units other than ``keep`` take their next cheaper choice until it fits
        (``keep`` too only when no other unit can); then units other than ``keep`` take their
        next dearer choice while that still fits, so what is left unused is less than one such
        step of some unit (at most ``step_bits()``), unless every other unit is at the top.
        """
        out = list(vector)
        total = self.cost(out)
        while total > self.budget:
            down = [(i, d) for i in range(self.n) if i != keep and (d := self._down(i, out[i])) is not None]
            if not down and keep is not None and (d := self._down(keep, out[keep])) is not None:
                down = [(keep, d)]
            if not down:  # cannot happen: the cheapest choices fit (checked when the space was made)
                raise ValueError("no choice vector fits the budget")
            i, d = rng.choice(down)
            total += self.costs[i][d] - self.costs[i][out[i]]
            out[i] = d
        while True:
            up = [(i, d) for i in range(self.n) if i != keep and (d := self._up(i, out[i])) is not None
                  and total + self.costs[i][d] - self.costs[i][out[i]] <= self.budget]
            if not up:
                return tuple(out)
            i, d = rng.choice(up)
            total += self.costs[i][d] - self.costs[i][out[i]]
            out[i] = d

    def _move(self, c: int, rng: random.Random, max_jump: int) -> int:
        """One unit's new choice: a level step (1..max_jump, biased to 1) or a neighbouring width."""
        widths = sorted({ch.bits for ch in self.choices})
        if len(widths) > 1 and rng.random() < 0.5:
            w = widths.index(self.choices[c].bits) + rng.choice((-1, 1))
            w = min(len(widths) - 1, max(0, w))
            # Trade bits for sparsity: the level of the new width that costs about the same per weight.
            here = bits_per_weight(self.choices[c].sparsity, self.choices[c].bits, self.group_size, self.symmetric)
            cands = [d for d, ch in enumerate(self.choices) if ch.bits == widths[w]]
            return min(cands, key=lambda d: (abs(bits_per_weight(self.choices[d].sparsity, widths[w],
                                                                 self.group_size, self.symmetric) - here), d))
        k = draw_switches(rng, cap=max_jump) if max_jump > 1 else 1
        d = c + rng.choice((-k, k))
        while not self._same_width(c, d):  # clip to the width's ladder
            d += 1 if d < c else -1
        return d

    def mutate(self, vector: Sequence[int], rng: random.Random, switches: int | None = None,
               max_jump: int = 1) -> Vector:
        """``switches`` moves (drawn biased toward one when not given), each repaired onto the budget."""
        k = draw_switches(rng) if switches is None else switches
        v = tuple(vector)
        for _ in range(k):
            i = rng.randrange(self.n)
            out = list(v)
            out[i] = self._move(v[i], rng, max_jump)
            v = self.repair(out, rng, keep=i)
        return v

    def crossover(self, a: Sequence[int], b: Sequence[int], rng: random.Random) -> Vector:
        """Uniform crossover of the two parents' choices, repaired onto the budget."""
        child = [x if rng.random() < 0.5 else y for x, y in zip(a, b, strict=True)]
        return self.repair(child, rng)

    def step_bits(self) -> int:
        """The largest single step up of any unit: a repaired vector is left less than this under the budget."""
        return max(self.costs[i][d] - self.costs[i][c] for i in range(self.n) for c in range(len(self.choices))
                   if (d := self._up(i, c)) is not None)

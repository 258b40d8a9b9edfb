"""Level vectors: the search space of per-unit sparsity that meets the global budget exactly.

A unit (a block, or one linear) gets an integer *level*. Level 0 is the exact uniform
allocation; one level step moves the same number of weights (``step``) in every unit, so a
vector whose levels sum to zero prunes exactly the global budget, counted in parameters:

    counts[i] = base[i] + level[i] * step,   sum(base) == budget,  sum(level) == 0.

Pure Python (no torch): pruning/ turns counts into masks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from evosparse.search import allocation, defaults

Vector = tuple[int, ...]


@dataclass(frozen=True)
class LevelSpace:
    """Sizes, the uniform base counts, the step, and per-unit level bounds."""

    sizes: tuple[int, ...]
    target: float
    step: int
    base: tuple[int, ...]
    lo: tuple[int, ...]  # lowest allowed level per unit (least sparse is base + lo*step)
    hi: tuple[int, ...]

    @classmethod
    def build(
        cls,
        sizes: Sequence[int],
        target: float,
        step_fraction: float = defaults.STEP_FRACTION,
        max_level_delta: float = defaults.MAX_LEVEL_DELTA,
    ) -> LevelSpace:
        if not sizes or any(n <= 0 for n in sizes):
            raise ValueError("every unit needs a positive size")
        if not 0.0 < target < 1.0:
            raise ValueError("target sparsity must be strictly between 0 and 1")
        sizes = tuple(int(n) for n in sizes)
        step = max(1, round(step_fraction * min(sizes)))
        base = tuple(allocation.uniform(sizes, target))
        lo, hi = [], []
        for n, b in zip(sizes, base, strict=True):
            min_count = max(0.0, target - max_level_delta) * n
            max_count = min(1.0, target + max_level_delta) * n
            # Bounds in whole levels, never past an empty or a fully pruned unit.
            lo.append(min(0, math.ceil((min_count - b) / step)))
            hi.append(max(0, math.floor((max_count - b) / step)))
        return cls(sizes=sizes, target=target, step=step, base=base, lo=tuple(lo), hi=tuple(hi))

    @property
    def n(self) -> int:
        return len(self.sizes)

    @property
    def budget(self) -> int:
        return sum(self.base)

    def zero(self) -> Vector:
        return (0,) * self.n

    def counts(self, vector: Sequence[int]) -> list[int]:
        """Weights to prune per unit; sums exactly to the budget for a valid vector."""
        self.check(vector)
        return [b + v * self.step for b, v in zip(self.base, vector, strict=True)]

    def fractions(self, vector: Sequence[int]) -> list[float]:
        return [c / n for c, n in zip(self.counts(vector), self.sizes, strict=True)]

    def is_valid(self, vector: Sequence[int]) -> bool:
        return (
            len(vector) == self.n
            and sum(vector) == 0
            and all(lo <= v <= hi for v, lo, hi in zip(vector, self.lo, self.hi, strict=True))
        )

    def check(self, vector: Sequence[int]) -> None:
        if not self.is_valid(vector):
            raise ValueError(f"level vector {list(vector)} is off-budget or out of bounds")

    def repair(self, levels: Sequence[float], rng=None) -> Vector:
        """Nearest valid vector to real-valued levels: clip, round, then fix the sum.

        The sum is fixed one step at a time on the units whose rounding moved them furthest in
        the offending direction (ties broken by ``rng`` when given, else by index), so the
        result is deterministic for a seed.
        """
        clipped = [min(hi, max(lo, x)) for x, lo, hi in zip(levels, self.lo, self.hi, strict=True)]
        out = [min(hi, max(lo, round(x))) for x, lo, hi in zip(clipped, self.lo, self.hi, strict=True)]
        excess = sum(out)
        tie = [rng.random() for _ in out] if rng is not None else [0.0] * self.n
        while excess != 0:
            if excess > 0:  # lower a unit that can go lower, preferring those rounded up most
                cands = [i for i in range(self.n) if out[i] > self.lo[i]]
                i = max(cands, key=lambda j: (out[j] - clipped[j], tie[j], -j))
                out[i] -= 1
                excess -= 1
            else:
                cands = [i for i in range(self.n) if out[i] < self.hi[i]]
                i = max(cands, key=lambda j: (clipped[j] - out[j], tie[j], -j))
                out[i] += 1
                excess += 1
        return tuple(out)

    def from_counts(self, counts: Sequence[int]) -> Vector:
        """The level-grid vector closest to an allocation given as prune counts (e.g. Fisher's)."""
        return self.repair([(c - b) / self.step for c, b in zip(counts, self.base, strict=True)])

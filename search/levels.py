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


def mixed_space(
    sizes: Sequence[int], target: float, m: int, choices: Sequence[int],
    max_level_delta: float = defaults.MAX_LEVEL_DELTA,
) -> LevelSpace:
    """The level space of a per-unit N:M choice (``mixed:M``, ``2:4+dense``), budget exact.

    Every unit prunes ``p`` of each ``m`` weights, ``p`` from the evenly spaced ``choices``
    (1..M-1 for mixed:M, {0, 2} for 2:4+dense), so its count is ``size * p / m``. The units
    must have one size (the blocks of a decoder), which makes a level step (one step of ``p``)
    move the same number of weights everywhere: any vector summing to zero then prunes exactly
    ``round(target * total)`` weights, and every unit's pattern is exact. A target that no mix
    of choices reaches exactly is refused, naming the nearest ones that are reached.

    Bounds: each unit stays within ``max_level_delta`` of the target (at least one step each
    way) and inside the choices.
    """
    sizes = tuple(int(n) for n in sizes)
    choices = sorted(int(p) for p in choices)
    if not sizes or len(set(sizes)) != 1:
        raise ValueError("mixed N:M needs units of one size (the blocks of one decoder stack)")
    if len(choices) < 2:
        raise ValueError("mixed N:M needs at least two choices per unit")
    dp = choices[1] - choices[0]
    if any(b - a != dp for a, b in zip(choices, choices[1:], strict=False)) or choices[0] % dp:
        raise ValueError(f"choices {choices} must be evenly spaced multiples of their spacing")
    size, n = sizes[0], len(sizes)
    if size * dp % m:
        raise ValueError(f"unit size {size} is not a whole number of {m}-weight groups")
    step = size * dp // m
    total_levels = allocation.budget(sizes, target) / step
    lo_abs, hi_abs = choices[0] // dp, choices[-1] // dp
    if abs(total_levels - round(total_levels)) > 1e-9 or not lo_abs * n <= round(total_levels) <= hi_abs * n:
        below = max(lo_abs * n, math.floor(total_levels))
        above = min(hi_abs * n, math.ceil(total_levels))
        near = sorted({below * step / sum(sizes), above * step / sum(sizes)})
        raise ValueError(
            f"sparsity {target:g} is not reachable exactly with {n} units choosing N:{m} "
            f"(nearest exact targets: {', '.join(f'{x:.6g}' for x in near)})"
        )
    k = round(total_levels)
    # The most uniform allocation: every unit at k // n levels, the first k % n one higher.
    base_levels = [k // n + (1 if i < k % n else 0) for i in range(n)]
    center = target * m / dp
    spread = max(1.0, max_level_delta * m / dp)
    lo_cap = max(lo_abs, math.floor(center - spread))
    hi_cap = min(hi_abs, math.ceil(center + spread))
    lo = tuple(min(0, lo_cap - b) for b in base_levels)
    hi = tuple(max(0, hi_cap - b) for b in base_levels)
    return LevelSpace(
        sizes=sizes, target=target, step=step, base=tuple(b * step for b in base_levels), lo=lo, hi=hi
    )


def pruned_per_group(space: LevelSpace, vector: Sequence[int], m: int) -> list[int]:
    """For a mixed N:M space: how many of every ``m`` weights each unit prunes (N = m - that)."""
    out = []
    for c, size in zip(space.counts(vector), space.sizes, strict=True):
        p, rem = divmod(c * m, size)
        if rem:
            raise ValueError(f"count {c} of {size} is not a whole N:{m} pattern")
        out.append(p)
    return out

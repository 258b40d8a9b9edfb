"""Budget-preserving variation operators on level vectors.

Every operator maps valid vectors (sum 0, within bounds) to valid vectors, so no candidate
ever misses the global sparsity target. Randomness comes only from the ``random.Random``
passed in, which keeps a search deterministic for its seed.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from evosparse.search.levels import LevelSpace, Vector


def draw_switches(rng: random.Random, p_stop: float = 0.5, cap: int = 8) -> int:
    """Number of level switches for one child: 1 with probability p_stop, 2 with p(1-p), ..."""
    k = 1
    while k < cap and rng.random() > p_stop:
        k += 1
    return k


def switch(space: LevelSpace, vector: Sequence[int], rng: random.Random, levels: int = 1) -> Vector:
    """Lower one unit by ``levels`` and raise another by as many: the sum (the budget) stays the same.

    The move shrinks to what both units' bounds allow.
    """
    v = list(vector)
    down = [i for i in range(space.n) if v[i] > space.lo[i]]
    up = [i for i in range(space.n) if v[i] < space.hi[i]]
    if not down or not up:
        return tuple(v)
    i = rng.choice(down)
    up = [j for j in up if j != i]
    if not up:
        return tuple(v)
    j = rng.choice(up)
    m = min(levels, v[i] - space.lo[i], space.hi[j] - v[j])
    v[i] -= m
    v[j] += m
    return tuple(v)


def mutate(
    space: LevelSpace,
    vector: Sequence[int],
    rng: random.Random,
    switches: int | None = None,
    max_jump: int = 1,
) -> Vector:
    """Apply ``switches`` level switches (drawn biased toward one when not given).

    With ``max_jump`` > 1 each switch moves 1 level with probability 1/2, 2 with 1/4, ... up
    to ``max_jump``: mostly fine steps, with the occasional long one that lets the search
    cross a flat stretch of the landscape in one generation instead of several.
    """
    k = draw_switches(rng) if switches is None else switches
    v = tuple(vector)
    for _ in range(k):
        levels = draw_switches(rng, cap=max_jump) if max_jump > 1 else 1
        v = switch(space, v, rng, levels)
    return v


def crossover(space: LevelSpace, a: Sequence[int], b: Sequence[int], rng: random.Random) -> Vector:
    """Uniform crossover, then repair the sum with single-level moves toward the other parent.

    Each unit's level comes from either parent; the sum is then walked back to zero by moving
    randomly chosen units one level toward their value in the other parent (or, failing
    that, anywhere within bounds), so the child stays between its parents where it can.
    """
    take = [rng.random() < 0.5 for _ in range(space.n)]
    child = [x if t else y for x, y, t in zip(a, b, take, strict=True)]
    other = [y if t else x for x, y, t in zip(a, b, take, strict=True)]
    excess = sum(child)
    while excess != 0:
        sign = 1 if excess > 0 else -1  # +1: a unit must go down
        toward = [i for i in range(space.n) if (child[i] - other[i]) * sign > 0]
        cands = toward or [
            i for i in range(space.n) if (child[i] > space.lo[i] if sign > 0 else child[i] < space.hi[i])
        ]
        i = rng.choice(cands)
        child[i] -= sign
        excess -= sign
    return tuple(child)

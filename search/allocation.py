"""Allocation baselines: per-unit sparsity that meets a global target exactly, counted in parameters.

A *unit* is whatever gets one sparsity (a block, or one linear module). Every function returns
the number of weights to prune in each unit; their sum is exactly ``round(target * total)``.
Pure Python: the scores come in as plain floats from pruning/.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def split_proportional(total: int, widths: Sequence[int]) -> list[int]:
    """``total`` split over parts proportional to ``widths``, summing exactly (largest remainder).

    The one integer splitter of the project: a unit's count over its linears, a layer's count
    over column blocks. Ties in the remainder go to the lower index.
    """
    size = sum(widths)
    if size <= 0:
        raise ValueError("widths must sum to a positive number")
    raw = [total * w / size for w in widths]
    out = [math.floor(r) for r in raw]
    order = sorted(range(len(widths)), key=lambda i: (raw[i] - out[i], -i), reverse=True)
    for i in order[: total - sum(out)]:
        out[i] += 1
    return out


def budget(sizes: Sequence[int], target: float) -> int:
    """The exact number of weights the whole model must lose."""
    return round(target * sum(sizes))


def exact_counts(sizes: Sequence[int], fractions: Sequence[float], target: float) -> list[int]:
    """Turn per-unit fractions into integer prune counts that sum exactly to the global budget.

    The fractions are first shifted by one common offset (bisection) so that, clipped to
    [0, 1], they meet the target in parameters; the rounding remainder then goes to the units
    with the largest fractional parts (largest-remainder rounding), never past a unit's size.
    """
    if len(sizes) != len(fractions):
        raise ValueError("sizes and fractions differ in length")
    if not 0.0 <= target <= 1.0:
        raise ValueError("target must be in [0, 1]")
    total = budget(sizes, target)

    def pruned(shift: float) -> float:
        return sum(n * min(1.0, max(0.0, f + shift)) for n, f in zip(sizes, fractions, strict=True))

    lo, hi = -1.0 - max(fractions, default=0.0), 1.0 - min(fractions, default=0.0)
    for _ in range(100):
        mid = (lo + hi) / 2
        if pruned(mid) < total:
            lo = mid
        else:
            hi = mid
    shifted = [min(1.0, max(0.0, f + hi)) for f in fractions]
    raw = [n * f for n, f in zip(sizes, shifted, strict=True)]
    counts = [min(n, math.floor(r)) for n, r in zip(sizes, raw, strict=True)]
    remainder = total - sum(counts)
    order = sorted(range(len(sizes)), key=lambda i: (raw[i] - counts[i]), reverse=True)
    i = 0
    while remainder > 0:
        j = order[i % len(order)]
        if counts[j] < sizes[j]:
            counts[j] += 1
            remainder -= 1
        i += 1
    while remainder < 0:  # only if clipping overshot; take back from the largest units
        j = order[::-1][i % len(order)]
        if counts[j] > 0:
            counts[j] -= 1
            remainder += 1
        i += 1
    return counts


def uniform(sizes: Sequence[int], target: float) -> list[int]:
    return exact_counts(sizes, [target] * len(sizes), target)


def _linear_spread(values: Sequence[float], target: float, spread: float, higher_keeps_more: bool) -> list[float]:
    """Map values linearly onto [target - spread, target + spread]; higher values -> lower sparsity."""
    lo, hi = min(values), max(values)
    if hi - lo < 1e-12:
        return [target] * len(values)
    out = []
    for v in values:
        t = (v - lo) / (hi - lo)  # 0 .. 1
        if higher_keeps_more:
            t = 1.0 - t
        out.append(target - spread + 2 * spread * t)
    return out


def owl(sizes: Sequence[int], target: float, outlier_ratios: Sequence[float], lam: float) -> list[int]:
    """OWL (Yin et al. 2024): sparsity in [S - λ, S + λ], more outliers -> less sparsity."""
    return exact_counts(sizes, _linear_spread(outlier_ratios, target, lam, higher_keeps_more=True), target)


def sensitivity_proportional(
    sizes: Sequence[int], target: float, scores: Sequence[float], spread: float
) -> list[int]:
    """Fisher/Hessian-trace allocation: z-score the log-trace, map it to S ± spread, meet the budget.

    Log first, because traces span orders of magnitude across depth; z-scoring then clipping
    to ±2σ keeps a single outlier block from squeezing every other block to the same level.
    """
    logs = [math.log(max(s, 1e-30)) for s in scores]
    mean = sum(logs) / len(logs)
    std = math.sqrt(sum((x - mean) ** 2 for x in logs) / len(logs))
    if std < 1e-12:
        return uniform(sizes, target)
    z = [max(-2.0, min(2.0, (x - mean) / std)) / 2.0 for x in logs]  # in [-1, 1]
    return exact_counts(sizes, [target - spread * zi for zi in z], target)


def ramp(sizes: Sequence[int], target: float, depths: Sequence[float], slope: float) -> list[int]:
    """ATP's linear depth ramp (ICML 2025): sparsity rises with depth, S - slope at the first block
    to S + slope at the last; ``depths`` in [0, 1] per unit (block index / (blocks - 1))."""
    if len(depths) != len(sizes) or any(not 0.0 <= d <= 1.0 for d in depths):
        raise ValueError("depths must be one value in [0, 1] per unit")
    return exact_counts(sizes, [target + slope * (2.0 * d - 1.0) for d in depths], target)


def fractions(sizes: Sequence[int], counts: Sequence[int]) -> list[float]:
    return [c / n for n, c in zip(sizes, counts, strict=True)]

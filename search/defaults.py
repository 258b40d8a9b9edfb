"""Defaults of the evolutionary search, set once here.

``SearchConfig`` and ``LevelSpace.build`` (this package) and the job spec's ``SearchSettings``
(jobs/spec.py) read them, so a search built in code and a submitted job start from the same
numbers. Sized for SmolLM2-135M on a 2-core CPU (bench/bench_search.py): many cheap generations
on few tokens beat few expensive ones, and the time budget caps the run.
"""

from __future__ import annotations

from collections.abc import Sequence

GENERATIONS = 60
OFFSPRING = 8
# Multi-fidelity selection stages: (calibration tokens, survivors), growing tokens, shrinking survivors.
STAGES: tuple[tuple[int, int], ...] = ((256, 2), (1024, 1))
TIME_BUDGET_S: float | None = 15 * 60.0
PATIENCE: int | None = None  # generations without improvement before stopping (None: never)
# One level step moves this fraction of the smallest unit's weights (the same count in every unit).
STEP_FRACTION = 0.02
# Every unit's sparsity stays within target ± this.
MAX_LEVEL_DELTA = 0.25


def format_stages(stages: Sequence[tuple[int, int]]) -> str:
    """The 'tokens:survivors,...' spelling of selection stages, e.g. '256:2,1024:1'."""
    return ",".join(f"{tokens}:{survivors}" for tokens, survivors in stages)

"""The evolutionary-allocation stage of a job: glue between pruning/ (model, level database,
proxy fitness, sensitivity) and search/ (the torch-free evolutionary loop).

``run_search`` builds the level database from the dense model, seeds the population from the
chosen sensitivity allocation, runs the search, forwards every generation's record and
serialised state to ``hooks.generation``, stops with ``CancelledError`` when
``hooks.should_cancel()`` turns true between generations, and resumes from ``resume_state``.
The model is left dense on return: the job prunes it afterwards with ``prune_model``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from evosparse.jobs.spec import JobSpec, parse_selection
from evosparse.pruning.errors import CancelledError, PruningConfigError
from evosparse.pruning.fitness import ProxyFitness
from evosparse.pruning.leveldb import LevelDB, Unit
from evosparse.search import allocation as alloc
from evosparse.search.evolution import EvolutionarySearch, SearchConfig
from evosparse.search.levels import LevelSpace, mixed_space
from torch import nn


@dataclass
class SearchOutcome:
    counts: dict[str, int]  # weights to prune per linear (full names); sums exactly to the budget
    history: list[dict]
    units: list[str]
    best_vector: list[float]  # sparsity per unit
    candidates_scored: int
    seconds: float
    uniform_vector: list[float] = field(default_factory=list)
    seed_vector: list[float] = field(default_factory=list)
    best_levels: list[int] = field(default_factory=list)
    stopped_by: str = ""
    best_fitness: float = float("nan")
    timings: dict[str, float] = field(default_factory=dict)


def search_config(spec: JobSpec, max_tokens: int) -> SearchConfig:
    """SearchConfig from the job's settings; stage token counts are capped at the calibration size."""
    s = spec.search
    stages = [(min(t, max_tokens), k) for t, k in parse_selection(s.selection)]
    return SearchConfig(
        generations=s.generations,
        offspring=s.offspring,
        stages=stages,
        seed=spec.seed,
        time_budget_s=s.time_budget_min * 60 if s.time_budget_min is not None else None,
        patience=s.patience,
    )


def unit_scores(units: list[Unit], per_linear: dict[str, float]) -> list[float]:
    """Size-weighted mean of a per-parameter score over each unit's linears."""
    return [sum(per_linear[n] * s for n, s in zip(u.linears, u.sizes, strict=True)) / u.size for u in units]


# The seed's spread is tried at these multiples of ``sensitivity_spread``: how far a sensitivity
# score should push a layer away from the target depends on the model and the sparsity, so the
# first generation picks it on the calibration fitness instead of fixing one guess.
SEED_SPREAD_FACTORS = (1.0, 0.5, 1.5, 2.0, 2.5)


def seed_counts(
    model: nn.Module,
    calib_tokens: torch.Tensor,
    spec: JobSpec,
    units: list[Unit],
    sensitivity: dict[str, Any] | None = None,
    note: Callable[[str], None] | None = None,
) -> list[list[int]]:
    """Per-unit prune counts of the seed allocations (fisher / hessian / owl / uniform).

    Fisher and Hessian give one allocation per spread in ``SEED_SPREAD_FACTORS`` (the first at
    ``spec.sensitivity_spread``); OWL and uniform give one.
    """
    from evosparse.pruning import sensitivity as sens

    source = spec.search.seed_from
    sizes = [u.size for u in units]
    sensitivity = sensitivity or {}
    if source == "uniform":
        return [alloc.uniform(sizes, spec.sparsity)]
    if source in ("fisher", "hessian"):
        scores = sensitivity.get(source)
        if scores is None and source == "fisher":
            progress = (lambda i, n: note(f"Fisher sensitivity: window {i}/{n}")) if note is not None else None
            scores = sens.fisher_traces(model, calib_tokens, progress=progress)
        elif scores is None:
            scores = sens.hessian_traces(model, sens.dense_input_stats(model, calib_tokens))
        per_unit = unit_scores(units, scores)
        return [
            alloc.sensitivity_proportional(sizes, spec.sparsity, per_unit, spec.sensitivity_spread * f)
            for f in SEED_SPREAD_FACTORS
        ]
    if source == "owl":
        ratios = sensitivity.get("owl") or sens.owl_ratios(model, sens.dense_input_stats(model, calib_tokens), spec.owl_m)
        per_unit = [ratios[u.block] for u in units]  # OWL ratios are per block
        return [alloc.owl(sizes, spec.sparsity, per_unit, spec.owl_lambda)]
    raise PruningConfigError(f"unknown seed source {source!r}")


def run_search(
    model: nn.Module,
    calib_tokens: torch.Tensor,
    spec: JobSpec,
    hooks: Any,
    resume_state: bytes | None = None,
    *,
    sensitivity: dict[str, Any] | None = None,
    db: LevelDB | None = None,
    fitness_tokens: torch.Tensor | None = None,
) -> SearchOutcome:
    """Search the per-unit sparsity for ``spec``; see the module docstring.

    ``sensitivity`` may carry precomputed {"fisher"|"hessian": per-linear traces, "owl": per-block
    ratios}; ``db`` a prebuilt level database for this model and pruner; ``fitness_tokens`` other
    windows for the fitness than the calibration ones (default: the calibration windows).
    """
    if spec.nm is not None:
        raise PruningConfigError("a fixed N:M pattern leaves nothing to search; use 'mixed:M' or '2:4+dense'")
    mixed = spec.mixed
    setup = getattr(hooks, "setup", None) or (lambda message: None)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    if db is None:
        setup(f"building the level database ({spec.pruner})")
        db = LevelDB.build(model, calib_tokens, spec.pruner, nm_m=mixed.m if mixed is not None else None)
    timings["leveldb"] = time.perf_counter() - t0
    if db.nm_m != (mixed.m if mixed is not None else None):
        raise PruningConfigError("the level database was built for another pattern than the job's")
    units = db.units(spec.search.granularity)
    if mixed is not None:  # one N:M per block, budget exact (search.levels.mixed_space)
        try:
            space = mixed_space([u.size for u in units], spec.sparsity, mixed.m, mixed.pruned,
                                spec.search.max_level_delta)
        except ValueError as exc:
            raise PruningConfigError(str(exc)) from None
    else:
        space = LevelSpace.build(
            [u.size for u in units], spec.sparsity, spec.search.step_fraction, spec.search.max_level_delta
        )
    t1 = time.perf_counter()
    setup(f"{spec.search.seed_from} seed allocations")
    seeds = [space.from_counts(c) for c in seed_counts(model, calib_tokens, spec, units, sensitivity, setup)]
    seed = seeds[0]
    timings["seed"] = time.perf_counter() - t1
    ftokens = calib_tokens if fitness_tokens is None else fitness_tokens
    cfg = search_config(spec, ftokens.numel())
    # The fitness only ever reads the windows the largest stage needs: skip the rest.
    need = -(-max(t for t, _ in cfg.stages) // ftokens.shape[1])
    ftokens = ftokens[:need]
    t2 = time.perf_counter()
    setup(f"dense reference on {need} windows")
    fitness = ProxyFitness(model, ftokens, db, units, space, kind=spec.search.fitness)
    timings["dense_reference"] = time.perf_counter() - t2

    def progress(record: dict, state: bytes) -> None:
        if hooks is not None:
            hooks.generation(record, state)

    search = EvolutionarySearch(
        space, fitness, cfg, seed_vector=seed, extra_seeds=seeds[1:], progress=progress, state=resume_state
    )
    cancelled = hooks.should_cancel if hooks is not None else None
    try:
        result = search.run(should_stop=cancelled)
    finally:
        db.restore()  # the job prunes the dense model afterwards
    if result.stopped_by == "cancelled":
        raise CancelledError("job cancelled during the evolutionary search")
    timings["search"] = result.seconds
    counts = db.linear_counts(units, space.counts(result.best))
    return SearchOutcome(
        counts=counts,
        history=result.history,
        units=[u.name for u in units],
        best_vector=space.fractions(result.best),
        candidates_scored=result.candidates_scored,
        seconds=result.seconds,
        uniform_vector=space.fractions(space.zero()),
        seed_vector=space.fractions(seed),
        best_levels=list(result.best),
        stopped_by=result.stopped_by,
        best_fitness=result.best_score,
        timings=timings,
    )

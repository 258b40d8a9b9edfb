"""The evolutionary allocation of a job: glue between pruning/ (model, level database, proxy
fitness, sensitivity) and search/ (the torch-free evolutionary loop).

``run_search`` computes the dense reference on the fitness windows, gets the level database
(loaded from a ``LevelStore`` when a job on the same model content, pruner and calibration data
built it before, else built and stored), seeds the population from the sensitivity allocation,
runs the search, forwards every generation's record and serialised state to
``hooks.generation``, stops with ``CancelledError`` when ``hooks.should_cancel()`` turns true
between generations, and resumes from ``resume_state``.

With a dense snapshot (the runner's) the level database keeps only the rank band the level space
can reach, and the snapshot restores the model afterwards; without one the model is left dense
by the database itself. ``scoring`` turns the local fitness into one that fans each selection
stage out to scoring workers (worker/scoring.py); the result is the same.

With ``search.validation_windows`` the last calibration windows are held out of the selection
and the answer is chosen on them (search/evolution.py); with ``search.fresh_windows`` the
selection windows are cut into chunks, one per generation. SparseGPT databases get their
anchor levels from ``level_kwargs`` (the coordinator and every scorer build the same ones).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from evosparse.jobs.spec import JobSpec, parse_selection
from evosparse.pruning.errors import CancelledError, PruningConfigError
from evosparse.pruning.fitness import DenseReference, ProxyFitness
from evosparse.pruning.layers import BlockInfo, find_blocks
from evosparse.pruning.leveldb import LevelDB, Unit, search_units, split_counts
from evosparse.pruning.prune import pruned_input_stats
from evosparse.pruning.snapshot import DenseWeights
from evosparse.search import allocation as alloc
from evosparse.search.bitbudget import ChoiceSpace
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
    leveldb: str = ""  # "built", "built and stored" or "loaded"
    bits: dict[str, int] = field(default_factory=dict)  # size-budget jobs: bits per linear
    best_bits: list[int] = field(default_factory=list)  # size-budget jobs: bits per unit
    uniform_bits: list[int] = field(default_factory=list)
    best_val: float | None = None  # validation score of the answer (search.validation_windows > 0)
    anchor_levels: int = 0  # SparseGPT levels built up front
    anchor_seconds: float = 0.0  # and the time they took (inside timings["leveldb"])
    shipped_val: dict[str, Any] = field(default_factory=dict)  # rerank: database vs shipped validation scores


def search_config(spec: JobSpec, max_tokens: int, fitness_windows: torch.Tensor | None = None) -> SearchConfig:
    """SearchConfig from the job's settings; stage token counts are capped at the calibration size.

    ``fitness_windows``: the windows the fitness holds; with ``fresh_windows`` they are chunks of
    the largest stage's width (``window_chunks``), without it they do not matter.
    """
    s = spec.search
    stages = [(min(t, max_tokens), k) for t, k in parse_selection(s.selection)]
    chunks = None
    if s.fresh_windows and fitness_windows is not None:
        chunks = fitness_windows.shape[0] // stage_windows(spec, fitness_windows)
    return SearchConfig(
        window_chunks=chunks,
        generations=s.generations,
        offspring=s.offspring,
        stages=stages,
        seed=spec.seed,
        time_budget_s=s.time_budget_min * 60 if s.time_budget_min is not None else None,
        patience=s.patience,
    )


def search_space(spec: JobSpec, units: Sequence[Unit]) -> LevelSpace | ChoiceSpace:
    """The level space of the job: a step grid around the target, for a mixed pattern one N:M per unit,
    or for a size budget one (sparsity, bits) choice per unit (search.bitbudget)."""
    if spec.bits_per_weight is not None:
        q = spec.quantize
        assert q is not None  # the spec requires it with bits_per_weight
        try:
            return ChoiceSpace.build([u.size for u in units], spec.bits_per_weight, q.group_size, spec.bit_widths,
                                     q.symmetric)
        except ValueError as exc:
            raise PruningConfigError(str(exc)) from None
    mixed = spec.mixed
    if mixed is not None:  # budget exact, every unit a whole N:M (search.levels.mixed_space)
        try:
            return mixed_space([u.size for u in units], spec.sparsity, mixed.m, mixed.pruned,
                               spec.search.max_level_delta)
        except ValueError as exc:
            raise PruningConfigError(str(exc)) from None
    return LevelSpace.build([u.size for u in units], spec.sparsity, spec.search.step_fraction,
                            spec.search.max_level_delta)


def budget_levels(space: ChoiceSpace, units: Sequence[Unit], vector: Sequence[int]) -> tuple[dict[str, int],
                                                                                             dict[str, int]]:
    """Per linear (weights pruned, bits) of a choice vector: each unit's count split by size, its bits for all."""
    counts = split_counts(units, [c for c, _ in space.counts(vector)])
    bits = {n: b for u, b in zip(units, space.widths(vector), strict=True) for n in u.linears}
    return counts, bits


def budget_uniform(spec: JobSpec, blocks: Sequence[BlockInfo]) -> tuple[dict[str, int], dict[str, int]]:
    """A size budget met by one (sparsity, bits) for every layer: the choice space's uniform vector."""
    units = search_units(blocks, "layer")
    space = search_space(spec, units)
    assert isinstance(space, ChoiceSpace)
    return budget_levels(space, units, space.zero())


def budget_seeds(
    model: nn.Module, calib_tokens: torch.Tensor, spec: JobSpec, units: list[Unit], space: ChoiceSpace,
    sensitivity: dict[str, Any] | None, note: Callable[[str], None] | None, blocks: Sequence[BlockInfo] | None,
) -> list[tuple[int, ...]]:
    """Seeds of a size-budget search: per bit width, the sensitivity seeds at that width's uniform sparsity.

    The width of the uniform baseline comes first; each seed is repaired onto the budget.
    """
    sizes = [u.size for u in units]
    zero = space.zero()
    uniforms = sorted(space.uniform_vectors(), key=lambda v: v != zero)
    seeds: list[tuple[int, ...]] = []
    for v in uniforms:
        choice = space.choices[v[0]]
        if choice.sparsity == 0:  # dense at this width: nothing for a sensitivity to spread
            seeds.append(v)
            continue
        at_width = spec.model_copy(update={"sparsity": choice.sparsity, "bits_per_weight": None})
        for counts in seed_counts(model, calib_tokens, at_width, units, sensitivity, note, blocks):
            seeds.append(space.from_fractions(alloc.fractions(sizes, counts), choice.bits))
    return list(dict.fromkeys(seeds)) or [zero]


def leveldb_mode(spec: JobSpec) -> dict[str, Any]:
    """Level-database arguments the pattern asks for: N:M levels for a mixed pattern."""
    return {"nm_m": spec.mixed.m if spec.mixed is not None else None}


def level_kwargs(spec: JobSpec, units: Sequence[Unit], space: LevelSpace) -> dict[str, Any]:
    """Everything the level database of a job depends on beyond model, pruner and data (the
    coordinator and every scorer build it alike): the N:M mode, and SparseGPT's anchor levels."""
    kwargs = leveldb_mode(spec)
    if spec.pruner == "sparsegpt" and spec.mixed is None and not spec.structured:
        kwargs["anchors"] = linear_anchors(units, space, spec.search.anchor_every)
    return kwargs


def _linear_counts_at(units: Sequence[Unit], space: LevelSpace, levels: Callable[[int], Sequence[int]]
                      ) -> dict[str, list[int]]:
    """Per linear, the counts its unit's ``levels(unit index)`` give it (split by size)."""
    out: dict[str, list[int]] = {}
    for i, u in enumerate(units):
        for level in levels(i):
            parts = alloc.split_proportional(space.base[i] + level * space.step, u.sizes)
            for n, c in zip(u.linears, parts, strict=True):
                out.setdefault(n, []).append(c)
    return out


def linear_anchors(units: Sequence[Unit], space: LevelSpace, every: int) -> dict[str, list[int]]:
    """Per linear, the counts of its unit's coarse levels: every ``every``-th level (0 = the
    target included) and both ends of the unit's range (sorted, distinct)."""
    def coarse(i: int) -> list[int]:
        lo, hi = space.lo[i], space.hi[i]
        return sorted({lo, hi, *(lv for lv in range(lo, hi + 1) if lv % every == 0)})

    return {n: sorted(set(c)) for n, c in _linear_counts_at(units, space, coarse).items()}


def linear_bounds(units: Sequence[Unit], space: LevelSpace) -> dict[str, tuple[int, int]]:
    """Per linear, the fewest and most weights any vector of the space prunes in it.

    Every level of every unit is enumerated: the largest-remainder split is not monotone in its
    total (a part can shrink when the total grows), so the end levels alone would not do.
    """
    every = _linear_counts_at(units, space, lambda i: range(space.lo[i], space.hi[i] + 1))
    return {n: (min(c), max(c)) for n, c in every.items()}


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
    blocks: Sequence[BlockInfo] | None = None,
) -> list[list[int]]:
    """Per-unit prune counts of the seed allocations (fisher / hessian / owl / uniform).

    Fisher and Hessian give one allocation per spread in ``SEED_SPREAD_FACTORS`` (the first at
    ``spec.sensitivity_spread``); OWL and uniform give one. ``sensitivity`` carries what the
    runner's sensitivity stage measured; what is missing is measured here.
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
            scores = sens.fisher_traces(model, calib_tokens, progress=progress, blocks=blocks)
        elif scores is None:
            scores = sens.hessian_traces(model, sens.dense_input_stats(model, calib_tokens, blocks=blocks))
        per_unit = unit_scores(units, scores)
        return [
            alloc.sensitivity_proportional(sizes, spec.sparsity, per_unit, spec.sensitivity_spread * f)
            for f in SEED_SPREAD_FACTORS
        ]
    if source == "owl":
        ratios = sensitivity.get("owl") or sens.owl_ratios(
            model, sens.dense_input_stats(model, calib_tokens, blocks=blocks), spec.owl_m, blocks=blocks)
        per_unit = [ratios[u.block] for u in units]  # OWL ratios are per block
        return [alloc.owl(sizes, spec.sparsity, per_unit, spec.owl_lambda)]
    raise PruningConfigError(f"unknown seed source {source!r}")


# Slopes of the linear depth ramps (ATP) that compete in the first generation, and that the
# ``ramp`` allocation picks from on the calibration KL: sparsity from target - slope (first
# block) to target + slope (last block).
RAMP_SLOPES = (0.0, 0.05, 0.1, 0.15, 0.2)


def ramp_counts(spec: JobSpec, units: Sequence[Unit], slopes: Sequence[float] = RAMP_SLOPES) -> list[list[int]]:
    """Per-unit prune counts of the depth ramps at ``slopes`` (a module unit takes its block's depth)."""
    last = max(u.block for u in units)
    depths = [u.block / last if last else 0.0 for u in units]
    return [alloc.ramp([u.size for u in units], spec.sparsity, depths, s) for s in slopes]


def calibration_split(spec: JobSpec, calib_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(selection windows, validation windows): the last ``search.validation_windows`` are held out."""
    v = spec.search.validation_windows
    n = calib_tokens.shape[0]
    if v >= n:
        raise PruningConfigError(f"search.validation_windows ({v}) must leave calibration windows ({n}) to select on")
    return (calib_tokens[: n - v], calib_tokens[n - v:]) if v else (calib_tokens, None)


def stage_windows(spec: JobSpec, windows: torch.Tensor) -> int:
    """How many of ``windows`` the largest selection stage reads."""
    n, seq_len = windows.shape
    return min(n, -(-max(t for t, _ in parse_selection(spec.search.selection)) // seq_len))


def fitness_windows(spec: JobSpec, calib_tokens: torch.Tensor) -> torch.Tensor:
    """The calibration windows the fitness reads: only as many as the largest stage needs, or with
    fresh windows every whole chunk of that width the selection windows hold."""
    pool, _ = calibration_split(spec, calib_tokens)
    need = stage_windows(spec, pool)
    if spec.search.fresh_windows:
        return pool[: pool.shape[0] // need * need]
    return pool[:need]


def fitness_kwargs(spec: JobSpec, ftokens: torch.Tensor) -> dict[str, Any]:
    """ProxyFitness arguments of a job (the coordinator and every scorer build it alike)."""
    cfg = search_config(spec, ftokens.numel())
    chunk = stage_windows(spec, ftokens) if spec.search.fresh_windows else None
    return {"kind": spec.search.fitness, "window_bounds": [t for t, _ in cfg.stages], "chunk_windows": chunk}


class LevelSource:
    """Where a search gets its level database: built here (this class), or kept between jobs
    (worker/leveldb_store.py keys them by model content, pruner and calibration data)."""

    # ``inputs`` names what the layers were calibrated on ("dense", or level_inputs_key's digest of
    # the allocation a block-by-block prune calibrated them at): databases of other inputs differ.
    def load(self, model: nn.Module, calib: torch.Tensor, pruner: str,  # noqa: ARG002
             inputs: str = "dense", **kwargs: Any) -> LevelDB | None:  # noqa: ARG002
        return None

    def build(self, model: nn.Module, calib: torch.Tensor, pruner: str,
              inputs: str = "dense", **kwargs: Any) -> LevelDB:  # noqa: ARG002
        return LevelDB.build(model, calib, pruner, **kwargs)


def level_inputs_key(counts: Mapping[str, int] | None) -> str:
    """The name of a level database's calibration inputs: "dense", or "pruned-" and a digest of the
    allocation the block-by-block prune that calibrated its layers ran at."""
    if counts is None:
        return "dense"
    text = json.dumps(sorted(counts.items()), separators=(",", ":"))
    return "pruned-" + hashlib.sha256(text.encode()).hexdigest()[:16]


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
    blocks: Sequence[BlockInfo] | None = None,
    dense: DenseWeights | None = None,
    stats: Mapping[str, Any] | None = None,
    levels: LevelSource | None = None,
    scoring: Callable[[ProxyFitness], Any] | None = None,
) -> SearchOutcome:
    """Search the per-unit sparsity for ``spec``; see the module docstring.

    ``sensitivity`` may carry precomputed {"fisher"|"hessian": per-linear traces, "owl": per-block
    ratios}; ``db`` a prebuilt level database for this model and pruner; ``fitness_tokens`` other
    windows for the fitness than the calibration ones (default: the calibration windows);
    ``stats`` dense calibration statistics already collected; ``levels`` where level databases are
    kept between jobs; ``scoring`` wraps the local fitness for distributed scoring.
    """
    if spec.nm is not None:
        raise PruningConfigError("a fixed N:M pattern leaves nothing to search; use 'mixed:M' or '2:4+dense'")
    setup = getattr(hooks, "setup", None) or (lambda message: None)
    timings: dict[str, float] = {}
    blocks = list(blocks) if blocks is not None else find_blocks(model)
    units = search_units(blocks, spec.search.granularity)
    space = search_space(spec, units)
    if spec.structured:  # widths: no block may be pushed past its last KV group and channel
        from evosparse.pruning.structured_leveldb import structured_space

        space = structured_space(spec.sparsity, spec.search.step_fraction, spec.search.max_level_delta, units, blocks)

    t0 = time.perf_counter()
    setup(f"{spec.search.seed_from} seed allocations")
    budget = isinstance(space, ChoiceSpace)
    if budget:
        seeds = budget_seeds(model, calib_tokens, spec, units, space, sensitivity, setup, blocks)
    else:
        seed_list = seed_counts(model, calib_tokens, spec, units, sensitivity, setup, blocks)
        if spec.search.ramp_seeds and spec.mixed is None and not spec.structured:
            seed_list += ramp_counts(spec, units)
        seeds = list(dict.fromkeys(space.from_counts(c) for c in seed_list))
    timings["seed"] = time.perf_counter() - t0

    ftokens = fitness_windows(spec, calib_tokens if fitness_tokens is None else fitness_tokens)
    _, vtokens = calibration_split(spec, calib_tokens if fitness_tokens is None else fitness_tokens)
    cfg = search_config(spec, ftokens.numel(), ftokens)
    t1 = time.perf_counter()
    setup(f"dense reference on {ftokens.shape[0]} windows")
    reference = DenseReference(model, ftokens, blocks)  # before the level database touches any weight
    val_reference = DenseReference(model, vtokens, blocks) if vtokens is not None else None
    timings["dense_reference"] = time.perf_counter() - t1

    t2 = time.perf_counter()
    how = "given"
    if db is None and spec.structured:  # its own database (rankings and Gram matrices), built per job
        from evosparse.pruning.structured_leveldb import StructuredLevelDB

        setup(f"building the structured level database ({spec.pruner})")
        db = StructuredLevelDB.build(model, calib_tokens, spec.pruner,
                                     max_fraction=spec.sparsity + spec.search.max_level_delta)
        how = "built"
    if db is None:
        # With the runner's dense snapshot to restore from, keep only the reachable rank band.
        # (N:M levels touch every group at every N: no band to keep, bounds do not apply.)
        # (Quantized levels overwrite the model's weights: the database must hold every weight itself.)
        banded = dense is not None and spec.mixed is None and not budget
        kwargs: dict[str, Any] = {"blocks": blocks, "dense": dense,
                                  **(leveldb_mode(spec) if budget else level_kwargs(spec, units, space)),
                                  "bounds": linear_bounds(units, space) if banded else None}
        if "anchors" in kwargs:
            kwargs["progress"] = lambda i, n: setup(f"SparseGPT levels: linear {i}/{n}")
        # Calibrated on pruned inputs: at the first seed (e.g. the Fisher spread), near where the search goes.
        calibrated_at = split_counts(units, space.counts(seeds[0])) if spec.search.level_inputs == "pruned" else None
        inputs = level_inputs_key(calibrated_at)
        source = levels or LevelSource()
        db = source.load(model, calib_tokens, spec.pruner, inputs=inputs, **kwargs)
        how = "loaded"
        if db is None:
            if calibrated_at is not None:
                setup("calibrating the level database: a block-by-block prune at the seed allocation")
                stats = pruned_input_stats(model, calib_tokens, spec.pruner, calibrated_at, blocks=blocks,
                                           progress=lambda i, n: setup(f"pruned-input calibration: block {i}/{n}"))
            setup(f"building the level database ({spec.pruner})")
            db = source.build(model, calib_tokens, spec.pruner, stats=stats, inputs=inputs, **kwargs)
            how = "built"
    if budget:  # levels are (count, bits): RTN on top of the pruned level
        from evosparse.pruning.quantlevels import QuantLevelDB

        q = spec.quantize
        assert q is not None
        db = db if isinstance(db, QuantLevelDB) else QuantLevelDB(db, q.group_size, q.symmetric)
    timings["leveldb"] = time.perf_counter() - t2
    if getattr(db, "nm_m", None) != leveldb_mode(spec)["nm_m"]:  # (a structured database has no N:M mode)
        raise PruningConfigError("the level database was built for another pattern than the job's")

    local = ProxyFitness(model, reference, db, units, space, **fitness_kwargs(spec, ftokens))
    fitness = scoring(local) if scoring is not None else local
    validate = None
    if val_reference is not None:
        val = ProxyFitness(model, val_reference, db, units, space, kind=spec.search.fitness, reuse_prefix=False)
        val_tokens = val_reference.tokens.numel()

        def validate(vector: Sequence[int]) -> float:
            return val(vector, val_tokens)

    def progress(record: dict, state: bytes) -> None:
        if hooks is not None:
            hooks.generation(record, state)

    search = EvolutionarySearch(
        space, fitness, cfg, seed_vector=seeds[0], extra_seeds=seeds[1:], progress=progress, state=resume_state,
        validate=validate,
    )
    cancelled = hooks.should_cancel if hooks is not None else None
    reranked: dict[str, Any] = {}
    try:
        result = search.run(should_stop=cancelled)
        if (spec.search.rerank and validate is not None and dense is not None and result.stopped_by != "cancelled"
                and spec.mixed is None and not spec.structured):
            t3 = time.perf_counter()
            setup(f"re-pruning the {spec.search.rerank} best on validation as the job ships them")
            best, reranked = rerank_shipped(model, calib_tokens, spec, db, units, space, search.val_cache, val,
                                            dense, blocks)
            result.best, result.best_val = best, search.val_cache[best]
            timings["rerank"] = time.perf_counter() - t3
    finally:
        close = getattr(fitness, "close", None)
        if close is not None:
            close()
        if dense is not None:
            dense.restore()  # the job prunes the dense model afterwards
        else:
            db.restore()
    if result.stopped_by == "cancelled":
        raise CancelledError("job cancelled during the evolutionary search")
    timings["search"] = result.seconds
    bits: dict[str, int] = {}
    if isinstance(space, ChoiceSpace):
        counts, bits = budget_levels(space, units, result.best)
    else:
        counts = db.linear_counts(units, space.counts(result.best))
    return SearchOutcome(
        counts=counts,
        bits=bits,
        best_bits=space.widths(result.best) if isinstance(space, ChoiceSpace) else [],
        uniform_bits=space.widths(space.zero()) if isinstance(space, ChoiceSpace) else [],
        history=result.history,
        units=[u.name for u in units],
        best_vector=space.fractions(result.best),
        candidates_scored=result.candidates_scored,
        seconds=result.seconds,
        uniform_vector=space.fractions(space.zero()),
        seed_vector=space.fractions(seeds[0]),
        best_levels=list(result.best),
        stopped_by=result.stopped_by,
        best_fitness=result.best_score,
        best_val=result.best_val,
        timings=timings,
        leveldb=how,
        anchor_levels=db.anchor_levels() if isinstance(db, LevelDB) else 0,
        shipped_val=reranked,
        anchor_seconds=getattr(db, "anchor_seconds", 0.0),
    )


def rerank_shipped(
    model: nn.Module,
    calib_tokens: torch.Tensor,
    spec: JobSpec,
    db: LevelDB,
    units: list[Unit],
    space: LevelSpace,
    val_cache: Mapping[tuple[int, ...], float],
    val: ProxyFitness,
    dense: DenseWeights,
    blocks: Sequence[BlockInfo],
) -> tuple[tuple[int, ...], dict[str, Any]]:
    """Score what ships: the ``spec.search.rerank`` best vectors on validation (database levels on
    dense inputs) re-pruned block by block as the prune stage does, scored again on validation;
    the best shipped model wins. Leaves the model dense (the database state is stale after it)."""
    from evosparse.pruning.prune import prune_model

    ranked = sorted(val_cache, key=lambda v: (val_cache[v], v))[: spec.search.rerank]
    shipped: dict[tuple[int, ...], float] = {}
    for v in ranked:
        dense.restore()
        prune_model(model, calib_tokens, spec.pruner, db.linear_counts(units, space.counts(v)), blocks=blocks)
        shipped[v] = val.score_model()
    dense.restore()
    best = min(shipped, key=lambda v: (shipped[v], v))
    return best, {"database": [val_cache[v] for v in ranked], "shipped": [shipped[v] for v in ranked],
                  "chosen": ranked.index(best), "levels": [list(v) for v in ranked]}


def ramp_allocation(
    model: nn.Module,
    calib_tokens: torch.Tensor,
    spec: JobSpec,
    blocks: Sequence[BlockInfo],
    dense: DenseWeights | None = None,
    stats: Mapping[str, Any] | None = None,
) -> tuple[dict[str, int], dict[str, Any]]:
    """The ``ramp`` allocation: per-linear counts of the depth ramp, and what was measured.

    With ``spec.ramp_slope`` the ramp is exact at that slope; otherwise each of ``RAMP_SLOPES`` is
    put on the search's level grid and the one with the lowest proxy KL on the calibration
    windows wins (one level database holding just those levels; the model is dense afterwards).
    """
    units = search_units(blocks, "layer")
    if spec.structured or spec.mixed is not None:
        raise PruningConfigError("allocation 'ramp' is built for unstructured sparsity")
    if spec.ramp_slope is not None:
        counts = ramp_counts(spec, units, [spec.ramp_slope])[0]
        return split_counts(units, counts), {"slope": spec.ramp_slope}
    space = LevelSpace.build([u.size for u in units], spec.sparsity, spec.search.step_fraction,
                             spec.search.max_level_delta)
    vectors = [space.from_counts(c) for c in ramp_counts(spec, units)]
    per_linear = [split_counts(units, space.counts(v)) for v in vectors]
    ftokens = fitness_windows(spec, calib_tokens)
    reference = DenseReference(model, ftokens, blocks)
    kwargs: dict[str, Any] = {"blocks": blocks, "dense": dense, "stats": stats}
    if spec.pruner == "sparsegpt":
        kwargs["anchors"] = {n: [pl[n] for pl in per_linear] for n in per_linear[0]}
    else:
        # From 0 without a dense snapshot: restoring the database then gives the dense model back.
        kwargs["bounds"] = {n: (min(pl[n] for pl in per_linear) if dense is not None else 0,
                                max(pl[n] for pl in per_linear)) for n in per_linear[0]}
    db = LevelDB.build(model, calib_tokens, spec.pruner, **kwargs)
    fitness = ProxyFitness(model, reference, db, units, space, kind=spec.search.fitness)
    try:
        kl = [fitness(v, ftokens.numel()) for v in vectors]
    finally:
        if dense is not None:
            dense.restore()
        else:
            db.restore()
    best = min(range(len(vectors)), key=lambda i: (kl[i], i))
    return per_linear[best], {"slope": RAMP_SLOPES[best], "calibration_kl": dict(zip(map(str, RAMP_SLOPES), kl,
                                                                                     strict=True))}

"""run_job: one pruning job end to end, the same code behind the CLI and the Celery worker.

A job is a short list of named stages over one ``Job`` (the model, its block layout computed
once, one dense snapshot in host memory, the token windows, what each stage found):

    load → data → dense_eval → dense_tasks → sensitivity → allocation → uniform_baseline → prune → eval
    → tasks → export

``sensitivity`` runs when the allocation (or the search's seed) needs it; ``uniform_baseline``
only for the evolutionary allocation (the comparison its report shows); ``dense_tasks`` and
``tasks`` only when the spec asks for lm-eval tasks (``eval_tasks``). The export writes the
checkpoint, an llm-compressor recipe of the allocation, the model card (README.md) and report.json
with its provenance block. Every allocation is one
``Allocator``: a function of the job that returns per-linear prune counts meeting the global
target exactly. The output folder appears only when complete: everything is written to a
temporary sibling folder, renamed to ``out_dir`` at the end and removed if anything fails.
report.json is written once, last.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from evosparse.jobs.spec import JobSpec
from evosparse.pruning.errors import CancelledError, PruningConfigError
from evosparse.pruning.offload import offload_of
from evosparse.pruning.provenance import utc_now
from evosparse.worker.hooks import RunHooks

# Share of overall progress per stage; stages a job skips are dropped and the rest rescaled.
STAGE_WEIGHTS = {
    "load": 2.0,
    "data": 1.0,
    "dense_eval": 6.0,
    "dense_tasks": 6.0,
    "sensitivity": 12.0,
    "allocation": 50.0,
    "uniform_baseline": 20.0,
    "prune": 20.0,
    "eval": 6.0,
    "tasks": 6.0,
    "export": 3.0,
}


class _Progress:
    """Maps (stage, fraction within stage) to overall progress and forwards it to the hooks."""

    def __init__(self, hooks: RunHooks, stages: list[str]):
        self.hooks = hooks
        total = sum(STAGE_WEIGHTS[s] for s in stages)
        self.start: dict[str, float] = {}
        acc = 0.0
        for s in stages:
            self.start[s] = acc / total
            acc += STAGE_WEIGHTS[s]
        self.width = {s: STAGE_WEIGHTS[s] / total for s in stages}
        self.last = 0.0

    def __call__(self, stage: str, within: float, message: str = "") -> None:
        within = min(max(within, 0.0), 1.0)
        # never step back (float sums of stage widths can differ in the last bit)
        self.last = min(1.0, max(self.last, self.start[stage] + self.width[stage] * within))
        self.hooks.stage(stage, self.last, message)

    def counter(self, stage: str, what: str = "block") -> Callable[[int, int], None]:
        """A (done, total) callback for loops inside a stage."""
        return lambda done, total: self(stage, done / total, f"{what} {done}/{total}")

    def check_cancel(self) -> None:
        if self.hooks.should_cancel():
            raise CancelledError("job cancelled")


class _SearchHooks(RunHooks):
    """Forwards to the job's hooks and turns generation records into overall progress."""

    def __init__(self, inner: RunHooks, progress: _Progress, generations: int, time_budget_s: float | None = None):
        self.inner, self.progress, self.generations = inner, progress, max(generations, 1)
        self.time_budget_s = time_budget_s

    def stage(self, name: str, fraction: float, message: str = "") -> None:
        self.inner.stage(name, fraction, message)

    def setup(self, message: str) -> None:
        """Search set-up (level database, seeds, dense reference): the message moves, the bar waits."""
        self.progress("allocation", 0.0, message)

    def generation(self, record: dict, state: bytes) -> None:
        self.inner.generation(record, state)
        gen = int(record.get("generation", 0))
        done = gen / self.generations
        if self.time_budget_s:  # whichever limit comes first ends the search
            done = max(done, float(record.get("seconds", 0.0)) / self.time_budget_s)
        self.progress("allocation", done, f"generation {gen}/{self.generations}, best {record.get('best', 0):.4g}")

    def should_cancel(self) -> bool:
        return self.inner.should_cancel()


@dataclass
class Job:
    """What the stages of one job share; each stage fills in what the next ones read."""

    spec: JobSpec
    hooks: RunHooks
    progress: _Progress
    resume_state: bytes | None = None
    levels: Any = None  # worker.search_stage.LevelSource: level databases kept between jobs
    scoring: Any = None  # wraps the search's fitness for distributed scoring (worker/scoring.py)
    model: Any = None
    tokenizer: Any = None
    blocks: list = field(default_factory=list)  # the block layout, discovered once
    dense: Any = None  # pruning.snapshot.DenseWeights: the one dense copy
    calib: torch.Tensor | None = None
    evalw: torch.Tensor | None = None
    stats: dict | None = None  # dense calibration statistics (one collector pass at most)
    sensitivity: dict[str, Any] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    compression: Any = None  # worker.compress_stage.Compression: N:M plan, quantization, checkpoint dtype/format
    quantized: dict[str, Any] = field(default_factory=dict)  # integer codes per linear (quantize jobs)
    perplexities: dict[str, float] = field(default_factory=dict)
    tasks: dict[str, dict[str, Any]] = field(default_factory=dict)  # lm-eval results: task -> {dense, pruned}
    report: dict[str, Any] = field(default_factory=dict)
    started_at: str = ""
    source: dict[str, Any] = field(default_factory=dict)  # provenance.source_info of the model loaded
    compute: dict[str, Any] = field(default_factory=dict)  # device and dtype the job runs in
    environment: dict[str, Any] = field(default_factory=dict)  # provenance.environment: versions, commit
    linear_sizes: dict[str, int] = field(default_factory=dict)  # weights per prunable linear, dense

    @property
    def evolutionary(self) -> bool:
        return self.spec.allocation == "evolutionary"

    def needs(self) -> set[str]:
        """The sensitivity measures this job's allocation (or its search's seed) reads."""
        source = self.spec.search.seed_from if self.evolutionary else self.spec.allocation
        return {"fisher": {"fisher"}, "hessian": {"hessian"}, "owl": {"owl"}}.get(source, set())


# ---------------------------------------------------------------------------------------- stages
def load(job: Job) -> None:
    from evosparse.pruning import provenance
    from evosparse.pruning.layers import find_blocks, weight_matrix
    from evosparse.pruning.loading import load_model
    from evosparse.pruning.snapshot import DenseWeights
    from evosparse.worker.compress_stage import Compression

    job.model, job.tokenizer = load_model(job.spec.model, device=job.spec.device, dtype=job.spec.dtype)
    # Where the weights ran: a model larger than its device keeps its blocks in host memory.
    job.report["blocks_offloaded"] = offload_of(job.model) is not None
    job.compression = Compression.prepare(job.spec, job.model)  # shape checks before any expensive stage
    job.blocks = find_blocks(job.model)
    job.compute = provenance.compute(job.model)
    job.source = provenance.source_info(job.spec.model, job.model)
    job.environment = provenance.environment()
    job.linear_sizes = {n: weight_matrix(m).numel() for b in job.blocks for n, m in b.linears.items()}
    if job.spec.structured:  # a target that needs every head of a layer removed fails now, before any work
        from evosparse.pruning.sensitivity import allocation_counts
        from evosparse.pruning.structured import check_structured

        check_structured(job.model, allocation_counts(job.model, "uniform", job.spec.sparsity, blocks=job.blocks))
    job.dense = DenseWeights(job.blocks)


def data(job: Job) -> None:
    from evosparse.pruning.data import get_windows

    s = job.spec
    job.calib = get_windows(s.calib, job.tokenizer, s.calib_windows, s.seq_len, "calib", s.seed)
    job.evalw = get_windows(s.eval, job.tokenizer, s.eval_windows, s.seq_len, "eval", s.seed)


def dense_eval(job: Job) -> None:
    from evosparse.pruning.evaluate import perplexity

    job.perplexities["dense"] = perplexity(job.model, job.evalw, progress=job.progress.counter("dense_eval", "batch"))


def _run_tasks(job: Job, which: str) -> None:
    from evosparse.pruning.lmeval import run_tasks

    s = job.spec
    results = run_tasks(job.model, job.tokenizer, list(s.eval_tasks), limit=s.eval_tasks_limit, seed=s.seed)
    for task, metrics in results.items():
        job.tasks.setdefault(task, {"samples": metrics.pop("samples"), "num_fewshot": metrics.pop("num_fewshot")})
        job.tasks[task][which] = metrics


def dense_tasks(job: Job) -> None:
    _run_tasks(job, "dense")


def sensitivity(job: Job) -> None:
    from evosparse.pruning import sensitivity as sens

    needs = job.needs()
    if "fisher" in needs and offload_of(job.model) is not None:
        # Gradients would keep every block's device copy alive: the model would have to fit after all.
        raise PruningConfigError("the model is larger than the device, so its blocks are offloaded and the "
                                 "Fisher sensitivity (gradients) cannot run; use seed_from / allocation "
                                 "hessian, owl or uniform")
    if "fisher" in needs:
        job.sensitivity["fisher"] = sens.fisher_traces(job.model, job.calib, blocks=job.blocks,
                                                       progress=job.progress.counter("sensitivity", "window"))
    if needs & {"hessian", "owl"}:
        # One pass of the collector; with SparseGPT levels to build it gathers their Hessians too.
        hessian = job.evolutionary and job.spec.pruner == "sparsegpt"
        job.stats = sens.dense_input_stats(job.model, job.calib, blocks=job.blocks, hessian=hessian,
                                           progress=job.progress.counter("sensitivity"))
        if "owl" in needs:
            job.sensitivity["owl"] = sens.owl_ratios(job.model, job.stats, job.spec.owl_m, blocks=job.blocks)
        else:
            job.sensitivity["hessian"] = sens.hessian_traces(job.model, job.stats)
    # Per-block figures for the report (OWL ratios already are per block).
    job.report["sensitivity"] = {
        k: (v if k == "owl" else sens.block_scores(job.blocks, v)) for k, v in job.sensitivity.items()
    }


Allocator = Callable[[Job], dict[str, int]]


def _baseline(kind: str) -> Allocator:
    def allocate(job: Job) -> dict[str, int]:
        from evosparse.pruning.sensitivity import allocation_counts

        s = job.spec
        return allocation_counts(job.model, kind, s.sparsity, owl_lambda=s.owl_lambda, spread=s.sensitivity_spread,
                                 blocks=job.blocks, **{k: v for k, v in job.sensitivity.items() if k == kind})
    return allocate


def _evolutionary(job: Job) -> dict[str, int]:
    from evosparse.worker.search_stage import run_search

    s = job.spec
    budget = s.search.time_budget_min * 60 if s.search.time_budget_min is not None else None
    hooks = _SearchHooks(job.hooks, job.progress, s.search.generations, budget)
    outcome = run_search(job.model, job.calib, s, hooks, job.resume_state, sensitivity=job.sensitivity,
                         blocks=job.blocks, dense=job.dense, stats=job.stats, levels=job.levels,
                         scoring=job.scoring)
    job.stats = None  # the level database was the last reader
    job.report["search"] = {
        "history": list(outcome.history),
        "units": list(outcome.units),
        "best_vector": list(outcome.best_vector),
        "uniform_vector": list(outcome.uniform_vector),
        "candidates_scored": outcome.candidates_scored,
        "seconds": outcome.seconds,
        "stopped_by": outcome.stopped_by,
        "leveldb": outcome.leveldb,
        "setup_seconds": {k: round(v, 3) for k, v in outcome.timings.items() if k != "search"},
        "best_fitness": outcome.best_fitness,
        "best_val": outcome.best_val,
        "anchor_levels": outcome.anchor_levels,
        "anchor_seconds": round(outcome.anchor_seconds, 3),
        "shipped_val": outcome.shipped_val,
    }
    if outcome.bits:  # a size budget: each layer's bits come with its count
        job.compression.widths = dict(outcome.bits)
        job.report["search"].update(best_bits=list(outcome.best_bits), uniform_bits=list(outcome.uniform_bits))
    return dict(outcome.counts)


def _ramp(job: Job) -> dict[str, int]:
    from evosparse.worker.search_stage import ramp_allocation

    counts, job.report["ramp"] = ramp_allocation(job.model, job.calib, job.spec, job.blocks, job.dense, job.stats)
    return counts


ALLOCATORS: dict[str, Allocator] = {
    "uniform": _baseline("uniform"),
    "owl": _baseline("owl"),
    "fisher": _baseline("fisher"),
    "hessian": _baseline("hessian"),
    "ramp": _ramp,
    "evolutionary": _evolutionary,
}


def allocation(job: Job) -> None:
    from evosparse.pruning.sensitivity import nm_counts

    if job.spec.nm is not None:  # N:M fixes every layer's count; the spec allows only uniform with it
        job.counts = nm_counts(job.model, job.spec.nm, blocks=job.blocks)
        return
    if job.spec.bits_per_weight is not None and not job.evolutionary:  # one (sparsity, bits) for every layer
        from evosparse.worker.search_stage import budget_uniform

        job.counts, job.compression.widths = budget_uniform(job.spec, job.blocks)
        return
    if job.spec.allocation not in ALLOCATORS:
        raise PruningConfigError(f"unknown allocation {job.spec.allocation!r}")
    job.counts = ALLOCATORS[job.spec.allocation](job)


def uniform_baseline(job: Job) -> None:
    from evosparse.pruning.evaluate import perplexity
    from evosparse.pruning.prune import prune_model

    widths = None
    if job.spec.bits_per_weight is not None:  # the same budget met by one (sparsity, bits) for every layer
        from evosparse.worker.search_stage import budget_uniform

        counts, widths = budget_uniform(job.spec, job.blocks)
    else:
        counts = ALLOCATORS["uniform"](job)
    if job.spec.structured:
        # Structured pruning changes the shapes: the baseline runs on a copy instead of being undone.
        import copy

        from evosparse.pruning.structured import prune_structured

        base = copy.deepcopy(job.model)
        prune_structured(base, job.calib, job.spec.pruner, counts, progress=job.progress.counter("uniform_baseline"),
                         should_cancel=job.hooks.should_cancel)
        job.perplexities["uniform"] = perplexity(base, job.evalw)
        return
    plan = job.compression.plan(job.model, counts)
    prune_model(job.model, job.calib, job.spec.pruner, plan.counts, plan.patterns, blocks=job.blocks,
                progress=job.progress.counter("uniform_baseline"), should_cancel=job.hooks.should_cancel,
                **job.compression.prune_kwargs(widths))
    with job.compression.finished(job.model, job.calib):  # like for like with the final model
        job.perplexities["uniform"] = perplexity(job.model, job.evalw)
    job.dense.restore()


def prune(job: Job) -> None:
    from evosparse.pruning.prune import prune_model

    if job.spec.structured:
        from evosparse.pruning.structured import prune_structured

        prune_structured(job.model, job.calib, job.spec.pruner, job.counts, progress=job.progress.counter("prune"),
                         should_cancel=job.hooks.should_cancel)
    else:
        plan = job.compression.plan(job.model, job.counts)  # mixed N:M: the per-layer patterns
        job.quantized = prune_model(job.model, job.calib, job.spec.pruner, plan.counts, plan.patterns,
                                    blocks=job.blocks, progress=job.progress.counter("prune"),
                                    should_cancel=job.hooks.should_cancel, **job.compression.prune_kwargs())
        # After the linears: their calibration passes run on the source embeddings, as in the search;
        # the head's GPTQ then sees the pruned model's final hidden states.
        job.quantized.update(job.compression.finish(job.model, job.calib))
        job.report["layer_pattern"] = plan.layer_pattern
    job.dense = None  # nothing restores the dense model after this: free the snapshot


def evaluate(job: Job) -> None:
    from evosparse.pruning.evaluate import perplexity

    job.perplexities["pruned"] = perplexity(job.model, job.evalw, progress=job.progress.counter("eval", "batch"))


def tasks(job: Job) -> None:
    _run_tasks(job, "pruned")


@dataclass(frozen=True)
class Stage:
    name: str
    run: Callable[[Job], None]
    when: Callable[[Job], bool] = lambda job: True


STAGES: tuple[Stage, ...] = (
    Stage("load", load),
    Stage("data", data),
    Stage("dense_eval", dense_eval),
    Stage("dense_tasks", dense_tasks, when=lambda job: bool(job.spec.eval_tasks)),
    Stage("sensitivity", sensitivity, when=lambda job: bool(job.needs())),
    Stage("allocation", allocation),
    Stage("uniform_baseline", uniform_baseline, when=lambda job: job.evolutionary),
    Stage("prune", prune),
    Stage("eval", evaluate),
    Stage("tasks", tasks, when=lambda job: bool(job.spec.eval_tasks)),
)  # then "export", which writes the folder (below)


# ---------------------------------------------------------------------------------------- output
def _check_out_dir(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists():
        if not out_dir.is_dir():
            raise PruningConfigError(f"output path {out_dir} exists and is not a folder")
        if any(out_dir.iterdir()) and not overwrite:
            raise PruningConfigError(f"output folder {out_dir} exists and is not empty (use --overwrite to replace it)")


@contextmanager
def _atomic_folder(out_dir: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces ``out_dir``, on failure it vanishes."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        yield tmp
        _check_out_dir(out_dir, overwrite)  # it may have appeared meanwhile
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _file_metadata(job: Job) -> dict[str, str]:
    """What the safetensors headers say about the file: who wrote it, from what, how."""
    import json

    git = job.environment.get("git") or {}
    s = job.spec
    return {"evosparse.version": job.environment["versions"]["evosparse"],
            "evosparse.commit": git.get("commit", ""),
            "evosparse.source": str(job.source.get("name", s.model)),
            "evosparse.source_sha256": json.dumps(job.source.get("sha256") or {}, sort_keys=True),
            "evosparse.pruner": s.pruner, "evosparse.allocation": s.allocation, "evosparse.pattern": s.pattern,
            "evosparse.sparsity_target": repr(s.sparsity), "evosparse.started_at": job.started_at}


def _block_sparsity(job: Job, layer_sparsity: dict[str, float]) -> list[float]:
    """Per decoder block: zero (or removed) weights over the dense block's weights, from the per-linear figures."""
    out = []
    for b in job.blocks:
        sizes = {n: job.linear_sizes[n] for n in b.linears}
        out.append(sum(layer_sparsity[n] * k for n, k in sizes.items()) / sum(sizes.values()))
    return out


def _export(job: Job, folder: Path, timings: dict[str, float], t_job: float) -> dict[str, Any]:
    """Weights and tokenizer first; then the recipe and the model card; report.json once, last."""
    from evosparse.cli.spec_flags import spec_command
    from evosparse.pruning import provenance
    from evosparse.pruning.export import save_checkpoint, write_report
    from evosparse.pruning.lmeval import lm_eval_version
    from evosparse.pruning.recipe import write_recipe
    from evosparse.worker.model_card import write_card

    t0 = time.perf_counter()
    job.progress("export", 0.0)
    metadata = _file_metadata(job)
    if job.spec.structured:  # smaller shapes: sparsity is measured as weights removed, not zeros
        from evosparse.pruning.structured_export import save_structured

        job.model.to(job.compression.dtype)  # the source dtype here too (export is the model's last use)
        measured = save_structured(job.model, job.tokenizer, folder, metadata=metadata)
    else:
        measured = save_checkpoint(job.model, job.tokenizer, folder, [n for b in job.blocks for n in b.linears],
                                   metadata=metadata, **job.compression.export_kwargs(job.quantized))
    s = job.spec
    report = dict(job.report)
    report.update({
        "model": s.model,
        "pruner": s.pruner,
        "allocation": s.allocation,
        "pattern": s.pattern,
        "sparsity_target": s.sparsity,  # None for a size budget (bits_per_weight_target below)
        "seed": s.seed,
        "perplexity": dict(job.perplexities),
        "eval_tokens": int(job.evalw.numel()),
        "calib_tokens": int(job.calib.numel()),
        "spec": s.model_dump(mode="json"),
        **job.compression.report(job.counts, job.blocks),
        **measured,
    })
    report["block_sparsity"] = _block_sparsity(job, measured["layer_sparsity"])
    report["command"] = spec_command(s)
    if job.tasks:
        report["lm_eval"] = {"version": lm_eval_version(), "limit": s.eval_tasks_limit, "results": job.tasks}
    report["provenance"] = {
        "schema_version": provenance.SCHEMA_VERSION,
        "source": job.source,
        "environment": job.environment,
        "compute": job.compute,
        "started_at": job.started_at,
        "finished_at": None,
        "stop_reason": (report.get("search") or {}).get("stopped_by"),
    }
    report["llmcompressor_recipe"] = write_recipe(folder, report)
    timings["export"] = round(time.perf_counter() - t0, 3)
    timings["total"] = round(time.perf_counter() - t_job, 3)
    report["timings"] = timings
    report["provenance"]["finished_at"] = provenance.utc_now()
    write_card(folder, report)
    write_report(folder, report)
    job.progress("export", 1.0)
    return report


def run_job(
    spec: JobSpec,
    out_dir: str | Path,
    hooks: RunHooks | None = None,
    resume_state: bytes | None = None,
    overwrite: bool = False,
    *,
    levels: Any = None,
    scoring: Any = None,
) -> dict[str, Any]:
    """Run one job; returns the report dict (also written to ``out_dir/report.json``).

    ``levels`` (a search_stage.LevelSource) keeps level databases between jobs; ``scoring`` fans
    the search's candidates out to scoring workers. Neither changes the result.
    """
    hooks = hooks or RunHooks()
    out_dir = Path(out_dir)
    _check_out_dir(out_dir, overwrite)
    job = Job(spec=spec, hooks=hooks, progress=_Progress(hooks, []), resume_state=resume_state,
              levels=levels, scoring=scoring)
    stages = [st for st in STAGES if st.when(job)]
    job.progress = _Progress(hooks, [st.name for st in stages] + ["export"])
    timings: dict[str, float] = {}
    t_job = time.perf_counter()
    job.started_at = utc_now()
    torch.manual_seed(spec.seed)
    for st in stages:
        job.progress.check_cancel()
        job.progress(st.name, 0.0)
        t0 = time.perf_counter()
        st.run(job)
        timings[st.name] = round(time.perf_counter() - t0, 3)
        job.progress(st.name, 1.0)
    job.progress.check_cancel()
    with _atomic_folder(out_dir, overwrite) as tmp:
        return _export(job, tmp, timings, t_job)

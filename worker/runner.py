"""run_job: one pruning job end to end, the same code behind the CLI and the Celery worker.

load model -> token windows -> dense perplexity -> (sensitivity) -> allocation counts -> prune
block by block -> pruned perplexity -> export checkpoint + report.json.

The output folder appears only when complete: everything is written to a temporary sibling
folder that is renamed to ``out_dir`` at the end, and removed if anything fails.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from evosparse.jobs.spec import JobSpec
from evosparse.pruning.errors import CancelledError, PruningConfigError
from evosparse.worker.compress_stage import Compression

# Share of overall progress per stage; stages a job skips are dropped and the rest rescaled.
_STAGE_WEIGHTS = {
    "load": 2.0,
    "data": 1.0,
    "dense_eval": 6.0,
    "sensitivity": 12.0,
    "search": 50.0,
    "uniform_baseline": 20.0,
    "prune": 20.0,
    "eval": 6.0,
    "export": 3.0,
}


class RunHooks:
    """Callbacks of a running job; the defaults do nothing. The service and the CLI subclass it."""

    def stage(self, name: str, fraction: float, message: str = "") -> None:
        """Overall progress 0..1, with the current stage's name and a short message."""

    def generation(self, record: dict, state: bytes) -> None:
        """After each search generation: its record and the serialised search state."""

    def should_cancel(self) -> bool:
        """Checked between blocks and generations; True makes the job raise CancelledError."""
        return False


class _Progress:
    """Maps (stage, fraction within stage) to overall progress and forwards it to the hooks."""

    def __init__(self, hooks: RunHooks, stages: list[str]):
        self.hooks = hooks
        total = sum(_STAGE_WEIGHTS[s] for s in stages)
        self.start: dict[str, float] = {}
        acc = 0.0
        for s in stages:
            self.start[s] = acc / total
            acc += _STAGE_WEIGHTS[s]
        self.width = {s: _STAGE_WEIGHTS[s] / total for s in stages}
        self.last = 0.0

    def __call__(self, stage: str, within: float, message: str = "") -> None:
        within = min(max(within, 0.0), 1.0)
        # never step back (float sums of stage widths can differ in the last bit)
        self.last = min(1.0, max(self.last, self.start[stage] + self.width[stage] * within))
        self.hooks.stage(stage, self.last, message)

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
        """Search set-up (level database, sensitivity, dense reference): the message moves, the bar waits."""
        self.progress("search", 0.0, message)

    def generation(self, record: dict, state: bytes) -> None:
        self.inner.generation(record, state)
        gen = int(record.get("generation", 0))
        done = gen / self.generations
        if self.time_budget_s:  # whichever limit comes first ends the search
            done = max(done, float(record.get("seconds", 0.0)) / self.time_budget_s)
        self.progress("search", done, f"generation {gen}/{self.generations}, best {record.get('best', 0):.4g}")

    def should_cancel(self) -> bool:
        return self.inner.should_cancel()


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


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    from evosparse.pruning.layers import prunable_linears

    return {n: m.weight.detach().clone() for n, m in prunable_linears(model).items()}


@torch.no_grad()
def _restore(model: torch.nn.Module, snap: dict[str, torch.Tensor]) -> None:
    from evosparse.pruning.layers import prunable_linears

    for n, m in prunable_linears(model).items():
        m.weight.copy_(snap[n])


def run_job(
    spec: JobSpec,
    out_dir: str | Path,
    hooks: RunHooks | None = None,
    resume_state: bytes | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Run one job; returns the report dict (also written to ``out_dir/report.json``)."""
    from evosparse.pruning.data import get_windows
    from evosparse.pruning.evaluate import perplexity
    from evosparse.pruning.export import export_checkpoint, write_report
    from evosparse.pruning.layers import find_blocks
    from evosparse.pruning.models import load_model
    from evosparse.pruning.prune import prune_model
    from evosparse.pruning.sensitivity import (
        allocation_counts,
        block_scores,
        dense_input_stats,
        fisher_traces,
        hessian_traces,
        nm_counts,
        owl_ratios,
    )

    hooks = hooks or RunHooks()
    out_dir = Path(out_dir)
    _check_out_dir(out_dir, overwrite)
    nm = spec.nm
    evolutionary = spec.allocation == "evolutionary"
    needs_sensitivity = spec.allocation in ("owl", "fisher", "hessian")
    stages = ["load", "data", "dense_eval"]
    stages += ["sensitivity"] if needs_sensitivity else []
    stages += ["search", "uniform_baseline"] if evolutionary else []
    stages += ["prune", "eval", "export"]
    progress = _Progress(hooks, stages)
    timings: dict[str, float] = {}
    t_job = time.perf_counter()

    @contextmanager
    def timed(stage: str) -> Iterator[None]:
        progress.check_cancel()
        progress(stage, 0.0)
        t0 = time.perf_counter()
        yield
        timings[stage] = round(time.perf_counter() - t0, 3)
        progress(stage, 1.0)

    def block_progress(stage: str, what: str = "block"):
        def cb(done: int, total: int) -> None:
            progress(stage, done / total, f"{what} {done}/{total}")
        return cb

    torch.manual_seed(spec.seed)
    with timed("load"):
        model, tokenizer = load_model(spec.model, device=spec.device, dtype=spec.dtype)
        compression = Compression.prepare(spec, model)  # shape checks before any expensive stage
    with timed("data"):
        calib = get_windows(spec.calib, tokenizer, spec.calib_windows, spec.seq_len, "calib", spec.seed)
        evalw = get_windows(spec.eval, tokenizer, spec.eval_windows, spec.seq_len, "eval", spec.seed)
    with timed("dense_eval"):
        dense_ppl = perplexity(model, evalw, progress=block_progress("dense_eval", "batch"))

    report: dict[str, Any] = {}
    if needs_sensitivity:
        with timed("sensitivity"):
            kwargs: dict[str, Any] = {}
            if spec.allocation == "fisher":
                kwargs["fisher"] = fisher_traces(model, calib, progress=block_progress("sensitivity", "window"))
            else:
                stats = dense_input_stats(model, calib, progress=block_progress("sensitivity"))
                if spec.allocation == "owl":
                    kwargs["owl"] = owl_ratios(model, stats, spec.owl_m)
                else:
                    kwargs["hessian"] = hessian_traces(model, stats)
                del stats
            # Per-block figures for the report (OWL ratios already are per block).
            report["sensitivity"] = {
                k: (v if k == "owl" else block_scores(find_blocks(model), v)) for k, v in kwargs.items()
            }
            counts = allocation_counts(model, spec.allocation, spec.sparsity, owl_lambda=spec.owl_lambda,
                                       spread=spec.sensitivity_spread, **kwargs)
    elif nm is not None:
        counts = nm_counts(model, nm)
    elif not evolutionary:
        counts = allocation_counts(model, "uniform", spec.sparsity)

    perplexities: dict[str, float] = {"dense": dense_ppl}
    if evolutionary:
        try:
            from evosparse.worker.search_stage import run_search
        except ImportError as exc:
            raise PruningConfigError("allocation 'evolutionary' is not available in this build yet") from exc
        dense = _snapshot(model)
        with timed("search"):
            budget = spec.search.time_budget_min * 60 if spec.search.time_budget_min is not None else None
            search_hooks = _SearchHooks(hooks, progress, spec.search.generations, budget)
            outcome = run_search(model, calib, spec, search_hooks, resume_state)
        _restore(model, dense)
        counts = dict(outcome.counts)
        with timed("uniform_baseline"):
            base = compression.plan(model, allocation_counts(model, "uniform", spec.sparsity))
            prune_model(model, calib, spec.pruner, base.counts, base.patterns,
                        progress=block_progress("uniform_baseline"), should_cancel=hooks.should_cancel,
                        quant=compression.quant, scale_dtype=compression.dtype)
            perplexities["uniform"] = perplexity(model, evalw)
        _restore(model, dense)
        del dense
        units = list(outcome.units)
        report["search"] = {
            "history": list(outcome.history),
            "units": units,
            "best_vector": list(outcome.best_vector),
            "uniform_vector": list(getattr(outcome, "uniform_vector", [spec.sparsity] * len(units))),
            "candidates_scored": outcome.candidates_scored,
            "seconds": outcome.seconds,
        }

    with timed("prune"):
        plan = compression.plan(model, counts)
        quantized = prune_model(model, calib, spec.pruner, plan.counts, plan.patterns, progress=block_progress("prune"),
                                should_cancel=hooks.should_cancel, quant=compression.quant,
                                scale_dtype=compression.dtype)
    with timed("eval"):
        perplexities["pruned"] = perplexity(model, evalw, progress=block_progress("eval", "batch"))

    report.update({
        "model": spec.model,
        "pruner": spec.pruner,
        "allocation": spec.allocation,
        "pattern": spec.pattern,
        "sparsity_target": spec.sparsity,
        "seed": spec.seed,
        "perplexity": perplexities,
        "eval_tokens": int(evalw.numel()),
        "calib_tokens": int(calib.numel()),
        "spec": spec.model_dump(mode="json"),
        "layer_pattern": plan.layer_pattern,
        **compression.report(),
    })
    with timed("export"), _atomic_folder(out_dir, overwrite) as tmp:
        timings["total"] = round(time.perf_counter() - t_job, 3)
        report["timings"] = timings
        report = export_checkpoint(model, tokenizer, tmp, report, **compression.export_kwargs(quantized))
    # The export time is known only now; rewrite the small report file in place.
    report["timings"] = dict(timings, total=round(time.perf_counter() - t_job, 3))
    write_report(out_dir, report)
    return report

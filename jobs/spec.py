"""The job specification: one pydantic model shared by the REST API, the worker and the CLI.

Everything a pruning job needs to be reproduced is here; the worker never reads settings that
are not in the spec, so a job resubmitted with the same spec gives the same result.
"""

from __future__ import annotations

import math
import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

PRUNERS = ("magnitude", "wanda", "sparsegpt", "dass")
ALLOCATIONS = ("uniform", "owl", "fisher", "hessian", "evolutionary")
SEED_SOURCES = ("fisher", "hessian", "owl", "uniform")

Pruner = Literal["magnitude", "wanda", "sparsegpt", "dass"]
Allocation = Literal["uniform", "owl", "fisher", "hessian", "evolutionary"]

_NM_RE = re.compile(r"^(\d+):(\d+)$")
_SELECTION_RE = re.compile(r"^\d+:\d+(,\d+:\d+)*$")


def parse_pattern(pattern: str) -> tuple[int, int] | None:
    """Return (N, M) for an N:M pattern, None for unstructured; raise ValueError otherwise."""
    if pattern == "unstructured":
        return None
    m = _NM_RE.match(pattern)
    if not m:
        raise ValueError(f"pattern must be 'unstructured' or 'N:M' (e.g. 2:4), got {pattern!r}")
    n, mm = int(m.group(1)), int(m.group(2))
    if not (0 < n < mm <= 32):
        raise ValueError(f"N:M pattern needs 0 < N < M <= 32, got {pattern!r}")
    return n, mm


def parse_selection(spec: str) -> list[tuple[int, int]]:
    """Parse 'tokens:survivors,...' (e.g. '512:16,2048:4,8192:1') into stages of growing fidelity."""
    spec = spec.replace(" ", "")
    if not _SELECTION_RE.match(spec):
        raise ValueError(f"selection must look like '512:16,2048:4,8192:1', got {spec!r}")
    stages = [(int(t), int(k)) for t, k in (part.split(":") for part in spec.split(","))]
    for (t0, k0), (t1, k1) in zip(stages, stages[1:], strict=False):
        if t1 < t0 or k1 > k0:
            raise ValueError("selection stages must use growing token counts and shrinking survivors")
    if any(t <= 0 or k <= 0 for t, k in stages):
        raise ValueError("selection token counts and survivors must be positive")
    return stages


class SearchSettings(BaseModel):
    """Settings of the evolutionary search (used when allocation == 'evolutionary')."""

    model_config = ConfigDict(extra="forbid")

    # Defaults sized for SmolLM2-135M on a 2-core CPU (bench/bench_search.py): many cheap
    # generations on few tokens beat few expensive ones; the time budget caps the run.
    generations: int = Field(60, ge=1, le=100_000)
    offspring: int = Field(8, ge=1, le=4096)
    selection: str = "256:2,1024:1"
    seed_from: Literal["fisher", "hessian", "owl", "uniform"] = "fisher"
    granularity: Literal["layer", "module"] = "layer"
    fitness: Literal["kl", "ppl"] = "kl"
    time_budget_min: float | None = Field(15.0, gt=0)
    patience: int | None = Field(None, ge=1)
    # One level step moves this fraction of the smallest unit's weights (same count in every unit).
    step_fraction: float = Field(0.02, gt=0, lt=0.5)
    max_level_delta: float = Field(0.25, gt=0, lt=1)  # per-unit sparsity stays within target ± this
    # Processes scoring this job's candidates, its own included (1: in-process). With more, each
    # selection stage is fanned out to scoring workers (worker/scoring.py); the result is the same.
    workers: int = Field(1, ge=1, le=1024)

    @field_validator("selection")
    @classmethod
    def _check_selection(cls, v: str) -> str:
        parse_selection(v)
        return v.replace(" ", "")


class JobSpec(BaseModel):
    """One pruning job: which model, how sparse, which pruner, how sparsity is allocated."""

    model_config = ConfigDict(extra="forbid")

    model: str = "smollm2-135m"
    sparsity: float
    pruner: Pruner = "wanda"
    allocation: Allocation = "uniform"
    pattern: str = "unstructured"
    calib: str = "pydoc"
    eval: str = "pydoc"
    calib_windows: int = Field(32, ge=1, le=4096)
    eval_windows: int = Field(32, ge=1, le=4096)
    seq_len: int = Field(256, ge=8, le=8192)
    seed: int = Field(0, ge=0, le=2**31 - 1)
    owl_m: float = Field(5.0, gt=0)
    owl_lambda: float = Field(0.08, ge=0, lt=1)
    sensitivity_spread: float = Field(0.1, ge=0, lt=1)  # ± around the target for fisher/hessian
    search: SearchSettings = Field(default_factory=SearchSettings)
    device: str = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"

    @field_validator("sparsity")
    @classmethod
    def _check_sparsity(cls, v: float) -> float:
        if not math.isfinite(v) or not (0.0 < v < 1.0):
            raise ValueError("sparsity must be a finite number strictly between 0 and 1")
        return v

    @field_validator("pattern")
    @classmethod
    def _check_pattern(cls, v: str) -> str:
        parse_pattern(v)
        return v

    @model_validator(mode="after")
    def _check_pattern_vs_sparsity(self) -> JobSpec:
        nm = parse_pattern(self.pattern)
        if nm is None:
            return self
        # An N:M pattern fixes every pruned layer at 1 - N/M; mixing patterns per layer is not built yet.
        if self.allocation != "uniform":
            raise ValueError("N:M patterns currently support only allocation 'uniform'")
        implied = 1.0 - nm[0] / nm[1]
        if abs(self.sparsity - implied) > 1e-6:
            raise ValueError(f"pattern {self.pattern} means sparsity {implied:g}, but sparsity is {self.sparsity:g}")
        return self

    @property
    def nm(self) -> tuple[int, int] | None:
        return parse_pattern(self.pattern)

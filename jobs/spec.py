"""The job specification: one pydantic model shared by the REST API, the worker and the CLI.

Everything a pruning job needs to be reproduced is here; the worker never reads settings that
are not in the spec, so a job resubmitted with the same spec gives the same result.
"""

from __future__ import annotations

import math
import re
from typing import Literal, get_args

from evosparse.search import defaults as search_defaults
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Pruner = Literal["magnitude", "wanda", "sparsegpt", "dass", "goa"]
# Pruners that remove whole attention heads and MLP channels (pattern "structured").
STRUCTURED_PRUNERS = ("goa", "magnitude")
Allocation = Literal["uniform", "owl", "fisher", "hessian", "evolutionary"]
SeedSource = Literal["fisher", "hessian", "owl", "uniform"]
PRUNERS: tuple[str, ...] = get_args(Pruner)
ALLOCATIONS: tuple[str, ...] = get_args(Allocation)
SEED_SOURCES: tuple[str, ...] = get_args(SeedSource)

_NM_RE = re.compile(r"^(\d+):(\d+)$")
_SELECTION_RE = re.compile(r"^\d+:\d+(,\d+:\d+)*$")


def parse_pattern(pattern: str) -> tuple[int, int] | None:
    """Return (N, M) for an N:M pattern, None for unstructured or structured; raise ValueError otherwise."""
    if pattern in ("unstructured", "structured"):
        return None
    m = _NM_RE.match(pattern)
    if not m:
        raise ValueError(f"pattern must be 'unstructured', 'structured' or 'N:M' (e.g. 2:4), got {pattern!r}")
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


# Non-finite numbers are refused everywhere (1e999 parses as inf; JSON cannot carry it back out).
_STRICT = ConfigDict(extra="forbid", allow_inf_nan=False)
DEVICE_PATTERN = r"^(auto|cpu|mps|cuda(:([0-9]|1[0-5]))?)$"


class SearchSettings(BaseModel):
    """Settings of the evolutionary search (used when allocation == 'evolutionary')."""

    model_config = _STRICT

    # The defaults are the search's own (search/defaults.py): a job and a search built in code agree.
    generations: int = Field(search_defaults.GENERATIONS, ge=1, le=100_000,
                             description="generations of the evolutionary loop")
    offspring: int = Field(search_defaults.OFFSPRING, ge=1, le=4096,
                           description="children bred per generation")
    selection: str = Field(search_defaults.format_stages(search_defaults.STAGES), max_length=200, description=(
        "multi-fidelity stages tokens:survivors, growing tokens and shrinking survivors, e.g. 512:16,2048:4,8192:1"))
    seed_from: SeedSource = Field("fisher", description="allocation the first population is seeded from")
    granularity: Literal["layer", "module"] = Field(
        "layer", description="one sparsity level per block (layer) or per linear (module)")
    fitness: Literal["kl", "ppl"] = Field(
        "kl", description="kl: divergence from the dense next-token distribution; ppl: perplexity")
    time_budget_min: float | None = Field(
        None if search_defaults.TIME_BUDGET_S is None else search_defaults.TIME_BUDGET_S / 60, gt=0,
        description="stop the search after this many minutes")
    patience: int | None = Field(search_defaults.PATIENCE, ge=1,
                                 description="stop after this many generations without improvement")
    step_fraction: float = Field(search_defaults.STEP_FRACTION, gt=0, lt=0.5, description=(
        "one level step moves this fraction of the smallest unit's weights (the same count in every unit)"))
    max_level_delta: float = Field(search_defaults.MAX_LEVEL_DELTA, gt=0, lt=1,
                                   description="every unit's sparsity stays within target ± this")
    workers: int = Field(1, ge=1, le=1024, description=(
        "processes scoring this job's candidates, its own included (1: in-process); with more, each "
        "selection stage is fanned out to scoring workers and the result is the same"))

    @field_validator("selection")
    @classmethod
    def _check_selection(cls, v: str) -> str:
        parse_selection(v)
        return v.replace(" ", "")


class JobSpec(BaseModel):
    """One pruning job: which model, how sparse, which pruner, how sparsity is allocated."""

    model_config = _STRICT

    model: str = Field("smollm2-135m", min_length=1, max_length=1000, description=(
        "Hugging Face folder, hub id, GGUF file, or the built-in 'smollm2-135m'"))
    sparsity: float = Field(description="global target sparsity, 0 < s < 1, counted in parameters (e.g. 0.6)")
    pruner: Pruner = Field("wanda", description=(
        "how one layer is pruned at a given sparsity; goa: whole heads and channels (pattern 'structured')"))
    allocation: Allocation = Field("uniform", description="how the global target is split across layers")
    pattern: str = Field("unstructured", max_length=32, description=(
        "'unstructured', N:M such as 2:4 (N:M needs allocation 'uniform'), or 'structured' (whole attention "
        "heads with their KV group and MLP channels removed; pruner goa or magnitude)"))
    calib: str = Field("pydoc", min_length=1, max_length=1000, description=(
        "calibration source: pydoc, a text file or folder, or a dataset (wikitext2, c4); its first half is used"))
    eval: str = Field("pydoc", min_length=1, max_length=1000,
                      description="evaluation source (its second half is used)")
    calib_windows: int = Field(32, ge=1, le=4096, description="calibration windows")
    eval_windows: int = Field(32, ge=1, le=4096, description="evaluation windows")
    seq_len: int = Field(256, ge=8, le=8192, description="tokens per window")
    seed: int = Field(0, ge=0, le=2**31 - 1, description="the whole job is deterministic for a seed")
    owl_m: float = Field(5.0, gt=0, description="OWL outlier threshold M (× mean score)")
    owl_lambda: float = Field(0.08, ge=0, lt=1, description="OWL sparsity spread λ")
    sensitivity_spread: float = Field(0.1, ge=0, lt=1, description=(
        "± around the target for the fisher/hessian allocations (and the search's seed)"))
    search: SearchSettings = Field(default_factory=SearchSettings,
                                   description="evolutionary search settings (allocation 'evolutionary')")
    device: str = Field("auto", pattern=DEVICE_PATTERN, max_length=8,
                        description="auto, cpu, mps, cuda or cuda:N (N < 16)")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto: bfloat16 on GPUs (float16 without bf16), float32 on CPU")

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
    def _check_structured(self) -> JobSpec:
        if self.pruner == "goa" and not self.structured:
            raise ValueError(f"pruner 'goa' removes whole heads and channels: it needs pattern 'structured', "
                             f"not {self.pattern!r}")
        if self.structured:
            if self.pruner not in STRUCTURED_PRUNERS:
                raise ValueError(f"pattern 'structured' needs pruner 'goa' or 'magnitude', got {self.pruner!r}")
            if self.allocation == "evolutionary" and self.search.granularity != "layer":
                raise ValueError("structured widths are searched per layer: search.granularity must be 'layer'")
            if self.allocation == "evolutionary" and self.search.workers > 1:
                raise ValueError("structured widths are searched in one process: search.workers must be 1")
        return self

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
    def structured(self) -> bool:
        """Whole heads and channels removed (the model gets physically smaller)."""
        return self.pattern == "structured"

    @property
    def nm(self) -> tuple[int, int] | None:
        return parse_pattern(self.pattern)

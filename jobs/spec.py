"""The job specification: one pydantic model shared by the REST API, the worker and the CLI.

Everything a pruning job needs to be reproduced is here; the worker never reads settings that
are not in the spec, so a job resubmitted with the same spec gives the same result.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Literal, get_args

from evosparse.search import defaults as search_defaults
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Pruner = Literal["magnitude", "wanda", "sparsegpt", "dass", "goa"]
# Pruners that remove whole attention heads and MLP channels (pattern "structured").
STRUCTURED_PRUNERS = ("goa", "magnitude")
Allocation = Literal["uniform", "owl", "fisher", "hessian", "ramp", "evolutionary"]
SeedSource = Literal["fisher", "hessian", "owl", "uniform"]
PRUNERS: tuple[str, ...] = get_args(Pruner)
ALLOCATIONS: tuple[str, ...] = get_args(Allocation)
SEED_SOURCES: tuple[str, ...] = get_args(SeedSource)

_NM_RE = re.compile(r"^(\d+):(\d+)$")
_MIXED_RE = re.compile(r"^mixed:(\d+)$")
PATTERN_SPELLINGS = "'unstructured', 'structured', 'N:M' (e.g. 2:4), 'mixed:M' (e.g. mixed:8) or '2:4+dense'"
FORMATS = ("dense", "compressed-tensors")
_SELECTION_RE = re.compile(r"^\d+:\d+(,\d+:\d+)*$")


@dataclass(frozen=True)
class MixedPattern:
    """A per-layer N:M choice: every layer prunes ``p`` of each ``m`` weights, ``p`` one of ``pruned``.

    ``mixed:M`` allows p = 1 .. M-1 (N = M-1 .. 1); ``2:4+dense`` allows p = 0 (dense) or 2 (2:4).
    The choices are evenly spaced, which is what the level space needs.
    """

    m: int
    pruned: tuple[int, ...]

    @property
    def min_sparsity(self) -> float:
        return self.pruned[0] / self.m

    @property
    def max_sparsity(self) -> float:
        return self.pruned[-1] / self.m

    def label(self, p: int) -> str:
        """The pattern a layer gets when it prunes ``p`` of every ``m``: 'dense' or 'N:M'."""
        return "dense" if p == 0 else f"{self.m - p}:{self.m}"


def parse_mixed(pattern: str) -> MixedPattern | None:
    """MixedPattern for 'mixed:M' / '2:4+dense', None for the fixed spellings; ValueError if malformed."""
    if pattern == "2:4+dense":
        return MixedPattern(m=4, pruned=(0, 2))
    mm = _MIXED_RE.match(pattern)
    if mm is None:
        return None
    m = int(mm.group(1))
    if not 3 <= m <= 32:
        raise ValueError(f"mixed:M needs 3 <= M <= 32 (M = 2 has only 1:2), got {pattern!r}")
    return MixedPattern(m=m, pruned=tuple(range(1, m)))


def parse_pattern(pattern: str) -> tuple[int, int] | None:
    """Return (N, M) for a fixed N:M pattern; None for unstructured, structured or a mixed pattern."""
    if pattern in ("unstructured", "structured") or parse_mixed(pattern) is not None:
        return None
    m = _NM_RE.match(pattern)
    if not m:
        raise ValueError(f"pattern must be {PATTERN_SPELLINGS}, got {pattern!r}")
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
    validation_windows: int = Field(0, ge=0, le=4096, description=(
        "the last calibration windows, held out from selection: the result is the parent or elite member "
        "best on them, and every generation records its parent's score there (0: no validation)"))
    fresh_windows: bool = Field(False, description=(
        "each generation's selection reads another chunk of the calibration windows (seeded, deterministic) "
        "instead of always the first ones"))
    ramp_seeds: bool = Field(True, description=(
        "linear depth ramps (sparsity rising with depth, ATP) at a few slopes compete in the first generation"))
    rerank: int = Field(0, ge=0, le=64, description=(
        "with validation windows: re-prune this many of the best candidates on validation block by block, as "
        "the job ships them, and answer the one whose shipped model is best on validation (0: off)"))
    anchor_every: int = Field(4, ge=1, le=1000, description=(
        "SparseGPT: levels built up front every this many level steps (and at the ends); levels between "
        "are derived from the nearest one below (1: every level exact)"))

    @field_validator("selection")
    @classmethod
    def _check_selection(cls, v: str) -> str:
        parse_selection(v)
        return v.replace(" ", "")


class QuantizeSettings(BaseModel):
    """Integer quantization of the pruned linears, applied on top of sparsity (pruned weights stay 0)."""

    model_config = ConfigDict(extra="forbid")

    bits: int = Field(4, ge=2, le=8, description="bits per kept weight, 2 to 8")
    group_size: int = Field(128, ge=8, le=8192, description=(
        "input columns sharing one scale; must divide every linear's input dimension (SmolLM2-135M: 32, 64 or 192)"))
    method: Literal["gptq", "rtn"] = Field("gptq", description=(
        "rtn: round to nearest per group; gptq: error feedback through the layer Hessian "
        "(with pruner sparsegpt, pruning and quantization are one joint pass)"))
    symmetric: bool = Field(True, description="symmetric grid (zero point 0) or asymmetric (integer zero point)")


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
        "'unstructured', N:M such as 2:4 (allocation 'uniform' only), 'mixed:M' (each layer its own N:M "
        "for that M, e.g. mixed:8), '2:4+dense' (each layer 2:4 or dense), or 'structured' (whole attention "
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
    ramp_slope: float | None = Field(None, ge=0, lt=1, description=(
        "allocation 'ramp': sparsity rises linearly with depth from target - slope to target + slope; "
        "None: the slope is picked on the calibration KL"))
    search: SearchSettings = Field(default_factory=SearchSettings,
                                   description="evolutionary search settings (allocation 'evolutionary')")
    device: str = Field("auto", pattern=DEVICE_PATTERN, max_length=8,
                        description="auto, cpu, mps, cuda or cuda:N (N < 16)")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto: bfloat16 on GPUs (float16 without bf16), float32 on CPU")
    quantize: QuantizeSettings | None = Field(None, description=(
        "quantize the pruned linears on top of sparsity, pruned weights kept 0 (none by default)"))
    format: Literal["dense", "compressed-tensors"] = Field("dense", description=(
        "checkpoint layout: dense (HF folder, zeros stored) or compressed-tensors (packed integer codes; "
        "needs symmetric quantize)"))
    export_dtype: Literal["source", "float32", "bfloat16", "float16"] = Field("source", description=(
        "float dtype of the saved checkpoint; source: the dtype the model was published in"))

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
            if self.quantize is not None or self.format != "dense":
                raise ValueError("pattern 'structured' is exported as a smaller dense model: quantize and "
                                 "format 'compressed-tensors' are not supported with it yet")
        return self

    @model_validator(mode="after")
    def _check_pattern_vs_sparsity(self) -> JobSpec:
        mixed = parse_mixed(self.pattern)
        if mixed is not None:
            lo, hi = mixed.min_sparsity, mixed.max_sparsity
            if not lo - 1e-9 <= self.sparsity <= hi + 1e-9:
                raise ValueError(f"pattern {self.pattern} reaches sparsity {lo:g} to {hi:g} only, "
                                 f"but sparsity is {self.sparsity:g}")
            if self.allocation == "evolutionary" and self.search.granularity != "layer":
                raise ValueError(f"pattern {self.pattern} is searched per layer: search.granularity must be 'layer'")
            return self
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

    @model_validator(mode="after")
    def _check_validation(self) -> JobSpec:
        if self.allocation == "evolutionary" and self.search.validation_windows >= self.calib_windows:
            raise ValueError(f"search.validation_windows ({self.search.validation_windows}) must leave calibration "
                             f"windows for the selection (calib_windows is {self.calib_windows})")
        return self

    @model_validator(mode="after")
    def _check_format(self) -> JobSpec:
        if self.format == "compressed-tensors" and self.quantize is None:
            # compressed-tensors >= 0.15 (what transformers 5 loads) dropped its sparse-bitmask
            # and 2:4 formats: what it stores compactly is quantized weights.
            raise ValueError("format 'compressed-tensors' stores packed integer weights: give quantize "
                             "(e.g. {bits: 8} keeps the most accuracy), or use format 'dense'")
        if self.format == "compressed-tensors" and self.quantize is not None and not self.quantize.symmetric:
            # transformers 5.24 + compressed-tensors 0.20 cannot load packed asymmetric zero points with a
            # plain from_pretrained (its meta-device layout expects them unpacked: a size mismatch).
            raise ValueError("format 'compressed-tensors' needs symmetric quantization (quantize.symmetric: true); "
                             "asymmetric codes are written with format 'dense'")
        return self

    @property
    def structured(self) -> bool:
        """Whole heads and channels removed (the model gets physically smaller)."""
        return self.pattern == "structured"

    @property
    def nm(self) -> tuple[int, int] | None:
        """(N, M) of a fixed N:M pattern; None for unstructured and mixed patterns."""
        return parse_pattern(self.pattern)

    @property
    def mixed(self) -> MixedPattern | None:
        """The per-layer N:M choice of a 'mixed:M' or '2:4+dense' pattern, else None."""
        return parse_mixed(self.pattern)

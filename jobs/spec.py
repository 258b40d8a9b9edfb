"""The job specification: one pydantic model shared by the REST API, the worker and the CLI.

Everything a pruning job needs to be reproduced is here; the worker never reads settings that
are not in the spec, so a job resubmitted with the same spec gives the same result.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

PRUNERS = ("magnitude", "wanda", "sparsegpt", "dass")
ALLOCATIONS = ("uniform", "owl", "fisher", "hessian", "evolutionary")
SEED_SOURCES = ("fisher", "hessian", "owl", "uniform")

Pruner = Literal["magnitude", "wanda", "sparsegpt", "dass"]
Allocation = Literal["uniform", "owl", "fisher", "hessian", "evolutionary"]

_NM_RE = re.compile(r"^(\d+):(\d+)$")
_MIXED_RE = re.compile(r"^mixed:(\d+)$")
PATTERN_SPELLINGS = "'unstructured', 'N:M' (e.g. 2:4), 'mixed:M' (e.g. mixed:8) or '2:4+dense'"
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
    """Return (N, M) for a fixed N:M pattern, None for unstructured or a mixed pattern; ValueError otherwise."""
    if pattern == "unstructured" or parse_mixed(pattern) is not None:
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


class QuantizeSettings(BaseModel):
    """Integer quantization of the pruned linears, applied on top of sparsity (pruned weights stay 0)."""

    model_config = ConfigDict(extra="forbid")

    bits: int = Field(4, ge=2, le=8, description="Bits per kept weight, 2 to 8.")
    group_size: int = Field(
        128, ge=8, le=8192,
        description="Input columns sharing one scale; must divide every pruned linear's input dimension "
                    "(SmolLM2-135M: 32, 64 or 192).",
    )
    method: Literal["gptq", "rtn"] = Field(
        "gptq",
        description="'rtn': round to nearest per group; 'gptq': error feedback through the layer Hessian "
                    "(with pruner sparsegpt, pruning and quantization happen jointly in one pass).",
    )
    symmetric: bool = Field(True, description="Symmetric grid (zero point 0) or asymmetric (integer zero point).")


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
    quantize: QuantizeSettings | None = Field(
        None, description="Quantize the pruned linears ({bits, group_size, method, symmetric}); none by default."
    )
    format: Literal["dense", "compressed-tensors"] = Field(
        "dense",
        description="Checkpoint layout: 'dense' (Hugging Face folder, zeros stored) or 'compressed-tensors' "
                    "(packed integer weights; needs quantize).",
    )
    export_dtype: Literal["source", "float32", "bfloat16", "float16"] = Field(
        "source",
        description="Float dtype of the saved checkpoint: 'source' keeps the dtype the model was published in.",
    )

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
    def nm(self) -> tuple[int, int] | None:
        """(N, M) of a fixed N:M pattern; None for unstructured and mixed patterns."""
        return parse_pattern(self.pattern)

    @property
    def mixed(self) -> MixedPattern | None:
        """The per-layer N:M choice of a 'mixed:M' or '2:4+dense' pattern, else None."""
        return parse_mixed(self.pattern)

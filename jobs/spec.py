"""The job specification: one pydantic model shared by the REST API, the worker and the CLI.

Everything a pruning job needs to be reproduced is here; the worker never reads settings that
are not in the spec, so a job resubmitted with the same spec gives the same result.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Literal, get_args

from evosparse.search import bitbudget
from evosparse.search import defaults as search_defaults
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Pruner = Literal["magnitude", "wanda", "sparsegpt", "dass", "goa"]
# Pruners that remove whole attention heads and MLP channels (pattern "structured"): pruning.structured's rule,
# copied because this module stays torch-free (a test ties the two).
STRUCTURED_PRUNERS = ("goa", "magnitude")
# The pruners that read calibration inputs: pruning.pruners.INPUT_PRUNERS (this module stays torch-free).
INPUT_PRUNERS = ("wanda", "sparsegpt", "dass")
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
# lm-eval tasks a job may ask for. pydoc_cloze is evosparse's own, built offline from the Python
# docs (pruning/lm_eval_tasks/); the others are lm-eval's standard multiple-choice tasks, whose
# datasets come from the Hugging Face hub (the server must allow the hub).
LOCAL_EVAL_TASKS = ("pydoc_cloze",)
HUB_EVAL_TASKS = ("hellaswag", "arc_easy", "arc_challenge", "piqa", "winogrande")
EVAL_TASKS = LOCAL_EVAL_TASKS + HUB_EVAL_TASKS
# Job metadata (name, labels): they find a job again (list filters, experiment tracking) and never
# change its result. Label keys look like Kubernetes label names, values are one token (no spaces),
# so a filter `key=value` can never be ambiguous.
NAME_MAX = 100
LABELS_MAX = 20
LABEL_KEY_RE = re.compile(r"^[a-z0-9]([a-z0-9._/-]{0,61}[a-z0-9])?$")
LABEL_VALUE_RE = re.compile(r"^[A-Za-z0-9._:/@+-]{0,200}$")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")


def check_name(v: str) -> str:
    """A job name: 1-100 printable characters, no surrounding blanks (ValueError otherwise)."""
    if not v or len(v) > NAME_MAX or v != v.strip() or _CONTROL_RE.search(v):
        raise ValueError(f"name must be 1-{NAME_MAX} printable characters without leading or trailing blanks")
    return v


def check_label(key: str, value: str | None) -> None:
    """ValueError unless ``key`` (and ``value``, when given) fit the label charset and lengths."""
    if not LABEL_KEY_RE.match(key):
        raise ValueError(f"label key {key[:80]!r} must be 1-63 characters of a-z 0-9 . _ / -, "
                         f"starting and ending with a letter or digit")
    if value is not None and not LABEL_VALUE_RE.match(value):
        raise ValueError(f"label {key!r}: the value must be at most 200 characters of A-Z a-z 0-9 . _ : / @ + -")


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
    level_inputs: Literal["dense", "pruned"] = Field("dense", description=(
        "what the level database's layers are calibrated on: dense: the dense model's layer inputs (levels "
        "independent of each other); pruned: the inputs a block-by-block prune at the seed allocation gives "
        "them, as the shipped model's layers are calibrated (wanda, sparsegpt, dass; unstructured sparsity)"))
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

    bits: int = Field(4, ge=2, le=8, description=(
        "bits per kept weight, 2 to 8 (unused with bits_per_weight: each layer's width comes from bit_widths)"))
    group_size: int = Field(128, ge=8, le=8192, description=(
        "input columns sharing one scale; must divide every linear's input dimension (SmolLM2-135M: 32, 64 or 192)"))
    method: Literal["gptq", "rtn"] = Field("gptq", description=(
        "rtn: round to nearest per group; gptq: error feedback through the layer Hessian "
        "(with pruner sparsegpt, pruning and quantization are one joint pass)"))
    symmetric: bool = Field(True, description="symmetric grid (zero point 0) or asymmetric (integer zero point)")
    embeddings: bool = Field(False, description=(
        "also quantize the token embedding and the output head (one matrix when tied, as in SmolLM2) with the "
        "same bits, group size and method (gptq: through the head's input Hessian); the last 16-bit weights "
        "of a quantized checkpoint (SmolLM2-135M: 21 %), at a perplexity cost the report's figures include"))
    bit_widths: list[int] | None = Field(None, min_length=1, max_length=7, description=(
        "with bits_per_weight: the widths each layer chooses from (default 2,3,4,8); quantize.bits is then unused"))

    @field_validator("bit_widths")
    @classmethod
    def _check_widths(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and (any(not 2 <= b <= 8 for b in v) or len(set(v)) != len(v)):
            raise ValueError("bit_widths must be distinct integers from 2 to 8")
        return sorted(v) if v is not None else None


class JobSpec(BaseModel):
    """One pruning job: which model, how sparse, which pruner, how sparsity is allocated."""

    model_config = _STRICT

    model: str = Field("smollm2-135m", min_length=1, max_length=1000, description=(
        "Hugging Face folder, hub id, GGUF file, or the built-in 'smollm2-135m'"))
    sparsity: float | None = Field(None, description=(
        "global target sparsity, 0 < s < 1, counted in parameters (e.g. 0.6); or give bits_per_weight instead"))
    bits_per_weight: float | None = Field(None, gt=1, le=16, description=(
        "a size budget instead of a sparsity: the mean storage per prunable weight, e.g. 3.0; each layer gets "
        "its own (sparsity, bits), costed as (1 - s)·b + 1 bit of bitmap when sparse + 16/group_size of scale "
        "(search/bitbudget.py); needs quantize (its group_size and method) and pattern 'unstructured'"))
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
    format: Literal["dense", "compressed-tensors", "gguf"] = Field("dense", description=(
        "checkpoint layout: dense (HF folder, zeros stored), compressed-tensors (packed integer codes; "
        "needs symmetric quantize) or gguf (llama.cpp, Q8_0 matrices: zeros stay exact; llama models, "
        "without quantize)"))
    export_dtype: Literal["source", "float32", "bfloat16", "float16"] = Field("source", description=(
        "float dtype of the saved checkpoint; source: the dtype the model was published in"))
    eval_tasks: list[str] = Field(default_factory=list, max_length=len(EVAL_TASKS), description=(
        f"lm-eval tasks scored on the dense and the pruned model: {', '.join(EVAL_TASKS)} "
        f"(pydoc_cloze is offline; the others download their data from the Hugging Face hub)"))
    eval_tasks_limit: int | None = Field(None, ge=1, le=100_000, description=(
        "items per lm-eval task (none: all of them; hellaswag has 10042)"))
    name: str | None = Field(None, max_length=NAME_MAX, description=(
        "a name to find the job by (list filter, experiment tracking run name); does not change the result"))
    labels: dict[str, str] = Field(default_factory=dict, description=(
        f"free-form key=value labels (at most {LABELS_MAX}; keys a-z 0-9 . _ / -, values without spaces); "
        f"the job list filters on them"))

    @field_validator("name")
    @classmethod
    def _check_name(cls, v: str | None) -> str | None:
        return None if v is None else check_name(v)

    @field_validator("labels")
    @classmethod
    def _check_labels(cls, v: dict[str, str]) -> dict[str, str]:
        if len(v) > LABELS_MAX:
            raise ValueError(f"at most {LABELS_MAX} labels")
        for key, value in v.items():
            check_label(key, value)
        return v

    @field_validator("sparsity")
    @classmethod
    def _check_sparsity(cls, v: float | None) -> float | None:
        if v is not None and (not math.isfinite(v) or not (0.0 < v < 1.0)):
            raise ValueError("sparsity must be a finite number strictly between 0 and 1")
        return v

    @field_validator("eval_tasks")
    @classmethod
    def _check_eval_tasks(cls, v: list[str]) -> list[str]:
        unknown = [t for t in v if t not in EVAL_TASKS]
        if unknown:
            raise ValueError(f"unknown eval task(s) {', '.join(map(repr, unknown))}; choose from {', '.join(EVAL_TASKS)}")
        if len(set(v)) != len(v):
            raise ValueError("eval_tasks lists a task twice")
        return v

    # Runs before the validators that read the sparsity: a job gives exactly one of the two targets.
    @model_validator(mode="after")
    def _check_target(self) -> JobSpec:
        q = self.quantize
        if self.bits_per_weight is None:
            if self.sparsity is None:
                raise ValueError("give sparsity (e.g. 0.6) or bits_per_weight (a size budget, e.g. 3.0)")
            if q is not None and q.bit_widths is not None:
                raise ValueError("quantize.bit_widths is for bits_per_weight jobs; give quantize.bits instead")
            return self
        if self.sparsity is not None:
            raise ValueError("give sparsity or bits_per_weight, not both: a size budget picks each layer's sparsity")
        if self.pattern != "unstructured":
            raise ValueError(f"bits_per_weight searches unstructured sparsity per layer, not pattern {self.pattern!r}")
        if self.allocation not in ("uniform", "evolutionary"):
            raise ValueError("bits_per_weight supports allocation 'uniform' (one sparsity and width for every layer) "
                             "or 'evolutionary' (searched per layer)")
        if q is None:
            raise ValueError("bits_per_weight needs quantize (its group_size and method; each layer's bits are chosen)")
        if self.allocation == "evolutionary" and self.search.workers > 1:
            raise ValueError("size-budget searches run in one process: search.workers must be 1 with bits_per_weight")
        widths = self.bit_widths
        cheapest = min(bitbudget.bits_per_weight(bitbudget.MAX_SPARSITY, b, q.group_size, q.symmetric) for b in widths)
        if self.bits_per_weight < cheapest:
            raise ValueError(f"bits_per_weight {self.bits_per_weight:g} is below the cheapest choice "
                             f"({cheapest:.4g}: {bitbudget.MAX_SPARSITY:g} sparse at {min(widths)} bits, "
                             f"group {q.group_size})")
        return self

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
                                 f"format {self.format!r} are not supported with it yet" if self.format != "dense"
                                 else "pattern 'structured' is exported as a smaller dense model: quantize is not "
                                 "supported with it yet")
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
        if self.allocation == "evolutionary" and self.search.level_inputs == "pruned":
            if self.pruner not in INPUT_PRUNERS:
                raise ValueError(f"search.level_inputs 'pruned' calibrates levels on pruned inputs: pruner "
                                 f"{self.pruner!r} reads no inputs (use {', '.join(INPUT_PRUNERS)})")
            if self.pattern != "unstructured":
                raise ValueError(f"search.level_inputs 'pruned' is for unstructured sparsity, not pattern {self.pattern!r}")
            if self.bits_per_weight is not None:
                raise ValueError("search.level_inputs 'pruned' is not built for bits_per_weight searches")
        return self

    @model_validator(mode="after")
    def _check_format(self) -> JobSpec:
        if self.format == "compressed-tensors" and self.quantize is None:
            # compressed-tensors >= 0.15 (what transformers 5 loads) dropped its sparse-bitmask
            # and 2:4 formats: what it stores compactly is quantized weights.
            raise ValueError("format 'compressed-tensors' stores packed integer weights: give quantize "
                             "(e.g. {bits: 8} keeps the most accuracy), or use format 'dense'")
        if self.format == "gguf" and self.quantize is not None:
            raise ValueError("format 'gguf' stores Q8_0 (8-bit blocks of 32 with a float16 scale) itself: "
                             "leave quantize out, or use format 'compressed-tensors' for other widths")
        if self.quantize is not None and self.quantize.embeddings and self.bits_per_weight is not None:
            # The embeddings take quantize.bits; and transformers dequantizes a compressed-tensors
            # checkpoint that quantizes them with one scheme for every packed weight (export.py).
            raise ValueError("quantize.embeddings needs one bit width for every layer (quantize.bits): "
                             "not with bits_per_weight, which picks each layer's width")
        if self.format == "compressed-tensors" and self.quantize is not None and not self.quantize.symmetric:
            # transformers 5.24 + compressed-tensors 0.20 cannot load packed asymmetric zero points with a
            # plain from_pretrained (its meta-device layout expects them unpacked: a size mismatch).
            raise ValueError("format 'compressed-tensors' needs symmetric quantization (quantize.symmetric: true); "
                             "asymmetric codes are written with format 'dense'")
        return self

    @property
    def bit_widths(self) -> tuple[int, ...]:
        """The widths a layer chooses from under bits_per_weight."""
        q = self.quantize
        return tuple(q.bit_widths) if q is not None and q.bit_widths else bitbudget.BIT_WIDTHS

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

"""The deployable-compression steps of a job: per-layer N:M plans, quantization, checkpoint dtype.

``Compression.prepare`` runs right after the model is loaded, so a group size or N:M that does
not fit the model's shapes fails before any expensive stage (and before anything is written).
``plan`` turns the allocation's per-linear counts into what is pruned (projected onto the
per-layer N:M grid for mixed patterns); ``export_kwargs`` says how the checkpoint is written.
The runner calls these at its prune and export steps and stays otherwise unaware of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from evosparse.jobs.spec import JobSpec
from evosparse.pruning.quantize import QuantConfig, QuantizedWeight
from torch import nn

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Plan:
    counts: dict[str, int]
    patterns: tuple[int, int] | None | dict[str, tuple[int, int] | None]
    layer_pattern: dict[str, str] = field(default_factory=dict)


@dataclass
class Compression:
    spec: JobSpec
    dtype: torch.dtype  # the checkpoint's float dtype (quantization scales are rounded to it)
    quant: QuantConfig | None

    @classmethod
    def prepare(cls, spec: JobSpec, model: nn.Module) -> Compression:
        from evosparse.pruning.loading import source_dtype
        from evosparse.pruning.mixed import check_nm_shapes
        from evosparse.pruning.prune import check_quant_shapes

        q = spec.quantize
        quant = QuantConfig(q.bits, q.group_size, q.method, q.symmetric) if q is not None else None
        check_quant_shapes(model, quant)
        m = spec.mixed.m if spec.mixed is not None else (spec.nm[1] if spec.nm is not None else None)
        if m is not None:
            check_nm_shapes(model, m)
        if spec.mixed is not None:  # an unreachable target fails now, not after the search
            from evosparse.pruning.mixed import block_space

            block_space(model, spec.sparsity, spec.mixed.m, spec.mixed.pruned, spec.search.max_level_delta)
        dtype = source_dtype(spec.model) if spec.export_dtype == "source" else _DTYPES[spec.export_dtype]
        return cls(spec=spec, dtype=dtype, quant=quant)

    def plan(self, model: nn.Module, counts: dict[str, int]) -> Plan:
        """What to prune: the counts as given, or for a mixed pattern their nearest exact N:M grid point."""
        from evosparse.pruning import mixed as mx

        mixed = self.spec.mixed
        if mixed is None:
            nm = self.spec.nm
            labels = {n: (self.spec.pattern if nm is not None else "unstructured") for n in counts}
            return Plan(counts=counts, patterns=nm, layer_pattern=labels)
        space = mx.block_space(model, self.spec.sparsity, mixed.m, mixed.pruned, self.spec.search.max_level_delta)
        # Counts already on the grid (the search's result) project onto themselves.
        p = mx.plan(model, space, mx.project_linear_counts(model, space, counts), mixed.m)
        return Plan(counts=p.counts, patterns=p.patterns, layer_pattern=p.layer_pattern)

    def prune_kwargs(self) -> dict[str, Any]:
        return {"quant": self.quant, "scale_dtype": self.dtype}

    def report(self) -> dict[str, Any]:
        q = self.spec.quantize
        return {"quantize": q.model_dump() if q is not None else None, "format": self.spec.format,
                "dtype": str(self.dtype).removeprefix("torch.")}

    def export_kwargs(self, quantized: dict[str, QuantizedWeight]) -> dict[str, Any]:
        return {"fmt": self.spec.format, "dtype": self.dtype, "quantized": quantized or None}


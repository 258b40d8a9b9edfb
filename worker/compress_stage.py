"""The deployable-compression steps of a job: per-layer N:M plans, quantization, checkpoint dtype.

``Compression.prepare`` runs right after the model is loaded, so a group size or N:M that does
not fit the model's shapes fails before any expensive stage (and before anything is written).
``plan`` turns the allocation's per-linear counts into what is pruned (projected onto the
per-layer N:M grid for mixed patterns); ``export_kwargs`` says how the checkpoint is written.
The runner calls these at its prune and export steps and stays otherwise unaware of them.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
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
    widths: dict[str, int] = field(default_factory=dict)  # size-budget jobs: bits per linear, set by the allocation

    @classmethod
    def prepare(cls, spec: JobSpec, model: nn.Module) -> Compression:
        from evosparse.pruning.loading import source_dtype
        from evosparse.pruning.mixed import check_nm_shapes
        from evosparse.pruning.prune import check_quant_shapes

        q = spec.quantize
        # (A size budget picks each layer's bits; the widest one stands in for the shape checks.)
        bits = (max(spec.bit_widths) if spec.bits_per_weight is not None else q.bits) if q is not None else 0
        quant = QuantConfig(bits, q.group_size, q.method, q.symmetric) if q is not None else None
        check_quant_shapes(model, quant)
        m = spec.mixed.m if spec.mixed is not None else (spec.nm[1] if spec.nm is not None else None)
        if m is not None:
            check_nm_shapes(model, m)
        if spec.mixed is not None:  # an unreachable target fails now, not after the search
            from evosparse.pruning.mixed import block_space

            block_space(model, spec.sparsity, spec.mixed.m, spec.mixed.pruned, spec.search.max_level_delta)
        if spec.format == "gguf":  # before any pruning: the writer knows llama's layout only
            from evosparse.pruning.gguf_export import check_gguf_model

            check_gguf_model(model)
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

    def prune_kwargs(self, widths: dict[str, int] | None = None) -> dict[str, Any]:
        """``prune_model`` arguments; with per-linear ``widths`` (default: the allocation's) one config per linear."""
        widths = self.widths if widths is None else widths
        if widths and self.quant is not None:
            return {"quant": {n: replace(self.quant, bits=b) for n, b in widths.items()}, "scale_dtype": self.dtype}
        return {"quant": self.quant, "scale_dtype": self.dtype}

    def report(self, counts: dict[str, int] | None = None, blocks: list | None = None) -> dict[str, Any]:
        """Quantization, format, dtype; for a size budget also the cost model's bits per weight of the result."""
        q = self.spec.quantize
        out: dict[str, Any] = {"quantize": q.model_dump(exclude_none=True) if q is not None else None,
                               "format": self.spec.format,
                               "dtype": str(self.dtype).removeprefix("torch.")}
        if self.spec.bits_per_weight is not None and q is not None and counts is not None and blocks is not None:
            from evosparse.pruning.layers import weight_matrix
            from evosparse.search.bitbudget import unit_bits

            sizes = {n: weight_matrix(m).numel() for b in blocks for n, m in b.linears.items()}
            total = sum(unit_bits(sizes[n], counts.get(n, 0), self.widths[n], q.group_size, q.symmetric)
                        for n in sizes)
            out["bits_per_weight_target"] = self.spec.bits_per_weight
            out["bits_per_weight"] = total / sum(sizes.values())  # the cost model (search/bitbudget.py)
            out["layer_bits"] = dict(self.widths)
            out["layer_pruned"] = {n: counts.get(n, 0) for n in sizes}
        return out

    @property
    def embeddings(self) -> bool:
        """Spec ``quantize.embeddings``: the embedding and output head are quantized too."""
        q = self.spec.quantize
        return self.quant is not None and q is not None and q.embeddings

    def finish(self, model: nn.Module, calib: torch.Tensor) -> dict[str, QuantizedWeight]:
        """After the linears are pruned: what the checkpoint format does to the rest, in place, so the
        evaluation sees the file's numbers: quantized embeddings (their codes returned; GPTQ calibrates
        the head on ``calib``), gguf's Q8_0."""
        from evosparse.pruning.quantize import quantize_embeddings

        codes: dict[str, QuantizedWeight] = {}
        if self.embeddings:
            assert self.quant is not None
            codes = quantize_embeddings(model, self.quant, self.dtype, calib)
        if self.spec.format == "gguf":
            from evosparse.pruning.gguf_export import round_q8_0

            round_q8_0(model)
        return codes

    @contextmanager
    def finished(self, model: nn.Module, calib: torch.Tensor) -> Iterator[None]:
        """``finish`` for a while (the uniform baseline), the embeddings restored afterwards (the caller
        restores the linears from its dense snapshot)."""
        from evosparse.pruning.quantize import embedding_weights

        if not (self.embeddings or self.spec.format == "gguf"):  # nothing to do: no copy either
            yield
            return
        saved = {n: w.detach().clone() for n, w in embedding_weights(model).items()}
        self.finish(model, calib)
        try:
            yield
        finally:
            with torch.no_grad():
                for name, w in embedding_weights(model).items():
                    w.copy_(saved[name])

    def export_kwargs(self, quantized: dict[str, QuantizedWeight]) -> dict[str, Any]:
        return {"fmt": self.spec.format, "dtype": self.dtype, "quantized": quantized or None}


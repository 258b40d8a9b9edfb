"""Group-wise integer quantization of (pruned) weight matrices, zeros kept exactly zero.

A weight matrix [out, in] is cut into groups of ``group_size`` consecutive input columns per
output row; each group gets one scale (and, asymmetric, one integer zero point). Codes are
stored signed, ``q`` in [-2^(b-1), 2^(b-1) - 1], and dequantise as ``(q - zero) * scale``:
the layout compressed-tensors' pack-quantized format uses, so export needs no re-rounding.

Why zeros survive: the integer grid always contains the real value 0 (symmetric: code 0;
asymmetric: the group range is widened to include 0 and the zero point is an integer code),
so a pruned weight quantizes to exactly 0. The keep mask is applied once more afterwards.

Scales are rounded to the checkpoint's dtype (``scale_dtype``) when they are chosen, so the
dense-with-zeros export and the packed export dequantize to the same numbers.

The token embedding and the output head (``quantize_embeddings``, spec ``quantize.embeddings``)
are quantized with the linears' bits, group size and method (GPTQ through the head's input
Hessian, RTN for a lookup-only embedding): a tied pair is one matrix, quantized once under the
embedding's name.

Two methods use this module: round-to-nearest (``quantize_rtn``) and the GPTQ-style error
feedback inside ``pruning.pruners.obs_prune_quantize`` (which calls ``group_params`` and
``quantize_codes`` column by column).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from evosparse.pruning.errors import PruningConfigError
from torch import nn

QUANT_METHODS = ("rtn", "gptq")


@dataclass(frozen=True)
class QuantConfig:
    """How a job quantizes its pruned linears (mirrors the job spec's ``quantize``)."""

    bits: int
    group_size: int
    method: str = "gptq"
    symmetric: bool = True

    def __post_init__(self) -> None:
        if not 2 <= self.bits <= 8:
            raise PruningConfigError(f"quantize.bits must be 2..8, got {self.bits}")
        if self.group_size < 1:
            raise PruningConfigError(f"quantize.group_size must be positive, got {self.group_size}")
        if self.method not in QUANT_METHODS:
            raise PruningConfigError(f"quantize.method must be one of {QUANT_METHODS}, got {self.method!r}")

    @property
    def qmin(self) -> int:
        return -(1 << (self.bits - 1))

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1

    def check_in_features(self, name: str, in_features: int) -> None:
        if in_features % self.group_size:
            raise PruningConfigError(
                f"{name}: quantize.group_size {self.group_size} does not divide its input dimension {in_features}"
            )


@dataclass
class QuantizedWeight:
    """Integer codes of one linear plus its group scales and zero points ([out, in // group])."""

    q: torch.Tensor  # int8 [out, in], signed codes
    scale: torch.Tensor  # float32 [out, groups], already representable in the checkpoint dtype
    zero: torch.Tensor | None  # int8 [out, groups] (asymmetric) or None (symmetric: zero point 0)
    config: QuantConfig

    def dequantize(self) -> torch.Tensor:
        """Float32 [out, in]: (q - zero) * scale, group by group."""
        return dequantize_codes(self.q, self.scale, self.zero, self.config.group_size)


def group_params(
    w: torch.Tensor, cfg: QuantConfig, scale_dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale and zero point of each row of ``w`` ([rows, group]); returns ([rows], [rows] or None).

    Symmetric: scale = max|w| / qmax (no clipping of the largest weight). Asymmetric: the
    range [min(w, 0), max(w, 0)] over 2^b - 1 steps, zero point the integer code of 0.
    """
    w = w.float()
    if cfg.symmetric:
        scale = w.abs().amax(dim=1) / cfg.qmax
        zero = None
    else:
        lo = w.amin(dim=1).clamp(max=0.0)
        hi = w.amax(dim=1).clamp(min=0.0)
        scale = (hi - lo) / (cfg.qmax - cfg.qmin)
    # An all-zero group: any positive scale reproduces it; 1 avoids dividing by zero.
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    scale = scale.to(scale_dtype).float()
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # underflow in fp16/bf16
    if not cfg.symmetric:
        zero = (torch.round(-lo / scale) + cfg.qmin).clamp(cfg.qmin, cfg.qmax)
    return scale, zero


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, cfg: QuantConfig) -> torch.Tensor:
    """Round ``w`` ([rows, k]) onto the grid of per-row ``scale``/``zero``; float tensor of codes."""
    z = zero.unsqueeze(1) if zero is not None else 0.0
    return torch.clamp(torch.round(w.float() / scale.unsqueeze(1)) + z, cfg.qmin, cfg.qmax)


def dequantize_codes(
    q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, group_size: int
) -> torch.Tensor:
    rows, cols = q.shape
    qg = q.float().reshape(rows, cols // group_size, group_size)
    if zero is not None:
        qg = qg - zero.float().unsqueeze(2)
    return (qg * scale.float().unsqueeze(2)).reshape(rows, cols)


@torch.no_grad()
def quantize_rtn(
    weight: torch.Tensor,
    cfg: QuantConfig,
    keep: torch.Tensor | None = None,
    scale_dtype: torch.dtype = torch.float32,
) -> QuantizedWeight:
    """Round-to-nearest, group-wise. ``keep`` (default: the non-zeros of ``weight``) stays the sparsity mask."""
    w = weight.detach().float()
    rows, cols = w.shape
    cfg.check_in_features("weight", cols)
    if keep is None:
        keep = w != 0
    groups = cols // cfg.group_size
    wg = w.reshape(rows * groups, cfg.group_size)
    scale, zero = group_params(wg, cfg, scale_dtype)
    q = quantize_codes(wg, scale, zero, cfg).reshape(rows, cols)
    zero_r = zero.reshape(rows, groups) if zero is not None else None
    q = _zero_pruned(q, keep, zero_r, cfg.group_size)
    return QuantizedWeight(
        q=q.to(torch.int8),
        scale=scale.reshape(rows, groups),
        zero=zero_r.to(torch.int8) if zero_r is not None else None,
        config=cfg,
    )


def _zero_pruned(q: torch.Tensor, keep: torch.Tensor, zero: torch.Tensor | None, group_size: int) -> torch.Tensor:
    """Pruned entries get the code of 0 (the zero point), whatever rounding gave them."""
    if zero is None:
        return torch.where(keep, q, torch.zeros_like(q))
    zfull = zero.float().repeat_interleave(group_size, dim=1)
    return torch.where(keep, q, zfull)


def distinct_per_group(qw: QuantizedWeight) -> int:
    """Largest number of distinct dequantized values in any group (at most 2^bits by construction)."""
    deq = qw.dequantize()
    rows, cols = deq.shape
    g = deq.reshape(rows * (cols // qw.config.group_size), qw.config.group_size)
    srt = torch.sort(g, dim=1).values
    return int(((srt[:, 1:] != srt[:, :-1]).sum(dim=1) + 1).max())


def embedding_weights(model: nn.Module) -> dict[str, nn.Parameter]:
    """{module name: weight} of the input embedding and the output head; a tied pair once, as the embedding."""
    found: dict[str, nn.Parameter] = {}
    seen: set[int] = set()
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        module = getattr(model, getter)()
        if module is None or id(module.weight) in seen:
            continue
        name = next(n for n, m in model.named_modules() if m is module)
        seen.add(id(module.weight))
        found[name] = module.weight
    return found


class _HeadInputSeen(Exception):
    """Stops a calibration forward once the output head's input is recorded (no logits needed)."""


@torch.no_grad()
def head_hessian(model: nn.Module, calib_tokens: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """H = 2 X^T X / N of the output head's input (the final hidden states) over the calibration windows."""
    head = model.get_output_embeddings()
    cols = head.weight.shape[1]
    h = torch.zeros(cols, cols, dtype=torch.float32, device=head.weight.device)
    seen = 0

    def record(module: nn.Module, args: tuple) -> None:
        nonlocal h, seen
        x = args[0].reshape(-1, cols).to(h.device, torch.float32)
        h += 2 * x.t() @ x
        seen += x.shape[0]
        raise _HeadInputSeen

    handle = head.register_forward_pre_hook(record)
    try:
        device = model.get_input_embeddings().weight.device
        for i in range(0, len(calib_tokens), batch_size):
            try:
                model(calib_tokens[i:i + batch_size].to(device))
            except _HeadInputSeen:
                pass
    finally:
        handle.remove()
    return h / max(seen, 1)


@torch.no_grad()
def quantize_embeddings(
    model: nn.Module, cfg: QuantConfig, scale_dtype: torch.dtype = torch.float32,
    calib_tokens: torch.Tensor | None = None,
) -> dict[str, QuantizedWeight]:
    """Quantize the embedding and output head in place; their codes by module name (as ``prune_model``'s).

    ``cfg.method`` gptq (with ``calib_tokens``): the output head (the tied matrix, for SmolLM2) is
    quantized with GPTQ error feedback through the Hessian of its input, the final hidden states.
    On SmolLM2-135M at 70 % + GPTQ 4-bit that holds the perplexity at 88.09 against 112.03 with
    round to nearest (83.13 with the embedding unquantized). An untied input embedding is always
    round to nearest: a lookup's "inputs" are one-hot, there is no error to feed back.
    """
    from evosparse.pruning.pruners import obs_prune_quantize  # pruners imports this module

    head = model.get_output_embeddings()
    gptq = cfg.method == "gptq" and calib_tokens is not None and head is not None
    hessian = head_hessian(model, calib_tokens) if gptq else None
    rtn = replace(cfg, method="rtn")
    out: dict[str, QuantizedWeight] = {}
    for name, weight in embedding_weights(model).items():
        cfg.check_in_features(name, weight.shape[1])
        keep = torch.ones_like(weight, dtype=torch.bool)
        if hessian is not None and weight is head.weight:
            _, qw = obs_prune_quantize(weight, hessian, 0, quant=cfg, keep=keep, scale_dtype=scale_dtype)
            assert qw is not None
        else:
            qw = quantize_rtn(weight, rtn, keep=keep, scale_dtype=scale_dtype)
        weight.copy_(qw.dequantize().to(weight.dtype))
        out[name] = qw
    return out

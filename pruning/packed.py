"""Sparse weight matrices held as a bit mask of their nonzeros and those nonzeros' values.

A SparseGPT level of a linear at 45–95 % sparsity stored as a dense float32 matrix costs 4 bytes
per weight, most of them zeros; as one bit per weight plus 4 bytes per kept weight it costs
1/8 + 4 x (1 - sparsity) bytes: about a third at 70 %. The anchor levels of a level database
(every linear at several counts) are what fills a scoring process's memory, so they are held
this way and unpacked when a level is applied (one scatter, small beside a forward pass).

Lossless for every value a matmul can tell apart: a stored zero (+0.0 or -0.0) unpacks as +0.0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

_BIT = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


@dataclass(frozen=True)
class PackedSparse:
    """One matrix: ``bits`` (uint8, 8 entries per byte, row-major, low bit first) and ``values``."""

    shape: tuple[int, ...]
    bits: torch.Tensor
    values: torch.Tensor

    @classmethod
    def pack(cls, weight: torch.Tensor) -> PackedSparse:
        flat = weight.detach().reshape(-1)
        mask = flat != 0
        pad = (-flat.numel()) % 8
        padded = torch.cat([mask, mask.new_zeros(pad)]) if pad else mask
        bits = (padded.view(-1, 8).to(torch.uint8) * _BIT.to(flat.device)).sum(dim=1, dtype=torch.uint8)
        return cls(tuple(weight.shape), bits, flat[mask].clone())

    def mask(self) -> torch.Tensor:
        """The nonzero pattern as a bool tensor of ``shape``."""
        unpacked = (self.bits.unsqueeze(1) & _BIT.to(self.bits.device)) != 0
        return unpacked.reshape(-1)[: math.prod(self.shape)].reshape(self.shape)

    def unpack(self) -> torch.Tensor:
        """The dense matrix (a new tensor, ``values``' dtype and device)."""
        mask = self.mask()
        return torch.zeros(self.shape, dtype=self.values.dtype, device=self.values.device).masked_scatter_(
            mask, self.values)

    @property
    def nnz(self) -> int:
        return self.values.numel()

    def nbytes(self) -> int:
        return self.bits.numel() * self.bits.element_size() + self.values.numel() * self.values.element_size()

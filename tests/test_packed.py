"""pruning/packed.py: sparse matrices as a bit mask plus kept values, unpacked to the same values."""

from __future__ import annotations

import pytest
import torch
from evosparse.pruning.packed import PackedSparse


@pytest.mark.parametrize("shape", [(7, 13), (8, 16), (1, 1), (3, 5, 2)])
@pytest.mark.parametrize("sparsity", [0.0, 0.7, 1.0])
def test_unpack_gives_back_the_matrix(shape, sparsity):
    g = torch.Generator().manual_seed(hash((shape, sparsity)) % 2**31)
    w = torch.randn(shape, generator=g)
    w[torch.rand(shape, generator=g) < sparsity] = 0.0
    packed = PackedSparse.pack(w)
    assert packed.nnz == int((w != 0).sum())
    assert torch.equal(packed.mask(), w != 0)
    out = packed.unpack()
    assert out.dtype == w.dtype and out.shape == w.shape and torch.equal(out, w)
    out[...] = 1.0  # a new tensor: writing to it leaves the packed copy alone
    assert torch.equal(packed.unpack(), w)


def test_packed_size_is_a_bit_per_weight_plus_the_kept_values():
    w = torch.randn(64, 128, dtype=torch.float32)
    w[:, : int(0.7 * 128)] = 0.0
    packed = PackedSparse.pack(w)
    assert packed.nbytes() == w.numel() // 8 + 4 * packed.nnz
    assert packed.nbytes() < 0.35 * w.numel() * w.element_size()


def test_negative_zero_unpacks_as_zero_and_other_dtypes_keep_theirs():
    w = torch.tensor([[0.0, -0.0, 1.5], [-2.0, 0.0, 3.0]], dtype=torch.bfloat16)
    out = PackedSparse.pack(w).unpack()
    assert out.dtype == torch.bfloat16 and torch.equal(out, w) and PackedSparse.pack(w).nnz == 3

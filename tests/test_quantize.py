"""Quantization on top of sparsity: the grid, zeros kept exactly zero, GPTQ error feedback, joint SparseGPT."""

import pytest
import torch
from evosparse.pruning.errors import PruningConfigError
from evosparse.pruning.layers import prunable_linears, weight_matrix
from evosparse.pruning.pruners import (
    keep_mask_from_scores,
    magnitude_scores,
    obs_prune_quantize,
    sparsegpt_prune,
)
from evosparse.pruning.quantize import QuantConfig, distinct_per_group, quantize_rtn
from evosparse.pruning.sensitivity import allocation_counts
from hypothesis import given, settings
from hypothesis import strategies as st


def _layer(rows: int, cols: int, seed: int, sparsity: float = 0.5):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * torch.rand(1, cols, generator=g)  # uneven column scales
    keep = keep_mask_from_scores(magnitude_scores(w), int(sparsity * w.numel()))
    return w * keep, keep


def _hessian(cols: int, seed: int, tokens: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """Correlated calibration inputs (what makes error feedback pay off) and H = 2XXᵀ/N."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g) / cols**0.5 * 3 + torch.eye(cols)
    x = torch.randn(tokens, cols, generator=g) @ mix
    return x, 2 * x.t() @ x / tokens


@settings(max_examples=40, deadline=None)
@given(
    bits=st.integers(2, 8),
    group=st.sampled_from([8, 16, 32]),
    groups=st.integers(1, 4),
    rows=st.integers(1, 12),
    symmetric=st.booleans(),
    sparsity=st.sampled_from([0.0, 0.5, 0.8]),
    seed=st.integers(0, 10_000),
)
def test_rtn_grid_has_at_most_2_to_the_bits_values_and_keeps_zeros(bits, group, groups, rows, symmetric,
                                                                   sparsity, seed):
    w, keep = _layer(rows, group * groups, seed, sparsity)
    cfg = QuantConfig(bits=bits, group_size=group, method="rtn", symmetric=symmetric)
    qw = quantize_rtn(w, cfg, keep)
    deq = qw.dequantize()
    assert distinct_per_group(qw) <= 2**bits
    assert torch.all(deq[~keep] == 0)  # pruned weights stay exactly zero
    assert int(qw.q.min()) >= cfg.qmin and int(qw.q.max()) <= cfg.qmax
    # Round to nearest: every kept weight within half a step of its value (no clipping here:
    # the grid covers the group's range, scales are float32).
    step = qw.scale.repeat_interleave(group, dim=1)
    assert torch.all((deq - w).abs()[keep] <= step[keep] * 0.5 + 1e-6)


def test_scales_are_representable_in_the_checkpoint_dtype():
    w, keep = _layer(16, 64, 0)
    qw = quantize_rtn(w, QuantConfig(4, 32, "rtn"), keep, scale_dtype=torch.bfloat16)
    assert torch.equal(qw.scale, qw.scale.to(torch.bfloat16).float())


def test_bad_quant_configs_are_refused():
    for kw in ({"bits": 1, "group_size": 32}, {"bits": 9, "group_size": 32}, {"bits": 4, "group_size": 0},
               {"bits": 4, "group_size": 32, "method": "awq"}):
        with pytest.raises(PruningConfigError):
            QuantConfig(**kw)
    with pytest.raises(PruningConfigError, match="does not divide"):
        quantize_rtn(torch.randn(4, 48), QuantConfig(4, 32, "rtn"))


@pytest.mark.parametrize("symmetric", [True, False])
def test_gptq_error_feedback_beats_round_to_nearest_on_the_layer_output(symmetric):
    """Same mask, same grid: feeding the rounding error back through H lowers ‖(W - Ŵ)X‖."""
    cols = 128
    w, keep = _layer(64, cols, 1, sparsity=0.5)
    x, h = _hessian(cols, 2)
    cfg = QuantConfig(bits=3, group_size=32, method="gptq", symmetric=symmetric)
    rtn = quantize_rtn(w, cfg, keep).dequantize()
    gptq, qw = obs_prune_quantize(w, h, 0, keep=keep, quant=cfg)
    assert torch.all(gptq[~keep] == 0) and torch.equal(qw.dequantize(), gptq)
    assert distinct_per_group(qw) <= 2**3
    err_rtn = ((w - rtn) @ x.t()).pow(2).sum()
    err_gptq = ((w - gptq) @ x.t()).pow(2).sum()
    assert err_gptq < 0.9 * err_rtn, (float(err_gptq), float(err_rtn))


@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_joint_sparsegpt_gptq_prunes_exactly_and_quantizes(nm):
    cols = 128
    g = torch.Generator().manual_seed(3)
    w = torch.randn(32, cols, generator=g)
    x, h = _hessian(cols, 4)
    count = w.numel() // 2
    cfg = QuantConfig(bits=4, group_size=64, method="gptq")
    joint, qw = obs_prune_quantize(w, h, count, nm, quant=cfg)
    assert int((joint == 0).sum()) >= count
    assert int((qw.q == 0).sum()) >= count  # symmetric: a pruned weight's code is 0
    if nm is not None:  # at most N non-zeros in every 4 consecutive inputs
        assert int((joint.reshape(32, -1, 4) != 0).sum(-1).max()) <= 2
    assert distinct_per_group(qw) <= 16
    assert torch.equal(qw.dequantize(), joint)
    # Quantizing on top of the pruning costs some output error, but the joint pass keeps it
    # close to the unquantized SparseGPT (RTN of the SparseGPT weights does worse).
    sparse = sparsegpt_prune(w, h, count, nm)
    rtn = quantize_rtn(sparse, QuantConfig(4, 64, "rtn")).dequantize()

    def err(v):
        return float(((w - v) @ x.t()).pow(2).sum())

    assert err(sparse) <= err(joint) < err(rtn)


@pytest.mark.parametrize("pruner, method", [("wanda", "rtn"), ("wanda", "gptq"), ("sparsegpt", "gptq"),
                                            ("magnitude", "gptq")])
def test_prune_model_quantizes_every_linear_and_keeps_the_budget(tiny_llama, tiny_tokens, pruner, method):
    from evosparse.pruning.prune import prune_model

    counts = allocation_counts(tiny_llama, "uniform", 0.6)
    cfg = QuantConfig(bits=4, group_size=32, method=method)
    quantized = prune_model(tiny_llama, tiny_tokens, pruner, counts, quant=cfg)
    linears = prunable_linears(tiny_llama)
    assert set(quantized) == set(linears)
    zeros = 0
    for name, mod in linears.items():
        w = weight_matrix(mod)
        assert torch.equal(quantized[name].dequantize(), w)  # the model holds the dequantized codes
        assert distinct_per_group(quantized[name]) <= 16
        zeros += int((w == 0).sum())
    # Every pruned weight is still zero (rounding may zero a few small kept ones too).
    assert zeros >= sum(counts.values())
    assert zeros <= sum(counts.values()) * 1.05


def test_prune_model_refuses_a_group_that_does_not_tile_the_inputs(tiny_llama, tiny_tokens):
    from evosparse.pruning.prune import prune_model

    before = {n: weight_matrix(m).clone() for n, m in prunable_linears(tiny_llama).items()}
    with pytest.raises(PruningConfigError, match="does not divide its input dimension 160"):
        prune_model(tiny_llama, tiny_tokens, "wanda", allocation_counts(tiny_llama, "uniform", 0.5),
                    quant=QuantConfig(4, 64, "rtn"))
    assert all(torch.equal(before[n], weight_matrix(m)) for n, m in prunable_linears(tiny_llama).items())

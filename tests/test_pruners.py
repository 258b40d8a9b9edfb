import pytest
import torch
from evosparse.pruning.blockwise import capture_block_inputs
from evosparse.pruning.calibration import collect_block_stats
from evosparse.pruning.layers import find_blocks, prunable_linears, weight_matrix
from evosparse.pruning.prune import prune_linear, prune_model
from evosparse.pruning.pruners import (
    dass_scores,
    keep_mask_from_scores,
    magnitude_scores,
    sparsegpt_prune,
    spread_counts,
    wanda_scores,
)
from evosparse.pruning.sensitivity import allocation_counts, nm_counts

from tests.conftest import make_tiny_gpt2, make_tiny_llama

PRUNERS = ("magnitude", "wanda", "sparsegpt", "dass")


def _zeros(model) -> dict[str, int]:
    return {n: int((weight_matrix(m) == 0).sum()) for n, m in prunable_linears(model).items()}


@pytest.mark.parametrize("pruner", PRUNERS)
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_every_layer_loses_exactly_its_count(pruner, family, tiny_tokens):
    model = make_tiny_llama() if family == "llama" else make_tiny_gpt2()
    counts = allocation_counts(model, "uniform", 0.537)  # not a round fraction of any layer
    # make the counts differ per layer so a pruner that ignored them would fail
    names = list(counts)
    counts[names[0]] = 7
    counts[names[1]] = 0
    prune_model(model, tiny_tokens, pruner, counts)
    assert _zeros(model) == counts


@pytest.mark.parametrize("pruner", PRUNERS)
@pytest.mark.parametrize("nm", [(2, 4), (4, 8)])
def test_nm_groups_hold_at_most_n_nonzeros(pruner, nm, tiny_tokens):
    model = make_tiny_llama()
    counts = nm_counts(model, nm)
    prune_model(model, tiny_tokens, pruner, counts, nm=nm)
    n, m = nm
    glu = {name for b in find_blocks(model) for name in (b.glu or ())[:2]}
    for name, mod in prunable_linears(model).items():
        w = weight_matrix(mod)
        # DaSS gate/up groups run along the intermediate dimension (rows), the rest along inputs
        along_rows = pruner == "dass" and name in glu
        groups = (w.t() if along_rows else w).reshape(-1, m)
        nonzero = (groups != 0).sum(dim=1)
        assert int(nonzero.max()) <= n, name
        assert int((w == 0).sum()) == counts[name], name


def test_unstructured_count_is_spread_over_rows_exactly():
    scores = torch.rand(5, 12, generator=torch.Generator().manual_seed(0))
    keep = keep_mask_from_scores(scores, 23)
    pruned_per_row = (~keep).sum(dim=1).tolist()
    assert pruned_per_row == [5, 5, 5, 4, 4] == spread_counts(23, 5).tolist()
    # within each row the pruned entries are exactly the lowest scores
    for r in range(5):
        k = pruned_per_row[r]
        lowest = set(torch.argsort(scores[r])[:k].tolist())
        assert set(torch.nonzero(~keep[r]).flatten().tolist()) == lowest
    cols = keep_mask_from_scores(scores, 14, dim=0)
    assert (~cols).sum(dim=0).tolist() == [2, 2] + [1] * 10


def test_wanda_mask_matches_the_paper_rule_by_hand():
    w = torch.tensor([[1.0, -2.0, 3.0, 0.5], [4.0, 1.0, -1.5, 2.0]])
    sq_norms = torch.tensor([16.0, 1.0, 1.0, 4.0])  # ‖X_j‖ = 4, 1, 1, 2
    # scores: row 0 = [4, 2, 3, 1], row 1 = [16, 1, 1.5, 4]; half of each row pruned
    keep = keep_mask_from_scores(wanda_scores(w, sq_norms), 4)
    assert keep.tolist() == [[True, False, True, False], [True, False, False, True]]
    # magnitude alone would keep a different set in row 0 (2 and 3 instead of 4·1 and 3)
    assert keep_mask_from_scores(magnitude_scores(w), 4)[0].tolist() == [False, True, True, False]


def test_dass_scores_gate_weights_by_intermediate_activation_by_hand():
    # gate/up weight [4 channels, 2 inputs]; Σ A_i² = 1, 1, 81, 10000 -> ‖A_i‖^½ = 1, 1, 3, 10
    w = torch.tensor([[2.0, 1.0], [1.0, 2.0], [1.0, 1.0], [0.5, 0.5]])
    a_sq = torch.tensor([1.0, 1.0, 81.0, 10000.0])
    scores = dass_scores(w, a_sq)
    torch.testing.assert_close(scores, torch.tensor([[2.0, 1.0], [1.0, 2.0], [3.0, 3.0], [5.0, 5.0]]))
    keep = keep_mask_from_scores(scores, 4, dim=0)  # 2 pruned in each input column
    # channels 2 and 3 (large activations) keep all their weights although channel 3's are the smallest
    assert keep.tolist() == [[False, False], [False, False], [True, True], [True, True]]
    assert keep_mask_from_scores(magnitude_scores(w), 4, dim=0)[3].tolist() == [False, False]
    # N:M along the intermediate dimension: groups are channels (0-3) within one column
    w8 = torch.ones(8, 1)
    a8 = torch.tensor([1.0, 50.0, 20.0, 2.0, 9.0, 3.0, 100.0, 4.0])
    keep_nm = keep_mask_from_scores(dass_scores(w8, a8), 1, nm=(2, 4), dim=0)
    assert keep_nm.flatten().tolist() == [False, True, True, False, True, False, True, False]


def test_dass_in_a_model_uses_the_down_projection_input(tiny_tokens):
    model = make_tiny_llama()
    block = find_blocks(model)[0]
    gate, up, down = block.glu
    inputs = capture_block_inputs(model, tiny_tokens)
    stats, _ = collect_block_stats(block.module, block.linears, inputs.hidden, inputs.kwargs)
    gate_w = weight_matrix(block.linears[gate]).clone()
    expected = keep_mask_from_scores(dass_scores(gate_w, stats[down].sq_norms), 5000, dim=0)
    prune_model(model, tiny_tokens, "dass", {gate: 5000, down: 3000})
    assert torch.equal(weight_matrix(block.linears[gate]) != 0, expected)
    # the down projection is pruned as Wanda: compare within rows with its own input norms
    # (it sees gate already pruned, so only its row counts are checked here)
    assert (weight_matrix(block.linears[down]) == 0).sum(dim=1).tolist() == spread_counts(3000, 64).tolist()
    # a channel with a larger intermediate activation keeps more of its gate weights
    kept_per_channel = (weight_matrix(block.linears[gate]) != 0).sum(dim=1).float()
    a = stats[down].sq_norms
    top, bottom = torch.argsort(a)[-20:], torch.argsort(a)[:20]
    assert kept_per_channel[top].mean() > kept_per_channel[bottom].mean()


def _layer_problem(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    rows, cols, n = 48, 96, 2048
    # correlated inputs with uneven scales, as real activations have
    mix = torch.randn(cols, cols, generator=g) / cols**0.5 + torch.eye(cols)
    scales = torch.exp(torch.randn(cols, generator=g))
    x = (torch.randn(n, cols, generator=g) @ mix) * scales
    w = torch.randn(rows, cols, generator=g)
    h = 2.0 * x.t() @ x / n
    return w, x, h


@pytest.mark.parametrize("sparsity", [0.5, 0.7])
def test_sparsegpt_reconstructs_better_than_magnitude(sparsity):
    w, x, h = _layer_problem()
    count = round(sparsity * w.numel())
    sgpt = sparsegpt_prune(w, h, count, blocksize=32)
    mag = w * keep_mask_from_scores(magnitude_scores(w), count)
    err = {k: float(((w - p) @ x.t()).pow(2).sum()) for k, p in {"sparsegpt": sgpt, "magnitude": mag}.items()}
    assert int((sgpt == 0).sum()) == count
    assert err["sparsegpt"] < 0.7 * err["magnitude"], err
    # and the OBS update matters: SparseGPT's own mask without the update is worse
    assert err["sparsegpt"] < float(((w - w * (sgpt != 0)) @ x.t()).pow(2).sum())


def test_sparsegpt_nm_pattern_and_input_unchanged():
    w, _, h = _layer_problem(1)
    before = w.clone()
    out = sparsegpt_prune(w, h, 1, nm=(2, 4))
    assert torch.equal(w, before)
    assert int((out.reshape(-1, 4) != 0).sum(dim=1).max()) <= 2
    assert int((out == 0).sum()) == w.numel() // 2


def test_prune_linear_rejects_unknown_pruner():
    from evosparse.pruning.errors import PruningConfigError

    model = make_tiny_llama(layers=1)
    lin = next(iter(prunable_linears(model).values()))
    with pytest.raises(PruningConfigError):
        prune_linear(lin, "random", 10, None)


def test_dass_falls_back_to_wanda_without_a_glu_mlp(tiny_tokens):
    a, b = make_tiny_gpt2(), make_tiny_gpt2()
    counts = allocation_counts(a, "uniform", 0.5)
    prune_model(a, tiny_tokens, "dass", counts)
    prune_model(b, tiny_tokens, "wanda", counts)
    for (n, ma), mb in zip(prunable_linears(a).items(), prunable_linears(b).values(), strict=True):
        assert torch.equal(weight_matrix(ma), weight_matrix(mb)), n


def test_each_block_is_calibrated_on_the_pruned_outputs_before_it(tiny_tokens):
    from evosparse.pruning.blockwise import run_block

    model = make_tiny_llama()
    reference = make_tiny_llama()  # same seed: same dense weights
    counts = allocation_counts(model, "uniform", 0.6)
    prune_model(model, tiny_tokens, "wanda", counts)
    # by hand: prune block 0, run it, then derive block 1's masks from those (pruned) outputs
    blocks = find_blocks(reference)
    inputs = capture_block_inputs(reference, tiny_tokens)
    dense_hidden1 = run_block(blocks[0].module, inputs.hidden, inputs.kwargs)
    for n, m in blocks[0].linears.items():
        weight_matrix(m).copy_(weight_matrix(prunable_linears(model)[n]))
    pruned_hidden1 = run_block(blocks[0].module, inputs.hidden, inputs.kwargs)
    name = "model.layers.1.self_attn.q_proj"
    w1 = weight_matrix(blocks[1].linears[name])
    masks = {}
    for label, hidden in {"pruned": pruned_hidden1, "dense": dense_hidden1}.items():
        stats, _ = collect_block_stats(blocks[1].module, {name: blocks[1].linears[name]}, hidden, inputs.kwargs)
        masks[label] = keep_mask_from_scores(wanda_scores(w1, stats[name].sq_norms), counts[name])
    got = weight_matrix(prunable_linears(model)[name]) != 0
    assert torch.equal(got, masks["pruned"])
    assert not torch.equal(masks["pruned"], masks["dense"])  # the test can tell the two apart

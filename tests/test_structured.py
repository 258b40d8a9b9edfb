"""Structured pruning (pattern 'structured', pruners goa / magnitude): pruner, reconstruction, export, levels, job."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from evosparse.jobs.spec import JobSpec, SearchSettings
from evosparse.pruning.blockwise import capture_block_inputs, run_block
from evosparse.pruning.errors import PruningConfigError
from evosparse.pruning.fitness import ProxyFitness
from evosparse.pruning.layers import find_blocks
from evosparse.pruning.sensitivity import allocation_counts
from evosparse.pruning.structured import (
    block_units,
    check_structured,
    plan_widths,
    prune_block_structured,
    prune_structured,
    structured_parameters,
)
from evosparse.pruning.structured_export import PADDED_DIR, export_structured, load_structured
from evosparse.pruning.structured_leveldb import StructuredLevelDB
from evosparse.search.levels import LevelSpace
from pydantic import ValidationError

from tests.conftest import make_tiny_llama


def _logits(model, x):
    with torch.no_grad():
        return model(input_ids=x, use_cache=False).logits


def _x():
    return torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(5))


def _block_counts(model, fractions):
    """Per-linear counts giving each block its own fraction (split over the block's linears by size)."""
    counts = {}
    for info, f in zip(find_blocks(model), fractions, strict=True):
        for name, m in info.linears.items():
            counts[name] = round(f * m.weight.numel())
    return counts


def test_plan_widths_budget_and_gqa_groups(tiny_llama):
    units = block_units(find_blocks(tiny_llama)[0])
    # tiny Llama: 4 query heads over 2 KV heads (head_dim 16), d 64, 160 channels
    assert (units.groups, units.n_rep, units.head_dim, units.channels) == (2, 2, 16, 160)
    assert units.group_params == (2 * 2 + 2) * 16 * 64 and units.channel_params == 3 * 64
    g, c = plan_widths(units, round(0.3 * units.params))
    assert g == 0 and abs(c * units.channel_params - 0.3 * units.params) <= units.channel_params / 2
    g, c = plan_widths(units, round(0.6 * units.params))  # past 1/2 of the block: one of the two KV groups goes
    assert g == 1
    assert abs(g * units.group_params + c * units.channel_params - 0.6 * units.params) <= units.channel_params / 2
    with pytest.raises(PruningConfigError, match="every attention head"):
        plan_widths(units, round(0.95 * units.params))


@pytest.mark.parametrize("pruner, sparsity", [("goa", 0.3), ("goa", 0.6), ("magnitude", 0.4)])
def test_uniform_export_loads_with_plain_from_pretrained(tmp_path, tiny_tokens, pruner, sparsity):
    from transformers import AutoModelForCausalLM

    model = make_tiny_llama()
    dense_params = structured_parameters(model)
    structure = prune_structured(model, tiny_tokens, pruner, allocation_counts(model, "uniform", sparsity))
    assert structure.uniform
    x = _x()
    ref = _logits(model, x)
    report = export_structured(model, None, tmp_path, {"pruner": pruner})
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(_logits(loaded, x), ref, rtol=0, atol=1e-5)
    # the config says the new widths; shapes and parameter counts are what the report says
    w = report["structure"]["layers"][0]
    assert report["structure"]["form"] == "hf-uniform" and not (tmp_path / PADDED_DIR).exists()
    assert loaded.config.intermediate_size == w["intermediate_size"]
    assert loaded.config.num_attention_heads == w["num_attention_heads"]
    assert loaded.config.num_key_value_heads == w["num_key_value_heads"]
    kept = structured_parameters(loaded)
    assert kept == report["parameters"]["kept_block_weights"] and dense_params == report["parameters"]["dense_block_weights"]
    assert report["global_sparsity"] == pytest.approx(1 - kept / dense_params)
    assert abs(report["global_sparsity"] - sparsity) < 0.01  # within half a channel per block
    for info in find_blocks(loaded):
        attn = info.module.self_attn
        assert attn.q_proj.weight.shape[0] == w["num_attention_heads"] * attn.head_dim
        assert attn.k_proj.weight.shape[0] == w["num_key_value_heads"] * attn.head_dim
        assert info.module.mlp.down_proj.weight.shape[1] == w["intermediate_size"]
        for name, m in info.linears.items():
            assert report["layer_sparsity"][name] == pytest.approx(1 - m.weight.numel() / _dense_numel(name))


def _dense_numel(name):
    dense = {n: m.weight.numel() for n, m in make_tiny_llama().named_modules() if hasattr(m, "weight")}
    return dense[name]


def test_per_layer_widths_export_reads_back_and_padded_form_matches(tmp_path, tiny_tokens):
    from evosparse.pruning.loading import load_model
    from transformers import AutoModelForCausalLM

    model = make_tiny_llama()
    structure = prune_structured(model, tiny_tokens, "goa", _block_counts(model, [0.2, 0.6, 0.4, 0.3]))
    assert not structure.uniform
    widths = [b["intermediate_size"] for b in structure.widths()]
    assert len(set(widths)) > 1 and structure.widths()[1]["num_key_value_heads"] == 1
    x = _x()
    ref = _logits(model, x)
    report = export_structured(model, None, tmp_path, {})
    assert report["structure"]["form"] == "evosparse-layer-widths"
    back = load_structured(tmp_path)
    torch.testing.assert_close(_logits(back, x), ref, rtol=0, atol=1e-5)
    assert [b.kept_channels for b in back.evosparse_structure.blocks] == [b.kept_channels for b in structure.blocks]
    assert structured_parameters(back) == report["parameters"]["kept_block_weights"]
    padded = AutoModelForCausalLM.from_pretrained(tmp_path / PADDED_DIR).eval()  # stock shapes, zeros
    assert padded.config.intermediate_size == 160 and padded.config.num_key_value_heads == 2
    torch.testing.assert_close(_logits(padded, x), ref, rtol=1e-4, atol=1e-4)
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):  # not a stock Llama checkpoint
        AutoModelForCausalLM.from_pretrained(tmp_path)
    # evosparse's loader (and so `evosparse eval`) reads it; it needs a tokenizer in the folder
    from evosparse.pruning.tiny import make_tokenizer

    make_tokenizer().save_pretrained(tmp_path)
    loaded, _tok = load_model(str(tmp_path), device="cpu")
    torch.testing.assert_close(_logits(loaded, x), ref, rtol=0, atol=1e-5)


def _block0_error(reconstruct_second: bool, tokens) -> tuple[float, float]:
    model = make_tiny_llama()
    info = find_blocks(model)[0]
    inputs = capture_block_inputs(model, tokens)
    target = run_block(info.module, inputs.hidden, inputs.kwargs)
    units = block_units(info)
    prune_block_structured(info, inputs.hidden, inputs.kwargs, "goa", plan_widths(units, round(0.6 * units.params)),
                           reconstruct_second)
    out = run_block(info.module, inputs.hidden, inputs.kwargs)
    return float((out - target).pow(2).sum()), float(target.pow(2).sum())


def test_reconstruction_lowers_the_block_output_error(tiny_tokens):
    with_rec, norm = _block0_error(True, tiny_tokens)
    without, _ = _block0_error(False, tiny_tokens)
    assert with_rec < 0.9 * without, (with_rec, without, norm)


def test_reconstruction_solves_the_least_squares_problem():
    from evosparse.pruning.structured import reconstruct

    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 12, generator=g) @ torch.randn(12, 12, generator=g)
    w = torch.randn(5, 12, generator=g)
    keep = torch.tensor([0, 2, 3, 7, 9, 11])
    w_new = reconstruct(w, x.t() @ x, keep, ridge=0.0)
    best = torch.linalg.lstsq(x[:, keep], x @ w.t()).solution.t()
    torch.testing.assert_close(w_new, best, rtol=1e-3, atol=1e-3)
    assert (x[:, keep] @ w_new.t() - x @ w.t()).norm() < (x[:, keep] @ w[:, keep].t() - x @ w.t()).norm()


def test_magnitude_keeps_the_largest_norm_channels(tiny_tokens):
    model = make_tiny_llama()
    mlp = find_blocks(model)[0].module.mlp
    with torch.no_grad():
        mlp.gate_proj.weight[7] *= 50  # channel 7 is by far the largest
        mlp.down_proj.weight[:, 3] = 0  # channel 3 the smallest
    structure = prune_structured(model, tiny_tokens, "magnitude", allocation_counts(model, "uniform", 0.3))
    kept = structure.blocks[0].kept_channels
    assert 7 in kept and 3 not in kept


def test_level_db_levels_match_block_sequential_pruning(tiny_tokens):
    """A level of the database computes the same function as pruning that block for real."""
    model = make_tiny_llama()
    real = copy.deepcopy(model)
    counts = _block_counts(model, [0.3, 0.0, 0.0, 0.0])  # channels only, first block: same inputs both ways
    db = StructuredLevelDB.build(model, tiny_tokens, "goa")
    db.apply(counts)
    prune_structured(real, tiny_tokens, "goa", counts)
    x = _x()
    torch.testing.assert_close(_logits(model, x), _logits(real, x), rtol=1e-4, atol=1e-4)
    assert db.current[0][1] == 160 - real.evosparse_structure.blocks[0].intermediate_size
    db.restore()
    torch.testing.assert_close(_logits(model, x), _logits(make_tiny_llama(), x), rtol=0, atol=0)


def test_proxy_fitness_scores_structured_levels(tiny_tokens):
    model = make_tiny_llama()
    db = StructuredLevelDB.build(model, tiny_tokens, "goa")
    units = db.units("layer")
    space = LevelSpace.build([u.size for u in units], 0.3, 0.05, 0.2)
    fit = ProxyFitness(model, tiny_tokens, db, units, space)
    uniform = fit(space.zero(), 64)
    moved = list(space.zero())
    moved[0], moved[3] = space.lo[0], -space.lo[0]
    assert uniform > 0 and fit(tuple(moved), 64) != uniform
    # the budget is exact in level space and lands within half a channel per block in weights
    widths = [plan_widths(u, c) for u, c in zip(db.units_of, space.counts(tuple(moved)), strict=True)]
    removed = sum(g * u.group_params + c * u.channel_params for (g, c), u in zip(widths, db.units_of, strict=True))
    assert abs(removed - space.budget) <= 4 * db.units_of[0].channel_params / 2
    db.restore()


def test_spec_rejects_bad_structured_input():
    from evosparse.jobs import spec as job_spec
    from evosparse.pruning import structured

    assert job_spec.STRUCTURED_PRUNERS == structured.STRUCTURED_PRUNERS  # the torch-free spec's copy of the rule
    with pytest.raises(ValidationError, match="needs pattern 'structured'"):
        JobSpec(sparsity=0.5, pruner="goa", pattern="2:4")
    with pytest.raises(ValidationError, match="needs pruner 'goa' or 'magnitude'"):
        JobSpec(sparsity=0.3, pruner="wanda", pattern="structured")
    with pytest.raises(ValidationError, match="granularity"):
        JobSpec(sparsity=0.3, pruner="goa", pattern="structured", allocation="evolutionary",
                search=SearchSettings(granularity="module"))
    with pytest.raises(ValidationError, match="search.workers"):
        JobSpec(sparsity=0.3, pruner="goa", pattern="structured", allocation="evolutionary",
                search=SearchSettings(workers=2))
    spec = JobSpec(sparsity=0.3, pruner="goa", pattern="structured")
    assert spec.structured and spec.nm is None
    with pytest.raises(PruningConfigError, match="N:M"):
        prune_structured(make_tiny_llama(), torch.zeros(1, 8, dtype=torch.long), "goa", {}, nm=(2, 4))


def test_job_refuses_a_sparsity_that_removes_every_head_and_writes_nothing(tiny_llama_dir, tmp_path):
    from evosparse.worker.runner import run_job

    spec = JobSpec(model=str(tiny_llama_dir), sparsity=0.95, pruner="goa", pattern="structured",
                   calib_windows=2, eval_windows=2, seq_len=32)
    out = tmp_path / "o"
    with pytest.raises(PruningConfigError, match="every attention head"):
        run_job(spec, out)
    assert not out.exists() and list(tmp_path.iterdir()) == []
    with pytest.raises(PruningConfigError):
        check_structured(make_tiny_llama(), allocation_counts(make_tiny_llama(), "uniform", 0.95))


def test_job_searched_widths_end_to_end(tiny_llama_dir, tmp_path):
    from evosparse.pruning.loading import load_model
    from evosparse.worker.runner import run_job

    spec = JobSpec(model=str(tiny_llama_dir), sparsity=0.3, pruner="goa", pattern="structured",
                   allocation="evolutionary", calib_windows=4, eval_windows=2, seq_len=32, seed=3,
                   search=SearchSettings(generations=2, offspring=3, selection="32:2,64:1", seed_from="uniform",
                                         step_fraction=0.05, max_level_delta=0.2, time_budget_min=2))
    report = run_job(spec, tmp_path / "o")
    out = tmp_path / "o"
    assert set(report["perplexity"]) == {"dense", "uniform", "pruned"}
    assert abs(report["global_sparsity"] - 0.3) < 0.01
    saved = json.loads((out / "report.json").read_text())
    assert saved["structure"]["layers"] == report["structure"]["layers"]
    model, _ = load_model(str(out), device="cpu")
    assert structured_parameters(model) == report["parameters"]["kept_block_weights"]
    widths = [b["intermediate_size"] for b in report["structure"]["layers"]]
    for info, wdt in zip(find_blocks(model), widths, strict=True):
        assert info.module.mlp.down_proj.weight.shape[1] == wdt


def test_cli_structured_prune_and_eval(tiny_llama_dir, tmp_path, capsys):
    from evosparse.cli.main import main
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    small = ["--calib-windows", "4", "--eval-windows", "2", "--seq-len", "32"]
    assert main(["prune", str(tiny_llama_dir), "--sparsity", "0.3", "--pruner", "goa", "--pattern", "structured",
                 *small, "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["pattern"] == "structured" and report["structure"]["form"] == "hf-uniform"
    assert AutoModelForCausalLM.from_pretrained(out).config.intermediate_size < 160
    capsys.readouterr()
    assert main(["eval", str(out), "--data", "pydoc", "--windows", "2", "--seq-len", "32"]) == 0
    assert f"perplexity {report['perplexity']['pruned']:.3f}" in capsys.readouterr().out
    bad = tmp_path / "bad"
    assert main(["prune", str(tiny_llama_dir), "--sparsity", "0.5", "--pruner", "goa", "--pattern", "2:4",
                 *small, "--out", str(bad)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(err) == 1 and "needs pattern 'structured'" in err[0] and not bad.exists()


def test_greedy_removal_matches_brute_force_least_squares():
    """Each greedy step removes the unit whose removal, after re-fitting the rest, costs least."""
    from evosparse.pruning.structured import greedy_removal_order, reconstruct

    g = torch.Generator().manual_seed(3)
    x = torch.randn(300, 10, generator=g) @ torch.randn(10, 10, generator=g)
    w = torch.randn(4, 10, generator=g)
    gram = x.t() @ x

    def err(keep):
        k = torch.tensor(keep)
        return float((x @ w.t() - x[:, k] @ reconstruct(w, gram, k, ridge=0.0).t()).pow(2).sum())

    order = greedy_removal_order(w, gram, None, 3, ridge=1e-9)
    kept: list[int] = list(range(10))
    for j in order:
        best = min(kept, key=lambda u: err([v for v in kept if v != u]))
        assert j == best
        kept.remove(j)
    # column sets (KV groups): the same rule a set at a time; the order is nested
    cols = [torch.tensor([0, 1]), torch.tensor([2, 3, 4]), torch.tensor([5, 6]), torch.tensor([7, 8, 9])]
    groups = greedy_removal_order(w, gram, cols, 2, ridge=1e-9)
    first = min(range(4), key=lambda u: err([c for v in range(4) if v != u for c in cols[v].tolist()]))
    assert groups[0] == first and greedy_removal_order(w, gram, cols, 1, ridge=1e-9) == groups[:1]

"""Size budgets (bits_per_weight): quantized levels, per-layer bits in prune and export, a searched job end to end."""

import json

import pytest
import torch
from evosparse.jobs.spec import JobSpec
from evosparse.pruning.errors import PruningConfigError
from evosparse.pruning.layers import prunable_linears, weight_matrix
from evosparse.pruning.leveldb import LevelDB
from evosparse.pruning.quantize import QuantConfig, quantize_rtn
from evosparse.pruning.quantlevels import QuantLevelDB
from evosparse.search.bitbudget import unit_bits
from evosparse.worker.runner import run_job
from pydantic import ValidationError


def _max_distinct_per_group(w: torch.Tensor, group: int) -> int:
    g = w.float().reshape(-1, group)
    srt = torch.sort(g, dim=1).values
    return int(((srt[:, 1:] != srt[:, :-1]).sum(dim=1) + 1).max())


def test_quantized_levels_are_the_pruned_level_rounded_with_zeros_kept(tiny_llama, tiny_tokens):
    base = LevelDB.build(tiny_llama, tiny_tokens, "wanda")
    db = QuantLevelDB(base, group_size=32)
    names = list(db.modules)
    levels = {n: (weight_matrix(db.modules[n]).numel() * k // 10, (2, 3, 4, 8)[k % 4])
              for k, n in enumerate(names)}
    levels = {n: (min(c, weight_matrix(db.modules[n]).numel()), b) for n, (c, b) in levels.items()}
    assert db.apply(levels) == names
    for n, (count, bits) in levels.items():
        w = weight_matrix(db.modules[n])
        pruned = base.pruned_weight(n, count)
        assert int((w == 0).sum()) >= count
        assert bool((w[pruned == 0] == 0).all())  # every pruned weight is still exactly zero
        assert _max_distinct_per_group(w, 32) <= 2 ** bits
        want = quantize_rtn(pruned, QuantConfig(bits, 32, "rtn"), keep=pruned != 0).dequantize()
        assert torch.equal(w, want.to(w.dtype))
    db.restore()
    assert all(torch.equal(weight_matrix(db.modules[n]), base.pruned_weight(n, 0)) for n in names)


def test_quantized_levels_refuse_a_banded_database(tiny_llama, tiny_tokens):
    bounds = {n: (10, 200) for n in prunable_linears(tiny_llama)}
    base = LevelDB.build(tiny_llama, tiny_tokens, "magnitude", bounds=bounds)
    with pytest.raises(PruningConfigError, match="without bounds"):
        QuantLevelDB(base, group_size=32)


def _spec(model_dir, **kw) -> JobSpec:
    base = dict(model=str(model_dir), bits_per_weight=3.0, pruner="wanda", calib_windows=4, eval_windows=2,
                seq_len=32, quantize={"group_size": 32, "method": "rtn"})
    base.update(kw)
    return JobSpec(**base)


def _check_checkpoint(out, report, widths):
    """Every linear: at most 2^bits values per group, its pruned weights zero, the budget kept."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        model(torch.zeros(1, 4, dtype=torch.long))  # a compressed-tensors checkpoint unpacks on the first forward
    bits = report["layer_bits"]
    assert set(bits.values()) <= set(widths)
    total = 0
    for name, mod in prunable_linears(model).items():
        w = weight_matrix(mod)
        assert _max_distinct_per_group(w, 32) <= 2 ** bits[name], name
        zeros = int((w == 0).sum())
        assert zeros >= report["layer_pruned"][name]  # the pruned weights stay zero through quantization and export
        total += unit_bits(w.numel(), zeros, bits[name], 32)
    # the cost model on what was written never exceeds the budget (zeros the rounding added only lower it)
    n = sum(weight_matrix(m).numel() for m in prunable_linears(model).values())
    assert report["bits_per_weight"] <= 3.0
    assert total / n <= report["bits_per_weight"] + 1e-9
    return model


def test_searched_budget_job_keeps_the_budget_and_exports_per_layer_bits(tiny_llama_dir, tmp_path):
    spec = _spec(tiny_llama_dir, allocation="evolutionary", format="compressed-tensors",
                 search={"generations": 3, "offspring": 4, "selection": "64:2,128:1", "seed_from": "fisher",
                         "time_budget_min": None})
    report = run_job(spec, tmp_path / "out")
    assert report["bits_per_weight"] <= report["bits_per_weight_target"] == 3.0
    assert report["bits_per_weight"] > 3.0 - 0.5  # filled, not left far under the budget
    s = report["search"]
    assert len(s["best_bits"]) == len(s["units"]) == 4
    assert "uniform" in report["perplexity"] and "pruned" in report["perplexity"]
    # one compressed-tensors scheme per width used, naming its linears
    qc = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    used = sorted(set(report["layer_bits"].values()))
    assert sorted(g["weights"]["num_bits"] for g in qc["config_groups"].values()) == used
    for g in qc["config_groups"].values():
        if len(used) > 1:
            assert all(report["layer_bits"][t] == g["weights"]["num_bits"] for t in g["targets"])
    _check_checkpoint(tmp_path / "out", report, (2, 3, 4, 8))


def test_uniform_budget_job_from_the_cli_gives_every_layer_one_width(tiny_llama_dir, tmp_path, capsys):
    from evosparse.cli.main import main

    rc = main(["prune", str(tiny_llama_dir), "--bits-per-weight", "3", "--quantize-group", "32",
               "--quantize-method", "gptq", "--quantize-bit-widths", "3", "4", "--calib-windows", "4",
               "--eval-windows", "2", "--seq-len", "32", "--out", str(tmp_path / "out")])
    assert rc == 0
    assert "bits per weight, budget 3" in capsys.readouterr().out
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["spec"]["sparsity"] is None and report["quantize"]["method"] == "gptq"
    assert len(set(report["layer_bits"].values())) == 1
    assert set(report["layer_bits"].values()) <= {3, 4}
    _check_checkpoint(tmp_path / "out", report, (3, 4))


@pytest.mark.parametrize("kw, match", [
    ({"sparsity": 0.5}, "not both"),
    ({"bits_per_weight": None}, "give sparsity"),
    ({"quantize": None}, "needs quantize"),
    ({"pattern": "2:4"}, "unstructured"),
    ({"allocation": "owl"}, "allocation"),
    ({"bits_per_weight": 1.2}, "below the cheapest choice"),
    ({"quantize": {"group_size": 32, "bit_widths": [1, 4]}}, "bit_widths"),
    ({"allocation": "evolutionary", "search": {"workers": 2}}, "one process"),
])
def test_bad_budget_specs_are_refused(tiny_llama_dir, kw, match):
    with pytest.raises(ValidationError, match=match):
        _spec(tiny_llama_dir, **kw)


def test_per_layer_bits_export_as_one_scheme_per_width_and_load_back(tiny_llama, tiny_tokens, tmp_path):
    from evosparse.pruning.export import count_zeros_in_checkpoint, save_checkpoint
    from evosparse.pruning.prune import prune_model
    from transformers import AutoModelForCausalLM

    names = list(prunable_linears(tiny_llama))
    widths = {n: (2, 3, 4, 8)[i % 4] for i, n in enumerate(names)}
    counts = {n: weight_matrix(m).numel() // 2 for n, m in prunable_linears(tiny_llama).items()}
    quant = {n: QuantConfig(b, 32, "gptq") for n, b in widths.items()}
    quantized = prune_model(tiny_llama, tiny_tokens, "wanda", counts, quant=quant, scale_dtype=torch.bfloat16)
    assert {n: qw.config.bits for n, qw in quantized.items()} == widths
    expected = {n: weight_matrix(m).detach().to(torch.bfloat16) for n, m in prunable_linears(tiny_llama).items()}
    rep = save_checkpoint(tiny_llama, None, tmp_path, fmt="compressed-tensors", dtype=torch.bfloat16,
                          quantized=quantized)
    groups = json.loads((tmp_path / "config.json").read_text())["quantization_config"]["config_groups"]
    assert {g["weights"]["num_bits"]: sorted(g["targets"]) for g in groups.values()} == {
        b: sorted(n for n in names if widths[n] == b) for b in (2, 3, 4, 8)}
    # the report reads each packed weight back with its own scheme
    zeros = count_zeros_in_checkpoint(tmp_path, [f"{n}.weight" for n in names])
    assert all(zeros[f"{n}.weight"][0] >= counts[n] for n in names)
    assert rep["global_sparsity"] >= 0.5
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        loaded(tiny_tokens[:1])  # transformers unpacks the codes on the first forward
    for n, m in prunable_linears(loaded).items():
        w = weight_matrix(m)
        assert torch.equal(w, expected[n]), n  # the same numbers as in memory, 8-bit codes included
        assert _max_distinct_per_group(w, 32) <= 2 ** widths[n]

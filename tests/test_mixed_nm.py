"""Mixed N:M per layer: exact patterns, exact global budget, N:M levels in the level database, end to end."""

import json
import random

import pytest
import torch
from evosparse.jobs.spec import JobSpec, parse_mixed
from evosparse.pruning.errors import PruningConfigError
from evosparse.pruning.layers import prunable_linears, weight_matrix
from evosparse.pruning.leveldb import LevelDB
from evosparse.pruning.pruners import keep_mask_from_scores, magnitude_scores
from evosparse.search import operators
from evosparse.search.levels import mixed_space, pruned_per_group
from hypothesis import assume, given, settings
from hypothesis import strategies as st


@settings(max_examples=60, deadline=None)
@given(
    units=st.integers(2, 40),
    groups=st.integers(1, 50),
    pattern=st.sampled_from(["mixed:4", "mixed:8", "mixed:16", "2:4+dense"]),
    frac=st.floats(0.0, 1.0),
    seed=st.integers(0, 10_000),
    moves=st.integers(1, 30),
)
def test_every_vector_is_exact_per_layer_and_in_total(units, groups, pattern, frac, seed, moves):
    mixed = parse_mixed(pattern)
    m, choices = mixed.m, mixed.pruned
    size = groups * m * 4  # a unit of `groups * 4` rows of M weights
    dp = choices[1] - choices[0]
    # a target that some mix of choices reaches exactly: k steps of dp over all units
    k = round(frac * (choices[-1] // dp - choices[0] // dp) * units) + choices[0] // dp * units
    target = k * dp / (m * units)
    assume(0.0 < target < 1.0)
    space = mixed_space([size] * units, target, m, choices, max_level_delta=0.25)
    rng = random.Random(seed)
    pop = [space.zero()]
    for _ in range(moves):
        a = operators.mutate(space, rng.choice(pop), rng, max_jump=3)
        b = operators.crossover(space, rng.choice(pop), a, rng)
        pop += [a, b]
    budget = round(target * size * units)
    for v in pop:
        counts = space.counts(v)
        assert sum(counts) == budget  # the global target, exact in parameters
        ps = pruned_per_group(space, v, m)  # every unit an exact N:M pattern
        assert all(p in choices for p in ps)
        assert all(c == size * p // m for c, p in zip(counts, ps, strict=True))


def test_unreachable_targets_name_the_nearest_reachable_ones():
    with pytest.raises(ValueError, match="nearest exact targets: 0.608333, 0.6125"):
        mixed_space([6400] * 30, 0.61, 8, range(1, 8))
    with pytest.raises(ValueError, match="one size"):
        mixed_space([6400, 3200], 0.5, 4, (0, 2))


def test_2_4_plus_dense_levels_are_only_dense_or_2_4():
    space = mixed_space([1024] * 10, 0.3, 4, (0, 2))
    rng = random.Random(0)
    v = space.zero()
    for _ in range(50):
        v = operators.mutate(space, v, rng)
        assert sorted(set(pruned_per_group(space, v, 4))) == [0, 2]
        assert pruned_per_group(space, v, 4).count(2) == 6  # 30 % of the weights = 6 of 10 blocks at 2:4


@pytest.mark.parametrize("pruner", ["magnitude", "wanda", "dass", "sparsegpt"])
def test_level_database_serves_exact_nm_levels(tiny_llama, tiny_tokens, pruner):
    db = LevelDB.build(tiny_llama, tiny_tokens, pruner, nm_m=4)
    units = db.units("layer")
    for p in (1, 2, 3):
        counts = db.linear_counts(units, [u.size * p // 4 for u in units])
        db.apply(counts)
        for name, mod in db.modules.items():
            w = weight_matrix(mod)
            dim = db.dim.get(name, 1)
            groups = (w if dim == 1 else w.t()).reshape(w.shape[0] if dim == 1 else w.shape[1], -1, 4)
            # exactly (4 - p):4 in every group of 4 along the compared dimension
            assert int((groups != 0).sum(-1).max()) <= 4 - p
            assert int((w == 0).sum()) == counts[name]
    if pruner == "magnitude":  # same masks as pruning the dense weights with the N:M pattern directly
        db.apply(db.linear_counts(units, [u.size // 2 for u in units]))
        for name, mod in db.modules.items():
            keep = keep_mask_from_scores(magnitude_scores(db.dense[name]), 1, (2, 4))
            assert torch.equal(weight_matrix(mod), db.dense[name] * keep)
    db.restore()
    assert all(torch.equal(weight_matrix(m), db.dense[n]) for n, m in db.modules.items())


def _spec(model_dir, **kw) -> JobSpec:
    base = dict(model=str(model_dir), calib_windows=4, eval_windows=2, seq_len=32)
    base.update(kw)
    return JobSpec(**base)


def _check_patterns(out_dir, report):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out_dir)
    linears = prunable_linears(model)
    assert set(report["layer_pattern"]) == set(linears)
    zeros = total = 0
    for name, mod in linears.items():
        w = weight_matrix(mod)
        label = report["layer_pattern"][name]
        zeros += int((w == 0).sum())
        total += w.numel()
        if label == "dense":
            continue
        n, m = map(int, label.split(":"))
        assert int((w.reshape(w.shape[0], -1, m) != 0).sum(-1).max()) <= n, name
        assert int((w == 0).sum()) == w.numel() * (m - n) // m, name  # exactly (M - N) of every M
    return zeros / total


def test_evolutionary_mixed_nm_job_is_exact(tiny_llama_dir, tmp_path):
    spec = _spec(tiny_llama_dir, sparsity=0.625, pattern="mixed:8", allocation="evolutionary", pruner="wanda",
                 search={"generations": 6, "offspring": 4, "selection": "64:2,128:1", "seed_from": "uniform",
                         "time_budget_min": 1})
    report = run_job_quiet(spec, tmp_path / "out")
    assert _check_patterns(tmp_path / "out", report) == pytest.approx(0.625, abs=1e-12)
    assert report["global_sparsity"] == pytest.approx(0.625, abs=1e-12)  # exact: 5 of every 8 on average
    blocks = {}
    for name, label in report["layer_pattern"].items():
        blocks.setdefault(name.split(".mlp")[0].split(".self_attn")[0], set()).add(label)
    assert all(len(labels) == 1 for labels in blocks.values())  # one pattern per layer (block)
    assert "uniform" in report["perplexity"]


def test_two_four_plus_dense_with_fisher_allocation(tiny_llama_dir, tmp_path):
    spec = _spec(tiny_llama_dir, sparsity=0.25, pattern="2:4+dense", allocation="fisher", pruner="sparsegpt")
    report = run_job_quiet(spec, tmp_path / "out")
    assert sorted(set(report["layer_pattern"].values())) == ["2:4", "dense"]
    assert _check_patterns(tmp_path / "out", report) == pytest.approx(0.25, abs=1e-12)
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert saved["layer_pattern"] == report["layer_pattern"]


def test_mixed_patterns_refuse_bad_combinations(tiny_llama_dir, tmp_path):
    with pytest.raises(ValueError, match="reaches sparsity"):
        JobSpec(sparsity=0.9, pattern="mixed:8")
    with pytest.raises(ValueError, match="granularity"):
        JobSpec(sparsity=0.5, pattern="mixed:8", allocation="evolutionary", search={"granularity": "module"})
    # 0.61 of 4 equal blocks is no mix of N:8: refused before anything is written
    with pytest.raises(PruningConfigError, match="not reachable exactly"):
        run_job_quiet(_spec(tiny_llama_dir, sparsity=0.61, pattern="mixed:8"), tmp_path / "x")
    assert not (tmp_path / "x").exists()


def run_job_quiet(spec, out):
    from evosparse.worker.runner import run_job

    return run_job(spec, out)

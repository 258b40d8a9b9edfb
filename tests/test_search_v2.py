"""Cheap SparseGPT levels, fresh windows, validation-based selection and depth-ramp seeds (tiny models)."""

from __future__ import annotations

import json
import random

import pytest
import torch
from evosparse.jobs.spec import JobSpec, SearchSettings
from evosparse.pruning import pruners
from evosparse.pruning.errors import PruningConfigError
from evosparse.pruning.fitness import ProxyFitness
from evosparse.pruning.layers import find_blocks
from evosparse.pruning.leveldb import LevelDB
from evosparse.search import allocation as alloc
from evosparse.search.evolution import EvolutionarySearch, SearchConfig, generation_chunk
from evosparse.search.levels import LevelSpace
from evosparse.worker.search_stage import linear_anchors, ramp_allocation, run_search


# ---------------------------------------------------------------------- SparseGPT levels
def test_sparsegpt_levels_in_one_pass_equal_one_pass_per_level(tiny_llama, tiny_tokens):
    db = LevelDB.build(tiny_llama, tiny_tokens, "sparsegpt")
    name = next(n for n in db.modules if "down_proj" in n)  # 160 inputs: two column blocks of 128 and 32
    w, h = db.dense[name], db.hessian[name]
    counts = [0, 1000, 4000, 7000]
    levels, diag = pruners.sparsegpt_levels(w, h, counts, blocksize=128)
    assert diag.shape == (w.shape[1],)
    for c, got in zip(counts, levels, strict=True):
        expected = pruners.sparsegpt_prune(w, h, c)
        assert int((got == 0).sum()) == c or c == 0
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_anchor_database_builds_up_front_and_derives_the_levels_between(tiny_llama, tiny_tokens, monkeypatch):
    blocks = find_blocks(tiny_llama)
    name = next(iter(blocks[0].linears))
    size = blocks[0].linears[name].weight.numel()
    anchors = {n: [0, size // 4, size // 2] for b in blocks for n in b.linears}
    db = LevelDB.build(tiny_llama, tiny_tokens, "sparsegpt", anchors=anchors)
    assert db.anchor_levels() == 3 * len(anchors) and db.anchor_seconds > 0

    def no_lazy_levels(*args, **kwargs):
        raise AssertionError("a level was computed on use")

    monkeypatch.setattr(pruners, "sparsegpt_prune", no_lazy_levels)
    anchor = db.pruned_weight(name, size // 4)
    assert torch.equal(anchor, db.anchors[name][size // 4].unpack())
    built, _ = pruners.sparsegpt_levels(db.dense[name], db.hessian[name], [size // 4])
    assert torch.equal(anchor, built[0])  # held packed, applied with the very values the OBS pass gave
    # Each anchor costs a bit per weight plus 4 bytes per kept weight: the zeros cost a bit, not 4 bytes.
    packed_bytes = sum(p.nbytes() for a in db.anchors.values() for p in a.values())
    assert packed_bytes == sum(-(-db.sizes[n] // 8) + 4 * (db.sizes[n] - c) for n, a in db.anchors.items() for c in a)
    count = size // 4 + 37
    derived = db.pruned_weight(name, count)
    assert int((derived == 0).sum()) == count
    kept = derived != 0
    assert torch.equal(derived[kept], anchor[kept])  # the nearest anchor below, with more zeros, nothing else moved
    assert torch.equal(db.pruned_weight(name, count), derived)  # deterministic
    with pytest.raises(PruningConfigError):
        LevelDB.build(tiny_llama, tiny_tokens, "sparsegpt", anchors=anchors, nm_m=4)


def test_linear_anchors_cover_the_ends_and_every_kth_level(tiny_llama):
    from evosparse.pruning.leveldb import search_units, split_counts

    units = search_units(find_blocks(tiny_llama), "layer")
    space = LevelSpace.build([u.size for u in units], 0.6, 0.05, 0.3)
    anchors = linear_anchors(units, space, 4)
    for i, u in enumerate(units):
        for level in (space.lo[i], space.hi[i], 0, 4, -4):
            vec_counts = [space.base[j] for j in range(len(units))]
            vec_counts[i] = space.base[i] + level * space.step
            for n, c in split_counts([u], [vec_counts[i]]).items():
                assert c in anchors[n]
        assert len(anchors[u.linears[0]]) < space.hi[i] - space.lo[i] + 1  # coarser than the full grid


# ---------------------------------------------------------------------- fresh windows
def test_generation_chunks_are_seeded_permutations():
    got = [generation_chunk(3, g, 4) for g in range(12)]
    for epoch in range(3):
        assert sorted(got[4 * epoch: 4 * epoch + 4]) == [0, 1, 2, 3]
    assert got == [generation_chunk(3, g, 4) for g in range(12)]
    assert got != [generation_chunk(4, g, 4) for g in range(12)]


def _toy_space() -> LevelSpace:
    return LevelSpace.build([100] * 6, 0.5, 0.05, 0.3)


def _toy_fitness(optimum, calls):
    def fitness(vector, tokens, chunk=0):
        calls.append(chunk)
        noise = random.Random(hash((tuple(vector), chunk))).random() * 0.3  # chunk-dependent: a "minibatch"
        return sum((a - b) ** 2 for a, b in zip(vector, optimum, strict=True)) + noise
    return fitness


def test_fresh_windows_read_each_generations_chunk_and_resume_exactly():
    space = _toy_space()
    optimum = (2, -2, 1, -1, 0, 0)
    calls: list[int] = []
    cfg = SearchConfig(generations=8, offspring=5, stages=[(1, 2), (4, 1)], seed=2, time_budget_s=None,
                       window_chunks=3)
    states: list[bytes] = []
    full = EvolutionarySearch(space, _toy_fitness(optimum, calls), cfg,
                              progress=lambda r, s: states.append(s)).run()
    assert {r["chunk"] for r in full.history} == {0, 1, 2}
    assert [r["chunk"] for r in full.history] == [generation_chunk(2, g, 3) for g in range(9)]
    assert set(calls) == {0, 1, 2}
    resumed = EvolutionarySearch(space, _toy_fitness(optimum, []), cfg, state=states[3]).run()
    assert resumed.best == full.best and [r["best"] for r in resumed.history] == [r["best"] for r in full.history]
    cache = json.loads(states[-1])["cache"]
    assert all(len(e) == 4 for e in cache)  # (vector, tokens, chunk, score)


def test_proxy_fitness_chunks_equal_a_fitness_on_those_windows_alone(tiny_llama, tiny_tokens):
    db = LevelDB.build(tiny_llama, tiny_tokens, "wanda")
    units = db.units("layer")
    space = LevelSpace.build([u.size for u in units], 0.6, 0.05, 0.3)
    v = space.from_counts(alloc.ramp([u.size for u in units], 0.6, [0, 1 / 3, 2 / 3, 1], 0.1))
    chunked = ProxyFitness(tiny_llama, tiny_tokens, db, units, space, window_bounds=[32, 128], chunk_windows=4)
    alone = ProxyFitness(tiny_llama, tiny_tokens[4:8], db, units, space, window_bounds=[32, 128])
    assert chunked(v, 32, 1) == alone(v, 32) and chunked(v, 128, 1) == alone(v, 128)
    assert chunked(v, 128, 0) != chunked(v, 128, 1)
    assert [w for w, _ in chunked.known_windows(v)] == list(range(8))
    other = ProxyFitness(tiny_llama, tiny_tokens, db, units, space, window_bounds=[32, 128], chunk_windows=4)
    other.add_known_windows(v, chunked.known_windows(v))
    runs = other.blocks_run
    assert other(v, 128, 1) == chunked(v, 128, 1) and other.blocks_run == runs  # nothing recomputed
    with pytest.raises(ValueError):
        chunked(v, 32, 2)
    db.restore()


# ---------------------------------------------------------------------- validation
def test_the_answer_is_the_parent_or_elite_member_best_on_validation():
    space = _toy_space()
    optimum = (2, -2, 1, -1, 0, 0)
    held_out = (1, -1, 1, -1, 0, 0)  # validation prefers another vector than the selection does

    def validate(v):
        return sum((a - b) ** 2 for a, b in zip(v, held_out, strict=True))

    cfg = SearchConfig(generations=10, offspring=6, stages=[(1, 2), (4, 1)], seed=1, time_budget_s=None)
    search = EvolutionarySearch(space, _toy_fitness(optimum, []), cfg, validate=validate)
    result = search.run()
    assert all("val" in r for r in result.history)
    assert [r["val"] for r in result.history] == [validate(tuple(r["best_levels"])) for r in result.history]
    candidates = {tuple(r["best_levels"]) for r in result.history} | {v for v, _ in search.elite}
    assert result.best_val == min(validate(v) for v in candidates) == validate(result.best)
    assert result.best != search.parent  # the last selection's winner was not the answer here


def test_run_search_with_validation_fresh_windows_and_ramp_seeds(tiny_llama, tiny_tokens):
    class Hooks:
        def __init__(self):
            self.records, self.states = [], []

        def generation(self, record, state):
            self.records.append(record)
            self.states.append(state)

        def should_cancel(self):
            return False

    spec = JobSpec(model="tiny", sparsity=0.6, pruner="sparsegpt", allocation="evolutionary", seed=3, calib_windows=8,
                   search=SearchSettings(generations=4, offspring=4, selection="32:2,64:1", seed_from="uniform",
                                         granularity="layer", step_fraction=0.05, max_level_delta=0.3,
                                         validation_windows=2, fresh_windows=True, anchor_every=3))
    hooks = Hooks()
    out = run_search(tiny_llama, tiny_tokens, spec, hooks)
    assert [r["chunk"] for r in hooks.records] == [generation_chunk(3, g, 3) for g in range(5)]  # 6 windows / 2
    assert out.anchor_levels > 0
    assert out.best_val is not None and out.best_val <= min(r["val"] for r in hooks.records)
    resumed = run_search(tiny_llama, tiny_tokens, spec, Hooks(), resume_state=hooks.states[1])
    assert resumed.best_levels == out.best_levels and resumed.best_val == out.best_val
    with pytest.raises(ValueError, match="validation_windows"):
        JobSpec(model="tiny", sparsity=0.6, allocation="evolutionary", calib_windows=4,
                search=SearchSettings(validation_windows=4))


# ---------------------------------------------------------------------- depth ramps
def test_ramp_rises_with_depth_and_meets_the_budget():
    sizes = [1000] * 5
    counts = alloc.ramp(sizes, 0.6, [0, 0.25, 0.5, 0.75, 1], 0.1)
    assert sum(counts) == alloc.budget(sizes, 0.6)
    assert counts == sorted(counts) and counts[-1] - counts[0] == 200
    with pytest.raises(ValueError):
        alloc.ramp(sizes, 0.6, [0, 2, 0, 0, 0], 0.1)


def test_ramp_allocation_picks_its_slope_on_calibration(tiny_llama, tiny_tokens):
    spec = JobSpec(model="tiny", sparsity=0.6, pruner="wanda", allocation="ramp",
                   search=SearchSettings(selection="32:2,64:1"))
    blocks = find_blocks(tiny_llama)
    dense = {n: m.weight.detach().clone() for b in blocks for n, m in b.linears.items()}
    counts, info = ramp_allocation(tiny_llama, tiny_tokens, spec, blocks)
    assert info["calibration_kl"][str(info["slope"])] == min(info["calibration_kl"].values())
    total = sum(w.numel() for w in dense.values())
    assert sum(counts.values()) == round(0.6 * total)
    assert all(torch.equal(m.weight, dense[n]) for b in blocks for n, m in b.linears.items())  # dense again
    fixed, info = ramp_allocation(tiny_llama, tiny_tokens, spec.model_copy(update={"ramp_slope": 0.2}), blocks)
    first, last = blocks[0], blocks[-1]
    frac = [sum(fixed[n] for n in b.linears) / sum(dense[n].numel() for n in b.linears) for b in (first, last)]
    assert frac[1] - frac[0] == pytest.approx(0.4, abs=0.01) and info == {"slope": 0.2}


def test_rerank_scores_the_shipped_models_and_leaves_the_model_dense(tiny_llama, tiny_tokens):
    from evosparse.pruning.snapshot import DenseWeights

    blocks = find_blocks(tiny_llama)
    before = {n: m.weight.detach().clone() for b in blocks for n, m in b.linears.items()}
    spec = JobSpec(model="tiny", sparsity=0.6, pruner="wanda", allocation="evolutionary", seed=1, calib_windows=8,
                   seq_len=32, search=SearchSettings(generations=3, offspring=4, selection="32:2,64:1",
                                                     seed_from="uniform", granularity="layer", step_fraction=0.05,
                                                     max_level_delta=0.3, validation_windows=2, rerank=2))
    out = run_search(tiny_llama, tiny_tokens, spec, None, blocks=blocks, dense=DenseWeights(blocks))
    shipped = out.shipped_val
    assert len(shipped["database"]) == len(shipped["shipped"]) == 2 and shipped["database"] == sorted(shipped["database"])
    assert shipped["shipped"][shipped["chosen"]] == min(shipped["shipped"])
    assert out.best_levels == shipped["levels"][shipped["chosen"]] and "rerank" in out.timings
    assert shipped["shipped"] != shipped["database"]  # block-sequential re-pruning is not the database's levels
    assert all(torch.equal(m.weight, before[n]) for b in blocks for n, m in b.linears.items())


def test_pruned_input_stats_are_what_the_block_sequential_prune_calibrates_on(tiny_llama, tiny_tokens):
    from evosparse.pruning.prune import prune_model, pruned_input_stats
    from evosparse.pruning.sensitivity import dense_input_stats

    blocks = find_blocks(tiny_llama)
    before = {n: m.weight.detach().clone() for b in blocks for n, m in b.linears.items()}
    counts = {n: w.numel() * 6 // 10 for n, w in before.items()}
    stats = pruned_input_stats(tiny_llama, tiny_tokens, "sparsegpt", counts, blocks=blocks)
    assert all(torch.equal(m.weight, before[n]) for b in blocks for n, m in b.linears.items())  # dense again
    assert set(stats) == set(before)
    dense = dense_input_stats(tiny_llama, tiny_tokens, hessian=True, blocks=blocks)
    first, last = next(iter(blocks[0].linears)), next(iter(blocks[-1].linears))
    def gap(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a - b).norm() / b.norm())

    assert gap(stats[first].hessian, dense[first].hessian) < 1e-5  # nothing pruned upstream of block 0
    assert gap(stats[last].hessian, dense[last].hessian) > 1e-2
    # The last block's SparseGPT reconstruction from these Hessians is exactly what prune_model ships.
    prune_model(tiny_llama, tiny_tokens, "sparsegpt", counts, blocks=blocks)
    for name, module in blocks[-1].linears.items():
        assert torch.equal(module.weight, pruners.sparsegpt_prune(before[name], stats[name].hessian, counts[name]))


def test_level_inputs_pruned_builds_its_own_stored_database_calibrated_at_the_seed(tiny_llama, tiny_tokens, tmp_path):
    from evosparse.jobs.store import LocalStore
    from evosparse.pruning.leveldb import search_units, split_counts
    from evosparse.pruning.prune import pruned_input_stats
    from evosparse.pruning.snapshot import DenseWeights
    from evosparse.worker.leveldb_store import LevelStore
    from evosparse.worker.search_stage import level_inputs_key, search_space, seed_counts

    blocks = find_blocks(tiny_llama)
    search = SearchSettings(generations=2, offspring=4, selection="32:2,64:1", seed_from="fisher", step_fraction=0.05,
                            max_level_delta=0.3, ramp_seeds=False, level_inputs="pruned")
    spec = JobSpec(model="tiny", sparsity=0.6, pruner="wanda", allocation="evolutionary", seed=1, calib_windows=8,
                   seq_len=32, search=search)
    levels = LevelStore(LocalStore(tmp_path / "store"), tmp_path / "scratch")
    out = run_search(tiny_llama, tiny_tokens, spec, None, blocks=blocks, dense=DenseWeights(blocks), levels=levels)
    assert out.leveldb == "built"
    pruned_key = levels.last_key
    dense_spec = spec.model_copy(update={"search": search.model_copy(update={"level_inputs": "dense"})})
    run_search(tiny_llama, tiny_tokens, dense_spec, None, blocks=blocks, dense=DenseWeights(blocks), levels=levels)
    assert levels.last_key != pruned_key  # dense-input levels are another database
    again = run_search(tiny_llama, tiny_tokens, spec, None, blocks=blocks, dense=DenseWeights(blocks), levels=levels)
    assert again.leveldb == "loaded" and levels.last_key == pruned_key
    # What was stored ranks each layer on the inputs of a block-by-block prune at the first (Fisher) seed.
    units = search_units(blocks, "layer")
    space = search_space(spec, units)
    first = space.from_counts(seed_counts(tiny_llama, tiny_tokens, spec, units, None, None, blocks)[0])
    at = split_counts(units, space.counts(first))
    expected = LevelDB.build(tiny_llama, tiny_tokens, "wanda", blocks=blocks,
                             stats=pruned_input_stats(tiny_llama, tiny_tokens, "wanda", at, blocks=blocks))
    stored = levels.load(tiny_llama, tiny_tokens, "wanda", inputs=level_inputs_key(at))
    assert levels.last_key == pruned_key
    name = next(iter(blocks[-1].linears))
    count = expected.sizes[name] * 6 // 10
    assert stored is not None and torch.equal(stored.pruned_weight(name, count), expected.pruned_weight(name, count))


@pytest.mark.parametrize("update, message", [
    ({"pruner": "magnitude"}, "reads no inputs"),
    ({"pattern": "mixed:8"}, "unstructured"),
])
def test_level_inputs_pruned_is_refused_where_it_means_nothing(update, message):
    from evosparse.jobs import spec as job_spec
    from evosparse.pruning.pruners import INPUT_PRUNERS

    assert job_spec.INPUT_PRUNERS == INPUT_PRUNERS  # the torch-free spec's copy of the pruning rule
    base = {"model": "tiny", "sparsity": 0.6, "pruner": "sparsegpt", "allocation": "evolutionary",
            "search": {"level_inputs": "pruned"}}
    with pytest.raises(ValueError, match=message):
        JobSpec(**(base | update))

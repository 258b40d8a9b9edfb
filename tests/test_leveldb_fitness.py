"""pruning/leveldb.py and pruning/fitness.py on tiny models: levels equal pruning from scratch, prefix reuse is exact."""

from __future__ import annotations

import pytest
import torch
from evosparse.pruning import pruners
from evosparse.pruning.fitness import ProxyFitness
from evosparse.pruning.layers import find_blocks, weight_matrix
from evosparse.pruning.leveldb import LevelDB, load_levels, rankings, save_levels
from evosparse.pruning.sensitivity import dense_input_stats
from evosparse.search.levels import LevelSpace


def test_one_collector_gives_sq_norms_and_the_layer_hessian(tiny_llama, tiny_tokens):
    blocks = find_blocks(tiny_llama)
    name = next(iter(blocks[1].linears))
    captured = []
    handle = blocks[1].linears[name].register_forward_hook(lambda m, a, o: captured.append(a[0].detach()))
    stats = dense_input_stats(tiny_llama, tiny_tokens, hessian=True)
    handle.remove()
    x = torch.cat([c.reshape(-1, c.shape[-1]) for c in captured]).double()
    torch.testing.assert_close(stats[name].sq_norms.double(), (x * x).sum(0), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(stats[name].hessian.double(), 2 * x.t() @ x / x.shape[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("pruner", ["magnitude", "wanda", "dass"])
def test_level_equals_pruning_the_layer_from_scratch(tiny_llama, tiny_tokens, pruner):
    db = LevelDB.build(tiny_llama, tiny_tokens, pruner)
    stats = dense_input_stats(tiny_llama, tiny_tokens)
    blocks = find_blocks(tiny_llama)
    checked = 0
    for name, mod in list(db.modules.items())[:9]:
        w = weight_matrix(mod).detach().clone()
        info = blocks[db.block_of[name]]
        dim = 1
        if pruner == "magnitude":
            scores = pruners.magnitude_scores(w)
        elif pruner == "dass" and name in info.glu[:2]:
            scores, dim = pruners.dass_scores(w, stats[info.glu[2]].sq_norms), 0
        else:
            scores = pruners.wanda_scores(w, stats[name].sq_norms)
        for frac in (0.0, 0.13, 0.5, 0.77, 1.0):
            count = round(frac * w.numel())
            keep = pruners.keep_mask_from_scores(scores, count, dim=dim)
            expected = w * keep
            got = db.pruned_weight(name, count)
            assert torch.equal(got, expected), (name, count)
            assert int((got == 0).sum()) >= count
            checked += 1
    assert checked == 45


def test_apply_rewrites_only_changed_linears_and_restores(tiny_llama, tiny_tokens):
    db = LevelDB.build(tiny_llama, tiny_tokens, "wanda")
    names = list(db.modules)
    dense = {n: weight_matrix(m).clone() for n, m in db.modules.items()}
    counts = {n: weight_matrix(db.modules[n]).numel() // 2 for n in names}
    assert sorted(db.apply(counts)) == sorted(names)
    counts2 = dict(counts)
    counts2[names[3]] += 17
    assert db.apply(counts2) == [names[3]]
    assert int((weight_matrix(db.modules[names[3]]) == 0).sum()) == counts2[names[3]]
    db.restore()
    for n, m in db.modules.items():
        assert torch.equal(weight_matrix(m), dense[n])


@pytest.mark.parametrize("pruner", ["magnitude", "wanda", "dass"])
def test_incremental_apply_equals_the_level_computed_whole(tiny_llama, tiny_tokens, pruner):
    import random

    dense = {n: weight_matrix(m).clone() for b in find_blocks(tiny_llama) for n, m in b.linears.items()}
    db = LevelDB.build(tiny_llama, tiny_tokens, pruner)
    rng = random.Random(7)
    for _ in range(12):  # up and down, big and small moves, through 0 and the full count
        counts = {n: rng.choice([0, w.numel(), rng.randrange(w.numel() + 1)]) for n, w in dense.items()}
        db.apply(counts)
        for n, mod in db.modules.items():
            assert torch.equal(weight_matrix(mod), db.pruned_weight(n, counts[n])), (pruner, n, counts[n])
    db.restore()
    for n, mod in db.modules.items():
        assert torch.equal(weight_matrix(mod), dense[n])


def test_sparsegpt_level_computed_once_and_equals_the_pruner(tiny_llama, tiny_tokens):
    db = LevelDB.build(tiny_llama, tiny_tokens, "sparsegpt")
    name = next(iter(db.modules))
    w = db.dense[name]
    count = w.numel() // 2
    got = db.pruned_weight(name, count)
    expected = pruners.sparsegpt_prune(w, db.hessian[name], count)
    assert torch.equal(got, expected)
    assert db.pruned_weight(name, count) is not None and (name, count) in db.levels
    assert int((got == 0).sum()) >= count


def make_fitness(model, tokens, granularity="layer", reuse=True, kind="kl", **kw):
    db = LevelDB.build(model, tokens, "wanda")
    units = db.units(granularity)
    space = LevelSpace.build([u.size for u in units], 0.6, step_fraction=0.05, max_level_delta=0.3)
    return ProxyFitness(model, tokens, db, units, space, kind=kind, reuse_prefix=reuse, **kw), space


@pytest.mark.parametrize("granularity", ["layer", "module"])
def test_prefix_reuse_equals_full_recomputation(tiny_llama, tiny_tokens, granularity):
    import random

    from evosparse.search.operators import mutate

    fit, space = make_fitness(tiny_llama, tiny_tokens, granularity, reuse=True, batch_windows=2)
    rng = random.Random(0)
    parent = mutate(space, space.zero(), rng, switches=3)
    children = [mutate(space, parent, rng) for _ in range(6)] + [parent]
    fit.set_parent(parent)
    # Staged like the search: one window first, then the same vectors on three windows.
    reused = [(fit(c, 32), fit(c, 96)) for c in children]
    blocks_with_reuse = fit.blocks_run
    fit.db.restore()  # the second database must see the dense weights
    fresh_fit, _ = make_fitness(tiny_llama, tiny_tokens, granularity, reuse=False, batch_windows=2)
    fresh = [(fresh_fit(c, 32), fresh_fit(c, 96)) for c in children]
    assert reused == fresh  # same window ranges, same batches: bit-identical
    assert blocks_with_reuse < fresh_fit.blocks_run  # the parent trace is paid back by reuse
    # A child that differs only in the last two units runs only the blocks from there on.
    late = list(parent)
    late[-2] -= 1
    late[-1] += 1
    late = tuple(late)
    fit.window_scores.pop(late, None)  # forget it if a child above happened to be this vector
    fit.db.apply(fit.db.linear_counts(fit.units, space.counts(parent)))
    before = fit.blocks_run
    fit(late, 32)
    fit(late, 96)  # the same window ranges as the parent's trace: nothing to rebuild
    n_blocks = len(find_blocks(tiny_llama))
    first = fit.unit_blocks[-2]
    assert fit.blocks_run - before == 3 * (n_blocks - first)
    before = fit.blocks_run
    fit(parent, 96)
    fit(late, 64)
    assert fit.blocks_run == before  # known windows are never run again
    assert all(r > 0 for r, _ in reused[:-1])


def test_more_tokens_runs_only_the_new_windows_and_a_scored_child_becomes_parent_for_free(tiny_llama, tiny_tokens):
    import random

    from evosparse.search.operators import mutate

    fit, space = make_fitness(tiny_llama, tiny_tokens)
    n_blocks = len(find_blocks(tiny_llama))
    rng = random.Random(3)
    a = mutate(space, space.zero(), rng, switches=2)
    fit(a, 64)
    assert fit.blocks_run == 2 * n_blocks
    fit(a, 160)
    assert fit.blocks_run == 5 * n_blocks  # windows 2..4 only
    # ``a`` was scored with no parent, so its whole trace is kept: as the parent it costs nothing.
    fit.set_parent(a)
    child = mutate(space, a, rng)
    before = fit.blocks_run
    fit(child, 160)
    first = min(fit.unit_blocks[i] for i in range(len(a)) if a[i] != child[i])
    assert fit.blocks_run - before == 5 * (n_blocks - first)  # no rebuild of a's trace
    # The child is adopted as the next parent with the states it computed: its grandchild reuses them.
    fit.set_parent(child)
    assert set(fit.parent_trace) == {(w, w + 1) for w in range(5)}  # on a CPU one range per window
    before = fit.blocks_run
    fit(child, 160)
    assert fit.blocks_run == before


def test_ranges_are_cut_at_the_stage_bounds_and_every_range_windows_and_split_into_work_items(
        tiny_llama, tiny_tokens):
    import random

    from evosparse.search.operators import mutate

    # Three fitnesses over one model: each restores its own database before use (they share the weights).
    batched, space = make_fitness(tiny_llama, tiny_tokens, window_bounds=[32, 160], range_windows=8)
    single, _ = make_fitness(tiny_llama, tiny_tokens, window_bounds=[32, 160])
    whole, _ = make_fitness(tiny_llama, tiny_tokens, window_bounds=[32, 160])
    assert single.range_windows == 1  # the CPU default
    v = mutate(space, space.zero(), random.Random(5), switches=2)
    assert batched.pending_ranges(v, 160) == [(0, 1), (1, 5)]
    assert single.pending_ranges(v, 160) == [(w, w + 1) for w in range(5)]
    whole.db.restore()
    expected = whole(v, 160)
    batched.db.restore()
    batched(v, 32)
    assert batched.pending_ranges(v, 160) == [(1, 5)]
    assert batched(v, 160) == pytest.approx(expected, rel=1e-5)  # other batching: other rounding only
    # Ranges scored as work items, in any order, give exactly the scores of the whole call.
    single.db.restore()
    items = single.pending_ranges(v, 160)
    for rng in reversed(items):
        assert [w for w, _ in single.score_range(v, rng)] == list(range(*rng))
    assert single.pending_ranges(v, 160) == [] and single.cost(v, 160) == 0
    before = single.blocks_run
    assert single(v, 160) == expected and single.blocks_run == before


def test_topk_kl_is_close_to_full_and_ppl_works(tiny_llama, tiny_tokens):
    full, space = make_fitness(tiny_llama, tiny_tokens)
    full.db.restore()
    approx, _ = make_fitness(tiny_llama, tiny_tokens, topk=200, dense_memory_bytes=0)
    assert full.full and not approx.full
    v = space.zero()
    kl_full, kl_top = full(v, 256), approx(v, 256)
    assert 0 < kl_top <= kl_full * 1.0001  # the coarse-grained KL is a lower bound
    assert kl_top > 0.5 * kl_full
    approx.db.restore()
    ppl, _ = make_fitness(tiny_llama, tiny_tokens, kind="ppl")
    assert ppl(v, 256) > 1.0


def test_sparsegpt_levels_stay_within_the_memory_limit_without_a_cache_dir(tiny_llama, tiny_tokens):
    db = LevelDB.build(tiny_llama, tiny_tokens, "sparsegpt")
    name = next(iter(db.modules))
    w = db.dense[name]
    one = w.numel() * w.element_size()
    db.memory_limit = 2 * one
    first = db.pruned_weight(name, w.numel() // 4).clone()
    for frac in (0.3, 0.5, 0.7):
        db.pruned_weight(name, round(frac * w.numel()))
    assert len(db.levels) == 2 and db._level_bytes <= db.memory_limit  # the oldest levels made room
    assert (name, w.numel() // 4) not in db.levels
    assert torch.equal(db.pruned_weight(name, w.numel() // 4), first)  # recomputed, same weights


@pytest.mark.parametrize("pruner", ["wanda", "dass"])
def test_a_banded_database_gives_the_same_levels_with_less_memory(tiny_llama, tiny_tokens, pruner):
    """Bounds keep only the reachable rank band; every count inside them prunes exactly as before."""
    import copy
    import random

    full_model = copy.deepcopy(tiny_llama)
    full = LevelDB.build(full_model, tiny_tokens, pruner)
    sizes = full.sizes
    bounds = {n: (round(0.35 * s), round(0.85 * s)) for n, s in sizes.items()}
    banded = LevelDB.build(tiny_llama, tiny_tokens, pruner, bounds=bounds)
    assert banded.nbytes() < 0.85 * full.nbytes()  # indices + values of half the ranks
    rng = random.Random(11)
    for _ in range(8):
        counts = {n: rng.choice([lo, hi, rng.randrange(lo, hi + 1)]) for n, (lo, hi) in bounds.items()}
        full.apply(counts)
        banded.apply(counts)
        for n in sizes:
            assert torch.equal(weight_matrix(banded.modules[n]), weight_matrix(full.modules[n])), (n, counts[n])
            assert torch.equal(banded.pruned_weight(n, counts[n]), full.pruned_weight(n, counts[n]))
    name = next(iter(bounds))
    with pytest.raises(Exception, match="bounds"):
        banded.apply({name: bounds[name][1] + 1})


@pytest.mark.parametrize("pruner", ["wanda", "sparsegpt"])
def test_saved_levels_load_into_an_equal_database(tiny_llama, tiny_tokens, tmp_path, pruner):
    import copy

    other = copy.deepcopy(tiny_llama)
    built = LevelDB.build(tiny_llama, tiny_tokens, pruner, save_to=tmp_path / "db")
    loaded = LevelDB.load(tmp_path / "db", other, pruner)
    counts = {n: s // 2 + 3 for n, s in built.sizes.items()}
    built.apply(counts)
    loaded.apply(counts)
    for n in built.sizes:
        assert torch.equal(weight_matrix(built.modules[n]), weight_matrix(loaded.modules[n]))
    (tmp_path / "db" / "meta.json").unlink()  # an interrupted save is never loaded
    with pytest.raises(Exception, match="no complete level database"):
        LevelDB.load(tmp_path / "db", other, pruner)


def test_stored_levels_refuse_another_pruner(tiny_llama, tiny_tokens, tmp_path):
    blocks = find_blocks(tiny_llama)
    save_levels(tmp_path, "magnitude", blocks, rankings(blocks, "magnitude", None))
    assert set(load_levels(tmp_path, "magnitude", blocks)) == {n for b in blocks for n in b.linears}
    with pytest.raises(Exception, match="another model, pruner"):
        load_levels(tmp_path, "wanda", blocks)


def test_full_kl_equals_torch_kl_div_of_the_pruned_model(tiny_llama, tiny_tokens):
    """The fitness's KL (full dense reference) is KL(p_dense ‖ p_pruned) averaged over every token."""
    import random

    import torch.nn.functional as F
    from evosparse.search.operators import mutate

    with torch.no_grad():
        dense = F.log_softmax(tiny_llama(input_ids=tiny_tokens).logits.float(), dim=-1)
    fit, space = make_fitness(tiny_llama, tiny_tokens)
    assert fit.full
    v = mutate(space, space.zero(), random.Random(1), switches=3)
    kl = fit(v, tiny_tokens.numel())
    fit.db.apply(fit.db.linear_counts(fit.units, space.counts(v)))
    with torch.no_grad():
        pruned = F.log_softmax(tiny_llama(input_ids=tiny_tokens).logits.float(), dim=-1)
    fit.db.restore()
    ref = F.kl_div(pruned, dense, log_target=True, reduction="none").sum(-1).mean()
    assert kl > 1e-4
    assert kl == pytest.approx(float(ref), rel=1e-4)


def test_a_parent_trace_taken_from_another_process_gives_the_same_scores_without_recomputing(tiny_tokens):
    import random

    from evosparse.pruning.fitness import trace_from_bytes, trace_to_bytes
    from evosparse.search.operators import mutate

    from tests.conftest import make_tiny_llama

    holder, space = make_fitness(make_tiny_llama(), tiny_tokens, batch_windows=2)
    rng = random.Random(4)
    grandparent = mutate(space, space.zero(), rng, switches=3)
    parent = mutate(space, grandparent, rng)
    children = [mutate(space, parent, rng) for _ in range(5)]
    holder.set_parent(grandparent)
    holder(parent, 32), holder(parent, 96)  # the holder scored the parent: it holds its trace
    rebuilt = holder.traces_rebuilt
    holder.set_parent(parent)
    want = [(holder(c, 32), holder(c, 96)) for c in children]
    assert holder.traces_rebuilt == rebuilt  # it scored the parent: its trace was at hand

    other, _ = make_fitness(make_tiny_llama(), tiny_tokens, batch_windows=2)
    asked = []

    def source(vector, rng_):  # noqa: ANN001, ANN202 - the bytes another process would publish
        asked.append(rng_)
        held = holder.held_traces(vector)
        return trace_from_bytes(trace_to_bytes(held[rng_])) if rng_ in held else None

    other.trace_source = source
    other.add_known_windows(parent, holder.known_windows(parent))
    other.set_parent(parent)
    got, predicted_total = [], 0
    for c in children:
        # The cost the coordinator orders a stage by is the work scoring really does (nothing rebuilt here).
        predicted, before = other.cost(c, 32), other.blocks_run
        first = other(c, 32)
        assert other.blocks_run - before == predicted and other.cost(c, 32) == 0
        predicted_total += predicted
        got.append((first, other(c, 96)))
    assert got == want and predicted_total > 0
    assert other.traces_rebuilt == 0 and other.traces_fetched == len(set(asked)) > 0

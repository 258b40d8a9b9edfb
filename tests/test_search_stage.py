"""worker/search_stage.run_search on a tiny model: beats uniform, forwards generations, cancels, resumes exactly."""

from __future__ import annotations

import pytest
from evosparse.jobs.spec import JobSpec, SearchSettings
from evosparse.pruning.errors import CancelledError
from evosparse.pruning.fitness import ProxyFitness
from evosparse.pruning.layers import find_blocks
from evosparse.pruning.leveldb import LevelDB
from evosparse.search.levels import LevelSpace
from evosparse.worker.search_stage import run_search


class Hooks:
    def __init__(self, cancel_after: int | None = None):
        self.records: list[dict] = []
        self.states: list[bytes] = []
        self.cancel_after = cancel_after

    def stage(self, name, fraction, message=""):
        pass

    def generation(self, record, state):
        self.records.append(record)
        self.states.append(state)

    def should_cancel(self):
        return self.cancel_after is not None and len(self.records) >= self.cancel_after


def spec_for(**search):
    settings = dict(generations=6, offspring=6, selection="64:3,256:1", seed_from="uniform",
                    granularity="module", step_fraction=0.05, max_level_delta=0.3)
    settings.update(search)
    return JobSpec(model="tiny", sparsity=0.6, pruner="wanda", allocation="evolutionary", seed=7,
                   search=SearchSettings(**settings))


def uniform_kl(model, tokens, spec, outcome):
    db = LevelDB.build(model, tokens, spec.pruner)
    units = db.units(spec.search.granularity)
    space = LevelSpace.build([u.size for u in units], spec.sparsity, spec.search.step_fraction,
                             spec.search.max_level_delta)
    fit = ProxyFitness(model, tokens, db, units, space)
    try:
        return fit(space.zero(), 256), fit(tuple(outcome.best_levels), 256)
    finally:
        db.restore()


def test_search_beats_uniform_on_tiny_model(tiny_llama, tiny_tokens):
    spec = spec_for()
    hooks = Hooks()
    out = run_search(tiny_llama, tiny_tokens, spec, hooks)
    uni, best = uniform_kl(tiny_llama, tiny_tokens, spec, out)
    assert best == pytest.approx(out.best_fitness)
    assert best < 0.97 * uni, (best, uni)
    total = sum(m.weight.numel() for b in find_blocks(tiny_llama) for m in b.linears.values())
    assert sum(out.counts.values()) == round(0.6 * total)
    assert len(hooks.records) == 7 and [r["generation"] for r in hooks.records] == list(range(7))
    assert out.units and len(out.best_vector) == len(out.units)
    assert out.candidates_scored > 7


def test_fisher_seed_and_layer_granularity(tiny_llama, tiny_tokens):
    spec = spec_for(seed_from="fisher", granularity="layer", generations=2)
    hooks = Hooks()
    notes: list[str] = []
    hooks.setup = notes.append
    out = run_search(tiny_llama, tiny_tokens, spec, hooks)
    assert len(out.units) == 4 and out.seed_vector != out.uniform_vector
    # The set-up before generation 0 reports what it is doing, window by window for Fisher; the
    # dense reference comes before the level database (which may zero the unreachable ranks).
    assert notes[0] == "fisher seed allocations"
    assert f"Fisher sensitivity: window {len(tiny_tokens)}/{len(tiny_tokens)}" in notes
    assert [n.split(" ")[0] for n in notes[-2:]] == ["dense", "building"]


def test_fisher_seeds_at_several_spreads_all_meet_the_budget(tiny_llama, tiny_tokens):
    from evosparse.worker.search_stage import SEED_SPREAD_FACTORS, seed_counts

    spec = spec_for(seed_from="fisher", granularity="layer")
    db = LevelDB.build(tiny_llama, tiny_tokens, spec.pruner)
    units = db.units("layer")
    seeds = seed_counts(tiny_llama, tiny_tokens, spec, units)
    assert len(seeds) == len(SEED_SPREAD_FACTORS)
    budget = round(0.6 * sum(u.size for u in units))
    assert all(sum(c) == budget for c in seeds)
    spans = [max(c) - min(c) for c in seeds]
    assert spans[2] > spans[0] > spans[1]  # factors 1.5 > 1 > 0.5: wider spreads, further from uniform


def test_cancel_raises_and_resume_equals_uninterrupted(tiny_llama, tiny_tokens):
    spec = spec_for(generations=4)
    full_hooks = Hooks()
    full = run_search(tiny_llama, tiny_tokens, spec, full_hooks)
    with pytest.raises(CancelledError):
        run_search(tiny_llama, tiny_tokens, spec, Hooks(cancel_after=2))
    resumed = run_search(tiny_llama, tiny_tokens, spec, Hooks(), resume_state=full_hooks.states[1])
    assert resumed.best_levels == full.best_levels
    assert resumed.counts == full.counts
    assert [r["best"] for r in resumed.history] == [r["best"] for r in full.history]
    assert resumed.candidates_scored == full.candidates_scored

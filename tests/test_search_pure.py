"""search/: budget-preserving operators, determinism, resumable state, stopping — no torch involved."""

from __future__ import annotations

import json
import random
import subprocess
import sys

import pytest
from evosparse.search.evolution import EvolutionarySearch, SearchConfig
from evosparse.search.levels import LevelSpace
from evosparse.search.operators import crossover, mutate
from hypothesis import given, settings
from hypothesis import strategies as st


def test_search_package_is_torch_free_and_knows_no_jobs():
    code = (
        "import sys, evosparse\n"
        "import evosparse.search.allocation, evosparse.search.defaults, evosparse.search.evolution\n"
        "import evosparse.search.levels, evosparse.search.operators\n"
        "assert 'torch' not in sys.modules, 'search/ imported torch'\n"
        "assert 'transformers' not in sys.modules\n"
        "assert 'pydantic' not in sys.modules and 'httpx' not in sys.modules  # the public surface is lazy\n"
        "assert not [m for m in sys.modules if m.startswith('evosparse.') and not m.startswith('evosparse.search')]\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    # evosparse/__init__ has loaded jobs.spec already, so also read search/'s own imports
    import ast
    from pathlib import Path

    for path in (Path(__file__).resolve().parents[1] / "search").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            bad = [n for n in names if n.split(".")[0] in ("torch", "transformers") or n.startswith("evosparse.")
                   and not n.startswith("evosparse.search")]
            assert not bad, f"{path.name} imports {bad}"


def test_search_defaults_are_the_job_specs():
    """One source of truth: a search built in code and a submitted job start from the same numbers."""
    import inspect

    from evosparse.jobs.spec import SearchSettings, parse_selection

    cfg, job = SearchConfig(), SearchSettings()
    assert (cfg.generations, cfg.offspring, cfg.patience) == (job.generations, job.offspring, job.patience)
    assert cfg.stages == parse_selection(job.selection)
    assert cfg.time_budget_s == job.time_budget_min * 60
    build = inspect.signature(LevelSpace.build).parameters
    assert build["step_fraction"].default == job.step_fraction
    assert build["max_level_delta"].default == job.max_level_delta


@st.composite
def spaces(draw):
    n = draw(st.integers(2, 12))
    sizes = draw(st.lists(st.integers(50, 5000), min_size=n, max_size=n))
    target = draw(st.floats(0.3, 0.85))
    step_fraction = draw(st.floats(0.01, 0.2))
    delta = draw(st.floats(0.05, 0.4))
    return LevelSpace.build(sizes, target, step_fraction, delta)


@settings(max_examples=150, deadline=None)
@given(space=spaces(), seed=st.integers(0, 10_000), ops=st.lists(st.sampled_from(["m", "j", "x", "r"]), max_size=40))
def test_any_sequence_of_operators_keeps_exact_budget_and_bounds(space, seed, ops):
    rng = random.Random(seed)
    a = space.zero()
    b = mutate(space, a, rng, switches=5)
    for op in ops:
        if op == "m":
            a = mutate(space, a, rng)
        elif op == "j":  # multi-level jumps
            a = mutate(space, a, rng, max_jump=rng.randint(2, 6))
        elif op == "x":
            a, b = crossover(space, a, b, rng), a
        else:  # repair from an arbitrary real-valued proposal
            a = space.repair([rng.uniform(-30, 30) for _ in range(space.n)], rng)
        for v in (a, b):
            assert space.is_valid(v)
            counts = space.counts(v)
            assert sum(counts) == round(space.target * sum(space.sizes))
            for c, n in zip(counts, space.sizes, strict=True):
                assert 0 <= c <= n
            assert all(lo <= x <= hi for x, lo, hi in zip(v, space.lo, space.hi, strict=True))


def test_bounds_respect_max_level_delta():
    space = LevelSpace.build([1000, 2000, 4000], 0.5, step_fraction=0.05, max_level_delta=0.1)
    assert space.step == 50
    for n, b, lo, hi in zip(space.sizes, space.base, space.lo, space.hi, strict=True):
        assert (b + lo * space.step) / n >= 0.4 - 1e-9
        assert (b + hi * space.step) / n <= 0.6 + 1e-9
        assert (b + (lo - 1) * space.step) / n < 0.4  # the bound is tight: one more step breaks it


def test_from_counts_lands_on_grid_near_the_allocation():
    space = LevelSpace.build([1000] * 4, 0.5, step_fraction=0.05)
    v = space.from_counts([400, 450, 550, 600])
    assert v == (-2, -1, 1, 2)
    assert space.is_valid(space.from_counts([0, 0, 1000, 1000]))  # clipped to the bounds, sum repaired


def toy_fitness(optimum):
    """A deterministic bumpy bowl: distance to a hidden optimum plus a tokens-dependent wobble."""

    def f(vector, tokens):
        d = sum((x - o) ** 2 for x, o in zip(vector, optimum, strict=True))
        wobble = (hash((vector, tokens)) % 1000) / 1000.0 * (512 / tokens)
        return d + wobble

    return f


def make_search(space, seed=3, state=None, generations=12, progress=None, **kw):
    cfg = SearchConfig(generations=generations, offspring=10, stages=[(512, 4), (2048, 1)], seed=seed, **kw)
    optimum = (3, -2, 1, 0, -4, 2)
    return EvolutionarySearch(space, toy_fitness(optimum), cfg, seed_vector=space.zero(), progress=progress, state=state)


@pytest.fixture
def space6():
    return LevelSpace.build([1000, 1500, 2000, 1000, 3000, 1200], 0.6, step_fraction=0.05, max_level_delta=0.3)


def test_search_improves_and_is_deterministic(space6):
    r1 = make_search(space6).run()
    r2 = make_search(space6).run()
    assert r1.best == r2.best and r1.history == [
        {**h, "seconds": r1.history[i]["seconds"]} for i, h in enumerate(r2.history)
    ]
    assert r1.best_score < r1.history[0]["best"]
    assert space6.is_valid(r1.best)
    assert r1.generations == 12 and r1.stopped_by == "generations"
    bests = [h["best"] for h in r1.history]
    assert bests == sorted(bests, reverse=True)  # the parent never gets worse
    r3 = make_search(space6, seed=4).run()
    assert r3.history != r1.history


def test_resume_from_state_equals_uninterrupted(space6):
    states = []
    full = make_search(space6, progress=lambda rec, st: states.append(st)).run()
    for cut in (1, 5, 9):
        resumed = make_search(space6, state=states[cut - 1]).run()
        assert resumed.best == full.best
        assert resumed.best_score == full.best_score
        assert resumed.candidates_scored == full.candidates_scored
        strip = [{k: v for k, v in h.items() if k != "seconds"} for h in full.history]
        assert [{k: v for k, v in h.items() if k != "seconds"} for h in resumed.history] == strip
    json.loads(states[-1])  # plain JSON, no pickle


def test_state_for_another_space_is_refused(space6):
    states = []
    make_search(space6, generations=1, progress=lambda rec, st: states.append(st)).run()
    other = LevelSpace.build([1000] * 6, 0.6)
    with pytest.raises(ValueError, match="different model"):
        make_search(other, state=states[0])
    with pytest.raises(ValueError, match="JSON"):
        make_search(space6, state=b"\x80not json")


def test_progress_records_and_patience(space6):
    records = []
    res = make_search(space6, generations=500, patience=3, progress=lambda rec, st: records.append(rec)).run()
    assert res.stopped_by == "patience" and res.generations < 500
    for key in ("generation", "best", "mean", "tokens", "seconds", "best_vector"):
        assert key in records[0]
    assert [r["generation"] for r in records] == list(range(len(records)))
    assert len(records[0]["best_vector"]) == 6
    assert records[-1]["tokens"] > records[0]["tokens"] > 0


def test_fitness_cache_never_rescores(space6):
    calls = []

    def f(v, t):
        calls.append((v, t))
        return sum(x * x for x in v) + t * 0

    cfg = SearchConfig(generations=6, offspring=8, stages=[(512, 4), (2048, 2)], seed=1)
    EvolutionarySearch(space6, f, cfg).run()
    assert len(calls) == len(set(calls))


def test_cancel_between_generations(space6):
    n = {"k": 0}

    def stop():
        n["k"] += 1
        return n["k"] > 3

    res = make_search(space6, generations=100).run(should_stop=stop)
    assert res.stopped_by == "cancelled" and len(res.history) == 3  # generation 0 is the seed population


def test_extra_seeds_compete_in_the_first_generation(space6):
    optimum = (3, -2, 1, 0, -4, 2)
    near = (2, -2, 1, 0, -3, 2)
    cfg = SearchConfig(generations=1, offspring=4, stages=[(512, 3), (2048, 1)], seed=0)
    search = EvolutionarySearch(space6, toy_fitness(optimum), cfg, seed_vector=space6.zero(), extra_seeds=[near])
    first = search.step()
    assert first["best_levels"] == list(near)  # far better than the main seed and its perturbations
    with pytest.raises(ValueError):
        EvolutionarySearch(space6, toy_fitness(optimum), cfg, extra_seeds=[(1, 0, 0, 0, 0, 0)])  # off-budget


def test_jumps_move_several_levels_and_keep_the_budget(space6):
    rng = random.Random(5)
    moves = set()
    for _ in range(400):
        child = mutate(space6, space6.zero(), rng, switches=1, max_jump=4)
        assert space6.is_valid(child)
        moves.add(max(child))
    assert moves == {1, 2, 3, 4}  # every jump length occurs, and none beyond max_jump

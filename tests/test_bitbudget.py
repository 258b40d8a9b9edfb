"""Size budgets in bits per weight (search/bitbudget.py): the cost model and the budget-keeping search space."""

import json
import random

import pytest
from evosparse.search.bitbudget import (
    ChoiceSpace,
    bits_per_weight,
    unit_bits,
    useful_levels,
)
from evosparse.search.evolution import EvolutionarySearch, SearchConfig
from hypothesis import given, settings
from hypothesis import strategies as st


def test_cost_model_counts_codes_bitmap_and_scales():
    # 1000 weights, 400 pruned, 4-bit codes, groups of 100 with 16-bit scales:
    # 600 * 4 code bits + 1000 bitmap bits + 10 * 16 scale bits
    assert unit_bits(1000, 400, 4, 100) == 2400 + 1000 + 160
    assert unit_bits(1000, 0, 4, 100) == 4000 + 160  # dense: no bitmap
    assert unit_bits(1000, 400, 4, 100, symmetric=False) == 2400 + 1000 + 10 * (16 + 4)  # + zero points
    assert bits_per_weight(0.4, 4, 100) == pytest.approx(3560 / 1000)
    assert bits_per_weight(0.0, 3, 64) == pytest.approx(3 + 0.25)


def test_levels_that_cost_more_than_dense_are_not_offered():
    # at 4 bits a bitmap (1 bit) outweighs the codes saved until more than 1/4 is pruned
    assert useful_levels(4, 64) == [0.0] + [round(0.3 + 0.05 * k, 10) for k in range(13)]
    assert min(s for s in useful_levels(2, 64) if s > 0) == pytest.approx(0.55)


@settings(max_examples=80, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 40).map(lambda k: k * 256), min_size=2, max_size=30),
    widths=st.sets(st.sampled_from([2, 3, 4, 5, 6, 8]), min_size=1, max_size=4),
    target_t=st.floats(0.0, 1.0),
    group=st.sampled_from([32, 64, 128]),
    symmetric=st.booleans(),
    seed=st.integers(0, 10_000),
    moves=st.integers(1, 25),
)
def test_every_vector_stays_within_the_budget_and_fills_it(sizes, widths, target_t, group, symmetric, seed, moves):
    lo = min(bits_per_weight(0.9, b, group, symmetric) for b in widths) + 0.01
    hi = max(bits_per_weight(0.0, b, group, symmetric) for b in widths) + 0.5
    target = lo + target_t * (hi - lo)
    space = ChoiceSpace.build(sizes, target, group, widths, symmetric)
    rng = random.Random(seed)
    pop = [space.zero(), *space.uniform_vectors(), *(space.from_fractions([rng.random()] * len(sizes), b)
                                                     for b in widths)]
    for _ in range(moves):
        a = space.mutate(rng.choice(pop), rng, max_jump=3)
        b = space.crossover(rng.choice(pop), a, rng)
        pop += [a, b]
    step = space.step_bits()
    total = sum(sizes)
    for v in pop:
        assert space.is_valid(v)
        cost = space.cost(v)
        # never over the budget (floor(target · total), computed with the space's 1e-9 guard against
        # float products such as 1.90375 · 12800 = 24367.999999999996)
        assert cost <= space.budget <= target * total + 1e-6
        # the cost is what the formula gives for the (pruned, bits) the vector means
        assert cost == sum(unit_bits(n, p, b, group, symmetric) for n, (p, b) in zip(sizes, space.counts(v),
                                                                                        strict=True))
        assert set(space.widths(v)) <= set(widths)
    for v in pop[-2 * moves:]:  # repaired by the operators: filled to within one step of some unit
        movable = sum(space._up(i, c) is not None for i, c in enumerate(v))
        assert space.budget - space.cost(v) < step or movable <= 1  # (the moved unit itself is not filled)


def test_a_budget_below_the_cheapest_choice_is_refused():
    with pytest.raises(ValueError, match="below the cheapest choice"):
        ChoiceSpace.build([4096] * 4, 1.0, 64)


def test_uniform_vectors_are_the_least_sparse_level_that_fits():
    space = ChoiceSpace.build([576 * 4096] * 30, 3.0, 64)
    by_width = {space.choices[v[0]].bits: space.choices[v[0]].sparsity for v in space.uniform_vectors()}
    # (1 - s) * b + 1 + 0.25 <= 3: s >= 1 - 1.75 / b, on the 0.05 grid
    assert by_width == {2: 0.0, 3: pytest.approx(0.45), 4: pytest.approx(0.6), 8: pytest.approx(0.8)}
    z = space.zero()
    assert space.cost(z) == max(space.cost(v) for v in space.uniform_vectors())


class _Quality:
    """A stand-in fitness over choices: more bits and less sparsity are better, unit 0 matters most."""

    def __init__(self, space):
        self.space = space

    def __call__(self, vector, tokens):
        return sum((1 + 3 * (i == 0)) * (s * 2 + 1 / b)
                   for i, (s, b) in enumerate(zip(self.space.fractions(vector), self.space.widths(vector),
                                                  strict=True)))


def test_evolution_over_choices_keeps_the_budget_and_resumes_exactly():
    space = ChoiceSpace.build([4096] * 8, 3.0, 64)
    cfg = SearchConfig(generations=12, offspring=6, stages=[(64, 2), (256, 1)], time_budget_s=None)
    run = EvolutionarySearch(space, _Quality(space), cfg, seed_vector=space.zero())
    for _ in range(5):
        run.step()
    state = run.state_bytes()
    whole = run.run()
    resumed = EvolutionarySearch(space, _Quality(space), cfg, seed_vector=space.zero(), state=state).run()
    assert resumed.best == whole.best and resumed.best_score == whole.best_score
    assert whole.best_score < _Quality(space)(space.zero(), 256)  # it improved on the uniform vector
    for v, *_ in run.cache:  # keys are (vector, tokens, window chunk)
        assert space.cost(v) <= space.budget
    other = ChoiceSpace.build([4096] * 8, 3.5, 64)
    with pytest.raises(ValueError, match="different model"):
        EvolutionarySearch(other, _Quality(other), cfg, state=state)
    assert json.loads(state)["space"]["budget"] == space.budget

"""The evolutionary search over level vectors, with multi-fidelity selection and resumable state.

One generation: the current parent (best vector so far) breeds ``offspring`` distinct children
by level-switch mutation (each switch moves 1 level, now and then up to ``max_jump``),
sometimes after a budget-preserving crossover with another member of the elite pool. The
children go through the selection stages of growing fidelity (``[(tokens, survivors), ...]``):
all are scored on the first stage's tokens, the best ``survivors`` move on, and so on; in the
last stage the parent competes with the survivors on the same tokens, and the winner becomes
the next parent. The first generation scores the seed, any extra seeds (e.g. the same
sensitivity at other spreads), the uniform vector and perturbations of the seed. Scores are
cached per (vector, tokens), so a candidate is never scored twice on the same tokens.

The model is seen only through ``fitness(vector, tokens) -> float`` (lower is better). A fitness
that also has ``score_many(vectors, tokens) -> list[float]`` gets each selection stage's
unscored candidates in one call (so it can fan them out to several processes; the single
call is the special case of one vector). If it has ``set_parent(vector)``, the search calls it
whenever the parent changes, so it can reuse the parent's intermediate results
(pruning/fitness.py does). Scores must be a pure function of (vector, tokens): then the search
is the same whichever process computed them.

The space is a ``LevelSpace`` (a sparsity budget, kept exact by level switches) or a
``bitbudget.ChoiceSpace`` (a size budget in bits: one (sparsity, bits) choice per unit, kept at
most the budget and filled to within one step by the space's own mutation and crossover).

Fresh windows (``window_chunks`` = K): the fitness windows are K fixed chunks, and each
generation reads one of them, drawn as a deterministic function of (seed, generation): every
run of K generations visits every chunk once, in a seeded order (as EvoPress samples a fresh
minibatch per generation). The fitness is then called ``fitness(vector, tokens, chunk)``
(``score_many(vectors, tokens, chunk)``) and scores are cached per (vector, tokens, chunk);
the parent is rescored on each generation's chunk and stays parent only if it beats the
children there. A vector is never bred twice, whatever chunk it was scored on.

Validation (``validate(vector) -> float``, lower is better, on windows the selection never
reads): each new parent is validated, the history records both its selection score and its
validation score, and the result is the best on validation among every parent and the final
elite pool, not the last selection's winner.

All randomness comes from one ``random.Random(seed)``; the whole state (parent, elite pool,
score cache, generator state, counters, history) serialises to JSON bytes after each
generation, and a search rebuilt from those bytes continues exactly as an uninterrupted run.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from evosparse.search import defaults
from evosparse.search.bitbudget import ChoiceSpace
from evosparse.search.levels import LevelSpace, Vector
from evosparse.search.operators import crossover, mutate

Fitness = Callable[[Vector, int], float]
STATE_VERSION = 1


@dataclass
class SearchConfig:
    generations: int = defaults.GENERATIONS
    offspring: int = defaults.OFFSPRING
    stages: list[tuple[int, int]] = field(default_factory=lambda: list(defaults.STAGES))
    seed: int = 0
    time_budget_s: float | None = defaults.TIME_BUDGET_S
    patience: int | None = defaults.PATIENCE
    elite: int = 6  # size of the pool that crossover draws its second parent from
    crossover_rate: float = 0.25
    init_switches: int = 4  # the initial population perturbs the seed by up to this many switches
    init_size: int | None = None  # initial population size (default: offspring)
    max_jump: int = 4  # a switch moves 1..max_jump levels, geometrically biased toward 1 (1: single steps only)
    window_chunks: int | None = None  # fresh windows: each generation reads one of this many chunks


def generation_chunk(seed: int, generation: int, chunks: int) -> int:
    """The window chunk generation ``generation`` reads: each run of ``chunks`` generations is a
    seeded permutation of all chunks (a pure function, so any process can recompute it)."""
    epoch, pos = divmod(generation, chunks)
    order = list(range(chunks))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order[pos]


@dataclass
class SearchResult:
    best: Vector
    best_score: float
    history: list[dict[str, Any]]
    candidates_scored: int
    tokens_evaluated: int
    seconds: float
    generations: int
    stopped_by: str
    best_val: float | None = None  # validation score of ``best`` (when the search validates)


class EvolutionarySearch:
    def __init__(
        self,
        space: LevelSpace | ChoiceSpace,
        fitness: Fitness,
        config: SearchConfig,
        seed_vector: Sequence[int] | None = None,
        extra_seeds: Sequence[Sequence[int]] = (),
        progress: Callable[[dict[str, Any], bytes], None] | None = None,
        state: bytes | None = None,
        validate: Callable[[Vector], float] | None = None,
    ) -> None:
        if not config.stages:
            raise ValueError("at least one selection stage is needed")
        self.space = space
        self.fitness = fitness
        self.config = config
        self.progress = progress
        self.seed_vector: Vector = tuple(seed_vector) if seed_vector is not None else space.zero()
        space.check(self.seed_vector)
        # Other starting points (e.g. the same sensitivity at other spreads) compete in the first generation.
        self.extra_seeds: list[Vector] = [tuple(v) for v in extra_seeds]
        for v in self.extra_seeds:
            space.check(v)
        self.rng = random.Random(config.seed)
        self.generation = -1  # -1: the initial population has not been scored yet
        self.parent: Vector | None = None
        self.parent_score = float("inf")
        self.elite: list[tuple[Vector, float]] = []
        self.validate = validate
        self.val_cache: dict[Vector, float] = {}
        self.cache: dict[tuple[Vector, int, int], float] = {}  # (vector, tokens, window chunk) -> score
        self.bred: set[Vector] = set()  # every vector ever scored (on any chunk)
        self.history: list[dict[str, Any]] = []
        self.candidates_scored = 0
        self.tokens_evaluated = 0
        self.seconds = 0.0
        self.since_improved = 0
        self._parent_told: Vector | None = None
        if state is not None:
            self._load(state)

    # ---------------------------------------------------------------- scoring
    def chunk(self) -> int:
        """The window chunk the generation being run reads (0 without fresh windows)."""
        k = self.config.window_chunks
        return generation_chunk(self.config.seed, self.generation + 1, k) if k else 0

    def score(self, vector: Vector, tokens: int) -> float:
        return self.score_stage([vector], tokens)[0]

    def score_stage(self, vectors: Sequence[Vector], tokens: int) -> list[float]:
        """Scores of ``vectors`` on ``tokens``; the uncached ones go to the fitness in one batch."""
        chunk = self.chunk()
        todo = [v for v in dict.fromkeys(vectors) if (v, tokens, chunk) not in self.cache]
        if todo:
            extra = (chunk,) if self.config.window_chunks else ()
            many = getattr(self.fitness, "score_many", None)
            scores = many(todo, tokens, *extra) if many is not None else [self.fitness(v, tokens, *extra) for v in todo]
            if len(scores) != len(todo):
                raise RuntimeError(f"the fitness returned {len(scores)} scores for {len(todo)} vectors")
            for v, s in zip(todo, scores, strict=True):
                self.cache[(v, tokens, chunk)] = float(s)
                self.bred.add(v)
                self.candidates_scored += 1
                self.tokens_evaluated += tokens
        return [self.cache[(v, tokens, chunk)] for v in vectors]

    def validation(self, vector: Vector) -> float:
        assert self.validate is not None
        if vector not in self.val_cache:
            self.val_cache[vector] = float(self.validate(vector))
        return self.val_cache[vector]

    def _tell_parent(self) -> None:
        setter = getattr(self.fitness, "set_parent", None)
        if setter is not None and self.parent is not None and self._parent_told != self.parent:
            setter(self.parent)
            self._parent_told = self.parent

    def _select(self, candidates: list[Vector], parent: Vector | None) -> list[tuple[Vector, float]]:
        """Run the stages; return the last stage's (vector, score) sorted best first."""
        stages = self.config.stages
        pool = list(candidates)
        for s, (tokens, survivors) in enumerate(stages):
            last = s == len(stages) - 1
            if last and parent is not None and parent not in pool:
                pool.append(parent)
            # Sort by score, then by the vector itself, so ties break the same way every run.
            scores = self.score_stage(pool, tokens)
            ranked = sorted(zip(pool, scores, strict=True), key=lambda vs: (vs[1], vs[0]))
            if last:
                return ranked
            pool = [v for v, _ in ranked[:survivors]]
        raise AssertionError("unreachable")

    # ---------------------------------------------------------------- breeding
    def _seen(self, v: Vector) -> bool:
        return v in self.bred

    # A space with its own budget rule (search.bitbudget.ChoiceSpace: a size budget in bits) brings
    # its own budget-keeping operators; a LevelSpace uses the level switches of search.operators.
    def _mutate(self, v: Vector, switches: int | None = None) -> Vector:
        own = getattr(self.space, "mutate", None)
        if own is not None:
            return own(v, self.rng, switches=switches, max_jump=self.config.max_jump)
        return mutate(self.space, v, self.rng, switches=switches, max_jump=self.config.max_jump)

    def _crossover(self, a: Vector, b: Vector) -> Vector:
        own = getattr(self.space, "crossover", None)
        return own(a, b, self.rng) if own is not None else crossover(self.space, a, b, self.rng)

    def _space_key(self) -> dict[str, Any]:
        """What a saved state must have been made for (the space's own key when it has one)."""
        own = getattr(self.space, "key", None)
        if own is not None:
            return own()
        return {"sizes": list(self.space.sizes), "step": self.space.step, "base": list(self.space.base)}

    def _initial_population(self) -> list[Vector]:
        size = self.config.init_size or self.config.offspring
        pop: list[Vector] = [self.seed_vector]
        for v in [*self.extra_seeds, self.space.zero()]:
            if v not in pop:
                pop.append(v)
        tries = 0
        while len(pop) < max(size, len(pop)) and tries < 50 * size:
            tries += 1
            k = self.rng.randint(1, self.config.init_switches)
            v = self._mutate(self.seed_vector, switches=k)
            if v not in pop:
                pop.append(v)
        return pop

    def _children(self) -> list[Vector]:
        assert self.parent is not None
        out: list[Vector] = []
        seen = {self.parent}
        tries = 0
        while len(out) < self.config.offspring and tries < 50 * self.config.offspring:
            tries += 1
            others = [v for v, _ in self.elite if v != self.parent]
            if others and self.rng.random() < self.config.crossover_rate:
                mate = self.rng.choice(others)
                child = self._crossover(self.parent, mate)
                if child in seen or self._seen(child):
                    child = self._mutate(child)
            else:
                child = self._mutate(self.parent)
            # Duplicates (within the generation, or already scored earlier) are dropped.
            if child in seen or self._seen(child):
                continue
            seen.add(child)
            out.append(child)
        return out

    # ---------------------------------------------------------------- loop
    def step(self) -> dict[str, Any]:
        """Run one generation (the first call scores the initial population)."""
        t0 = time.perf_counter()
        self._tell_parent()
        if self.generation < 0:
            candidates = self._initial_population()
            ranked = self._select(candidates, None)
        else:
            candidates = self._children()
            ranked = self._select(candidates, self.parent)
        best, best_score = ranked[0]
        chunk = self.chunk()
        if self.config.window_chunks:
            # The parent was rescored on this generation's windows: it stays only if it is still best there.
            improved = self.parent is not None and best != self.parent
            self.parent, self.parent_score = best, best_score
        else:
            improved = best_score < self.parent_score
            if improved or self.parent is None:
                self.parent, self.parent_score = best, best_score
        self.since_improved = 0 if improved else self.since_improved + 1
        pool = dict(self.elite)
        pool.update(ranked)
        self.elite = sorted(pool.items(), key=lambda vs: (vs[1], vs[0]))[: self.config.elite]
        self.generation += 1
        if self.validate is not None:
            self.validation(self.parent)  # (part of the generation's time)
        self.seconds += time.perf_counter() - t0
        scores = [s for _, s in ranked]
        record = {
            "generation": self.generation,
            "best": self.parent_score,
            "mean": sum(scores) / len(scores),
            "tokens": self.tokens_evaluated,  # cumulative tokens scored so far
            "seconds": self.seconds,  # cumulative search time
            "best_vector": self.space.fractions(self.parent),
            "best_levels": list(self.parent),
            "candidates": len(candidates),
            "candidates_scored": self.candidates_scored,
        }
        if self.config.window_chunks:
            record["chunk"] = chunk
        if self.validate is not None:
            record["val"] = self.validation(self.parent)  # calibration vs validation: overfitting shows
        self.history.append(record)
        if self.progress is not None:
            self.progress(record, self.state_bytes())
        return record

    def stop_reason(self) -> str | None:
        c = self.config
        if self.generation >= c.generations:
            return "generations"
        if c.time_budget_s is not None and self.seconds >= c.time_budget_s:
            return "time_budget"
        if c.patience is not None and self.generation > 0 and self.since_improved >= c.patience:
            return "patience"
        return None

    def run(self, should_stop: Callable[[], bool] | None = None) -> SearchResult:
        """Generations until a stop condition; ``should_stop`` is checked between generations."""
        while (reason := self.stop_reason()) is None:
            if should_stop is not None and should_stop():
                reason = "cancelled"
                break
            self.step()
        return self.result(reason)

    def final_choice(self) -> Vector:
        """The answer: the last parent, or with validation the best on it among every parent and the elite."""
        assert self.parent is not None, "no generation has run"
        if self.validate is None:
            return self.parent
        for v, _ in self.elite:
            self.validation(v)
        return min(self.val_cache, key=lambda v: (self.val_cache[v], v))

    def result(self, stopped_by: str = "") -> SearchResult:
        best = self.final_choice()
        scores = [s for (v, _, _), s in self.cache.items() if v == best]
        return SearchResult(
            best=best,
            # its last-stage score (the parent's current one when no validation chose another)
            best_score=self.parent_score if best == self.parent else (scores[-1] if scores else float("nan")),
            best_val=self.val_cache.get(best),
            history=list(self.history),
            candidates_scored=self.candidates_scored,
            tokens_evaluated=self.tokens_evaluated,
            seconds=self.seconds,
            generations=self.generation,
            stopped_by=stopped_by,
        )

    # ---------------------------------------------------------------- state
    def state_bytes(self) -> bytes:
        version, internal, gauss = self.rng.getstate()
        state = {
            "version": STATE_VERSION,
            "space": self._space_key(),
            "seed_vector": list(self.seed_vector),
            "generation": self.generation,
            "parent": list(self.parent) if self.parent is not None else None,
            "parent_score": self.parent_score,
            "elite": [[list(v), s] for v, s in self.elite],
            "cache": [[list(v), t, c, s] for (v, t, c), s in self.cache.items()],
            "val": [[list(v), s] for v, s in self.val_cache.items()],
            "history": self.history,
            "rng": [version, list(internal), gauss],
            "candidates_scored": self.candidates_scored,
            "tokens_evaluated": self.tokens_evaluated,
            "seconds": self.seconds,
            "since_improved": self.since_improved,
        }
        return json.dumps(state, separators=(",", ":")).encode()

    def _load(self, data: bytes) -> None:
        try:
            state = json.loads(data.decode())
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"search state is not valid JSON: {exc}") from exc
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"search state version {state.get('version')} is not {STATE_VERSION}")
        if state["space"] != self._space_key():
            raise ValueError("search state was saved for a different model, target or level step")
        self.seed_vector = tuple(state["seed_vector"])
        self.generation = state["generation"]
        self.parent = tuple(state["parent"]) if state["parent"] is not None else None
        self.parent_score = state["parent_score"]
        self.elite = [(tuple(v), s) for v, s in state["elite"]]
        # (entries of a state written before window chunks existed have no chunk: chunk 0)
        self.cache = {(tuple(e[0]), e[1], e[2] if len(e) == 4 else 0): e[-1] for e in state["cache"]}
        self.bred = {v for v, _, _ in self.cache}
        self.val_cache = {tuple(v): s for v, s in state.get("val", [])}
        self.history = state["history"]
        version, internal, gauss = state["rng"]
        self.rng.setstate((version, tuple(internal), gauss))
        self.candidates_scored = state["candidates_scored"]
        self.tokens_evaluated = state["tokens_evaluated"]
        self.seconds = state["seconds"]
        self.since_improved = state["since_improved"]

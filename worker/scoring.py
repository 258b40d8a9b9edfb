"""Distributed scoring: one search, its selection stages fanned out to scoring workers over Celery + Redis.

The task that runs the job owns the search state (the *coordinator*). For each selection stage
with ``search.workers`` > 1 it writes the stage's work items to Redis as a batch — every window
range its candidates still have to run (on a CPU one window each, so a last stage of two
candidates still splits evenly) — sends ``workers - 1`` wake-up tasks to the scoring queue, and
scores items itself too. Everyone takes items from the batch's list one at a time (LPOP,
atomic), holds a lease on the one it is scoring (a key that expires unless its holder refreshes
it), and writes back its per-window scores; the coordinator then forms each candidate's score
from its windows exactly as one process does. So:

- *work stealing*: a fast or warm process takes more; a job never waits for a scorer that is
  busy or still loading (the coordinator alone can finish every batch);
- *a scorer killed mid-task* (SIGKILL) stops refreshing its lease; once it has expired the
  coordinator puts the item back on the list and someone else scores it;
- *same result*: a window's score is a pure function of (vector, window) — the fitness cuts
  window ranges at the same places in every process (pruning/fitness.py) — so which process
  computed it changes nothing: bit-identical on one device type with the
  same torch thread count;
- *warm scorers*: a scoring process keeps the job's model, dense reference and level database
  (loaded from the object store, never rebuilt) between tasks, keyed by the job attempt; it
  drops them when the coordinator's ``alive`` key disappears (the job ended, was cancelled, or
  its coordinator died), checked every few seconds, or when a task of another job arrives;
- *queues*: jobs go to the ``queue`` setting, wake-ups to ``score_queue``, served by separate
  scoring workers (``evosparse serve --scoring-workers N``; compose's ``scorer`` service). A job
  sends at most ``workers - 1`` wake-ups per stage, and stages of different jobs interleave
  on the scoring queue in FIFO order, so one job's scorers cannot hold another team's job:
  at worst that job's coordinator scores its stages alone.

*Shared parent traces*: children reuse their parent's per-block hidden states (the trace), which
only the process that scored the parent holds. Recomputing it elsewhere costs a full forward of
the fitness windows per process per parent change: about 40 % on top of a generation's work
with 2 processes on SmolLM2. So in the last selection stage (whose winner becomes the next
parent) each process publishes to Redis the traces it holds for the stage's candidates,
*before* it writes their scores; when the coordinator sends the next stage, the winner's trace is
there, and a process that lacks it fetches it (bytes, exact) instead of recomputing. A trace
that is not there (its holder did not take part, or was killed) is recomputed, as before; the
scores are the same either way. Traces are kept for two last stages, then deleted
(``TRACE_TTL_S`` is the safety net). By default only CPU jobs share traces: on a GPU one forward
costs less than moving the bytes.

The batch machinery (``post_batch`` / ``drain_batch`` on the coordinator, ``serve_batch`` on a
scorer: items under leases, put back when a holder dies) also carries the build of a SparseGPT
job's anchor levels, one block per item (worker/anchor_build.py).

Cancel is checked by the coordinator between generations; a cancelled job sends no further
batch, and its scorers free their memory at the next janitor pass.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("evosparse.scoring")

ALIVE_TTL_S = 120.0  # the coordinator refreshes its alive key at every stage
BATCH_TTL_S = 6 * 3600  # safety net: a dead coordinator's batch keys vanish on their own
TRACE_TTL_S = 15 * 60  # safety net for published traces; the coordinator deletes them much sooner


def redis_from_url(url: str) -> Any:
    """A redis-py client for a broker URL (also kombu's ``redis+socket://`` form of the embedded Redis)."""
    import redis

    if url.startswith("redis+socket://"):
        path = url[len("redis+socket://"):].split("?", 1)[0]
        return redis.Redis(unix_socket_path=path)
    return redis.Redis.from_url(url)


def _keys(batch: str, i: int | None = None) -> dict[str, str]:
    k = {"items": f"{batch}:items", "todo": f"{batch}:todo", "done": f"{batch}:done", "meta": f"{batch}:meta"}
    if i is not None:
        k["lease"] = f"{batch}:lease:{i}"
    return k


class _Lease(threading.Thread):
    """Keeps a lease key alive while its holder works; the key expires lease_s after the holder dies."""

    def __init__(self, r: Any, key: str, holder: str, lease_s: float) -> None:
        super().__init__(daemon=True, name="evosparse-lease")
        self.r, self.key, self.lease_s = r, key, lease_s
        self.stop = threading.Event()
        r.set(key, holder, px=int(lease_s * 1000))

    def run(self) -> None:
        while not self.stop.wait(self.lease_s / 3):
            try:
                self.r.pexpire(self.key, int(self.lease_s * 1000))
            except Exception:  # a broker blip: the next refresh tries again
                log.warning("lease refresh failed", exc_info=True)

    def release(self) -> None:
        self.stop.set()
        self.r.delete(self.key)


def post_batch(r: Any, batch: str, items: Sequence[str], order: Sequence[int], meta: dict[str, Any],
               alive_key: str) -> None:
    """Write a batch: its work items (JSON text, by index), the order they are taken in, its meta."""
    k = _keys(batch)
    pipe = r.pipeline()
    pipe.hset(k["items"], mapping={str(j): item for j, item in enumerate(items)})
    pipe.set(k["meta"], json.dumps(meta))
    pipe.rpush(k["todo"], *order)
    for key in k.values():
        pipe.expire(key, int(BATCH_TTL_S))
    pipe.set(alive_key, "1", px=int(ALIVE_TTL_S * 1000))
    pipe.execute()


def drain_batch(r: Any, batch: str, n_items: int, holder: str, lease_s: float, poll_s: float,
                work_here: Callable[[int], None], collect: Callable[[int, dict[str, Any]], None]) -> int:
    """The coordinator's side of a batch: work its items here (``work_here(j)``) until its list is
    empty, then ``collect(j, result)`` what the others wrote, putting back an item whose holder's
    lease expired without a result. Returns how many items were put back."""
    k = _keys(batch)
    done: set[int] = set()
    missing_since: dict[int, float] = {}
    requeued = 0
    while len(done) < n_items:
        item = r.lpop(k["todo"])
        if item is not None:  # work one ourselves, under a lease like everyone else
            j = int(item)
            if j not in done:
                lease = _Lease(r, _keys(batch, j)["lease"], holder, lease_s)
                lease.start()
                try:
                    work_here(j)
                finally:
                    lease.release()
                done.add(j)
            continue
        for key, raw in r.hgetall(k["done"]).items():
            j = int(key)
            if j not in done:
                collect(j, json.loads(raw))
                done.add(j)
        pending = [j for j in range(n_items) if j not in done]
        if not pending:
            break
        leases = r.mget([_keys(batch, j)["lease"] for j in pending])
        now = time.monotonic()
        for j, held in zip(pending, leases, strict=True):
            if held is not None:
                missing_since.pop(j, None)
                continue
            # Off the list, no lease, no result: its holder died (or is between LPOP and lease).
            if now - missing_since.setdefault(j, now) > min(2.0, lease_s):
                if not r.hexists(k["done"], str(j)):
                    r.rpush(k["todo"], j)
                    requeued += 1
                    log.warning("item %d of %s lost its worker; doing it again", j, batch)
                missing_since.pop(j, None)
        time.sleep(poll_s)
    return requeued


def serve_batch(r: Any, batch: str, holder: str, lease_s: float,
                work: Callable[[dict[str, Any]], dict[str, Any]]) -> int:
    """A scorer's side of a batch: take items until its list is empty, each under a lease, and write
    each one's result (``work(item)``, JSON) before letting the lease go. Returns how many it did."""
    k = _keys(batch)
    count = 0
    while (item := r.lpop(k["todo"])) is not None:
        j = int(item)
        lease = _Lease(r, _keys(batch, j)["lease"], holder, lease_s)
        lease.start()
        try:
            raw = r.hget(k["items"], str(j))
            if raw is None:
                break  # the batch was cleaned up meanwhile
            result = work(json.loads(raw))
            r.hset(k["done"], str(j), json.dumps(result))
            r.expire(k["done"], int(BATCH_TTL_S))  # the coordinator may have deleted the batch meanwhile
            count += 1
        finally:
            lease.release()
    return count


class TraceExchange:
    """Parent traces through Redis: publish the ones this process holds, fetch the ones it lacks.

    Keys: ``{ns}:trace:{vector digest}:{lo}-{hi}``, each listed in the sorted set ``{ns}:traces``
    under the serial number of the batch that published it, so the coordinator can drop old ones.
    """

    def __init__(self, r: Any, namespace: str, fitness: Any) -> None:
        self.r, self.ns, self.fitness = r, namespace, fitness
        self.published = 0
        fitness.trace_source = self.fetch

    def key(self, vector: Sequence[int], rng: tuple[int, int]) -> str:
        digest = hashlib.sha1(json.dumps(list(vector)).encode()).hexdigest()[:20]
        return f"{self.ns}:trace:{digest}:{rng[0]}-{rng[1]}"

    def publish(self, vectors: Sequence[Sequence[int]], serial: int) -> None:
        """Publish every trace this process holds for ``vectors`` that nobody has published yet."""
        from evosparse.pruning.fitness import trace_to_bytes

        for v in vectors:
            for rng, trace in self.fitness.held_traces(v).items():
                key = self.key(v, rng)
                if self.r.exists(key):
                    continue
                pipe = self.r.pipeline()
                pipe.set(key, trace_to_bytes(trace), ex=TRACE_TTL_S, nx=True)
                pipe.zadd(f"{self.ns}:traces", {key: serial})
                pipe.expire(f"{self.ns}:traces", TRACE_TTL_S)
                pipe.execute()
                self.published += 1

    def fetch(self, vector: tuple[int, ...], rng: tuple[int, int]) -> Any:
        from evosparse.pruning.fitness import trace_from_bytes

        try:
            data = self.r.get(self.key(vector, rng))
        except Exception:  # a broker blip costs a recomputation, never a wrong score
            log.warning("could not fetch a parent trace; recomputing it", exc_info=True)
            return None
        return None if data is None else trace_from_bytes(data, self.fitness.inputs.device)

    def drop_before(self, serial: int) -> None:
        """Delete the traces published by batches before ``serial``."""
        zkey = f"{self.ns}:traces"
        old = self.r.zrangebyscore(zkey, "-inf", f"({serial}")
        if old:
            self.r.delete(*old)
            self.r.zrem(zkey, *old)

    def drop_all(self) -> None:
        zkey = f"{self.ns}:traces"
        keys = self.r.zrange(zkey, 0, -1)
        self.r.delete(zkey, *keys)


class DistributedFitness:
    """The coordinator's fitness: ``score_many`` fans a stage out; everything else is the local fitness."""

    def __init__(
        self,
        local: Any,
        r: Any,
        namespace: str,
        context: dict[str, Any],
        workers: int,
        send: Callable[[dict[str, Any], str], None],
        lease_s: float = 10.0,
        poll_s: float = 0.02,
        on_close: Callable[[], None] | None = None,
        share_traces: bool | None = None,
    ) -> None:
        if share_traces is None:  # on a GPU one forward costs less than moving a trace through Redis
            share_traces = local.inputs.device.type == "cpu"
        self.traces = TraceExchange(r, namespace, local) if share_traces and workers > 1 else None
        self.local, self.r, self.ns = local, r, namespace
        self.context = {**context, "share_traces": self.traces is not None}
        self.final_batches: list[int] = []  # serials of the last-stage batches, for dropping old traces
        self.workers, self.send, self.lease_s, self.poll_s = workers, send, lease_s, poll_s
        self.parent: tuple[int, ...] | None = None
        self.batches = 0
        self.remote_scored = 0  # work items scored by other processes (the benchmark reads it)
        self.requeued = 0  # work items put back after their scorer's lease expired
        self.holder = f"coordinator@{socket.gethostname()}:{os.getpid()}"
        self.on_close = on_close
        self._alive()
        # Scorers load the job while the coordinator computes generation 0: a wake-up with no batch.
        for _ in range(workers - 1):
            send(self.context, "")

    def _alive(self) -> None:
        self.r.set(f"{self.ns}:alive", "1", px=int(ALIVE_TTL_S * 1000))

    def set_parent(self, vector: Sequence[int]) -> None:
        self.parent = tuple(vector)
        self.local.set_parent(vector)

    def __call__(self, vector: Sequence[int], tokens: int, chunk: int = 0) -> float:
        return self.score_many([vector], tokens, chunk)[0]

    def score_many(self, vectors: Sequence[Sequence[int]], tokens: int, chunk: int = 0) -> list[float]:
        vectors = [tuple(v) for v in vectors]
        if self.workers <= 1:
            return self.local.score_many(vectors, tokens, chunk)
        self.batches += 1
        final = self.traces is not None and self.local.is_final(tokens)
        if final:  # keep the last two last-stages' traces: the current parent's is among them
            self.final_batches.append(self.batches)
            if len(self.final_batches) > 2:
                self.traces.drop_before(self.final_batches[-2])
            self.traces.publish(vectors, self.batches)  # what this process scored of them earlier
        # The work items: every window range still to run, of every candidate (on a CPU one window
        # each), so a stage of two candidates still splits evenly between processes.
        items = [(i, rng) for i, v in enumerate(vectors) for rng in self.local.pending_ranges(v, tokens, chunk)]
        if len(items) > 1:
            batch = f"{self.ns}:b{self.batches}"
            # Most expensive first (longest-processing-time order): the stage's last, lone item is a
            # cheap one, so the processes reach the barrier together. Order never changes a score.
            costs = [self.local.range_cost(vectors[i], rng) for i, rng in items]
            post_batch(self.r, batch, [json.dumps({"v": vectors[i], "r": list(rng)}) for i, rng in items],
                       sorted(range(len(items)), key=lambda j: -costs[j]),
                       {"tokens": tokens, "chunk": chunk, "parent": self.parent, "final": final,
                        "serial": self.batches}, f"{self.ns}:alive")
            for _ in range(min(self.workers - 1, len(items) - 1)):
                self.send(self.context, batch)
            try:
                self._gather(batch, vectors, items, final)
            finally:
                self.r.delete(*_keys(batch).values())
        else:
            for i, rng in items:
                self._score_here(vectors[i], rng, final)
        # Every window is known now: the scores are means of per-window scores, computed here alike.
        return self.local.score_many(vectors, tokens, chunk)

    def _score_here(self, vector: tuple[int, ...], rng: tuple[int, int], final: bool) -> None:
        self.local.score_range(vector, rng)
        if final:  # before the score is known to anyone: the winner's trace is there when decided
            self.traces.publish([vector], self.batches)

    def _gather(self, batch: str, vectors: list[tuple[int, ...]], items: list[tuple[int, tuple[int, int]]],
                final: bool) -> None:
        """Score items of ``batch`` here until its list is empty, then collect the others' results."""
        def here(j: int) -> None:
            self._score_here(vectors[items[j][0]], items[j][1], final)

        def collect(j: int, result: dict[str, Any]) -> None:
            self.local.add_known_windows(vectors[items[j][0]], result["w"])
            self.remote_scored += 1

        self.requeued += drain_batch(self.r, batch, len(items), self.holder, self.lease_s, self.poll_s, here, collect)

    def close(self) -> None:
        """The job's search is over: scorers drop its model at their next janitor pass."""
        try:
            self.r.delete(f"{self.ns}:alive")
            if self.traces is not None:
                self.traces.drop_all()
        except Exception:
            log.warning("could not clear the scoring alive key of %s", self.ns, exc_info=True)
        if self.on_close is not None:
            self.on_close()


# ------------------------------------------------------------------------------------ scorer side
@dataclass
class ScorerState:
    key: str  # the coordinator's namespace: one job attempt
    fitness: Any
    model: Any
    traces: TraceExchange | None = None


_state: ScorerState | None = None
_state_lock = threading.Lock()
_janitor: threading.Thread | None = None


def _drop_state() -> None:
    """Free the warm job (model, level database, reference): its job ended or another job came."""
    global _state
    if _state is None:
        return
    log.info("scorer: releasing job %s", _state.key)
    _state = None
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # noqa: BLE001 - freeing is best effort
        pass


def _janitor_loop(r: Any, interval_s: float) -> None:
    while True:
        time.sleep(interval_s)
        with _state_lock:
            if _state is not None and not r.exists(f"{_state.key}:alive"):
                _drop_state()


def build_scorer_fitness(context: dict[str, Any], levels: Any) -> tuple[Any, Any]:
    """Rebuild the coordinator's fitness in this process: same model, windows, reference and levels."""
    from evosparse.jobs.spec import JobSpec
    from evosparse.pruning.data import get_windows
    from evosparse.pruning.fitness import DenseReference, ProxyFitness
    from evosparse.pruning.layers import find_blocks
    from evosparse.pruning.loading import load_model
    from evosparse.worker.search_stage import (
        fitness_kwargs,
        fitness_windows,
        level_kwargs,
        linear_bounds,
        search_space,
        search_units,
    )

    spec = JobSpec.model_validate(context["spec"])
    model, tokenizer = load_model(spec.model, device=spec.device, dtype=spec.dtype)
    blocks = find_blocks(model)
    calib = get_windows(spec.calib, tokenizer, spec.calib_windows, spec.seq_len, "calib", spec.seed)
    ftokens = fitness_windows(spec, calib)
    units = search_units(blocks, spec.search.granularity)
    space = search_space(spec, units)
    reference = DenseReference(model, ftokens, blocks)
    # No dense copy here: a scorer never restores the model, so it keeps only the reachable rank band.
    bounds = linear_bounds(units, space) if spec.pruner != "sparsegpt" and spec.mixed is None else None
    db = levels.load_key(context["leveldb_key"], model, spec.pruner, blocks=blocks, bounds=bounds,
                         **level_kwargs(spec, units, space))
    if db is None:
        raise RuntimeError(f"level database {context['leveldb_key']} is not in the store")
    fitness = ProxyFitness(model, reference, db, units, space, **fitness_kwargs(spec, ftokens))
    return fitness, model


def score_batch(context: dict[str, Any], batch: str, r: Any, levels: Any, lease_s: float,
                janitor_s: float = 2.0) -> int:
    """Score work items of ``batch`` until its list is empty; returns how many this process scored."""
    global _state, _janitor
    if context.get("kind") == "anchors":  # SparseGPT anchor levels of a level database, not a stage
        from evosparse.worker.anchor_build import serve_anchor_batch

        return serve_anchor_batch(context, batch, r, levels, lease_s)
    k = _keys(batch)
    if batch and not r.exists(k["meta"]):
        return 0  # the stage is over (the coordinator finished it alone)
    holder = f"scorer@{socket.gethostname()}:{os.getpid()}"
    with _state_lock:
        if _janitor is None:
            _janitor = threading.Thread(target=_janitor_loop, args=(r, janitor_s), daemon=True,
                                        name="evosparse-scorer-janitor")
            _janitor.start()
        if _state is None or _state.key != context["namespace"]:
            _drop_state()
            if not r.exists(f"{context['namespace']}:alive"):
                return 0
            t0 = time.perf_counter()
            fitness, model = build_scorer_fitness(context, levels)
            traces = TraceExchange(r, context["namespace"], fitness) if context.get("share_traces", True) else None
            _state = ScorerState(context["namespace"], fitness, model, traces)
            log.info("scorer: job %s warm in %.1f s", context["namespace"], time.perf_counter() - t0)
            r.set(f"{context['namespace']}:warm:{holder}", "1", px=int(ALIVE_TTL_S * 1000))
        if not batch:
            return 0  # a warm-up call
        state = _state
        raw_meta = r.get(k["meta"])
        if raw_meta is None:
            return 0
        meta = json.loads(raw_meta)
        if meta.get("parent") is not None:
            state.fitness.set_parent(meta["parent"])
        final = bool(meta.get("final")) and state.traces is not None
        if final:  # traces of this stage's candidates this process computed in earlier stages
            items = r.hvals(k["items"])
            state.traces.publish([json.loads(raw)["v"] for raw in items], meta["serial"])
        def work(item: dict[str, Any]) -> dict[str, Any]:
            v = tuple(item["v"])
            windows = state.fitness.score_range(v, tuple(item["r"]))
            if final:  # before the score: once the stage is decided, the winner's trace is there
                state.traces.publish([v], meta["serial"])
            return {"w": windows}

        return serve_batch(r, batch, holder, lease_s, work)

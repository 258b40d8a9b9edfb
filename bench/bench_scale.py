"""Scale-out benchmark: one search on several scoring processes, a scoring worker's memory, level reuse.

Subcommands (each writes JSON under bench/results/raw/ and prints a table):

  throughput  SmolLM2-135M, Wanda 70 %: the same search (same seed, fixed generations) with
              search.workers = 1 (in-process) and 2 (the coordinator + one real Celery scoring
              worker), every process at 1 torch thread; candidates scored per minute of search
              time, and whether the best vectors are identical.
  memory      peak resident memory (VmHWM) of one real scoring worker during a 2-generation
              search, against the model's parameter bytes; SmolLM2-135M or a synthetic Llama
              built from a config with random weights (--synthetic 1b), saved once to disk.
  reuse       set-up time (seed, dense reference, level database) of a first job on a model
              and of a second job on the same model content, which loads the stored database.
  exchange    Redis CPU for trace-sized values with the broker's append-only file and without it.
  anchors     SparseGPT anchor levels built by the coordinator alone, then with a scoring worker beside it.
  ceiling     the machine's own limit: forwards of one SmolLM2-shaped block by one 1-thread
              process, then by two at once (no Redis, no search): the most 2 workers could give.

Heavy: run one at a time, e.g.
  flock /tmp/evosparse-heavy.lock python3 bench/bench_scale.py throughput
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent
RAW = ROOT / "results" / "raw"

# Llama-shaped configs for memory/speed work (random weights; perplexity means nothing).
SYNTHETIC = {
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
               num_key_value_heads=4),
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32),
}


def synthetic_model_dir(size: str, cache: Path) -> Path:
    """A Llama of the given shape with random weights and SmolLM2's tokenizer, saved once (float32)."""
    import torch
    from evosparse.pruning.loading import load_model
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = cache / f"synthetic-llama-{size}"
    if (folder / "config.json").is_file():
        return folder
    _, tok = load_model("smollm2-135m")
    config = LlamaConfig(vocab_size=len(tok), max_position_embeddings=2048, tie_word_embeddings=False,
                         **SYNTHETIC[size])
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    tmp = folder.with_name(folder.name + ".tmp")
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    tmp.rename(folder)
    return folder


class Service:
    """The pieces a distributed search needs: embedded Redis, a local object store, scoring workers."""

    def __init__(self, root: Path, scorers: int, scoring_on_broker: bool = False) -> None:
        from evosparse.cli.service_cmd import start_embedded_redis

        # As `evosparse serve` runs them: the broker with its append-only file, the scoring exchange in
        # memory only (``scoring_on_broker``: the exchange on the broker, as before that split).
        self.redis, broker = start_embedded_redis(root / "redis.db")
        self.scoring_redis, scoring_url = (None, broker) if scoring_on_broker else \
            start_embedded_redis(root / "scoring-redis.db", persistent=False)
        self.env = {
            "EVOSPARSE_BROKER_URL": broker,
            "EVOSPARSE_SCORING_REDIS_URL": scoring_url,
            "EVOSPARSE_DATA_DIR": str(root / "data"),
            "EVOSPARSE_STORE_URL": f"file://{root / 'store'}",
            "EVOSPARSE_WORK_DIR": str(root / "work"),
            "EVOSPARSE_SCORE_QUEUE": f"score-{uuid.uuid4().hex[:6]}",
            "EVOSPARSE_TORCH_THREADS": "1",
            "EVOSPARSE_LOG_LEVEL": "WARNING",
        }
        os.environ.update(self.env)
        from evosparse.jobs.settings import get_settings

        get_settings.cache_clear()
        self.root = root
        self.logs: list = []
        self.procs: list[subprocess.Popen] = []
        self.start_scorers(scorers)

    def start_scorers(self, n: int) -> None:
        from evosparse.cli.service_cmd import scorer_worker_cmd

        env = dict(os.environ, PYTHONPATH=str(ROOT.parent), OMP_NUM_THREADS="1")
        for _ in range(n):
            i = len(self.procs)
            log = open(self.root / f"scorer{i}.log", "w")
            self.logs.append(log)
            self.procs.append(subprocess.Popen(scorer_worker_cmd(self.env["EVOSPARSE_SCORE_QUEUE"], f"scorer{i}@%h"),
                                               env=env, stdout=log, stderr=subprocess.STDOUT))

    def peak_rss_mb(self, i: int = 0) -> float:
        for line in Path(f"/proc/{self.procs[i].pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    @contextmanager
    def cpu_seconds(self) -> Iterator[dict[str, float]]:
        """CPU seconds (user + system) this process, the scorers and the embedded Redis spend inside the block:
        where the time of a distributed run goes, whatever else the machine is running."""
        import psutil

        procs = {"coordinator": psutil.Process(), "redis": psutil.Process(self.redis.pid)}
        if self.scoring_redis is not None:
            procs["scoring_redis"] = psutil.Process(self.scoring_redis.pid)
        procs.update({f"scorer{i}": psutil.Process(p.pid) for i, p in enumerate(self.procs)})

        def used(name: str, p) -> float:  # noqa: ANN001 - Redis's snapshot/rewrite forks count for Redis
            times = p.cpu_times()
            return sum(times[:4]) if "redis" in name else sum(times[:2])

        before = {k: used(k, p) for k, p in procs.items()}
        wall = time.perf_counter()
        out: dict[str, float] = {}
        yield out
        out.update({k: round(used(k, p) - before[k], 2) for k, p in procs.items()})
        out["wall"] = round(time.perf_counter() - wall, 2)

    def stop(self) -> None:
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
        for server in (self.redis, self.scoring_redis):
            if server is not None:
                server.shutdown()


def run_one(model_path: str, sparsity: float, workers: int, generations: int, offspring: int, selection: str,
            namespace: str, wait_warm: bool = True, calib_windows: int = 32, pruner: str = "wanda") -> dict:
    """One search as the job task runs it (level store + scoring factory); returns figures."""
    import torch
    from evosparse.jobs.settings import get_settings
    from evosparse.jobs.spec import JobSpec
    from evosparse.jobs.store import store_from_settings
    from evosparse.pruning.data import get_windows
    from evosparse.pruning.layers import find_blocks
    from evosparse.pruning.loading import load_model
    from evosparse.pruning.snapshot import DenseWeights
    from evosparse.worker.leveldb_store import LevelStore
    from evosparse.worker.scoring import redis_from_url
    from evosparse.worker.search_stage import run_search
    from evosparse.worker.tasks import anchor_fanout_for, scoring_for

    torch.set_num_threads(1)
    settings = get_settings()
    spec = JobSpec(model=model_path, sparsity=sparsity, pruner=pruner, allocation="evolutionary", seed=0,
                   calib_windows=calib_windows,
                   search={"generations": generations, "offspring": offspring, "selection": selection,
                           "seed_from": "uniform", "workers": workers, "time_budget_min": None})
    t0 = time.perf_counter()
    model, tok = load_model(spec.model, device="cpu", dtype="float32")
    blocks = find_blocks(model)
    calib = get_windows("pydoc", tok, spec.calib_windows, spec.seq_len, "calib", seed=0)
    load_s = time.perf_counter() - t0
    levels = LevelStore(store_from_settings(settings), settings.resolved_work_dir / "leveldb")
    levels.anchor_fanout = anchor_fanout_for(namespace, spec, settings)  # as the job task sets it
    made: list = []

    def scoring(local):  # noqa: ANN001, ANN202
        factory = scoring_for(namespace, spec, settings, levels)
        fitness = factory(local) if factory is not None else local
        made.append(fitness)
        if workers > 1 and wait_warm:  # measure the search, not the scorers' start-up
            r = redis_from_url(settings.resolved_scoring_redis_url)
            deadline = time.monotonic() + 600
            while len(list(r.scan_iter(match=f"{namespace}:warm:*"))) < workers - 1:
                if time.monotonic() > deadline:
                    raise TimeoutError("scorers did not warm up")
                time.sleep(0.2)
        return fitness

    out = run_search(model, calib, spec, None, blocks=blocks, dense=DenseWeights(blocks), levels=levels,
                     scoring=scoring)
    fitness = made[0]
    return {
        "workers": workers, "generations": generations, "candidates_scored": out.candidates_scored,
        "search_seconds": round(out.seconds, 2),
        "candidates_per_minute": round(60 * out.candidates_scored / out.seconds, 2),
        "remote_scored": getattr(fitness, "remote_scored", 0),
        # The coordinator's parent traces: fetched from the scorer that held them, or recomputed here.
        "coordinator_traces": {"fetched": getattr(fitness, "local", fitness).traces_fetched,
                               "rebuilt": getattr(fitness, "local", fitness).traces_rebuilt},
        "best_levels": out.best_levels, "best_fitness": out.best_fitness,
        "setup_seconds": {k: round(v, 2) for k, v in out.timings.items() if k != "search"},
        "leveldb": out.leveldb, "load_seconds": round(load_s, 2),
        # SparseGPT: anchor levels, and whether this job read them from the store or built and stored them.
        "anchor_levels": out.anchor_levels, "anchors": {"read": levels.anchors_read, "stored": levels.anchors_stored},
        "anchor_seconds": round(out.anchor_seconds, 2),
        "anchor_blocks": {"here": getattr(levels.anchor_fanout, "local_blocks", None),
                          "scorers": getattr(levels.anchor_fanout, "remote_blocks", None)},
        "model_param_mb": round(sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20, 1),
    }


def same_search(a: dict, b: dict) -> dict:
    """Whether two runs of one search (on one process and on several) found the same answer."""
    return {"same_best_vector": a["best_levels"] == b["best_levels"], "same_best_fitness": a["best_fitness"] == b["best_fitness"]}


def cmd_throughput(args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        svc = Service(Path(tmp), scorers=1, scoring_on_broker=args.scoring_on_broker)
        try:
            # Build (and store) the level database first, so both timed runs load it alike.
            run_one(args.model, args.sparsity, 1, 1, args.offspring, args.selection, "warmup")
            with svc.cpu_seconds() as cpu1:
                one = run_one(args.model, args.sparsity, 1, args.generations, args.offspring, args.selection, "w1")
            with svc.cpu_seconds() as cpu2:
                two = run_one(args.model, args.sparsity, 2, args.generations, args.offspring, args.selection, "w2")
            one["cpu_seconds"], two["cpu_seconds"] = cpu1, cpu2
        finally:
            svc.stop()
    result = {"bench": "throughput", "model": args.model, "sparsity": args.sparsity, "one": one, "two": two,
              "speedup": round(two["candidates_per_minute"] / one["candidates_per_minute"], 3), **same_search(one, two)}
    print(f"| workers | candidates | search s | candidates/min |\n|---|---|---|---|\n"
          f"| 1 | {one['candidates_scored']} | {one['search_seconds']} | {one['candidates_per_minute']} |\n"
          f"| 2 | {two['candidates_scored']} | {two['search_seconds']} | {two['candidates_per_minute']} |\n"
          f"speed-up {result['speedup']}x; same best vector: {result['same_best_vector']}; "
          f"work items (candidate x window) scored by the scoring worker: {two['remote_scored']}; coordinator's parent traces "
          f"fetched/rebuilt: {two['coordinator_traces']['fetched']}/{two['coordinator_traces']['rebuilt']}\n"
          f"CPU seconds, 1 worker: {one['cpu_seconds']}; 2 workers: {two['cpu_seconds']}")
    return result


def _drive_scorer(r, namespace: str, context: dict, batches: list[tuple[list[tuple[int, ...]], int]],
                  timeout_s: float = 3600) -> int:
    """A coordinator that holds no model: it only hands batches to the scoring worker and waits."""
    from evosparse.worker.scoring import _keys

    scored = 0
    for n, (vectors, tokens) in enumerate(batches):
        batch = f"{namespace}:b{n}"
        k = _keys(batch)
        r.set(f"{namespace}:alive", "1", ex=600)
        r.hset(k["items"], mapping={str(i): json.dumps({"v": list(v), "known": []}) for i, v in enumerate(vectors)})
        r.set(k["meta"], json.dumps({"tokens": tokens, "parent": None, "size": len(vectors), "workers": 2}))
        r.rpush(k["todo"], *range(len(vectors)))
        _send_score_task(context, batch)
        deadline = time.monotonic() + timeout_s
        while r.hlen(k["done"]) < len(vectors):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the scoring worker did not finish {batch}")
            time.sleep(0.2)
        scored += len(vectors)
        r.delete(*k.values())
    r.delete(f"{namespace}:alive")
    return scored


def _send_score_task(context: dict, batch: str) -> None:
    from evosparse.jobs.settings import get_settings
    from evosparse.worker.celery_app import make_celery

    settings = get_settings()
    make_celery(settings).send_task("evosparse.score", args=[context, batch], queue=settings.score_queue)


def cmd_memory(args: argparse.Namespace) -> dict:
    """Build and store the level database here, free it, then let one scoring worker score on its own."""
    import gc
    import random

    cache = Path(args.cache)
    model_path = str(synthetic_model_dir(args.synthetic, cache)) if args.synthetic else args.model
    with tempfile.TemporaryDirectory() as tmp:
        svc = Service(Path(tmp), scorers=0)
        try:
            import torch
            from evosparse.jobs.settings import get_settings
            from evosparse.jobs.spec import JobSpec
            from evosparse.jobs.store import store_from_settings
            from evosparse.pruning.data import get_windows
            from evosparse.pruning.layers import find_blocks
            from evosparse.pruning.loading import load_model
            from evosparse.search.operators import mutate
            from evosparse.worker.leveldb_store import LevelStore
            from evosparse.worker.scoring import redis_from_url
            from evosparse.worker.search_stage import linear_bounds, search_space, search_units

            torch.set_num_threads(2)
            settings = get_settings()
            spec = JobSpec(model=model_path, sparsity=args.sparsity, pruner="wanda", allocation="evolutionary",
                           calib_windows=args.calib_windows, seed=0,
                           search={"offspring": args.offspring, "selection": args.selection, "seed_from": "uniform",
                                   "workers": 2})
            model, tok = load_model(model_path, device="cpu", dtype="float32")
            model_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
            blocks = find_blocks(model)
            calib = get_windows("pydoc", tok, spec.calib_windows, spec.seq_len, "calib", seed=0)
            units = search_units(blocks, spec.search.granularity)
            space = search_space(spec, units)
            levels = LevelStore(store_from_settings(settings), settings.resolved_work_dir / "leveldb")
            t0 = time.perf_counter()
            levels.build(model, calib, "wanda", blocks=blocks, bounds=linear_bounds(units, space))
            build_s = time.perf_counter() - t0
            key = levels.last_key
            del model, blocks, levels
            gc.collect()
            rng = random.Random(0)
            batches = []
            for _ in range(args.generations):
                vectors = [mutate(space, space.zero(), rng, switches=3) for _ in range(args.offspring)]
                batches += [(vectors, 256), (vectors[:2], 1024)]
            namespace = "evosparse:score:mem:1"
            context = {"namespace": namespace, "spec": spec.model_dump(mode="json"), "leveldb_key": key}
            svc.start_scorers(1)
            t1 = time.perf_counter()
            scored = _drive_scorer(redis_from_url(settings.resolved_scoring_redis_url), namespace, context, batches)
            score_s = time.perf_counter() - t1
            peak = svc.peak_rss_mb(0)
        finally:
            svc.stop()
    result = {"bench": "memory", "model": args.synthetic or args.model, "scorer_peak_rss_mb": round(peak, 1),
              "model_param_mb": round(model_mb, 1), "ratio": round(peak / model_mb, 3), "candidates": scored,
              "leveldb_build_s": round(build_s, 1), "scoring_s": round(score_s, 1),
              "calib_windows": args.calib_windows, "generations": args.generations}
    print(f"scoring worker peak RSS {peak:.0f} MB for a {model_mb:.0f} MB model (float32 parameters): "
          f"{result['ratio']:.2f}x, {scored} candidates scored in {score_s:.0f} s (level database built in "
          f"{build_s:.0f} s by the coordinator and loaded by the scorer)")
    return result


def cmd_reuse(args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        svc = Service(Path(tmp), scorers=0)
        try:
            first = run_one(args.model, args.sparsity, 1, 1, args.offspring, args.selection, "r1", pruner=args.pruner)
            second = run_one(args.model, args.sparsity, 1, 1, args.offspring, args.selection, "r2", pruner=args.pruner)
        finally:
            svc.stop()
    s1, s2 = sum(first["setup_seconds"].values()), sum(second["setup_seconds"].values())
    result = {"bench": "reuse", "model": args.model, "pruner": args.pruner,
              "first": first["setup_seconds"], "second": second["setup_seconds"],
              "first_leveldb": first["leveldb"], "second_leveldb": second["leveldb"],
              "first_total": round(s1, 2), "second_total": round(s2, 2), "ratio": round(s2 / s1, 3)}
    print(f"first job set-up {s1:.1f} s ({first['leveldb']}: {first['setup_seconds']}); second job {s2:.1f} s "
          f"({second['leveldb']}: {second['setup_seconds']}); ratio {result['ratio']}; anchor levels "
          f"{first['anchor_levels']} {first['anchors']} then {second['anchor_levels']} {second['anchors']}")
    return result


def _block_forwards(n: int, ready=None, go=None) -> float:  # noqa: ANN001 - multiprocessing events
    """Seconds for ``n`` forwards of one SmolLM2-shaped decoder block (random weights) on 256 tokens, 1 thread."""
    import torch
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3)
    block, rope = LlamaDecoderLayer(cfg, 0).eval(), LlamaRotaryEmbedding(cfg)
    h = torch.randn(1, 256, 576)
    pos = rope(h, torch.arange(256).unsqueeze(0))
    with torch.no_grad():
        block(h, position_embeddings=pos)  # warm-up
        if ready is not None:
            ready.set()
            go.wait()
        t0 = time.perf_counter()
        for _ in range(n):
            block(h, position_embeddings=pos)
        return time.perf_counter() - t0


def _timed(n: int, ready, go, out) -> None:  # noqa: ANN001
    out.put(_block_forwards(n, ready, go))


def cmd_ceiling(args: argparse.Namespace) -> dict:
    """What two 1-thread processes can do together on this machine, with no coordination at all."""
    import multiprocessing as mp

    n = args.forwards
    alone = _block_forwards(n)
    ctx = mp.get_context("spawn")
    out, go = ctx.Queue(), ctx.Event()
    readies = [ctx.Event() for _ in range(2)]
    procs = [ctx.Process(target=_timed, args=(n, r, go, out)) for r in readies]
    for p in procs:
        p.start()
    for r in readies:
        r.wait()
    go.set()
    times = [out.get() for _ in procs]
    for p in procs:
        p.join()
    ratio = 2 * n / max(times) / (n / alone)
    result = {"bench": "ceiling", "forwards": n, "alone_s": round(alone, 2), "pair_s": [round(t, 2) for t in times],
              "aggregate_speedup": round(ratio, 3)}
    print(f"{n} block forwards alone: {alone:.1f} s; two processes at once: {times[0]:.1f} s and {times[1]:.1f} s "
          f"-> two independent 1-thread processes do {ratio:.2f}x the work of one")
    return result


def cmd_exchange(args: argparse.Namespace) -> dict:
    """Redis CPU for trace-sized values on the broker's configuration (append-only file) and on the
    scoring exchange's (memory only): why the exchange has its own Redis."""
    import psutil
    from evosparse.cli.service_cmd import start_embedded_redis

    payload = os.urandom(55 << 20)  # one SmolLM2 trace of 3 windows, float32
    out = {}
    for persistent in (True, False):
        with tempfile.TemporaryDirectory() as tmp:
            server, _ = start_embedded_redis(Path(tmp) / "r.db", persistent=persistent)
            proc = psutil.Process(server.pid)
            before, wall = sum(proc.cpu_times()[:4]), time.perf_counter()
            for i in range(args.sets):  # a published trace, a fetched one, a stage's lease traffic
                server.set(f"trace{i % 4}", payload)
                server.get(f"trace{(i + 1) % 4}")
                for j in range(100):
                    server.set(f"lease{j}", "x", px=10_000)
            name = "append-only" if persistent else "memory-only"
            out[name] = {"redis_cpu_s": round(sum(proc.cpu_times()[:4]) - before, 2),
                         "wall_s": round(time.perf_counter() - wall, 2)}
            server.shutdown()
    print(f"{args.sets} sets + gets of 55 MB: {out}")
    return {"bench": "exchange", "sets": args.sets, **out}


def cmd_anchors(args: argparse.Namespace) -> dict:
    """SparseGPT anchor levels built by the coordinator alone, then with one scoring worker beside it
    (every process at 1 thread), from an empty store each time; the same levels either way."""
    from evosparse.jobs.settings import get_settings
    from evosparse.jobs.store import store_from_settings

    with tempfile.TemporaryDirectory() as tmp:
        svc = Service(Path(tmp), scorers=1)
        try:
            alone = run_one(args.model, args.sparsity, 1, 1, args.offspring, args.selection, "a1", pruner="sparsegpt")
            store_from_settings(get_settings()).delete_prefix("leveldb/")  # the second job builds everything again
            shutil.rmtree(get_settings().resolved_work_dir / "leveldb", ignore_errors=True)
            with svc.cpu_seconds() as cpu2:
                two = run_one(args.model, args.sparsity, 2, 1, args.offspring, args.selection, "a2", pruner="sparsegpt")
            two["cpu_seconds"] = cpu2
        finally:
            svc.stop()
    result = {"bench": "anchors", "model": args.model, "sparsity": args.sparsity, "alone": alone, "two": two,
              "anchor_speedup": round(alone["anchor_seconds"] / two["anchor_seconds"], 3), **same_search(alone, two)}
    print(f"anchor levels {alone['anchor_levels']}: alone {alone['anchor_seconds']} s; with one scorer "
          f"{two['anchor_seconds']} s (blocks {two['anchor_blocks']}) -> {result['anchor_speedup']}x; level database "
          f"{alone['setup_seconds'].get('leveldb')} s vs {two['setup_seconds'].get('leveldb')} s; same best vector "
          f"{result['same_best_vector']}, same best fitness {result['same_best_fitness']}; CPU s {cpu2}")
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=("throughput", "memory", "reuse", "ceiling", "exchange", "anchors"))
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--synthetic", choices=sorted(SYNTHETIC), help="memory: a synthetic Llama instead of --model")
    p.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "evosparse-bench-models"))
    p.add_argument("--sparsity", type=float, default=0.7)
    p.add_argument("--pruner", default="wanda", help="reuse: the level database's pruner (sparsegpt: with anchor levels)")
    p.add_argument("--generations", type=int, default=15, help="memory: batches of offspring to score (default 15)")
    p.add_argument("--offspring", type=int, default=8)
    p.add_argument("--selection", default="256:2,1024:1")
    p.add_argument("--calib-windows", type=int, default=32, help="memory: calibration windows of 256 tokens")
    p.add_argument("--scoring-on-broker", action="store_true",
                   help="throughput: the scoring exchange on the broker's (append-only) Redis, as before it had its own")
    p.add_argument("--sets", type=int, default=30, help="exchange: trace-sized values written")
    p.add_argument("--forwards", type=int, default=400, help="ceiling: block forwards per process")
    args = p.parse_args()
    result = {"cmd": " ".join(sys.argv), **{"throughput": cmd_throughput, "memory": cmd_memory,
                                             "reuse": cmd_reuse, "ceiling": cmd_ceiling,
                                             "exchange": cmd_exchange, "anchors": cmd_anchors}[args.command](args)}
    RAW.mkdir(parents=True, exist_ok=True)
    suffix = ("_on_broker" if args.scoring_on_broker else "") + (f"_{args.pruner}" if args.pruner != "wanda" else "")
    name = f"scale_{args.command}_{args.synthetic or Path(args.model).name}{suffix}.json"
    (RAW / name).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()

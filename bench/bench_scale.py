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

Heavy: run one at a time, e.g.
  flock /tmp/evosparse-heavy.lock python3 bench/bench_scale.py throughput
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
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

    def __init__(self, root: Path, scorers: int) -> None:
        from evosparse.cli.service_cmd import scorer_worker_cmd, start_embedded_redis

        self.redis, broker = start_embedded_redis(root / "redis.db")
        self.env = {
            "EVOSPARSE_BROKER_URL": broker,
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
        env = dict(os.environ, PYTHONPATH=str(ROOT.parent), OMP_NUM_THREADS="1")
        self.logs = [open(root / f"scorer{i}.log", "w") for i in range(scorers)]
        self.procs = [subprocess.Popen(scorer_worker_cmd(self.env["EVOSPARSE_SCORE_QUEUE"], f"scorer{i}@%h"), env=env,
                                       stdout=log, stderr=subprocess.STDOUT) for i, log in enumerate(self.logs)]

    def peak_rss_mb(self, i: int = 0) -> float:
        for line in Path(f"/proc/{self.procs[i].pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self) -> None:
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
        self.redis.shutdown()


def run_one(model_path: str, sparsity: float, workers: int, generations: int, offspring: int, selection: str,
            namespace: str, wait_warm: bool = True) -> dict:
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
    from evosparse.worker.tasks import scoring_for

    torch.set_num_threads(1)
    settings = get_settings()
    spec = JobSpec(model=model_path, sparsity=sparsity, pruner="wanda", allocation="evolutionary", seed=0,
                   search={"generations": generations, "offspring": offspring, "selection": selection,
                           "seed_from": "uniform", "workers": workers, "time_budget_min": None})
    t0 = time.perf_counter()
    model, tok = load_model(spec.model, device="cpu", dtype="float32")
    blocks = find_blocks(model)
    calib = get_windows("pydoc", tok, spec.calib_windows, spec.seq_len, "calib", seed=0)
    load_s = time.perf_counter() - t0
    levels = LevelStore(store_from_settings(settings), settings.resolved_work_dir / "leveldb")
    made: list = []

    def scoring(local):  # noqa: ANN001, ANN202
        factory = scoring_for(namespace, spec, settings, levels)
        fitness = factory(local) if factory is not None else local
        made.append(fitness)
        if workers > 1 and wait_warm:  # measure the search, not the scorers' start-up
            r = redis_from_url(settings.broker_url)
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
        "best_levels": out.best_levels, "best_fitness": out.best_fitness,
        "setup_seconds": {k: round(v, 2) for k, v in out.timings.items() if k != "search"},
        "leveldb": out.leveldb, "load_seconds": round(load_s, 2),
        "model_param_mb": round(sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20, 1),
    }


def cmd_throughput(args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        svc = Service(Path(tmp), scorers=1)
        try:
            # Build (and store) the level database first, so both timed runs load it alike.
            run_one(args.model, args.sparsity, 1, 1, args.offspring, args.selection, "warmup")
            one = run_one(args.model, args.sparsity, 1, args.generations, args.offspring, args.selection, "w1")
            two = run_one(args.model, args.sparsity, 2, args.generations, args.offspring, args.selection, "w2")
        finally:
            svc.stop()
    result = {"bench": "throughput", "model": args.model, "sparsity": args.sparsity, "one": one, "two": two,
              "speedup": round(two["candidates_per_minute"] / one["candidates_per_minute"], 3),
              "same_best_vector": one["best_levels"] == two["best_levels"],
              "same_best_fitness": one["best_fitness"] == two["best_fitness"]}
    print(f"| workers | candidates | search s | candidates/min |\n|---|---|---|---|\n"
          f"| 1 | {one['candidates_scored']} | {one['search_seconds']} | {one['candidates_per_minute']} |\n"
          f"| 2 | {two['candidates_scored']} | {two['search_seconds']} | {two['candidates_per_minute']} |\n"
          f"speed-up {result['speedup']}x; same best vector: {result['same_best_vector']}; "
          f"candidates scored by the scoring worker: {two['remote_scored']}")
    return result


def cmd_memory(args: argparse.Namespace) -> dict:
    cache = Path(args.cache)
    model = str(synthetic_model_dir(args.synthetic, cache)) if args.synthetic else args.model
    with tempfile.TemporaryDirectory() as tmp:
        svc = Service(Path(tmp), scorers=1)
        try:
            run = run_one(model, args.sparsity, 2, 2, args.offspring, args.selection, "mem")
            peak = svc.peak_rss_mb(0)
        finally:
            svc.stop()
    result = {"bench": "memory", "model": args.synthetic or args.model, "scorer_peak_rss_mb": round(peak, 1),
              "model_param_mb": run["model_param_mb"], "ratio": round(peak / run["model_param_mb"], 3),
              "remote_scored": run["remote_scored"], "setup_seconds": run["setup_seconds"]}
    print(f"scoring worker peak RSS {peak:.0f} MB for a {run['model_param_mb']:.0f} MB model: "
          f"{result['ratio']:.2f}x (it scored {run['remote_scored']} candidates)")
    return result


def cmd_reuse(args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        svc = Service(Path(tmp), scorers=0)
        try:
            first = run_one(args.model, args.sparsity, 1, 1, args.offspring, args.selection, "r1")
            second = run_one(args.model, args.sparsity, 1, 1, args.offspring, args.selection, "r2")
        finally:
            svc.stop()
    s1, s2 = sum(first["setup_seconds"].values()), sum(second["setup_seconds"].values())
    result = {"bench": "reuse", "model": args.model, "first": first["setup_seconds"], "second": second["setup_seconds"],
              "first_leveldb": first["leveldb"], "second_leveldb": second["leveldb"],
              "first_total": round(s1, 2), "second_total": round(s2, 2), "ratio": round(s2 / s1, 3)}
    print(f"first job set-up {s1:.1f} s ({first['leveldb']}: {first['setup_seconds']}); second job {s2:.1f} s "
          f"({second['leveldb']}: {second['setup_seconds']}); ratio {result['ratio']}")
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=("throughput", "memory", "reuse"))
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--synthetic", choices=sorted(SYNTHETIC), help="memory: a synthetic Llama instead of --model")
    p.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "evosparse-bench-models"))
    p.add_argument("--sparsity", type=float, default=0.7)
    p.add_argument("--generations", type=int, default=15)
    p.add_argument("--offspring", type=int, default=8)
    p.add_argument("--selection", default="256:2,1024:1")
    args = p.parse_args()
    result = {"cmd": " ".join(sys.argv), **{"throughput": cmd_throughput, "memory": cmd_memory,
                                             "reuse": cmd_reuse}[args.command](args)}
    RAW.mkdir(parents=True, exist_ok=True)
    name = f"scale_{args.command}_{args.synthetic or Path(args.model).name}.json"
    (RAW / name).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()

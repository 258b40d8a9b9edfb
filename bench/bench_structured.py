"""Benchmark of structured pruning on SmolLM2-135M (pydoc calibration, held-out second half).

Subcommands, each writing JSON under bench/results/raw/; ``report`` renders
bench/results/structured.md from whatever JSON exists:

  quality   held-out perplexity at each sparsity (fraction of block weights removed) for
            magnitude-norm units (uniform widths), GOA ranking without reconstruction, GOA with
            reconstruction, and GOA with reconstruction at searched per-layer widths (the
            evolutionary search on the structured level database, Fisher-seeded, KL fitness on
            calibration windows only). Resumable: cells already in the JSON are skipped.
  speed     dense vs the structured model (uniform widths, GOA, given sparsity; and the searched
            widths of the quality run when present) in the same run, interleaved: tokens/s of
            greedy generation and of a forward pass at batch 1 and 8, and checkpoint size.

Run heavy parts under the shared lock, e.g.
  flock /tmp/evosparse-heavy.lock python bench/bench_structured.py quality
All tuning (rankings, reconstruction, search) uses the calibration half only; the evaluation half
is read only for the final perplexities.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from common import setup  # bench/common.py (the script folder is on sys.path)

ROOT = Path(__file__).resolve().parent
RAW = ROOT / "results" / "raw"
QUALITY = RAW / "structured_quality.json"
SPEED = RAW / "structured_speed.json"
METHODS = ("magnitude", "goa-norec", "goa", "goa-search")
LABELS = {
    "magnitude": "magnitude-norm units, uniform widths",
    "goa-norec": "GOA ranking, no reconstruction, uniform widths",
    "goa": "GOA ranking + reconstruction, uniform widths",
    "goa-search": "GOA + reconstruction, searched widths",
}


def load_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def block_counts(model, budgets: list[int]) -> dict[str, int]:
    """Per-linear counts whose per-block sums are ``budgets`` (the structured pruner sums them per block)."""
    from evosparse.pruning.layers import find_blocks

    return {next(iter(b.linears)): n for b, n in zip(find_blocks(model), budgets, strict=True)}


def block_budgets(model, counts: dict[str, int]) -> list[int]:
    from evosparse.pruning.layers import find_blocks

    return [sum(counts.get(n, 0) for n in b.linears) for b in find_blocks(model)]


class Hooks:
    def stage(self, name, fraction, message=""):
        pass

    def setup(self, message):
        print(f"  setup: {message}", flush=True)

    def generation(self, record, state):
        print(f"  gen {record['generation']:3d} best {record['best']:.5f} t {record['seconds']:.0f}s", flush=True)

    def should_cancel(self):
        return False


def cmd_quality(args) -> None:
    from evosparse.jobs.spec import JobSpec, SearchSettings
    from evosparse.pruning.evaluate import perplexity
    from evosparse.pruning.sensitivity import allocation_counts
    from evosparse.pruning.structured import prune_structured, structured_parameters
    from evosparse.worker.search_stage import run_search

    model, _tok, calib, evalw = setup(args)
    results = load_json(QUALITY)
    if "dense" not in results:
        t0 = time.perf_counter()
        results["dense"] = {"ppl": perplexity(model, evalw), "seconds": time.perf_counter() - t0}
        QUALITY.write_text(json.dumps(results, indent=1))
    print(f"dense ppl {results['dense']['ppl']:.2f}", flush=True)
    dense_params = structured_parameters(model)
    fisher = None
    db = None
    fisher_path = RAW / "fisher_32.json"  # per-linear Fisher traces of the dense model (bench_search.py)
    for s in [float(x) for x in args.sparsities.split(",")]:
        for method in args.methods.split(","):
            key = f"{method}@{s:g}"
            if key in results and not args.force:
                print(f"{key}: cached ppl {results[key]['ppl']:.2f}")
                continue
            work = copy.deepcopy(model)
            t0 = time.perf_counter()
            entry: dict = {}
            if method == "goa-search":
                if fisher is None:
                    if fisher_path.exists():
                        fisher = json.loads(fisher_path.read_text())
                    else:
                        from evosparse.pruning.sensitivity import fisher_traces

                        fisher = fisher_traces(model, calib)
                        fisher_path.write_text(json.dumps(fisher))
                spec = JobSpec(model=args.model, sparsity=s, pruner="goa", pattern="structured",
                               allocation="evolutionary", calib_windows=args.calib_windows, seed=0,
                               search=SearchSettings(generations=args.generations, offspring=8,
                                                     selection="256:2,1024:1", seed_from="fisher",
                                                     time_budget_min=args.search_min))
                if db is None:  # one level database serves every sparsity (it holds rankings, not levels)
                    from evosparse.pruning.structured_leveldb import StructuredLevelDB

                    t_db = time.perf_counter()
                    top = max(float(x) for x in args.sparsities.split(","))
                    db = StructuredLevelDB.build(model, calib, "goa", max_fraction=top + spec.search.max_level_delta)
                    db_seconds = time.perf_counter() - t_db
                    results["leveldb_seconds"] = db_seconds
                # The search runs on the dense model the database holds and leaves it dense.
                outcome = run_search(model, calib, spec, Hooks(), sensitivity={"fisher": fisher}, db=db)
                counts = outcome.counts
                entry["search"] = {"seconds": outcome.seconds, "candidates": outcome.candidates_scored,
                                   "generations": len(outcome.history), "stopped_by": outcome.stopped_by,
                                   "timings": outcome.timings, "best_fitness": outcome.best_fitness}
            else:
                counts = allocation_counts(work, "uniform", s)
            t1 = time.perf_counter()
            pruner = "magnitude" if method == "magnitude" else "goa"
            structure = prune_structured(work, calib, pruner, counts, reconstruct_second=method != "goa-norec")
            entry["prune_seconds"] = time.perf_counter() - t1
            entry["ppl"] = perplexity(work, evalw)
            entry["seconds"] = time.perf_counter() - t0
            entry["removed"] = 1 - structured_parameters(work) / dense_params
            entry["widths"] = structure.widths()
            entry["block_budgets"] = block_budgets(work, counts)
            results[key] = entry
            QUALITY.write_text(json.dumps(results, indent=1))
            print(f"{key}: ppl {entry['ppl']:.2f} removed {entry['removed']:.4f} ({entry['seconds']:.0f} s)", flush=True)
            del work


def _time(fn, reps: int) -> list[float]:
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def _dir_mb(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 2**20


@torch.no_grad()
def cmd_speed(args) -> None:
    from evosparse.pruning.sensitivity import allocation_counts
    from evosparse.pruning.structured import prune_structured, structured_parameters
    from evosparse.pruning.structured_export import export_structured

    model, tok, calib, _evalw = setup(args)
    models = {"dense": model}
    uni = copy.deepcopy(model)
    prune_structured(uni, calib, "goa", allocation_counts(uni, "uniform", args.sparsity))
    models[f"goa uniform {args.sparsity:g}"] = uni
    searched = load_json(QUALITY).get(f"goa-search@{args.sparsity:g}")
    if searched is not None:
        srch = copy.deepcopy(model)
        prune_structured(srch, calib, "goa", block_counts(srch, searched["block_budgets"]))
        models[f"goa searched {args.sparsity:g}"] = srch
    sizes, params = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, m in models.items():
            d = Path(tmp) / name.replace(" ", "_")
            if name == "dense":
                m.save_pretrained(d, safe_serialization=True)
            else:
                export_structured(m, None, d, {}, padded=False)
            sizes[name] = _dir_mb(d)
            params[name] = sum(p.numel() for p in m.parameters())
    block_params = {n: structured_parameters(m) for n, m in models.items()}
    prompt = calib[:8, :32]
    fwd = {b: calib[:b, :256] for b in (1, 8)}
    timings: dict[str, dict[str, list[float]]] = {n: {} for n in models}
    torch.manual_seed(0)
    for rep in range(args.reps):  # interleaved: every model sees the same machine load, round by round
        for name, m in models.items():
            for b in (1, 8):
                x = fwd[b]
                timings[name].setdefault(f"forward_b{b}", []).extend(
                    _time(lambda m=m, x=x: m(input_ids=x, use_cache=False), 1))
                p = prompt[:b]
                timings[name].setdefault(f"generate_b{b}", []).extend(_time(
                    lambda m=m, p=p: m.generate(input_ids=p, attention_mask=torch.ones_like(p), do_sample=False,
                                                max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                                use_cache=True, pad_token_id=tok.eos_token_id), 1))
        print(f"round {rep + 1}/{args.reps} done", flush=True)
    out = {"sparsity": args.sparsity, "reps": args.reps, "new_tokens": args.new_tokens, "threads": torch.get_num_threads(),
           "models": {}}
    for name in models:
        t = {k: statistics.median(v) for k, v in timings[name].items()}
        out["models"][name] = {
            "checkpoint_mb": sizes[name], "parameters": params[name], "block_weights": block_params[name],
            "forward_b1_tok_s": 256 / t["forward_b1"], "forward_b8_tok_s": 8 * 256 / t["forward_b8"],
            "generate_b1_tok_s": args.new_tokens / t["generate_b1"],
            "generate_b8_tok_s": 8 * args.new_tokens / t["generate_b8"],
            "raw_seconds": timings[name],
        }
        print(name, {k: round(v, 1) for k, v in out["models"][name].items() if k != "raw_seconds"}, flush=True)
    SPEED.write_text(json.dumps(out, indent=1))


def cmd_report(args) -> None:
    q, sp = load_json(QUALITY), load_json(SPEED)
    lines = ["# Structured pruning on SmolLM2-135M", ""]
    if q:
        sparsities = sorted({float(k.split("@")[1]) for k in q if "@" in k})
        lines += [f"Held-out perplexity (dense {q['dense']['ppl']:.2f}); calibration 32 × 256 tokens of the first half "
                  "of pydoc, evaluation 16 × 256 tokens of the second half. Sparsity = fraction of the blocks' "
                  "weights removed (embeddings and LM head stay); the measured fraction is in brackets.", "",
                  "| method | " + " | ".join(f"{s:.0%}" for s in sparsities) + " |",
                  "| --- | " + " | ".join("---" for _ in sparsities) + " |"]
        for m in METHODS:
            cells = []
            for s in sparsities:
                e = q.get(f"{m}@{s:g}")
                cells.append("—" if e is None else f"{e['ppl']:.2f} ({e['removed']:.1%}, {e['seconds']:.0f} s)")
            lines.append(f"| {LABELS[m]} | " + " | ".join(cells) + " |")
        lines += ["", "Cells: perplexity (measured fraction removed, wall seconds of search + pruning + evaluation).", ""]
        for s in sparsities:
            e, base, uni = q.get(f"goa-search@{s:g}"), q.get(f"magnitude@{s:g}"), q.get(f"goa@{s:g}")
            if e is not None and base is not None and uni is not None:
                lines.append(f"- {s:.0%}: searched / magnitude-norm = {e['ppl']:.2f} / {base['ppl']:.2f} = "
                             f"{e['ppl'] / base['ppl']:.2g}; searched / uniform GOA = {e['ppl']:.2f} / "
                             f"{uni['ppl']:.2f} = {e['ppl'] / uni['ppl']:.3f}; search {e['search']['seconds']:.0f} s, "
                             f"{e['search']['generations']} generations, {e['search']['candidates']} candidates, "
                             f"stopped by {e['search']['stopped_by']}")
        lines.append("")
        for s in sparsities:
            e = q.get(f"goa-search@{s:g}")
            if e is not None:
                inter = [w["intermediate_size"] for w in e["widths"]]
                kv = [w["num_key_value_heads"] for w in e["widths"]]
                lines.append(f"- searched widths at {s:.0%}: intermediate_size per layer {inter}; KV heads {kv}")
        u = q.get("goa@0.3")
        if u is not None:
            lines.append(f"- uniform widths at 30 %: {u['widths'][0]}")
        lines.append("")
    if sp:
        names = list(sp["models"])
        dense = sp["models"]["dense"]
        lines += [f"Speed on this CPU ({sp['threads']} torch threads, float32, median of {sp['reps']} interleaved rounds; "
                  f"forward = one pass over 256 tokens per sequence, generation = greedy, 32-token prompt, "
                  f"{sp['new_tokens']} new tokens, KV cache on):", "",
                  "| model | block weights | parameters | checkpoint MB | forward b1 tok/s | forward b8 tok/s | "
                  "generate b1 tok/s | generate b8 tok/s |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for n in names:
            m = sp["models"][n]

            def cell(k, m=m, n=n):
                r = m[k] / dense[k]
                return f"{m[k]:.0f}" + ("" if n == "dense" else f" ({r:.2f}×)")
            lines.append(f"| {n} | {m['block_weights']:,} | {m['parameters']:,} | {m['checkpoint_mb']:.0f} | "
                         f"{cell('forward_b1_tok_s')} | {cell('forward_b8_tok_s')} | {cell('generate_b1_tok_s')} | "
                         f"{cell('generate_b8_tok_s')} |")
        lines.append("")
    out = ROOT / "results" / "structured.md"
    out.write_text("\n".join(lines) + "\n")
    print(out.read_text())


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("quality", "speed"):
        p = sub.add_parser(name)
        p.add_argument("--model", default="smollm2-135m")
        p.add_argument("--calib-windows", type=int, default=32)
        p.add_argument("--eval-windows", type=int, default=16)
    q = sub.choices["quality"]
    q.add_argument("--sparsities", default="0.2,0.3,0.4")
    q.add_argument("--methods", default=",".join(METHODS))
    q.add_argument("--generations", type=int, default=400)
    q.add_argument("--search-min", type=float, default=6.0, help="time budget of each search, minutes")
    q.add_argument("--force", action="store_true", help="recompute cells already in the JSON")
    s = sub.choices["speed"]
    s.add_argument("--sparsity", type=float, default=0.3)
    s.add_argument("--reps", type=int, default=5)
    s.add_argument("--new-tokens", type=int, default=64)
    sub.add_parser("report")
    args = ap.parse_args(argv)
    {"quality": cmd_quality, "speed": cmd_speed, "report": cmd_report}[args.cmd](args)


if __name__ == "__main__":
    main()

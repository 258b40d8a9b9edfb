"""Search v2 benchmark on SmolLM2-135M: cheap SparseGPT levels, validation selection, fresh windows,
depth-ramp seeds, several seeds, and a second held-out text that is not Python documentation.

  quality  baselines (uniform / Fisher / OWL / ramp) and the evolutionary search at several search
           seeds, every final model pruned block-sequentially as a job ships it, perplexity on the
           pydoc evaluation half and on the Debian licence texts (/usr/share/common-licenses,
           concatenated; never read for calibration or tuning). ``--transfer sparsegpt``: also
           prune each found allocation with SparseGPT (search on Wanda levels, ship SparseGPT).
           ``--transfer-search wanda``: per seed, also a search on Wanda levels given the same whole-job
           time as the native search (its budget grows by the level databases' build-time difference),
           its allocation pruned with ``--pruner``: transfer against native search at equal time.
  anchors  the SparseGPT anchor levels of a job's grid: memory packed against dense float32, bytes
           stored, and the cost of unpacking a level against copying a dense one.
  report   renders bench/results/search_v2.md from bench/results/raw/v2_*.json (and appends the
           hand-written bench/results/search_v2_notes.md).

Calibration: 32 pydoc windows (first half, seed 0) for every seed; the search seed varies.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import typing
from pathlib import Path

import torch
from evosparse.jobs.spec import SearchSettings
from evosparse.search.defaults import MAX_LEVEL_DELTA

ROOT = Path(__file__).resolve().parent
RAW = ROOT / "results" / "raw"
# The search's proxy: its choices and default are the job spec's (a run without --fitness is a default job).
FITNESS = SearchSettings.model_fields["fitness"]
sys.path.insert(0, str(ROOT))
LICENCES = Path("/usr/share/common-licenses")


def licence_file() -> Path:
    """The Debian licence texts as one file (each distinct text once, in name order)."""
    out = Path("/tmp/evosparse-bench-licences.txt")
    seen, parts = set(), []
    for p in sorted(LICENCES.iterdir()):
        if p.is_file():
            text = p.resolve().read_text(errors="replace")
            if text not in seen:
                seen.add(text)
                parts.append(text)
    out.write_text("\n\n".join(parts))
    return out


def evaluate(model, texts: dict) -> dict:
    from evosparse.pruning.evaluate import perplexity

    return {name: perplexity(model, w) for name, w in texts.items()}


def prune_eval(model, dense, calib, texts, pruner, counts) -> tuple[dict, float]:
    from evosparse.pruning.prune import prune_model

    t = time.perf_counter()
    prune_model(model, calib, pruner, counts)
    prune_s = time.perf_counter() - t
    ppl = evaluate(model, texts)
    dense.restore()
    return ppl, prune_s


class Hooks:
    def stage(self, *a, **k):
        pass

    def setup(self, message):
        pass

    def generation(self, record, state):
        print(f"  gen {record['generation']:3d} best {record['best']:.4f} val {record.get('val', float('nan')):.4f} "
              f"t {record['seconds']:.0f}s", flush=True)

    def should_cancel(self):
        return False


def cmd_quality(args) -> None:
    from bench_search import sensitivity
    from common import setup
    from evosparse.jobs.spec import JobSpec
    from evosparse.pruning.data import get_windows
    from evosparse.pruning.layers import find_blocks
    from evosparse.pruning.leveldb import LevelDB, search_units, split_counts
    from evosparse.pruning.prune import pruned_input_stats
    from evosparse.pruning.sensitivity import allocation_counts
    from evosparse.pruning.snapshot import DenseWeights
    from evosparse.worker.search_stage import (
        level_kwargs,
        ramp_allocation,
        run_search,
        search_space,
        seed_counts,
    )

    RAW.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    model, tok, calib, evalw = setup(args)
    texts = {"pydoc": evalw, "licences": get_windows(str(licence_file()), tok, args.eval_windows, 256, "eval")}
    blocks = find_blocks(model)
    dense = DenseWeights(blocks)
    out: dict = {"args": vars(args) | {"func": None}, "dense": evaluate(model, texts), "baselines": {}, "runs": []}
    print("dense", out["dense"], flush=True)
    sens = sensitivity(model, calib, 32)
    base_spec = JobSpec(model=args.model, sparsity=args.sparsity, pruner=args.pruner, allocation="ramp",
                        calib_windows=args.calib_windows)
    for name in args.baselines.split(","):
        if not name:
            continue
        t = time.perf_counter()
        extra: dict = {}
        if name == "ramp":
            counts, extra = ramp_allocation(model, calib, base_spec, blocks, dense)
        else:
            kind, _, spread = name.partition("@")
            counts = allocation_counts(model, kind, args.sparsity, owl=sens["owl"], fisher=sens["fisher"],
                                       hessian=sens["hessian"], owl_lambda=0.08, spread=float(spread or 0.1), blocks=blocks)
        alloc_s = time.perf_counter() - t
        ppl, prune_s = prune_eval(model, dense, calib, texts, args.pruner, counts)
        out["baselines"][name] = {"ppl": ppl, "alloc_s": alloc_s, "prune_s": prune_s, **extra}
        print(name, out["baselines"][name], flush=True)

    settings = dict(generations=10_000, seed_from="fisher", granularity=args.granularity,
                    time_budget_min=args.budget_min, validation_windows=args.validation_windows,
                    fresh_windows=not args.fixed_windows, ramp_seeds=not args.no_ramps, anchor_every=args.anchor_every,
                    rerank=args.rerank, level_inputs=args.level_inputs, max_level_delta=args.max_level_delta,
                    fitness=args.fitness)
    spec0 = JobSpec(model=args.model, sparsity=args.sparsity, pruner=args.search_pruner or args.pruner,
                    allocation="evolutionary", calib_windows=args.calib_windows, search=SearchSettings(**settings))
    units = search_units(blocks, args.granularity)
    space = search_space(spec0, units)
    t = time.perf_counter()
    stats, calibration_s = None, 0.0
    if args.level_inputs == "pruned":  # as run_search does: a block-by-block prune at the first seed
        first = space.from_counts(seed_counts(model, calib, spec0, units, sens, lambda m: None, blocks)[0])
        stats = pruned_input_stats(model, calib, spec0.pruner, split_counts(units, space.counts(first)), blocks=blocks)
        calibration_s = time.perf_counter() - t
        print(f"pruned-input calibration {calibration_s:.1f} s", flush=True)
    db = LevelDB.build(model, calib, spec0.pruner, blocks=blocks, stats=stats, **level_kwargs(spec0, units, space))
    out["leveldb"] = {"seconds": time.perf_counter() - t, "calibration_s": calibration_s,
                      "anchor_seconds": db.anchor_seconds,
                      "anchor_levels": db.anchor_levels(), "linears": len(db.modules), "mb": db.nbytes() / 2**20}
    print("level db", out["leveldb"], flush=True)
    if args.transfer_search:
        # Equal whole-job time: the same final prune and dense references, so the transfer search gets
        # the native search's budget plus what its cheaper level database saves.
        spec_t = spec0.model_copy(update={"pruner": args.transfer_search})
        t = time.perf_counter()
        db_t = LevelDB.build(model, calib, args.transfer_search, blocks=blocks, **level_kwargs(spec_t, units, space))
        t_db = time.perf_counter() - t
        budget_t = args.budget_min + max(0.0, out["leveldb"]["seconds"] - t_db) / 60
        spec_t = spec_t.model_copy(update={"search": spec_t.search.model_copy(update={"time_budget_min": budget_t})})
        out["transfer_search"] = {"pruner": args.transfer_search, "leveldb_s": t_db, "budget_min": budget_t}
        print("transfer search", out["transfer_search"], flush=True)
    for seed in [int(s) for s in args.seeds.split(",")]:
        spec = spec0.model_copy(update={"seed": seed})
        t = time.perf_counter()
        outcome = run_search(model, calib, spec, Hooks(), sensitivity=sens, db=db, blocks=blocks,
                             dense=dense if args.rerank else None)
        db.restore()  # after a dense snapshot's restore the database's own state is stale: make it dense again
        search_s = time.perf_counter() - t
        run = {"seed": seed, "search_s": search_s, "loop_s": outcome.seconds, "generations": len(outcome.history) - 1,
               "candidates": outcome.candidates_scored, "best_fitness": outcome.best_fitness,
               "best_val": outcome.best_val, "history": outcome.history, "best_vector": outcome.best_vector,
               "timings": outcome.timings}
        run["ppl"], run["prune_s"] = prune_eval(model, dense, calib, texts, args.pruner, outcome.counts)
        if outcome.shipped_val:  # score what ships: also the model the database-level validation would have chosen
            run["rerank"] = outcome.shipped_val
            if outcome.shipped_val["chosen"] != 0:
                first = space.counts(outcome.shipped_val["levels"][0])
                run["ppl_db_choice"], _ = prune_eval(model, dense, calib, texts, args.pruner,
                                                     db.linear_counts(units, first))
        if args.transfer:
            run["transfer_ppl"], run["transfer_prune_s"] = prune_eval(model, dense, calib, texts, args.transfer,
                                                                      outcome.counts)
        if args.transfer_search:
            t = time.perf_counter()
            other = run_search(model, calib, spec_t.model_copy(update={"seed": seed}), Hooks(), sensitivity=sens,
                               db=db_t, blocks=blocks)
            db_t.restore()
            run["equal_time"] = {"search_s": time.perf_counter() - t, "generations": len(other.history) - 1,
                                 "candidates": other.candidates_scored, "best_vector": other.best_vector}
            run["equal_time"]["ppl"], run["equal_time"]["prune_s"] = prune_eval(model, dense, calib, texts,
                                                                               args.pruner, other.counts)
            print("  equal-time transfer", run["equal_time"], flush=True)
        out["runs"].append(run)
        print("seed", seed, {k: v for k, v in run.items() if k not in ("history", "best_vector")}, flush=True)
        (RAW / f"v2_{args.tag}.json").write_text(json.dumps(out, indent=1))
    out["total_s"] = time.perf_counter() - t_all
    (RAW / f"v2_{args.tag}.json").write_text(json.dumps(out, indent=1))


def cmd_anchors(args) -> None:
    """SparseGPT anchor levels of a job's grid: memory held packed against dense float32, the bytes
    stored, and what unpacking a level costs against copying a dense one (what apply did before)."""
    import tempfile

    from common import setup
    from evosparse.jobs.spec import JobSpec
    from evosparse.pruning.layers import find_blocks
    from evosparse.pruning.leveldb import LevelDB, search_units
    from evosparse.worker.search_stage import level_kwargs, search_space

    model, _, calib, _ = setup(args)
    blocks = find_blocks(model)
    spec = JobSpec(model=args.model, sparsity=args.sparsity, pruner="sparsegpt", allocation="evolutionary",
                   calib_windows=args.calib_windows, search=SearchSettings(anchor_every=args.anchor_every))
    units = search_units(blocks, "layer")
    t = time.perf_counter()
    db = LevelDB.build(model, calib, "sparsegpt", blocks=blocks, **level_kwargs(spec, units, search_space(spec, units)))
    build_s = time.perf_counter() - t
    packed = [p for a in db.anchors.values() for p in a.values()]
    packed_mb = sum(p.nbytes() for p in packed) / 2**20
    dense_mb = sum(4 * db.sizes[n] * len(a) for n, a in db.anchors.items()) / 2**20
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        db.save_anchors(tmp)
        save_s = time.perf_counter() - t
        stored_mb = sum(f.stat().st_size for f in Path(tmp).iterdir()) / 2**20
    # Per level, what apply writes into the weight: before, a dense anchor copied in; now, one unpacked.
    before = after = 0.0
    for a in db.anchors.values():
        weight = torch.empty(next(iter(a.values())).shape)
        dense_levels = [p.unpack() for p in a.values()]
        t = time.perf_counter()
        for w in dense_levels:
            weight.copy_(w)
        before += time.perf_counter() - t
        t = time.perf_counter()
        for p in a.values():
            weight.copy_(p.unpack())
        after += time.perf_counter() - t
    copy_ms, unpack_ms = before * 1e3 / len(packed), after * 1e3 / len(packed)
    out = {"levels": len(packed), "linears": len(db.anchors), "build_s": round(build_s, 1),
           "anchor_s": round(db.anchor_seconds, 1), "dense_float32_mb": round(dense_mb), "packed_mb": round(packed_mb),
           "packed/dense": round(packed_mb / dense_mb, 3), "stored_mb": round(stored_mb), "save_s": round(save_s, 1),
           "database_mb": round(db.nbytes() / 2**20), "apply_unpacked_ms_per_level": round(unpack_ms, 3),
           "apply_dense_ms_per_level": round(copy_ms, 3)}
    print(json.dumps(out, indent=1))
    RAW.mkdir(parents=True, exist_ok=True)
    (RAW / "v2anchors_packed.json").write_text(json.dumps({"args": args.argv, **out}, indent=1))


def ms(xs) -> str:
    xs = [x for x in xs if x is not None]
    if not xs:
        return "—"
    if len(xs) == 1:
        return f"{xs[0]:.2f}"
    return f"{statistics.mean(xs):.2f} ± {statistics.stdev(xs):.2f}"


def seeds_row(label: str, ppls: list[dict], uni: dict | None) -> str:
    """One table row over search seeds: perplexities, and their ratios to uniform when it applies."""
    pp, pl = [x["pydoc"] for x in ppls], [x["licences"] for x in ppls]
    rel = f"{ms([x / uni['pydoc'] for x in pp])} | {ms([x / uni['licences'] for x in pl])}" if uni else "— | —"
    return f"| {label} ({len(pp)} seeds) | {ms(pp)} | {ms(pl)} | {rel} |"


def cmd_report(args) -> None:
    runs = {p.stem[3:]: json.loads(p.read_text()) for p in sorted(RAW.glob("v2_*.json"))}
    lines = ["# Search v2 benchmark (SmolLM2-135M, pydoc calibration)", "",
             "Generated by `python bench/bench_search_v2.py report` from bench/results/raw/v2_*.json. "
             "Perplexity on 16 windows × 256 tokens of the pydoc evaluation half and of the Debian licence "
             "texts (/usr/share/common-licenses, each distinct text once, concatenated, evaluation half). "
             "Cells with ± are mean ± sample standard deviation over the search seeds.", ""]
    for tag, r in runs.items():
        a = r["args"]
        ppl_proxy = a.get("fitness", FITNESS.default) == "ppl"
        proxy = "ppl" if ppl_proxy else "KL"  # what best / val hold: the search's own proxy
        lines += [f"## {tag}: {a['pruner']} at {a['sparsity']}, search on {a.get('search_pruner') or a['pruner']} "
                  f"levels, {a['granularity']}, {a['budget_min']} min"
                  + (", levels calibrated on pruned inputs" if a.get("level_inputs") == "pruned" else "")
                  + (f", levels within ±{a['max_level_delta']}" if a.get("max_level_delta", MAX_LEVEL_DELTA) != MAX_LEVEL_DELTA
                     else "")
                  + (", perplexity as the search's proxy" if ppl_proxy else ""), "",
                  f"Command: `python bench/bench_search_v2.py quality {' '.join(a.get('argv', []))}`", "",
                  "| allocation | pydoc ppl | licences ppl | / uniform (pydoc) | / uniform (licences) |",
                  "| --- | --- | --- | --- | --- |"]
        uni = r["baselines"].get("uniform", {}).get("ppl")
        lines.append(f"| dense | {r['dense']['pydoc']:.2f} | {r['dense']['licences']:.2f} | | |")
        for name, b in r["baselines"].items():
            p = b["ppl"]
            rel = (f"{p['pydoc'] / uni['pydoc']:.3f} | {p['licences'] / uni['licences']:.3f}") if uni else "— | —"
            label = name + (f" (slope {b['slope']})" if "slope" in b else "")
            lines.append(f"| {label} | {p['pydoc']:.2f} | {p['licences']:.2f} | {rel} |")
        for key, label in (("ppl", "evolutionary"), ("transfer_ppl", f"transfer → {a.get('transfer')}")):
            if not r["runs"] or key not in r["runs"][0]:
                continue
            # A transferred model is pruned by another pruner: this run's uniform is not its baseline.
            same = key == "ppl" or a.get("transfer") == a["pruner"]
            lines.append(seeds_row(label, [x[key] for x in r["runs"]], uni if same else None))
        et = [x["equal_time"] for x in r["runs"] if "equal_time" in x]
        if et:
            ts = r["transfer_search"]
            lines.append(seeds_row(f"search on {ts['pruner']} levels at equal job time ({ts['budget_min']:.1f} min), "
                                   f"pruned with {a['pruner']}", [x["ppl"] for x in et], uni))
        if uni and r["runs"]:
            fixed = {k: v["ppl"]["pydoc"] for k, v in r["baselines"].items() if k != "uniform"}
            if fixed:
                best = min(fixed, key=fixed.get)
                evo = [x["ppl"]["pydoc"] / fixed[best] for x in r["runs"]]
                carry = [(x["ppl"]["licences"] / uni["licences"]) / (x["ppl"]["pydoc"] / uni["pydoc"])
                         for x in r["runs"]]
                lines += ["", f"evolutionary / best fixed rule on pydoc ({best}): {ms(evo)}; "
                              f"(searched/uniform on licences) / (searched/uniform on pydoc): {ms(carry)}"]
                if et:
                    lines += ["", f"equal-time transfer / best fixed rule on pydoc: "
                                  f"{ms([x['ppl']['pydoc'] / fixed[best] for x in et])}; native / equal-time "
                                  f"transfer: {ms([x['ppl']['pydoc'] / x['equal_time']['ppl']['pydoc'] for x in r['runs'] if 'equal_time' in x])}"]
        reranked = [x for x in r["runs"] if "rerank" in x]
        if reranked:
            lines += ["", "Score what ships (`search.rerank`): the best candidates on validation (database levels on dense "
                          "inputs) re-pruned block by block as the job ships them and scored on validation again:", "",
                      "| seed | database val KL (top) | shipped val KL (same) | chosen | pydoc ppl of the shipped choice | "
                      "pydoc ppl of the database choice |", "| --- | --- | --- | --- | --- | --- |"]
            for x in reranked:
                rr = x["rerank"]
                other = x.get("ppl_db_choice", x["ppl"])["pydoc"]
                lines.append(f"| {x['seed']} | {', '.join(f'{v:.4f}' for v in rr['database'])} | "
                             f"{', '.join(f'{v:.4f}' for v in rr['shipped'])} | #{rr['chosen']} | "
                             f"{x['ppl']['pydoc']:.2f} | {other:.2f} |")
        db = r.get("leveldb", {})
        calibrated = f", {db['calibration_s']:.0f} s of it the pruned-input calibration" if db.get("calibration_s") else ""
        lines += ["", f"Level database: {db.get('seconds', 0):.0f} s{calibrated} ({db.get('anchor_levels', 0)} SparseGPT levels "
                      f"built up front in {db.get('anchor_seconds', 0):.0f} s, {db.get('mb', 0):.0f} MB). "
                      f"Baselines: " + ", ".join(f"{k} prune {v['prune_s']:.0f} s" for k, v in r["baselines"].items()),
                  "", f"| seed | generations | candidates | search s | prune s | final calib {proxy} | final val {proxy} |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for x in r["runs"]:
            lines.append(f"| {x['seed']} | {x['generations']} | {x['candidates']} | {x['search_s']:.0f} | "
                         f"{x['prune_s']:.0f} | {x['best_fitness']:.4f} | "
                         + (f"{x['best_val']:.4f} |" if x['best_val'] is not None else "— |"))
        if et:
            lines += ["", f"Equal-time transfer: {r['transfer_search']['pruner']} level database "
                          f"{r['transfer_search']['leveldb_s']:.0f} s; generations / candidates / search s per seed: "
                          + "; ".join(f"{x['generations']} / {x['candidates']} / {x['search_s']:.0f}" for x in et)]
        if r["runs"]:
            h = r["runs"][0]["history"]
            step = max(1, len(h) // 8)
            lines += ["", f"Calibration vs validation {proxy} of the parent, seed {r['runs'][0]['seed']} (calibration: "
                          "that generation's chunk):", "", "| generation | chunk | calibration | validation |",
                      "| --- | --- | --- | --- |"]
            for rec in h[::step] + ([h[-1]] if (len(h) - 1) % step else []):
                lines.append(f"| {rec['generation']} | {rec.get('chunk', '—')} | {rec['best']:.4f} | "
                             f"{rec.get('val', float('nan')):.4f} |")
        lines.append("")
    notes = ROOT / "results" / "search_v2_notes.md"  # hand-written: how each run ran, what else ran
    if notes.is_file():
        lines += ["", notes.read_text().rstrip()]
    (ROOT / "results" / "search_v2.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(required=True)
    q = sub.add_parser("quality")
    q.add_argument("--tag", required=True)
    q.add_argument("--model", default="smollm2-135m")
    q.add_argument("--pruner", default="wanda")
    q.add_argument("--search-pruner", default=None, help="level database pruner (default: --pruner)")
    q.add_argument("--transfer", default=None, help="also prune each found allocation with this pruner")
    q.add_argument("--transfer-search", default=None,
                   help="also search on this pruner's levels at equal whole-job time, prune with --pruner")
    q.add_argument("--sparsity", type=float, default=0.7)
    q.add_argument("--seeds", default="0,1,2")
    q.add_argument("--budget-min", type=float, default=3.0)
    q.add_argument("--granularity", default="layer")
    q.add_argument("--baselines", default="uniform,fisher@0.1,fisher@0.2,owl,ramp")
    q.add_argument("--calib-windows", type=int, default=32)
    q.add_argument("--eval-windows", type=int, default=16)
    q.add_argument("--validation-windows", type=int, default=8)
    q.add_argument("--anchor-every", type=int, default=4)
    q.add_argument("--fixed-windows", action="store_true")
    q.add_argument("--no-ramps", action="store_true")
    q.add_argument("--rerank", type=int, default=0)
    q.add_argument("--level-inputs", default="dense", choices=("dense", "pruned"))
    q.add_argument("--fitness", default=FITNESS.default, choices=typing.get_args(FITNESS.annotation),
                   help="the search's proxy: KL from the dense model (default) or perplexity on the windows")
    q.add_argument("--max-level-delta", type=float, default=MAX_LEVEL_DELTA,
                   help="every layer's sparsity stays within target ± this (the search's default unless given)")
    q.set_defaults(func=cmd_quality)
    a = sub.add_parser("anchors")
    a.add_argument("--model", default="smollm2-135m")
    a.add_argument("--sparsity", type=float, default=0.7)
    a.add_argument("--calib-windows", type=int, default=32)
    a.add_argument("--eval-windows", type=int, default=16)
    a.add_argument("--anchor-every", type=int, default=4)
    a.set_defaults(func=cmd_anchors)
    r = sub.add_parser("report")
    r.set_defaults(func=cmd_report)
    args = ap.parse_args()
    args.argv = sys.argv[2:]
    torch.set_num_threads(2)
    args.func(args)


if __name__ == "__main__":
    main()

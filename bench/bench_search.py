"""Benchmark of the evolutionary allocation on SmolLM2-135M (pydoc calibration, held-out second half).

Three parts, each a subcommand writing JSON under bench/results/raw/, and ``report`` that
renders bench/results/search.md from whatever JSON exists:

  quality   held-out perplexity of uniform / OWL / Fisher-proportional / evolutionary at one
            sparsity and pruner, with the search's wall time and candidates scored; also the
            speed ratio (candidate score time / dense forward time over the same tokens, measured
            interleaved in this run) and peak memory against the dense model's size.
  ablation  the same search seeded from uniform (best fitness per generation), to compare with
            the Fisher-seeded history of the matching ``quality`` run.

Run heavy parts under the shared lock, e.g.
  flock /tmp/evosparse-heavy.lock python bench/bench_search.py quality --sparsity 0.7 --pruner wanda
All tuning uses the calibration half only; the evaluation half is only read for the final ppl.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
RAW = ROOT / "results" / "raw"
FISHER_SPREADS = (0.1, 0.15, 0.2, 0.25)  # the Fisher baseline at ±spread around the target


def rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mb() -> float:
    """Resident memory right now, from /proc (0 where there is none)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def setup(args):
    from evosparse.pruning.data import get_windows
    from evosparse.pruning.loading import load_model

    torch.manual_seed(0)
    model, tok = load_model(args.model, device="cpu", dtype="float32")
    model.eval()
    calib = get_windows("pydoc", tok, args.calib_windows, 256, "calib", seed=0)
    evalw = get_windows("pydoc", tok, args.eval_windows, 256, "eval")
    return model, calib, evalw


def sensitivity(model, calib, n_fisher: int) -> dict:
    """Fisher traces (cached in raw/ across runs: they only depend on the dense model and calib)."""
    from evosparse.pruning import sensitivity as sens

    path = RAW / f"fisher_{n_fisher}.json"
    if path.exists():
        fisher = json.loads(path.read_text())
    else:
        fisher = sens.fisher_traces(model, calib[:n_fisher])
        path.write_text(json.dumps(fisher))
    stats = sens.dense_input_stats(model, calib)  # one dense pass serves OWL ratios and Hessian traces
    return {"fisher": fisher, "owl": sens.owl_ratios(model, stats, 5.0), "hessian": sens.hessian_traces(model, stats)}


def make_spec(args, seed_from: str):
    from evosparse.jobs.spec import JobSpec, SearchSettings

    kw = {"seed_from": seed_from}
    for k in ("generations", "offspring", "selection", "step_fraction", "max_level_delta", "granularity"):
        v = getattr(args, k)
        if v is not None:
            kw[k] = v
    if args.time_budget_min is not None:
        kw["time_budget_min"] = args.time_budget_min
    return JobSpec(model=args.model, sparsity=args.sparsity, pruner=args.pruner, allocation="evolutionary",
                   calib_windows=args.calib_windows, seed=args.seed, search=SearchSettings(**kw))


class Hooks:
    def __init__(self):
        self.t0 = time.perf_counter()
        self.max_rss_mb = current_rss_mb()  # sampled after each generation: the search's own peak

    def stage(self, name, fraction, message=""):
        pass

    def generation(self, record, state):
        self.max_rss_mb = max(self.max_rss_mb, current_rss_mb())
        print(f"  gen {record['generation']:3d} best {record['best']:.5f} mean {record['mean']:.5f} "
              f"tokens {record['tokens']} t {record['seconds']:.0f}s", flush=True)

    def should_cancel(self):
        return False


def prune_and_eval(model, dense_state, calib, evalw, pruner, counts) -> float:
    from evosparse.pruning.evaluate import perplexity
    from evosparse.pruning.prune import prune_model

    model.load_state_dict(dense_state)
    prune_model(model, calib, pruner, counts)
    ppl = perplexity(model, evalw)
    model.load_state_dict(dense_state)
    return ppl


def speed_probe(model, calib, db, outcome, spec, n: int = 8, windows: int = 4) -> dict:
    """Interleaved: a plain dense forward over `windows` windows vs scoring a fresh child on the same tokens.

    The dense forward runs on a separate dense copy of the model, so timing it does not undo the
    pruned state the fitness keeps between candidates (as it would in a real search).
    """
    import copy

    from evosparse.pruning.fitness import ProxyFitness
    from evosparse.search.levels import LevelSpace
    from evosparse.search.operators import mutate

    db.restore()
    dense_model = copy.deepcopy(model)
    units = db.units(spec.search.granularity)
    space = LevelSpace.build([u.size for u in units], spec.sparsity, spec.search.step_fraction,
                             spec.search.max_level_delta)
    toks = calib[:windows]
    tokens = toks.numel()
    fit = ProxyFitness(model, toks, db, units, space)
    parent = tuple(outcome.best_levels)
    fit.set_parent(parent)
    fit(parent, tokens)  # builds the parent's trace (a real search mostly adopts it from the child's own run)
    rng = random.Random(1)
    t_dense = t_child = t_noreuse = 0.0
    with torch.no_grad():
        dense_model(input_ids=toks, use_cache=False)  # warm-up
        for _ in range(n):
            child = mutate(space, parent, rng, max_jump=1)
            t = time.perf_counter()
            dense_model(input_ids=toks, use_cache=False)
            t_dense += time.perf_counter() - t
            t = time.perf_counter()
            fit(child, tokens)
            t_child += time.perf_counter() - t
            fit.reuse_prefix = False
            fit.window_scores.pop(child)
            t = time.perf_counter()
            fit(child, tokens)
            t_noreuse += time.perf_counter() - t
            fit.reuse_prefix = True
    db.restore()
    del dense_model
    return {"tokens": tokens, "n": n, "dense_s": t_dense / n, "child_s": t_child / n, "child_noreuse_s": t_noreuse / n,
            "ratio": t_child / t_dense, "ratio_noreuse": t_noreuse / t_dense}


def cmd_quality(args) -> None:
    from evosparse.pruning.leveldb import LevelDB
    from evosparse.pruning.sensitivity import allocation_counts
    from evosparse.worker.search_stage import run_search

    RAW.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    model, calib, evalw = setup(args)
    model_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    rss_loaded = rss_mb()
    dense_state = {k: v.clone() for k, v in model.state_dict().items()}
    out: dict = {"args": {k: v for k, v in vars(args).items() if k != "func"}, "model_mb": model_mb, "rss_after_load_mb": rss_loaded}
    from evosparse.pruning.evaluate import perplexity

    out["dense_ppl"] = perplexity(model, evalw)
    print("dense ppl", out["dense_ppl"], flush=True)
    t = time.perf_counter()
    sens = sensitivity(model, calib, args.fisher_windows)
    out["sensitivity_s"] = time.perf_counter() - t
    ppl = {}
    if not args.skip_baselines:
        # Fisher-proportional at several spreads: the comparison is with the best of them (chosen on
        # the evaluation text, which favours the baseline, not the search).
        baselines = [("uniform", 0.1), ("owl", 0.1)] + [("fisher", sp) for sp in FISHER_SPREADS]
        for alloc, spread in baselines:
            counts = allocation_counts(model, alloc, args.sparsity, owl=sens["owl"], fisher=sens["fisher"],
                                       owl_lambda=0.08, spread=spread)
            key = alloc if alloc != "fisher" or spread == 0.1 else f"fisher@{spread}"
            ppl[key] = prune_and_eval(model, dense_state, calib, evalw, args.pruner, counts)
            print(key, ppl[key], flush=True)
    spec = make_spec(args, args.seed_from)
    t = time.perf_counter()
    db = LevelDB.build(model, calib, args.pruner)
    db_s = time.perf_counter() - t
    rss_before_search = current_rss_mb()
    hooks = Hooks()
    outcome = run_search(model, calib, spec, hooks, sensitivity=sens, db=db)
    wall = time.perf_counter() - t + 0.0
    out["search"] = {
        "wall_s": wall, "leveldb_s": db_s, "loop_s": outcome.seconds, "timings": outcome.timings,
        "candidates_scored": outcome.candidates_scored, "generations": len(outcome.history) - 1,
        "stopped_by": outcome.stopped_by, "history": outcome.history, "best_vector": outcome.best_vector,
        "seed_vector": outcome.seed_vector, "best_levels": outcome.best_levels, "best_fitness": outcome.best_fitness,
        "settings": spec.search.model_dump(), "db_mb": db.nbytes() / 2**20,
        "rss_before_search_mb": rss_before_search, "rss_peak_after_search_mb": rss_mb(),
        "rss_max_during_search_mb": hooks.max_rss_mb,
    }
    ppl["evolutionary"] = prune_and_eval(model, dense_state, calib, evalw, args.pruner, outcome.counts)
    print("evolutionary", ppl["evolutionary"], flush=True)
    out["ppl"] = ppl
    if not args.skip_speed:
        out["speed"] = speed_probe(model, calib, db, outcome, spec)
        print("speed", out["speed"], flush=True)
    out["total_s"] = time.perf_counter() - t_all
    (RAW / f"{args.tag}.json").write_text(json.dumps(out, indent=1))


def fmt(x, nd=1):
    return "—" if x is None else f"{x:.{nd}f}"


def cmd_report(args) -> None:
    runs = {p.stem: json.loads(p.read_text()) for p in sorted(RAW.glob("*.json")) if not p.stem.startswith("fisher")}
    lines = ["# Search benchmark (SmolLM2-135M, pydoc)", "",
             "Generated by `python bench/bench_search.py report` from bench/results/raw/*.json; "
             "each run's command is in its `args`. Held-out ppl: 16 windows × 256 tokens of the pydoc "
             "second half; search and calibration on the first half only.", "",
             "## Quality", "",
             "| run | sparsity | pruner | dense | uniform | OWL | Fisher ±0.1 | best Fisher (spread) | evolutionary "
             "| evo/uniform | evo/best Fisher | search wall (s) | loop (s) | generations | candidates | stopped by |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for tag, r in runs.items():
        a, p, s = r["args"], r.get("ppl", {}), r.get("search", {})
        if a.get("seed_from") != "fisher":
            continue
        evo, uni = p.get("evolutionary"), p.get("uniform")
        fishers = {k: v for k, v in p.items() if k.startswith("fisher")}
        best_key = min(fishers, key=fishers.get) if fishers else None
        fis = fishers.get(best_key)
        spread = best_key.split("@")[1] if best_key and "@" in best_key else "0.1"
        lines.append(
            f"| {tag} | {a['sparsity']} | {a['pruner']} | {fmt(r['dense_ppl'])} | {fmt(uni)} | {fmt(p.get('owl'))} | "
            f"{fmt(p.get('fisher'))} | {fmt(fis)} ({spread if fis else '—'}) | {fmt(evo)} | "
            f"{fmt(evo / uni if evo and uni else None, 3)} | "
            f"{fmt(evo / fis if evo and fis else None, 3)} | {fmt(s.get('wall_s'), 0)} | {fmt(s.get('loop_s'), 0)} | "
            f"{s.get('generations')} | {s.get('candidates_scored')} | {s.get('stopped_by')} |")
    lines += ["", "Search settings per run: " + "; ".join(
        f"{t}: {json.dumps(r['search']['settings'])}" for t, r in runs.items() if "search" in r), ""]
    lines += ["## Ablation: Fisher-seeded vs uniform-seeded (best proxy KL per generation)", ""]
    pairs = [(t, r) for t, r in runs.items() if r["args"].get("seed_from") == "uniform"]
    for tag, r in pairs:
        a = r["args"]
        same = {k: v for k, v in r["search"]["settings"].items() if k != "seed_from"}
        match = [r2 for t2, r2 in runs.items() if r2["args"].get("seed_from") == "fisher"
                 and r2["args"]["sparsity"] == a["sparsity"] and r2["args"]["pruner"] == a["pruner"]
                 and {k: v for k, v in r2["search"]["settings"].items() if k != "seed_from"} == same]
        if not match:
            continue
        hf, hu = match[0]["search"]["history"], r["search"]["history"]
        lines += [f"{a['pruner']} at {a['sparsity']}: uniform-seeded run `{tag}`", "",
                  "| generation | Fisher-seeded best | uniform-seeded best | Fisher t (s) | uniform t (s) |",
                  "| --- | --- | --- | --- | --- |"]
        n = max(len(hf), len(hu))
        for g in range(n):
            if g % max(1, n // 15) and g != n - 1:
                continue
            f_ = hf[g] if g < len(hf) else None
            u_ = hu[g] if g < len(hu) else None
            lines.append(f"| {g} | {fmt(f_ and f_['best'], 4)} | {fmt(u_ and u_['best'], 4)} | "
                         f"{fmt(f_ and f_['seconds'], 0)} | {fmt(u_ and u_['seconds'], 0)} |")
        final_u, final_f, start_f = hu[-1]["best"], hf[-1]["best"], hf[0]["best"]
        reach = next((h["generation"] for h in hf if h["best"] <= final_u), None)
        reach_txt = f"at generation {reach}" if reach is not None else f"not within its {len(hf) - 1} generations"
        catch_f = next((h["generation"] for h in hu if h["best"] <= final_f), None)
        catch_0 = next((h["generation"] for h in hu if h["best"] <= start_f), None)
        lines += ["", f"Uniform-seeded final best {final_u:.4f} after {len(hu) - 1} generations; the Fisher-seeded "
                  f"search reached it {reach_txt}. The uniform-seeded search reached the Fisher-seeded final "
                  f"({final_f:.4f}) at generation {catch_f}, and the Fisher seed generation's best ({start_f:.4f}) "
                  f"at generation {catch_0}.", ""]
        if r.get("ppl", {}).get("evolutionary") is not None:
            lines += [f"Held-out ppl of the uniform-seeded result: {r['ppl']['evolutionary']:.1f}", ""]
    lines += ["## Speed and memory", "",
              "| run | probe tokens | dense forward (s) | child score, prefix reuse (s) | ratio | without reuse (s) | "
              "ratio | whole search: s per scored token / dense s per token | model MB | level DB MB | "
              "RSS sampled during search, max MB | process peak RSS MB |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for tag, r in runs.items():
        sp, s = r.get("speed"), r.get("search", {})
        if not sp:
            continue
        loop_ratio = None
        if s.get("history"):
            tok = s["history"][-1]["tokens"]
            loop_ratio = (s["loop_s"] / tok) / (sp["dense_s"] / sp["tokens"])
        lines.append(f"| {tag} | {sp['tokens']} | {sp['dense_s']:.2f} | {sp['child_s']:.2f} | {sp['ratio']:.2f} | "
                     f"{sp['child_noreuse_s']:.2f} | {sp['ratio_noreuse']:.2f} | {fmt(loop_ratio, 2)} | "
                     f"{r['model_mb']:.0f} | {s.get('db_mb', 0):.0f} | {fmt(s.get('rss_max_during_search_mb'), 0)} | "
                     f"{s.get('rss_peak_after_search_mb', 0):.0f} |")
    lines += ["", "The process peak includes everything before the search in the same process (baseline "
              "pruning with a dense state copy, Fisher's backward pass when not cached).", ""]
    mem = [(t, r) for t, r in runs.items() if r.get("search", {}).get("rss_max_during_search_mb")]
    if mem:
        lines += ["Memory of the search itself (resident set sampled after every generation, against the "
                  "same process just before the search, which already holds the model and the level DB):", "",
                  "| run | model MB | level DB MB | RSS before search MB | max RSS during search MB | "
                  "search's own growth MB |", "| --- | --- | --- | --- | --- | --- |"]
        for tag, r in mem:
            s = r["search"]
            lines.append(f"| {tag} | {r['model_mb']:.0f} | {s['db_mb']:.0f} | {s['rss_before_search_mb']:.0f} | "
                         f"{s['rss_max_during_search_mb']:.0f} | "
                         f"{s['rss_max_during_search_mb'] - s['rss_before_search_mb']:.0f} |")
        lines.append("")
    (ROOT / "results" / "search.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    q = sub.add_parser("quality")
    q.add_argument("--tag", default=None)
    q.add_argument("--model", default="smollm2-135m")
    q.add_argument("--sparsity", type=float, default=0.7)
    q.add_argument("--pruner", default="wanda")
    q.add_argument("--seed-from", default="fisher")
    q.add_argument("--calib-windows", type=int, default=32)
    q.add_argument("--eval-windows", type=int, default=16)
    q.add_argument("--fisher-windows", type=int, default=32)
    q.add_argument("--seed", type=int, default=0)
    for k in ("generations", "offspring"):
        q.add_argument(f"--{k}", type=int, default=None)
    for k in ("step-fraction", "max-level-delta", "time-budget-min"):
        q.add_argument(f"--{k}", type=float, default=None)
    q.add_argument("--selection", default=None)
    q.add_argument("--granularity", default=None)
    q.add_argument("--skip-baselines", action="store_true")
    q.add_argument("--skip-speed", action="store_true")
    q.set_defaults(func=cmd_quality)
    r = sub.add_parser("report")
    r.set_defaults(func=cmd_report)
    args = ap.parse_args(argv)
    if args.cmd == "quality" and args.tag is None:
        args.tag = f"{args.pruner}{round(args.sparsity * 100)}_{args.seed_from}"
    args.func(args)


if __name__ == "__main__":
    main()

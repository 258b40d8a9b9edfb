"""Benchmark of deployable compression on SmolLM2-135M (pydoc calibration, held-out second half).

Subcommands, each writing JSON under bench/results/raw/ (``report`` renders bench/results/compression.md):

  nm      uniform 2:4 and 4:8 against mixed N:8 at 50 %, uniform 3:8 against mixed N:8 at 62.5 %:
          the mixed allocation both as the Fisher allocation projected onto the N:8 grid (no
          search) and searched (evolutionary, Fisher-seeded, same level grid), for one pruner.
  quant   70 % sparsity: sparse alone, + RTN 4-bit, + GPTQ 4-bit (joint with SparseGPT, mask-fixed
          error feedback with Wanda), + the embedding (tied head) 4-bit too, and the artifact sizes of
          each format (dense, compressed-tensors, GGUF Q8_0) against the dense 16-bit checkpoint,
          each artifact loaded back with transformers' from_pretrained and evaluated again.
  bpw     a size budget in bits per weight (cost model: search/bitbudget.py): every uniform
          (sparsity, bits) meeting it, the Fisher seed at the baseline's width (no search), and the
          searched per-layer (sparsity, bits), all RTN-quantized, for one pruner.

Run under the shared lock, e.g.
  flock /tmp/evosparse-heavy.lock nice -n 5 python bench/bench_compression.py nm --pruner wanda
  flock /tmp/evosparse-heavy.lock nice -n 5 python bench/bench_compression.py quant
  python bench/bench_compression.py report
Everything is chosen on the calibration half; the evaluation half is read only for the final ppl.
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch
from common import setup  # bench/common.py (the script folder is on sys.path)

ROOT = Path(__file__).resolve().parent
RAW = ROOT / "results" / "raw"
OUT_MD = ROOT / "results" / "compression.md"


def fisher(model, calib) -> dict[str, float]:
    """Fisher traces on the calibration windows (cached: they depend only on the dense model and calib)."""
    from evosparse.pruning import sensitivity as sens

    path = RAW / f"fisher_{len(calib)}.json"
    if path.exists():
        return json.loads(path.read_text())
    out = sens.fisher_traces(model, calib)
    path.write_text(json.dumps(out))
    return out


class Hooks:
    def stage(self, name, fraction, message=""):
        pass

    def generation(self, record, state):
        print(f"  gen {record['generation']:3d} best {record['best']:.5f} t {record['seconds']:.0f}s", flush=True)

    def should_cancel(self):
        return False


def start(args, **record):
    """A run's start: the model and windows, a copy of its dense weights, and its JSON record holding the
    arguments and the dense held-out perplexity (``record`` adds empty tables of its own)."""
    from evosparse.pruning.evaluate import perplexity

    RAW.mkdir(parents=True, exist_ok=True)
    model, tok, calib, evalw = setup(args)
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    out: dict = {"args": {k: v for k, v in vars(args).items() if k != "func"}, "rows": [], **record}
    out["dense_ppl"] = perplexity(model, evalw)
    print("dense", out["dense_ppl"], flush=True)
    return model, tok, calib, evalw, dense, out


def prune_eval(model, dense, calib, evalw, pruner, counts, patterns, quant=None, keep=False):
    """Prune a fresh copy of the dense weights, evaluate on the held-out half; restore unless ``keep``."""
    from evosparse.pruning.evaluate import perplexity
    from evosparse.pruning.prune import prune_model

    model.load_state_dict(dense)
    t = time.perf_counter()
    quantized = prune_model(model, calib, pruner, counts, patterns, quant=quant, scale_dtype=torch.bfloat16)
    prune_s = time.perf_counter() - t
    ppl = perplexity(model, evalw)
    if not keep:
        model.load_state_dict(dense)
    return ppl, prune_s, quantized


def cmd_nm(args) -> None:
    from evosparse.jobs.spec import JobSpec
    from evosparse.pruning.leveldb import LevelDB
    from evosparse.pruning.sensitivity import allocation_counts, nm_counts
    from evosparse.worker.compress_stage import Compression
    from evosparse.worker.search_stage import run_search

    model, _, calib, evalw, dense, out = start(args)
    fish = fisher(model, calib)
    t = time.perf_counter()
    db = LevelDB.build(model, calib, args.pruner, nm_m=8)
    out["leveldb_s"] = time.perf_counter() - t

    def row(**kw):
        out["rows"].append(kw)
        print(kw, flush=True)
        (RAW / f"nm_{args.pruner}{args.tag}.json").write_text(json.dumps(out, indent=1))

    for sparsity, uniform in ((0.5, ("2:4", "4:8")), (0.625, ("3:8",))):
        for pat in uniform:
            n, m = map(int, pat.split(":"))
            ppl, s, _ = prune_eval(model, dense, calib, evalw, args.pruner, nm_counts(model, (n, m)), (n, m))
            row(sparsity=sparsity, allocation=f"uniform {pat}", ppl=ppl, prune_s=s)
        spec = JobSpec(model=args.model, sparsity=sparsity, pruner=args.pruner, allocation="evolutionary",
                       pattern="mixed:8", calib_windows=args.calib_windows,
                       search={"time_budget_min": args.search_min, "generations": 10_000, "seed_from": "fisher"})
        comp = Compression.prepare(spec, model)
        proj = comp.plan(model, allocation_counts(model, "fisher", sparsity, fisher=fish, spread=0.1))
        ppl, s, _ = prune_eval(model, dense, calib, evalw, args.pruner, proj.counts, proj.patterns)
        row(sparsity=sparsity, allocation="Fisher ±0.1 on the N:8 grid", ppl=ppl, prune_s=s,
            patterns=_block_patterns(proj.layer_pattern))
        model.load_state_dict(dense)
        t = time.perf_counter()
        outcome = run_search(model, calib, spec, Hooks(), sensitivity={"fisher": fish}, db=db)
        search_s = time.perf_counter() - t
        plan = comp.plan(model, outcome.counts)
        ppl, s, _ = prune_eval(model, dense, calib, evalw, args.pruner, plan.counts, plan.patterns)
        row(sparsity=sparsity, allocation="mixed N:8, searched", ppl=ppl, prune_s=s, search_s=search_s,
            candidates=outcome.candidates_scored, generations=len(outcome.history), stopped_by=outcome.stopped_by,
            patterns=_block_patterns(plan.layer_pattern),
            measured_sparsity=sum(plan.counts.values()) / sum(db.dense[n].numel() for n in db.dense))


def _block_patterns(layer_pattern: dict[str, str]) -> list[str]:
    """One label per block (all linears of a block share it)."""
    blocks: dict[str, str] = {}
    for name, label in layer_pattern.items():
        blocks.setdefault(name.split(".self_attn")[0].split(".mlp")[0], label)
    return list(blocks.values())


def cmd_quant(args) -> None:
    from evosparse.pruning.evaluate import perplexity
    from evosparse.pruning.export import export_checkpoint, folder_bytes
    from evosparse.pruning.gguf_export import GGUF_FILE, round_q8_0
    from evosparse.pruning.layers import prunable_linears
    from evosparse.pruning.quantize import QuantConfig, quantize_embeddings
    from evosparse.pruning.sensitivity import allocation_counts
    from transformers import AutoModelForCausalLM

    model, tok, calib, evalw, dense, out = start(args, sizes=[])
    counts = allocation_counts(model, "uniform", args.sparsity)
    path = RAW / f"quant{round(args.sparsity * 100)}{args.tag}.json"
    tmp = Path(tempfile.mkdtemp(prefix="bench-compression-"))

    def save():
        path.write_text(json.dumps(out, indent=1))

    def artifact(label, fmt, quantized, ppl_mem, src):
        """Export ``src`` (cast to bfloat16 on the way: export is its last use), load it back, evaluate."""
        folder = tmp / label.replace(" ", "_").replace("%", "pct")
        rep = export_checkpoint(src, tok, folder, {}, fmt=fmt, dtype=torch.bfloat16, quantized=quantized)
        # a GGUF is read as evosparse reads GGUF input: transformers dequantizes it to float32
        gguf = {"gguf_file": GGUF_FILE, "dtype": torch.float32} if fmt == "gguf" else {}
        loaded = AutoModelForCausalLM.from_pretrained(folder, **gguf).eval()
        ppl_loaded = perplexity(loaded, evalw)
        lin = prunable_linears(loaded)
        zeros = sum(int((m.weight == 0).sum()) for m in lin.values()) / sum(m.weight.numel() for m in lin.values())
        del loaded
        out["sizes"].append({"artifact": label, "format": fmt, "bytes": folder_bytes(folder), "ppl_in_memory": ppl_mem,
                             "ppl_loaded": ppl_loaded, "sparsity_report": rep["global_sparsity"],
                             "sparsity_loaded": zeros})
        print(out["sizes"][-1], flush=True)
        save()
        shutil.rmtree(folder)

    pct = f"{round(args.sparsity * 100)}%"
    try:
        # The dense 16-bit reference: the unpruned model as published (bfloat16).
        artifact("dense 16-bit (unpruned)", "dense", None, out["dense_ppl"], copy.deepcopy(model))
        variants = {"sparse": ("sparse only", None), "rtn": ("+ RTN 4-bit", QuantConfig(4, args.group, "rtn")),
                    "gptq": ("+ GPTQ 4-bit", QuantConfig(4, args.group, "gptq"))}

        def row(pruner, label, ppl, s):
            out["rows"].append({"pruner": pruner, "sparsity": args.sparsity, "variant": label, "ppl": ppl,
                                "prune_s": s})
            print(out["rows"][-1], flush=True)
            save()

        for pruner in args.pruners:
            first = pruner == args.pruners[0]
            for label, quant in (variants[v] for v in args.variants):
                ppl, s, quantized = prune_eval(model, dense, calib, evalw, pruner, counts, None, quant, keep=True)
                row(pruner, label, ppl, s)
                if first and quant is None and args.gguf:  # GGUF Q8_0 of the sparse model, evaluated as rounded
                    q8 = copy.deepcopy(model)
                    round_q8_0(q8)
                    artifact(f"{pct} {label}, GGUF Q8_0", "gguf", None, perplexity(q8, evalw), q8)
                if first and label != "+ RTN 4-bit":
                    artifact(f"{pct} {label}, dense with zeros", "dense", None, ppl, copy.deepcopy(model))
                    if quant is not None:
                        artifact(f"{pct} {label}, compressed-tensors", "compressed-tensors", quantized, ppl,
                                 copy.deepcopy(model))
                if quant is not None and quant.method == "gptq" and args.embeddings:
                    # The same pruned linears, then the embedding (tied head) at their bits and group size,
                    # GPTQ through the head's input Hessian on the calibration windows.
                    quantized.update(quantize_embeddings(model, quant, torch.bfloat16, calib))
                    ppl = perplexity(model, evalw)
                    row(pruner, f"{label} + embeddings {quant.bits}-bit", ppl, s)
                    if first:
                        artifact(f"{pct} {label} + embeddings {quant.bits}-bit, compressed-tensors",
                                 "compressed-tensors", quantized, ppl, copy.deepcopy(model))
                model.load_state_dict(dense)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def cmd_bpw(args) -> None:
    from evosparse.jobs.spec import JobSpec
    from evosparse.pruning.layers import find_blocks
    from evosparse.pruning.leveldb import LevelDB, search_units
    from evosparse.pruning.quantize import QuantConfig
    from evosparse.pruning.quantlevels import QuantLevelDB
    from evosparse.search.bitbudget import unit_bits
    from evosparse.worker.search_stage import budget_levels, budget_seeds, run_search, search_space

    model, _, calib, evalw, dense, out = start(args)
    fish = fisher(model, calib)
    spec = JobSpec(model=args.model, bits_per_weight=args.bpw, pruner=args.pruner, allocation="evolutionary",
                   calib_windows=args.calib_windows, quantize={"group_size": args.group, "method": "rtn"},
                   search={"time_budget_min": args.search_min, "generations": 10_000, "seed_from": "fisher"})
    blocks = find_blocks(model)
    units = search_units(blocks, "layer")
    space = search_space(spec, units)
    sizes = {n: m.weight.numel() for b in blocks for n, m in b.linears.items()}
    path = RAW / f"bpw{args.bpw:g}_{args.pruner}{args.tag}.json"

    def row(label, vector=None, counts=None, bits=None, **kw):
        if vector is not None:
            counts, bits = budget_levels(space, units, vector)
        quant = {n: QuantConfig(b, args.group, "rtn") for n, b in bits.items()}
        ppl, s, _ = prune_eval(model, dense, calib, evalw, args.pruner, counts, None, quant)
        cost = sum(unit_bits(sizes[n], counts[n], bits[n], args.group) for n in sizes) / sum(sizes.values())
        per_block = [(round(sum(counts[n] for n in u.linears) / u.size, 3), bits[u.linears[0]]) for u in units]
        out["rows"].append({"allocation": label, "ppl": ppl, "bits_per_weight": cost, "prune_s": s,
                            "blocks": per_block, **kw})
        print({k: v for k, v in out["rows"][-1].items() if k != "blocks"}, flush=True)
        path.write_text(json.dumps(out, indent=1))

    for v in space.uniform_vectors():
        c = space.choices[v[0]]
        row(f"uniform {c.sparsity:g} sparse, {c.bits}-bit", v)
    seeds = budget_seeds(model, calib, spec, units, space, {"fisher": fish}, None, blocks)
    row("Fisher seed at the baseline's width (no search)", seeds[0])
    t = time.perf_counter()
    db = QuantLevelDB(LevelDB.build(model, calib, args.pruner), args.group)
    out["leveldb_s"] = time.perf_counter() - t
    t = time.perf_counter()
    outcome = run_search(model, calib, spec, Hooks(), sensitivity={"fisher": fish}, db=db)
    search_s = time.perf_counter() - t
    row("searched (sparsity, bits) per layer", counts=outcome.counts, bits=outcome.bits, search_s=search_s,
        candidates=outcome.candidates_scored, generations=len(outcome.history), stopped_by=outcome.stopped_by)


def cmd_report(args) -> None:
    lines = ["# Compression benchmark (SmolLM2-135M, pydoc)", "",
             "Generated by `python bench/bench_compression.py report` from bench/results/raw/nm_*.json and "
             "quant*.json; each run's arguments are in its `args`. Held-out perplexity on the pydoc second half; "
             "calibration, Fisher traces and the search use the first half only.", ""]
    for f in sorted(RAW.glob("nm_*.json")):
        d = json.loads(f.read_text())
        a = d["args"]
        lines += [f"## N:M, {a['pruner']} (`{f.name}`)", "",
                  f"Command: `python bench/bench_compression.py nm --pruner {a['pruner']} --search-min "
                  f"{a['search_min']:g}` (under `/work/helpers/heavy.sh bench`, the shared lock).", "",
                  f"dense ppl {d['dense_ppl']:.2f}; {a['calib_windows']} calibration / {a['eval_windows']} evaluation "
                  f"windows × 256 tokens; search budget {a['search_min']} min per sparsity; level database "
                  f"{d.get('leveldb_s', 0):.0f} s.", "",
                  "| sparsity | allocation | held-out ppl | vs uniform | search (s) | candidates | per-layer N:8 |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        uniform_by_s: dict[float, float] = {}
        for r in d["rows"]:
            if r["allocation"].startswith("uniform"):
                uniform_by_s[r["sparsity"]] = min(uniform_by_s.get(r["sparsity"], float("inf")), r["ppl"])
        for r in d["rows"]:
            ratio = r["ppl"] / uniform_by_s[r["sparsity"]] if r["sparsity"] in uniform_by_s else float("nan")
            pats = " ".join(p.split(":")[0] for p in r.get("patterns", [])) if r.get("patterns") else ""
            lines.append(f"| {r['sparsity']:g} | {r['allocation']} | {r['ppl']:.2f} | {ratio:.3f} | "
                         f"{r.get('search_s', 0):.0f} | {r.get('candidates', '')} | {pats} |")
        lines += ["", "vs uniform: against the best uniform pattern at that sparsity. Per-layer N:8: N of each "
                  "block, first to last.", ""]
    for f in sorted(RAW.glob("bpw*.json")):
        d = json.loads(f.read_text())
        a = d["args"]
        lines += [f"## Size budget {a['bpw']:g} bits per weight, {a['pruner']} + RTN (`{f.name}`)", "",
                  f"Command: `python bench/bench_compression.py bpw --pruner {a['pruner']} --bpw {a['bpw']:g} --group "
                  f"{a['group']} --search-min {a['search_min']:g}` (under `/work/helpers/heavy.sh bench`).", "",
                  f"dense ppl {d['dense_ppl']:.2f}; {a['calib_windows']} calibration / {a['eval_windows']} evaluation "
                  f"windows × 256 tokens; group size {a['group']}, symmetric; search budget {a['search_min']} min; "
                  "bits per weight by the cost model of search/bitbudget.py ((1 - s)·b + 1 bit of bitmap when "
                  "sparse + 16/group).", "",
                  "| allocation | bits/weight | held-out ppl | search (s) | candidates | per-block (sparsity, bits) |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for r in d["rows"]:
            blocks = " ".join(f"{s:g}/{b}" for s, b in r["blocks"]) if len({tuple(x) for x in r["blocks"]}) > 1 \
                else "all " + "/".join(str(x) for x in r["blocks"][0])
            lines.append(f"| {r['allocation']} | {r['bits_per_weight']:.4f} | {r['ppl']:.2f} | "
                         f"{r.get('search_s', 0):.0f} | {r.get('candidates', '')} | {blocks} |")
        lines += ["", "Per block: sparsity/bits, first to last block.", ""]
    for f in sorted(RAW.glob("quant*.json")):
        d = json.loads(f.read_text())
        a = d["args"]
        flags = (f" --pruners {' '.join(a['pruners'])} --group {a['group']}"
                 + (f" --variants {' '.join(a['variants'])}" if "variants" in a else "")
                 + ("" if a.get("embeddings", False) else " --no-embeddings" if "embeddings" in a else "")
                 + ("" if a.get("gguf", False) else " --no-gguf" if "gguf" in a else "")
                 + (f" --tag {a['tag']}" if a.get("tag") else ""))
        lines += [f"## Sparsity + quantization at {a['sparsity']:g} (`{f.name}`)", "",
                  f"Command: `python bench/bench_compression.py quant{flags}` (under `/work/helpers/heavy.sh bench`).",
                  "",
                  f"dense ppl {d['dense_ppl']:.2f}; uniform allocation; group size {a['group']}, symmetric; "
                  "scales rounded to bfloat16.", "",
                  "| pruner | variant | held-out ppl | vs sparse only | prune (s) |", "| --- | --- | --- | --- | --- |"]
        base = {r["pruner"]: r["ppl"] for r in d["rows"] if r["variant"] == "sparse only"}
        for r in d["rows"]:
            lines.append(f"| {r['pruner']} | {r['variant']} | {r['ppl']:.2f} | {r['ppl'] / base[r['pruner']]:.3f} | "
                         f"{r['prune_s']:.0f} |")
        if d["sizes"]:
            ref = d["sizes"][0]["bytes"]
            lines += ["", "Artifacts (weights on disk: `*.safetensors`, `*.gguf`), each loaded back with "
                      "`AutoModelForCausalLM.from_pretrained` (a GGUF with `gguf_file=`, as float32) and evaluated "
                      "again:", "",
                      "| artifact | format | MiB | × dense 16-bit | ppl in memory | ppl loaded | sparsity (report) | "
                      "sparsity (loaded) |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
            for s in d["sizes"]:
                lines.append(f"| {s['artifact']} | {s['format']} | {s['bytes'] / 2**20:.1f} | {s['bytes'] / ref:.3f} | "
                             f"{s['ppl_in_memory']:.2f} | {s['ppl_loaded']:.2f} | {s['sparsity_report']:.4f} | "
                             f"{s['sparsity_loaded']:.4f} |")
        lines.append("")
    OUT_MD.write_text("\n".join(lines) + "\n")
    print(OUT_MD.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name, fn in (("nm", cmd_nm), ("quant", cmd_quant), ("bpw", cmd_bpw)):
        p = sub.add_parser(name)
        p.add_argument("--model", default="smollm2-135m")
        p.add_argument("--calib-windows", type=int, default=32)
        p.add_argument("--eval-windows", type=int, default=16)
        p.add_argument("--tag", default="")
        p.set_defaults(func=fn)
        if name == "nm":
            p.add_argument("--pruner", default="wanda")
            p.add_argument("--search-min", type=float, default=6.0)
        elif name == "bpw":
            p.add_argument("--pruner", default="wanda")
            p.add_argument("--bpw", type=float, default=3.0)
            p.add_argument("--group", type=int, default=64)
            p.add_argument("--search-min", type=float, default=5.0)
        else:
            p.add_argument("--sparsity", type=float, default=0.7)
            p.add_argument("--group", type=int, default=64)
            p.add_argument("--pruners", nargs="+", default=["sparsegpt", "wanda"])
            p.add_argument("--variants", nargs="+", choices=("sparse", "rtn", "gptq"), default=["sparse", "rtn", "gptq"])
            p.add_argument("--embeddings", action=argparse.BooleanOptionalAction, default=True,
                           help="after GPTQ, also quantize the embedding (tied head) and export that too")
            p.add_argument("--gguf", action=argparse.BooleanOptionalAction, default=True,
                           help="export the sparse-only model as GGUF Q8_0 too")
    r = sub.add_parser("report")
    r.set_defaults(func=cmd_report)
    args = ap.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()

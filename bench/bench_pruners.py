"""Benchmark: held-out perplexity of every pruner × sparsity × allocation on SmolLM2-135M.

    flock /tmp/evosparse-heavy.lock python3 bench/bench_pruners.py [--eval-windows 16] [--out bench/results/pruners.md]

Calibration: pydoc, first half, 32 random windows of 256 tokens (seed 0). Evaluation: the first
``--eval-windows`` consecutive windows of 256 tokens of pydoc's second half (never used for any
choice here). The model is loaded once; Fisher traces and OWL ratios are computed once on the
dense model and reused; the dense weights are restored between runs. Wall time per run = pruning
(block-by-block calibration included) + evaluation. The table is rewritten after every run, so a
partial run still leaves its results.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch
from evosparse.pruning.data import get_windows
from evosparse.pruning.evaluate import perplexity
from evosparse.pruning.layers import prunable_linears
from evosparse.pruning.loading import load_model
from evosparse.pruning.prune import prune_model
from evosparse.pruning.pruners import PRUNER_NAMES
from evosparse.pruning.sensitivity import allocation_counts, dense_input_stats, fisher_traces, owl_ratios

PRUNERS = PRUNER_NAMES
SPARSITIES = (0.5, 0.6, 0.7)
ALLOCATIONS = ("uniform", "fisher", "owl")


def _restore(model: torch.nn.Module, dense: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for n, m in prunable_linears(model).items():
            m.weight.copy_(dense[n])


def _table(results: dict, header: list[str]) -> str:
    lines = header + ["", "| pruner | allocation | 50 % | 60 % | 70 % |", "| --- | --- | --- | --- | --- |"]
    for alloc in ALLOCATIONS:
        for pruner in PRUNERS:
            cells = []
            for s in SPARSITIES:
                r = results.get((pruner, alloc, s))
                cells.append(f"{r[0]:.2f} ({r[1]:.0f} s)" if r else "—")
            if any(c != "—" for c in cells):
                lines.append(f"| {pruner} | {alloc} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("Cells: perplexity on the held-out windows (wall seconds of pruning + evaluation).")
    return "\n".join(lines) + "\n"


def _read_table(path: Path) -> dict:
    """Cells of an earlier run's table: {(pruner, allocation, sparsity): (ppl, seconds)}."""
    import re

    cell = re.compile(r"^([0-9.]+) \(([0-9]+) s\)$")
    results: dict = {}
    for line in path.read_text().splitlines():
        parts = [p.strip() for p in line.strip().strip("|").split("|")]
        if len(parts) != 5 or parts[0] not in PRUNERS:
            continue
        for s, c in zip(SPARSITIES, parts[2:], strict=True):
            m = cell.match(c)
            if m:
                results[(parts[0], parts[1], s)] = (float(m.group(1)), float(m.group(2)))
    return results


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--calib-windows", type=int, default=32)
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--pruners", default=",".join(PRUNERS))
    ap.add_argument("--allocations", default=",".join(ALLOCATIONS))
    ap.add_argument("--resume", action="store_true", help="keep the cells already in --out; run only the missing ones")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "pruners.md"))
    args = ap.parse_args()
    pruners = args.pruners.split(",")
    allocations = args.allocations.split(",")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    results: dict = _read_table(out) if args.resume and out.is_file() else {}

    model, tok = load_model(args.model, device="cpu")
    calib = get_windows("pydoc", tok, args.calib_windows, args.seq_len, "calib", seed=0)
    evalw = get_windows("pydoc", tok, args.eval_windows, args.seq_len, "eval")
    dense = {n: m.weight.detach().clone() for n, m in prunable_linears(model).items()}

    t0 = time.perf_counter()
    dense_ppl = perplexity(model, evalw)
    t_dense = time.perf_counter() - t0
    t0 = time.perf_counter()
    need_fisher = "fisher" in allocations and any(
        (p, "fisher", s) not in results for p in pruners for s in SPARSITIES)
    fisher = fisher_traces(model, calib) if need_fisher else None
    t_fisher = time.perf_counter() - t0
    t0 = time.perf_counter()
    owl = owl_ratios(model, dense_input_stats(model, calib), m=5.0)
    t_owl = time.perf_counter() - t0
    header = [
        f"# Pruners on {args.model}",
        "",
        f"Command: `flock /tmp/evosparse-heavy.lock python3 bench/bench_pruners.py --eval-windows {args.eval_windows}`",
        "",
        f"Machine: {platform.machine()} CPU, torch {torch.__version__}, {torch.get_num_threads()} threads, float32.",
        f"Calibration: pydoc first half, {args.calib_windows} windows x {args.seq_len} tokens (seed 0). "
        f"Evaluation: pydoc second half, first {args.eval_windows} consecutive windows x {args.seq_len} tokens "
        f"({evalw.numel()} tokens).",
        f"Dense perplexity: **{dense_ppl:.2f}** ({t_dense:.0f} s). Fisher traces computed once"
        + (f" in {t_fisher:.0f} s" if need_fisher else " (in an earlier, resumed run)") + ", "
        f"OWL ratios (M=5, λ=0.08) once in {t_owl:.0f} s; Fisher allocation: log-trace per block, z-scored, "
        "target ± 0.1; every allocation meets the global target exactly in parameters.",
    ]
    print("\n".join(header), flush=True)
    for alloc in allocations:
        for s in SPARSITIES:
            if all((p, alloc, s) in results for p in pruners):
                continue
            counts = allocation_counts(model, alloc, s, owl=owl, fisher=fisher, owl_lambda=0.08, spread=0.1)
            for pruner in pruners:
                if (pruner, alloc, s) in results:
                    continue
                _restore(model, dense)
                t0 = time.perf_counter()
                prune_model(model, calib, pruner, counts)
                ppl = perplexity(model, evalw)
                wall = time.perf_counter() - t0
                results[(pruner, alloc, s)] = (ppl, wall)
                print(f"{pruner:9s} {alloc:8s} {s:.0%}: ppl {ppl:.2f} ({wall:.0f} s)", flush=True)
                out.write_text(_table(results, header))
    print(_table(results, header), flush=True)


if __name__ == "__main__":
    main()

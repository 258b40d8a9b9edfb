"""GPU check: a short evolutionary search on Llama-shaped models built from a config, everything on CUDA.

For each model (SmolLM2-135M's shape, ~1B, ~7B; random bfloat16 weights, no download: their
perplexity means nothing, their time and memory are real) it prints: one dense forward of a
256-token window, the set-up (dense snapshot in pinned host memory, seed, dense reference,
level database), seconds per scored window against one dense forward, seconds per generation,
and peak GPU memory against the model's size. The KL is computed in float32.

    python3 bench/gpu_check.py [--models smollm2,1b,7b] [--generations 4] [--out FILE]

bench/gpu_check.sh wraps it (works from a source checkout without installing the package).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback

import torch

SHAPES = {
    "smollm2": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True),
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
               num_key_value_heads=4, vocab_size=32000, tie_word_embeddings=False),
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32, vocab_size=32000, tie_word_embeddings=False),
}


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def build(shape: str, dtype: torch.dtype, device: str) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(max_position_embeddings=2048, **SHAPES[shape])
    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(old)
    model.config.use_cache = False
    return model.eval()


def sync_time(fn, repeat: int = 5) -> float:  # noqa: ANN001
    fn()
    _sync()
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    _sync()
    return (time.perf_counter() - t0) / repeat


class Gens:
    def __init__(self) -> None:
        self.records: list[dict] = []
        self.t = time.perf_counter()
        self.times: list[float] = []

    def generation(self, record: dict, state: bytes) -> None:
        _sync()
        now = time.perf_counter()
        self.times.append(now - self.t)
        self.t = now
        self.records.append(record)

    def should_cancel(self) -> bool:
        return False


def check(shape: str, generations: int, sparsity: float, device: str = "cuda") -> dict:
    from evosparse.jobs.spec import JobSpec
    from evosparse.pruning.layers import find_blocks
    from evosparse.pruning.snapshot import DenseWeights
    from evosparse.worker.search_stage import run_search

    cuda = device == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    dtype = torch.bfloat16 if cuda else torch.float32
    t0 = time.perf_counter()
    model = build(shape, dtype, device)
    _sync()
    build_s = time.perf_counter() - t0
    params = sum(p.numel() for p in model.parameters())
    model_gb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30
    g = torch.Generator().manual_seed(0)
    seq = 256
    calib = torch.randint(0, SHAPES[shape]["vocab_size"], (8, seq), generator=g)
    with torch.no_grad():
        dense_fwd = sync_time(lambda: model(input_ids=calib[:1].to(device), use_cache=False))
    blocks = find_blocks(model)
    t1 = time.perf_counter()
    dense = DenseWeights(blocks)
    snapshot_s = time.perf_counter() - t1
    spec = JobSpec(model="synthetic", sparsity=sparsity, pruner="wanda", allocation="evolutionary", seed=0,
                   calib_windows=8, seq_len=seq, device=device,
                   search={"generations": generations, "offspring": 8, "selection": "256:2,1024:1",
                           "seed_from": "uniform", "time_budget_min": None})
    hooks = Gens()
    t2 = time.perf_counter()
    out = run_search(model, calib, spec, hooks, blocks=blocks, dense=dense)
    _sync()
    total_s = time.perf_counter() - t2
    windows_scored = out.history[-1]["tokens"] / seq
    per_window = out.seconds / windows_scored
    peak_gb = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    return {
        "model": shape, "params_b": round(params / 1e9, 3), "model_gb": round(model_gb, 2),
        "device": torch.cuda.get_device_name() if cuda else "cpu", "dtype": str(dtype).replace("torch.", ""),
        "build_s": round(build_s, 1), "snapshot_s": round(snapshot_s, 2),
        "dense_forward_s": round(dense_fwd, 4),
        "setup_s": {k: round(v, 2) for k, v in out.timings.items() if k != "search"},
        "search_s": round(out.seconds, 2), "total_s": round(total_s, 2),
        "generations": len(out.history), "candidates_scored": out.candidates_scored,
        "windows_scored": windows_scored, "s_per_window": round(per_window, 4),
        "window_vs_dense_forward": round(per_window / dense_fwd, 3),
        "s_per_generation": [round(t, 2) for t in hooks.times],
        "peak_gpu_gb": round(peak_gb, 2),
        "peak_vs_model": round(peak_gb / model_gb, 2),
        "best_fitness": out.best_fitness,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="smollm2,1b,7b")
    p.add_argument("--generations", type=int, default=4)
    p.add_argument("--sparsity", type=float, default=0.7)
    p.add_argument("--out")
    p.add_argument("--device", default="cuda", help="cpu runs the same check without a GPU (float32)")
    args = p.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device; nothing to check (--device cpu runs it on the CPU)", file=sys.stderr)
        return 1
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name() if args.device == 'cuda' else 'cpu'}",
          flush=True)
    results = []
    for shape in args.models.split(","):
        try:
            r = check(shape, args.generations, args.sparsity, args.device)
        except Exception as exc:  # noqa: BLE001 - report and go on with the next model
            traceback.print_exc()
            r = {"model": shape, "error": f"{type(exc).__name__}: {exc}"}
        results.append(r)
        print(json.dumps(r), flush=True)
    print("\n| model | params | dense fwd (256 tok) | set-up s | s/generation | window / dense fwd | peak GPU GB (x model) |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        if "error" in r:
            print(f"| {r['model']} | error: {r['error'][:80]} |")
            continue
        gens = r["s_per_generation"]
        print(f"| {r['model']} | {r['params_b']} B | {r['dense_forward_s'] * 1000:.1f} ms | "
              f"{sum(r['setup_s'].values()) + r['snapshot_s']:.1f} | {sum(gens[1:]) / max(1, len(gens) - 1):.2f} "
              f"(gen 0: {gens[0]:.2f}) | {r['window_vs_dense_forward']} | {r['peak_gpu_gb']} ({r['peak_vs_model']}x) |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`evosparse prune` and `evosparse eval`: run one job in-process, or measure a saved checkpoint."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from evosparse.jobs.spec import ALLOCATIONS, PRUNERS, SEED_SOURCES
from evosparse.pruning.errors import PruningConfigError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prune", help="prune a model in-process and write a checkpoint + report.json")
    p.add_argument("model", help="Hugging Face folder, hub id, GGUF file, or 'smollm2-135m'")
    p.add_argument("--sparsity", type=float, required=True, help="global target, e.g. 0.6")
    p.add_argument("--pruner", choices=PRUNERS, default="wanda")
    p.add_argument("--allocation", choices=ALLOCATIONS, default="uniform")
    p.add_argument("--pattern", default="unstructured",
                   help="'unstructured', N:M such as 2:4, 'mixed:M' (per-layer N:M, e.g. mixed:8) or '2:4+dense'")
    p.add_argument("--calib", default="pydoc", help="pydoc, a text file/folder, or a dataset (wikitext2, c4)")
    p.add_argument("--eval", default="pydoc", help="evaluation source (its second half is used)")
    p.add_argument("--calib-windows", type=int, default=32)
    p.add_argument("--eval-windows", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--owl-m", type=float, default=5.0, help="OWL outlier threshold M (× mean score)")
    p.add_argument("--owl-lambda", type=float, default=0.08, help="OWL sparsity spread λ")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"))
    q = p.add_argument_group("quantization and checkpoint format")
    q.add_argument("--quantize-bits", type=int, help="quantize the pruned linears to this many bits (2-8)")
    q.add_argument("--quantize-group", type=int, help="input columns per scale (default 128)")
    q.add_argument("--quantize-method", choices=("gptq", "rtn"), help="default gptq")
    q.add_argument("--quantize-asymmetric", action="store_true", help="integer zero point per group")
    q.add_argument("--format", choices=("dense", "compressed-tensors"), default="dense")
    q.add_argument("--export-dtype", choices=("source", "float32", "bfloat16", "float16"), default="source")
    p.add_argument("--out", help="output folder (default: ./pruned-<model>-<pruner>-<allocation>-<pct>)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    g = p.add_argument_group("evolutionary search (--allocation evolutionary)")
    g.add_argument("--generations", type=int)
    g.add_argument("--offspring", type=int)
    g.add_argument("--selection", help="tokens:survivors stages, e.g. 512:16,2048:4,8192:1")
    g.add_argument("--seed-from", choices=SEED_SOURCES)
    g.add_argument("--granularity", choices=("layer", "module"))
    g.add_argument("--fitness", choices=("kl", "ppl"))
    g.add_argument("--time-budget", type=float, help="minutes")
    p.set_defaults(func=cmd_prune)

    e = sub.add_parser("eval", help="perplexity of a saved checkpoint on a data source's evaluation half")
    e.add_argument("dir", help="checkpoint folder (or any model spec load accepts)")
    e.add_argument("--data", default="pydoc")
    e.add_argument("--windows", type=int, default=32)
    e.add_argument("--seq-len", type=int, default=256)
    e.add_argument("--device", default="auto")
    e.set_defaults(func=cmd_eval)


def build_spec(args: argparse.Namespace):
    """JobSpec from CLI arguments; validation errors become one PruningConfigError line."""
    from evosparse.jobs.spec import JobSpec
    from pydantic import ValidationError

    search = {k: v for k, v in {
        "generations": args.generations, "offspring": args.offspring, "selection": args.selection,
        "seed_from": args.seed_from, "granularity": args.granularity, "fitness": args.fitness,
        "time_budget_min": args.time_budget,
    }.items() if v is not None}
    quant = {k: v for k, v in {
        "bits": args.quantize_bits, "group_size": args.quantize_group, "method": args.quantize_method,
        "symmetric": False if args.quantize_asymmetric else None,
    }.items() if v is not None}
    if quant and "bits" not in quant:
        raise PruningConfigError("--quantize-group/--quantize-method/--quantize-asymmetric need --quantize-bits")
    try:
        return JobSpec(
            model=args.model, sparsity=args.sparsity, pruner=args.pruner, allocation=args.allocation,
            pattern=args.pattern, calib=args.calib, eval=args.eval, calib_windows=args.calib_windows,
            eval_windows=args.eval_windows, seq_len=args.seq_len, seed=args.seed, owl_m=args.owl_m,
            owl_lambda=args.owl_lambda, device=args.device, dtype=args.dtype, search=search,
            quantize=quant or None, format=args.format, export_dtype=args.export_dtype,
        )
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(x) for x in err.get("loc", ())) or "spec"
        msg = str(err.get("msg", exc)).removeprefix("Value error, ")
        raise PruningConfigError(f"invalid {where}: {msg}") from None


def default_out(spec) -> Path:
    name = Path(spec.model).name.removesuffix(".gguf") or "model"
    return Path(f"pruned-{name}-{spec.pruner}-{spec.allocation}-{round(spec.sparsity * 100)}")


class CliHooks:
    """A tqdm bar on stderr over the whole job (percent), labelled with the stage and block."""

    def __init__(self) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=100, file=sys.stderr, unit="%", bar_format="{desc:<28}{percentage:3.0f}%|{bar}| {elapsed}<{remaining}")

    def stage(self, name: str, fraction: float, message: str = "") -> None:
        self.bar.set_description_str(f"{name} {message}".strip(), refresh=False)
        self.bar.n = round(fraction * 100, 1)
        self.bar.refresh()

    def generation(self, record: dict, state: bytes) -> None:
        self.bar.write(f"generation {record.get('generation')}: best {record.get('best'):.4g} "
                       f"mean {record.get('mean'):.4g}", file=sys.stderr)

    def should_cancel(self) -> bool:
        return False

    def close(self) -> None:
        self.bar.close()


def _quiet_transformers() -> None:
    """Our own bar is the progress display; hide transformers' per-file loading/saving bars."""
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:
        pass


def cmd_prune(args: argparse.Namespace) -> int:
    from evosparse.worker.runner import RunHooks, _check_out_dir, run_job

    _quiet_transformers()

    spec = build_spec(args)
    out = Path(args.out) if args.out else default_out(spec)
    _check_out_dir(out, args.overwrite)  # refuse before loading anything

    class Hooks(CliHooks, RunHooks):
        pass

    hooks = Hooks()
    try:
        report = run_job(spec, out, hooks, overwrite=args.overwrite)
    finally:
        hooks.close()
    ppl = report["perplexity"]
    print(f"perplexity dense {ppl['dense']:.3f} -> pruned {ppl['pruned']:.3f}"
          + (f" (uniform {ppl['uniform']:.3f})" if "uniform" in ppl else ""))
    print(f"global sparsity {report['global_sparsity']:.4f} (target {spec.sparsity:g}); "
          f"{report['timings'].get('total', 0):.1f} s")
    print(f"wrote {out}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from evosparse.pruning.data import get_windows
    from evosparse.pruning.evaluate import perplexity
    from evosparse.pruning.models import load_model

    _quiet_transformers()
    if args.windows < 1 or args.seq_len < 2:
        raise PruningConfigError("--windows must be >= 1 and --seq-len >= 2")
    model, tokenizer = load_model(args.dir, device=args.device)
    windows = get_windows(args.data, tokenizer, args.windows, args.seq_len, "eval")
    ppl = perplexity(model, windows)
    line = f"perplexity {ppl:.3f} on {args.windows} x {args.seq_len} tokens of {args.data} (evaluation half)"
    report = Path(args.dir) / "report.json"
    if report.is_file():
        try:
            line += f"; global sparsity {json.loads(report.read_text())['global_sparsity']:.4f}"
        except (ValueError, KeyError):
            pass
    print(line)
    return 0

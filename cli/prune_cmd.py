"""`evosparse prune` and `evosparse eval`: run one job in-process, or measure a saved checkpoint."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from evosparse.cli import tasks_cmd
from evosparse.cli.spec_flags import add_spec_arguments, build_spec
from evosparse.pruning.errors import PruningConfigError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prune", help="prune a model in-process and write a checkpoint + report.json",
                       description="Run one pruning job in this process. Every job-spec field is a flag "
                                   "(the same fields POST /v1/jobs takes).")
    add_spec_arguments(p)
    o = p.add_argument_group("output")
    o.add_argument("--out", help="output folder (default: ./pruned-<model>-<pruner>-<allocation>-<pct>)")
    o.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    o.add_argument("--json", action="store_true", help="print {out, report} as one JSON document on stdout")
    t = p.add_argument_group("experiment tracking")
    t.add_argument("--mlflow-uri", default=os.environ.get("EVOSPARSE_MLFLOW_TRACKING_URI") or None, help=(
        "log the job as an MLflow run here (sqlite:///mlflow.db, http://host:5000, ...; needs the [tracking] "
        "extra) (default: $EVOSPARSE_MLFLOW_TRACKING_URI, else off)"))
    t.add_argument("--mlflow-experiment", default="evosparse", help="MLflow experiment of the run")
    p.set_defaults(func=cmd_prune)

    e = sub.add_parser("eval", help="perplexity of a saved checkpoint on a data source's evaluation half "
                                    "(and lm-eval task accuracy with --tasks)")
    e.add_argument("dir", help="checkpoint folder (or any model spec load accepts)")
    e.add_argument("--data", default="pydoc")
    e.add_argument("--windows", type=int, default=32)
    e.add_argument("--seq-len", type=int, default=256)
    e.add_argument("--device", default="auto")
    tasks_cmd.add_task_arguments(e)
    e.set_defaults(func=cmd_eval)


def default_out(spec) -> Path:
    name = Path(spec.model).name.removesuffix(".gguf") or "model"
    target = f"{spec.bits_per_weight:g}bpw" if spec.sparsity is None else str(round(spec.sparsity * 100))
    return Path(f"pruned-{name}-{spec.pruner}-{spec.allocation}-{target}")


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
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def _tracker(args: argparse.Namespace, spec):  # noqa: ANN001, ANN202 - MlflowTracker | None
    """The job's MLflow run, opened before anything is loaded: a tracking URI that does not work
    stops the command at once, in one line."""
    from evosparse.worker.tracking import MlflowTracker, TrackingUnavailable

    if not args.mlflow_uri:
        return None
    try:
        return MlflowTracker(args.mlflow_uri, args.mlflow_experiment, spec.model_dump(mode="json"))
    except TrackingUnavailable:
        raise
    except Exception as exc:  # noqa: BLE001 - MLflow's own errors: unreachable server, bad URI scheme
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise PruningConfigError(f"--mlflow-uri {args.mlflow_uri}: {first}") from None


def cmd_prune(args: argparse.Namespace) -> int:
    from evosparse.pruning.errors import CancelledError
    from evosparse.worker.runner import RunHooks, _check_out_dir, run_job
    from evosparse.worker.tracking import TrackingHooks

    _quiet_transformers()

    spec = build_spec(args)
    out = Path(args.out) if args.out else default_out(spec)
    _check_out_dir(out, args.overwrite)  # refuse before loading anything
    if spec.search.workers > 1 and spec.allocation == "evolutionary":
        # Scoring workers are Celery processes of the service; a CLI run has none to fan out to.
        print(f"evosparse: search.workers={spec.search.workers}: `evosparse prune` scores in this process "
              f"(the same search, one process); `evosparse serve --scoring-workers N` and `evosparse submit` "
              f"spread it over scoring workers", file=sys.stderr)
    tracker = _tracker(args, spec)

    class Hooks(CliHooks, RunHooks):
        pass

    hooks = Hooks()
    status = "FAILED"
    try:
        report = run_job(spec, out, TrackingHooks(hooks, tracker) if tracker else hooks, overwrite=args.overwrite)
        status = "SUCCEEDED"
        if tracker:
            tracker.outputs(out, report)
    except CancelledError:
        status = "CANCELLED"
        raise
    finally:
        hooks.close()
        if tracker:
            tracker.finish(status)
    if args.json:
        print(json.dumps({"out": str(out.resolve()), "report": report}))
        return 0
    ppl = report["perplexity"]
    print(f"perplexity dense {ppl['dense']:.3f} -> pruned {ppl['pruned']:.3f}"
          + (f" (uniform {ppl['uniform']:.3f})" if "uniform" in ppl else ""))
    target = (f"target {spec.sparsity:g}" if spec.sparsity is not None else
              f"{report['bits_per_weight']:.4f} bits per weight, budget {spec.bits_per_weight:g}")
    print(f"global sparsity {report['global_sparsity']:.4f} ({target}); {report['timings'].get('total', 0):.1f} s")
    print(f"wrote {out}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from evosparse.pruning.data import get_windows
    from evosparse.pruning.evaluate import perplexity
    from evosparse.pruning.loading import load_model

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
    if args.tasks:
        print("\n".join(tasks_cmd.run(args, model, tokenizer)))
    return 0

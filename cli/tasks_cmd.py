"""`evosparse eval DIR --tasks ...`: lm-eval task accuracy of a checkpoint, recorded in its report.

The perplexity half of ``evosparse eval`` lives in prune_cmd.py; this module adds the task flags
and what happens with their results: a table on stdout and, when DIR is an evosparse output
folder (it holds report.json), the results written into the report's ``lm_eval`` block and the
model card (README.md) rewritten from it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def add_task_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("downstream tasks (lm-evaluation-harness)")
    g.add_argument("--tasks", nargs="+", metavar="TASK", default=[],
                   help="lm-eval tasks to score: pydoc_cloze (offline, ships with evosparse) or any lm-eval task "
                        "(hellaswag, arc_easy, arc_challenge, piqa, winogrande, ...: their data comes from the hub)")
    g.add_argument("--limit", type=int, default=None, help="items per task (default: all)")
    g.add_argument("--num-fewshot", type=int, default=0, help="few-shot examples per item (default: 0)")
    g.add_argument("--batch-size", type=int, default=8, help="lm-eval batch size (default: 8)")


def record(folder: Path, results: dict[str, dict[str, Any]], limit: int | None) -> bool:
    """Merge task results (of the checkpoint in ``folder``) into its report.json and rewrite its card.

    A task's dense figure from the job is kept only when it was measured on the same number of
    items with the same shots; otherwise the two would not be comparable. Returns False when
    ``folder`` has no report.json (not an evosparse output folder).
    """
    from evosparse.pruning.export import write_report
    from evosparse.pruning.lmeval import lm_eval_version
    from evosparse.worker.model_card import write_card

    path = folder / "report.json"
    if not path.is_file():
        return False
    report = json.loads(path.read_text())
    block = report.setdefault("lm_eval", {"results": {}})
    block["version"] = lm_eval_version()
    block["limit"] = limit
    for task, metrics in results.items():
        metrics = dict(metrics)
        entry = {"samples": metrics.pop("samples"), "num_fewshot": metrics.pop("num_fewshot"), "pruned": metrics}
        old = block["results"].get(task) or {}
        if old.get("dense") and (old.get("samples"), old.get("num_fewshot")) == (entry["samples"], entry["num_fewshot"]):
            entry["dense"] = old["dense"]
        block["results"][task] = entry
    write_card(folder, report)
    write_report(folder, report)
    return True


def run(args: argparse.Namespace, model: Any, tokenizer: Any) -> list[str]:
    """Score the tasks named by --tasks on ``model``; returns the lines to print."""
    from evosparse.pruning.errors import PruningConfigError
    from evosparse.pruning.lmeval import run_tasks

    if args.limit is not None and args.limit < 1 or args.num_fewshot < 0 or args.batch_size < 1:
        raise PruningConfigError("--limit and --batch-size must be >= 1 and --num-fewshot >= 0")
    results = run_tasks(model, tokenizer, list(dict.fromkeys(args.tasks)), limit=args.limit,
                        num_fewshot=args.num_fewshot, batch_size=args.batch_size)
    lines = [f"{'task':<16} {'items':>6} {'acc':>8} {'acc_norm':>9}"]
    for task, m in results.items():
        norm = f"{100 * m['acc_norm']:8.1f}%" if "acc_norm" in m else f"{'—':>9}"
        acc = f"{100 * m['acc']:7.1f}%" if "acc" in m else f"{'—':>8}"
        lines.append(f"{task:<16} {m['samples']:>6} {acc} {norm}")
    folder = Path(args.dir)
    if folder.is_dir() and record(folder, results, args.limit):
        lines.append(f"recorded in {folder / 'report.json'} and {folder / 'README.md'}")
    return lines

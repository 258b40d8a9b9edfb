"""A fixed tiny evolutionary job whose search outcome is recorded in tests/data/golden_tiny_search.json.

The structure refactor (staged runner, one dense snapshot, batched scoring) must not change what a
job computes: the same seed gives the same best vector and history. ``python -m tests.golden_search
--record`` rewrites the file (only when a change is meant to alter the search).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

GOLDEN = Path(__file__).parent / "data" / "golden_tiny_search.json"


def golden_spec(model_dir: str | Path) -> dict[str, Any]:
    return dict(model=str(model_dir), sparsity=0.6, pruner="wanda", allocation="evolutionary", seed=5,
                calib_windows=6, eval_windows=2, seq_len=32,
                search=dict(generations=5, offspring=6, selection="64:3,192:1", seed_from="fisher",
                            granularity="module", step_fraction=0.05, max_level_delta=0.3,
                            time_budget_min=None))


def summary(report: dict[str, Any]) -> dict[str, Any]:
    """The deterministic part of a report: no timings."""
    s = report["search"]
    keep = ("generation", "best", "mean", "best_levels", "candidates", "candidates_scored", "tokens")
    return {
        "best_vector": s["best_vector"],
        "history": [{k: r[k] for k in keep} for r in s["history"]],
        "layer_sparsity": report["layer_sparsity"],
        "perplexity": report["perplexity"],
    }


def run_golden(model_dir: str | Path) -> dict[str, Any]:
    from evosparse.jobs.spec import JobSpec
    from evosparse.worker.runner import run_job

    with tempfile.TemporaryDirectory() as tmp:
        report = run_job(JobSpec.model_validate(golden_spec(model_dir)), Path(tmp) / "out")
    return summary(report)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--record", action="store_true")
    args = parser.parse_args()
    from evosparse.pruning.tiny import save_tiny_llama

    with tempfile.TemporaryDirectory() as tmp:
        out = run_golden(save_tiny_llama(Path(tmp) / "m"))
    if args.record:
        GOLDEN.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out)[:400])

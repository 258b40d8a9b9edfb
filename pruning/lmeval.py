"""Downstream-task accuracy with EleutherAI's lm-evaluation-harness (``lm_eval.simple_evaluate``).

The model is handed to lm-eval as the in-memory Hugging Face model (``HFLM(pretrained=model)``),
so a job scores exactly what it prunes and ``evosparse eval DIR --tasks`` scores what was saved.
Besides lm-eval's own registry (hellaswag, arc_easy, arc_challenge, piqa, winogrande, ...: their
datasets come from the Hugging Face hub), ``TASK_DIR`` holds evosparse's offline task
``pydoc_cloze`` (see lm_eval_tasks/pydoc_cloze.py), which needs no network.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from evosparse.pruning.errors import PruningConfigError

TASK_DIR = Path(__file__).parent / "lm_eval_tasks"
# The figures kept per task: lm-eval reports "<metric>,<filter>" keys; these are its multiple-choice ones.
_METRICS = ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr")


def lm_eval_version() -> str | None:
    try:
        from importlib.metadata import version

        return version("lm_eval")
    except Exception:  # noqa: BLE001 - not installed
        return None


def _local_tasks() -> set[str]:
    return {p.stem for p in TASK_DIR.glob("*.yaml")}


def _task_manager(tasks: list[str]):
    try:
        from lm_eval.tasks import TaskManager
    except ModuleNotFoundError as exc:
        raise PruningConfigError("task evaluation needs lm-eval (part of the [worker] extra): "
                                 "pip install 'evosparse[eval]'") from exc
    # Indexing lm-eval's own few thousand task files takes seconds: skip it when only ours are asked for.
    return TaskManager(include_path=str(TASK_DIR), include_defaults=not set(tasks) <= _local_tasks())


def check_reachable(tasks: list[str]) -> None:
    """Tasks whose data lives on the hub fail at once on a machine that cannot reach it.

    With HF_HUB_OFFLINE / HF_DATASETS_OFFLINE set the user means the local datasets cache: lm-eval
    is left to read it.
    """
    from evosparse.pruning.config import offline_requested
    from evosparse.pruning.hub import unreachable

    remote = [t for t in tasks if t not in _local_tasks()]
    if remote and not offline_requested():
        why = unreachable("huggingface.co", 443)
        if why is not None:
            raise PruningConfigError(f"{', '.join(remote)}: lm-eval's tasks read their data from the Hugging Face "
                                     f"hub, which this machine cannot reach ({why}); pydoc_cloze runs offline")


def run_tasks(model: Any, tokenizer: Any, tasks: list[str], *, limit: int | None = None, num_fewshot: int = 0,
              batch_size: int = 8, seed: int = 0) -> dict[str, dict[str, Any]]:
    """{task: {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "samples", "num_fewshot"}} for ``model``.

    ``limit`` caps the items per task (lm-eval's ``limit``; None: all). Unknown task names fail
    before the model runs. The model's ``use_cache`` is left as it was.
    """
    if not tasks:
        return {}
    check_reachable(tasks)
    manager = _task_manager(list(tasks))
    known = set(manager.all_tasks)
    unknown = [t for t in tasks if t not in known]  # exact names: lm-eval would read others as globs
    if unknown:
        raise PruningConfigError(f"unknown lm-eval task(s) {', '.join(unknown)}; offline: pydoc_cloze; "
                                 f"with network e.g. hellaswag, arc_easy, arc_challenge, piqa, winogrande")
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    for name in ("lm-eval", "lm_eval"):  # its per-task INFO lines would drown a CLI's output
        logging.getLogger(name).setLevel(logging.ERROR)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size,
              device=str(next(model.parameters()).device))
    # bootstrap_iters: accuracy's standard error is closed-form; a count above 0 only switches it on.
    out = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit,
                                  task_manager=manager, log_samples=False, bootstrap_iters=100,
                                  random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                                  fewshot_random_seed=seed)
    results: dict[str, dict[str, Any]] = {}
    for task in tasks:
        raw = out["results"].get(task, {})
        entry: dict[str, Any] = {}
        for key, value in raw.items():
            metric = key.split(",")[0]
            if metric in _METRICS and isinstance(value, int | float):
                entry[metric] = float(value)
        entry["samples"] = int(out.get("n-samples", {}).get(task, {}).get("effective", 0))
        entry["num_fewshot"] = num_fewshot
        results[task] = entry
    return results

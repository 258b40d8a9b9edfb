"""The model card (README.md) of a pruned checkpoint, written from its report.json.

Hugging Face's hub shows README.md as the model's page and reads its YAML header (``base_model``,
``tags``, ``license``, ...); the card is built with ``huggingface_hub``'s ``ModelCard`` so the
header is what the hub expects. Everything in it comes from the report, so ``evosparse eval
--tasks``, which adds task results to the report, rewrites the card the same way.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

CARD_FILE = "README.md"
_BAR = 24  # characters of a full (100 %) sparsity bar


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.1f} %"


def _target(report: dict[str, Any]) -> str:
    if report.get("sparsity_target") is None and report.get("bits_per_weight") is not None:
        return f"a size budget of {report['bits_per_weight']} bits per weight"
    return _pct(report.get("sparsity_target"))


def _title(report: dict[str, Any]) -> str:
    source = (report.get("provenance") or {}).get("source") or {}
    name = source.get("name") or report.get("model", "model")
    return (f"{name}, pruned to {_pct(report.get('global_sparsity'))} "
            f"({report.get('pruner')}, {report.get('allocation')} allocation, {report.get('pattern')})")


def _tags(report: dict[str, Any]) -> list[str]:
    target = report.get("sparsity_target")
    budget = f"bits-per-weight-{report.get('bits_per_weight')}"  # a size-budget job has no sparsity target
    tags = ["evosparse", "pruned", "sparse", f"sparsity-{round(100 * target)}" if target is not None else budget,
            str(report.get("pruner")), f"allocation-{report.get('allocation')}"]
    if report.get("allocation") == "evolutionary":
        tags.append("evolutionary-search")
    pattern = str(report.get("pattern"))
    tags.append("structured-pruning" if pattern == "structured" else f"pattern-{pattern.replace(':', '-')}")
    if report.get("quantize"):
        widths = report["quantize"].get("bit_widths") or [report["quantize"].get("bits")]
        tags += [f"int{b}" for b in widths if b is not None]
    if report.get("format") in ("compressed-tensors", "gguf"):
        tags.append(str(report["format"]))
    return tags


def _perplexity(report: dict[str, Any]) -> list[str]:
    ppl = report.get("perplexity") or {}
    dense = ppl.get("dense")
    spec = report.get("spec") or {}
    rows = [("dense", 0.0, dense)]
    if ppl.get("uniform") is not None:
        rows.append((f"uniform ({report.get('pruner')})", report.get("sparsity_target"), ppl["uniform"]))
    what = "searched" if report.get("allocation") == "evolutionary" else str(report.get("allocation"))
    rows.append((f"{what} ({report.get('pruner')}), this checkpoint", report.get("global_sparsity"), ppl.get("pruned")))
    out = [f"Perplexity on {report.get('eval_tokens', 0)} held-out tokens of `{spec.get('eval', '?')}` "
           f"(its second half; calibration: {report.get('calib_tokens', 0)} tokens of the first half of "
           f"`{spec.get('calib', '?')}`), measured in the job before the checkpoint was cast for saving:", "",
           "| model | sparsity | perplexity | × dense |", "| --- | --- | --- | --- |"]
    for label, sparsity, value in rows:
        ratio = f"{value / dense:.2f}" if value is not None and dense else "—"
        out.append(f"| {label} | {_pct(sparsity)} | {'—' if value is None else f'{value:.2f}'} | {ratio} |")
    return out


def _tasks(report: dict[str, Any]) -> list[str]:
    lm = report.get("lm_eval") or {}
    results = lm.get("results") or {}
    if not results:
        return []
    out = ["## Downstream tasks (lm-evaluation-harness)", "",
           f"lm-eval {lm.get('version') or '?'}, accuracy (length-normalised accuracy in brackets), "
           f"zero-shot unless stated; `pydoc_cloze` is evosparse's offline task (pick the sentence that follows "
           f"one from the Python docs, 4 choices, chance 25 %).", "",
           "| task | items | shots | dense | this checkpoint |", "| --- | --- | --- | --- | --- |"]

    def cell(m: dict[str, Any] | None) -> str:
        if not m or "acc" not in m:
            return "—"
        norm = f" ({100 * m['acc_norm']:.1f} %)" if "acc_norm" in m else ""
        return f"{100 * m['acc']:.1f} %{norm}"

    for task, entry in results.items():
        out.append(f"| {task} | {entry.get('samples', '?')} | {entry.get('num_fewshot', 0)} | "
                   f"{cell(entry.get('dense'))} | {cell(entry.get('pruned'))} |")
    return out + [""]


def _layers(report: dict[str, Any]) -> list[str]:
    blocks = report.get("block_sparsity") or []
    if not blocks:
        return []
    target = report.get("sparsity_target") or 0.0
    out = ["## Sparsity per layer", "",
           f"Fraction of each decoder layer's linear weights that are zero (removed, for structured pruning), "
           f"measured in the saved files; `|` marks the {_pct(target)} target.", "",
           "| layer | sparsity | |", "| --- | --- | --- |"]
    mark = round(target * _BAR)
    for i, s in enumerate(blocks):
        filled = round(s * _BAR)
        bar = "".join("█" if k < filled else "·" for k in range(_BAR))
        bar = bar[:mark] + "|" + bar[mark:]
        out.append(f"| {i} | {_pct(s)} | `{bar}` |")
    return out + [""]


def _provenance(report: dict[str, Any]) -> list[str]:
    prov = report.get("provenance") or {}
    src = prov.get("source") or {}
    env = prov.get("environment") or {}
    versions = env.get("versions") or {}
    comp = prov.get("compute") or {}
    git = env.get("git") or {}
    out = ["## Provenance", ""]
    line = f"- source: `{src.get('name', report.get('model'))}` (given as `{src.get('spec', report.get('model'))}`"
    out.append(line + (f"): {src['note']}" if src.get("note") else ")"))
    for file, digest in (src.get("sha256") or {}).items():
        out.append(f"- source file `{file}`: sha256 `{digest}`")
    if src.get("revision"):
        out.append(f"- source revision: `{src['revision']}`")
    commit = f", commit `{git['commit'][:12]}`{' (uncommitted changes)' if git.get('dirty') else ''}" if git else ""
    out.append(f"- evosparse {versions.get('evosparse', '?')}{commit}; "
               + ", ".join(f"{k} {v}" for k, v in versions.items() if k != "evosparse"))
    out.append(f"- pruned on `{comp.get('device', '?')}` ({comp.get('device_name', '?')}) in {comp.get('dtype', '?')}; "
               f"checkpoint written in {report.get('dtype', '?')} ({report.get('format', 'dense')} layout)")
    out.append(f"- job ran {prov.get('started_at', '?')} → {prov.get('finished_at', '?')} "
               f"({(report.get('timings') or {}).get('total', '?')} s)")
    search = report.get("search") or {}
    if search:
        last = (search.get("history") or [{}])[-1].get("generation", 0)
        out.append(f"- search: {last} generations after the seed population, {search.get('candidates_scored')} "
                   f"candidates scored in {search.get('seconds', 0):.0f} s; stopped by `{prov.get('stop_reason')}`")
    out.append(f"- report.json schema version {prov.get('schema_version', '?')}")
    return out + [""]


def card_text(report: dict[str, Any]) -> str:
    """The README.md text: YAML header for the hub, then the facts of the report."""
    from huggingface_hub import ModelCard, ModelCardData

    src = (report.get("provenance") or {}).get("source") or {}
    data = ModelCardData(base_model=src.get("name") if src.get("kind") in ("builtin", "hub") else None,
                         license=src.get("license"), library_name="transformers", pipeline_tag="text-generation",
                         tags=_tags(report))
    spec = report.get("spec") or {}
    recipe = report.get("llmcompressor_recipe") or {}
    body = [f"# {_title(report)}", "",
            f"Pruned by evosparse with the `{report.get('pruner')}` pruner and the "
            f"`{report.get('allocation')}` allocation: {_pct(report.get('global_sparsity'))} of the decoder layers' "
            f"linear weights are zero (target {_target(report)}, counted in parameters, "
            f"measured in the saved files).", "", "## Perplexity", "", *_perplexity(report), "",
            *_tasks(report), *_layers(report), "## Reproduce", "", "```bash", report.get("command", ""), "```", "",
            "The same job through the REST API (`POST /v1/jobs`):", "", "```json",
            json.dumps(spec, indent=2), "```", ""]
    if recipe.get("file"):
        body += [f"`{recipe['file']}` holds this allocation as an llm-compressor recipe ({recipe.get('modifier')}, "
                 f"one sparsity per linear), to re-apply it or quantize after it there.", ""]
    if report.get("structure", {}).get("form") == "evosparse-layer-widths":
        use = ["from evosparse.pruning.loading import load_model", "", "model, tokenizer = load_model(\".\")  "
               "# per-layer widths: plain from_pretrained refuses them"]
    elif report.get("format") == "gguf":  # pruning.gguf_export.GGUF_FILE (not imported: no torch here)
        use = ["from transformers import AutoModelForCausalLM, AutoTokenizer", "",
               "model = AutoModelForCausalLM.from_pretrained(\".\", gguf_file=\"model.gguf\")",
               "tokenizer = AutoTokenizer.from_pretrained(\".\", gguf_file=\"model.gguf\")"]
    else:
        use = ["from transformers import AutoModelForCausalLM, AutoTokenizer", "",
               "model = AutoModelForCausalLM.from_pretrained(\".\")", "tokenizer = AutoTokenizer.from_pretrained(\".\")"]
    body += ["## Use", "", "```python", *use, "```", "", *_provenance(report),
             "`report.json` holds every figure above and more (per-linear sparsity, the search history, timings)."]
    return ModelCard("---\n" + data.to_yaml() + "\n---\n\n" + "\n".join(body) + "\n").content


def write_card(folder: str | Path, report: dict[str, Any]) -> Path:
    path = Path(folder) / CARD_FILE
    path.write_text(card_text(report))
    return path

"""The searched allocation as an llm-compressor recipe (``recipe.yaml``), for users of that tool.

llm-compressor (vLLM's compression library) reads recipes of stages, each holding groups of
modifiers (``<name>_stage: {<group>_modifiers: {ModifierClass: {arguments}}}``). Its one-shot
pruners, ``SparseGPTModifier`` and ``WandaPruningModifier``, take ``sparsity`` as one number or as a list
with one entry per module matched by ``targets``, in the model's module order; ``mask_structure``
is ``"0:0"`` (unstructured) or ``"N:M"``, N the weights *pruned* in every M (evosparse's patterns
name the weights kept: its 1:4 is llm-compressor's 3:4; 2:4 is the same in both). evosparse writes every pruned linear as a target with
the sparsity measured in the saved checkpoint, so re-applying the recipe in llm-compressor gives
each linear the fraction evosparse found (masks are chosen again by llm-compressor on its own
calibration data). Mixed N:M patterns become one modifier group per N:M; a quantized job adds a
second stage with the same bits and group size (GPTQ or round-to-nearest). Schema: llm-compressor
0.14 (``llmcompressor.recipe.Recipe``, ``SparsityModifierBase``).

Not expressible: structured pruning (whole heads and channels; llm-compressor has no such
one-shot modifier), so those jobs get no recipe, and the report says why.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

RECIPE_FILE = "recipe.yaml"
# evosparse pruner -> the llm-compressor one-shot modifier closest to it. Magnitude and DaSS have
# no one-shot counterpart there; Wanda is the nearest (DaSS is Wanda with a GLU-aware score).
MODIFIERS = {"wanda": "WandaPruningModifier", "sparsegpt": "SparseGPTModifier", "magnitude": "WandaPruningModifier",
             "dass": "WandaPruningModifier"}
SPARSITY_MODIFIERS = frozenset(MODIFIERS.values())
_SPARSEGPT_ARGS = {"block_size": 128, "dampening_frac": 0.01}  # what pruning/pruners.py uses


def _mask_structure(label: str) -> str:
    """evosparse's 'N:M' keeps N of every M weights; llm-compressor's ``mask_structure`` 'N:M' prunes N of M."""
    if label == "unstructured":
        return "0:0"
    kept, m = (int(x) for x in label.split(":"))
    return f"{m - kept}:{m}"


def _quant_stage(quantize: dict[str, Any]) -> dict[str, Any]:
    modifier = "GPTQModifier" if quantize.get("method") == "gptq" else "QuantizationModifier"
    weights = {"num_bits": int(quantize["bits"]), "type": "int", "symmetric": bool(quantize["symmetric"]),
               "strategy": "group", "group_size": int(quantize["group_size"])}
    return {"quantization_modifiers": {modifier: {
        "ignore": ["lm_head"], "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights}}}}}


def build_recipe(report: dict[str, Any]) -> tuple[dict[str, Any] | None, str]:
    """(recipe dict, modifier name) from a job's report; (None, why not) when there is no equivalent."""
    if report.get("pattern") == "structured":
        return None, "llm-compressor has no one-shot modifier that removes whole heads and channels"
    layer = report.get("layer_sparsity") or {}
    if not layer:
        return None, "the report measured no per-layer sparsity"
    modifier = MODIFIERS.get(report.get("pruner", ""), "SparseGPTModifier")
    labels = report.get("layer_pattern") or {}
    groups: dict[str, list[str]] = {}  # mask_structure -> linears, in model order
    for name in layer:  # layer_sparsity lists the linears in the model's module order
        label = labels.get(name, "unstructured")
        if label == "dense":  # a 2:4+dense layer left dense: nothing to prune there
            continue
        groups.setdefault(_mask_structure(label), []).append(name)
    stage: dict[str, Any] = {}
    for mask, names in groups.items():
        args: dict[str, Any] = {"sparsity": [float(layer[n]) for n in names], "mask_structure": mask,
                                "targets": names, "ignore": []}
        if modifier == "SparseGPTModifier":
            args.update(_SPARSEGPT_ARGS)
        key = "sparsity_modifiers" if len(groups) == 1 else f"sparsity_{mask.replace(':', '_of_')}_modifiers"
        stage[key] = {modifier: args}
    recipe: dict[str, Any] = {"sparsity_stage": stage}
    if report.get("quantize"):
        recipe["quantization_stage"] = _quant_stage(report["quantize"])
    return recipe, modifier


def _header(report: dict[str, Any], modifier: str) -> str:
    source = ((report.get("provenance") or {}).get("source") or {}).get("name") or report.get("model", "")
    lines = [
        f"llm-compressor recipe written by evosparse from report.json ({report.get('pruner')} pruner, "
        f"{report.get('allocation')} allocation, {report.get('pattern')}).",
        f"Per-linear sparsity as measured in the saved checkpoint (global {report.get('global_sparsity', 0):.4f}).",
        "Re-apply it to the source model in llm-compressor, e.g.:",
        f"  oneshot(model=\"{source}\", recipe=\"recipe.yaml\", dataset=..., num_calibration_samples=...)",
    ]
    if report.get("pruner") != {"WandaPruningModifier": "wanda", "SparseGPTModifier": "sparsegpt"}[modifier]:
        lines.append(f"evosparse's pruner {report.get('pruner')!r} has no llm-compressor counterpart: "
                     f"{modifier} applies the same allocation.")
    return "".join(f"# {line}\n" for line in lines)


def write_recipe(folder: str | Path, report: dict[str, Any]) -> dict[str, Any]:
    """Write ``recipe.yaml`` into ``folder`` when the job has an llm-compressor equivalent.

    Returns what report.json records about it: ``{"file", "modifier"}``, or ``{"file": None, "reason"}``.
    """
    import yaml

    recipe, modifier = build_recipe(report)
    if recipe is None:
        return {"file": None, "reason": modifier}
    text = _header(report, modifier) + yaml.safe_dump(recipe, sort_keys=False, default_flow_style=None, width=100)
    (Path(folder) / RECIPE_FILE).write_text(text)
    return {"file": RECIPE_FILE, "modifier": modifier, "schema": "llm-compressor 0.14"}


def recipe_sparsity(path: str | Path) -> dict[str, float]:
    """{linear name: sparsity} of every sparsity modifier in a recipe file (the inverse of write_recipe)."""
    import yaml

    data = yaml.safe_load(Path(path).read_text())
    out: dict[str, float] = {}
    for stage_key, stage in data.items():
        if not stage_key.endswith("_stage"):
            continue
        for group_key, group in stage.items():
            if not group_key.endswith("_modifiers"):
                continue
            for name, args in group.items():
                if name not in SPARSITY_MODIFIERS:
                    continue
                values = args["sparsity"]
                targets = args["targets"]
                if not isinstance(values, list):
                    values = [values] * len(targets)
                out.update(zip(targets, (float(v) for v in values), strict=True))
    return out

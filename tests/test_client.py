"""The Python client and the `evosparse` client verbs against a real API (uvicorn on loopback, SQLite,
local store, embedded Redis as the broker). No worker runs: jobs are moved along with the same
``jobs.repo`` calls a worker makes (claim, record a generation, finish with artifacts), so every
state a pipeline meets is real and each test takes well under a second.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import threading
import time
from pathlib import Path

import pytest
from evosparse.api.schemas import ArtifactOut, JobList, JobOut, Submitted
from evosparse.cli.main import main
from evosparse.jobs.client import ApiError

from evosparse import (
    AsyncClient,
    ChecksumMismatch,
    Client,
    Conflict,
    JobCancelled,
    JobFailed,
    NotFound,
    RateLimited,
)
from tests.live_server import LiveServer

TEAM = "pipeline-team"


class Service:
    """A running API, a key of TEAM, and the worker-side moves of a job."""

    def __init__(self, settings, base: str, token: str, team_id: int):  # noqa: ANN001
        self.settings, self.url, self.key, self.team_id = settings, base, token, team_id
        self.db = settings.resolved_database_url

    def client(self, **kw: object) -> Client:
        return Client(self.url, self.key, **kw)

    def job(self, sparsity: float = 0.5, idempotency_key: str | None = None, **spec: object) -> str:
        from evosparse.jobs import repo
        from evosparse.jobs.db import session_scope
        from evosparse.jobs.spec import JobSpec

        body = JobSpec(sparsity=sparsity, allocation="evolutionary", **spec).model_dump(mode="json")
        with session_scope(self.db) as db:
            job, _ = repo.create_job(db, self.team_id, body, idempotency_key)
            return job.id

    def finish(self, job_id: str, status: str, generations: int = 0, files: dict[str, bytes] | None = None,
               report: dict | None = None, error: str | None = None) -> None:
        from evosparse.jobs import repo
        from evosparse.jobs.db import session_scope
        from evosparse.jobs.store import store_from_settings

        objects = prefix = None
        with session_scope(self.db) as db:
            claim = repo.claim_job(db, job_id, "test-worker", 120, 3)
            assert isinstance(claim, repo.Claim), claim
            for g in range(generations):
                assert repo.record_generation(db, claim, {"generation": g, "best": 1.0 / (g + 1), "mean": 2.0 / (g + 1),
                                                          "tokens": 64, "seconds": 0.1, "best_vector": [0.4, 0.6]},
                                              b"{}")
            if files:
                out = Path(self.settings.data_dir) / "out" / job_id
                out.mkdir(parents=True)
                for name, data in files.items():
                    (out / name).write_bytes(data)
                prefix = f"jobs/{job_id}/attempt-1"
                objects = store_from_settings(self.settings).put_dir(out, prefix)
            assert repo.finish_job(db, claim, status, error=error, report=report, artifacts=objects,
                                   artifact_prefix=prefix)


def _start(tmp_path_factory, name: str, **settings_kw: object):  # noqa: ANN202
    from evosparse.api.main import create_app
    from evosparse.cli.service_cmd import start_embedded_redis
    from evosparse.jobs import repo
    from evosparse.jobs.db import session_scope
    from evosparse.jobs.settings import Settings

    data = tmp_path_factory.mktemp(name)
    redis_server, broker = start_embedded_redis(data / "redis.db")
    settings = Settings(data_dir=data, broker_url=broker, **settings_kw)
    app = create_app(settings)
    with session_scope(settings.resolved_database_url) as db:
        token, key = repo.create_api_key(db, TEAM)
        team_id = key.team_id
    return app, settings, token, team_id, redis_server


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    app, settings, token, team_id, redis_server = _start(tmp_path_factory, "client-api")
    try:
        with LiveServer(app) as base:
            yield Service(settings, base, token, team_id)
    finally:
        redis_server.shutdown()


# --- the Python client ------------------------------------------------------------------------------

def test_answers_are_typed_and_the_list_filters_by_name_label_and_text(service: Service) -> None:
    a = service.job(name="nightly-a", labels={"team": "nlp", "stage": "nightly"})
    b = service.job(name="nightly-b", labels={"team": "vision"}, model="org/Some-Model")
    c = service.job()
    with service.client() as client:
        job = client.get(a)
        assert isinstance(job, JobOut) and job.name == "nightly-a" and job.labels == {"team": "nlp", "stage": "nightly"}
        page = client.list(labels={"team": "nlp"})
        assert isinstance(page, JobList) and [j.id for j in page.items] == [a] and page.total == 1
        assert {j.id for j in client.list(labels=["team"]).items} == {a, b}  # has the label, any value
        assert [j.id for j in client.list(labels=["team=nlp", "stage=nightly"]).items] == [a]
        assert client.list(labels={"team": "nlp", "stage": "weekly"}).items == []
        assert [j.id for j in client.list(name="nightly-b").items] == [b]
        assert {j.id for j in client.list(search="NIGHTLY").items} == {a, b}  # name, case-insensitive
        assert [j.id for j in client.list(search="some-model").items] == [b]  # model
        assert [j.id for j in client.list(search=c[:10]).items] == [c]  # the id's start
        names = [j.name for j in client.list(sort="name", labels=["team"]).items]
        assert names == ["nightly-a", "nightly-b"]
        assert [j.name for j in client.list(sort="-name", labels=["team"]).items] == ["nightly-b", "nightly-a"]
        for bad in ({"labels": ["Team=x"]}, {"labels": ["team=two words"]}, {"sort": "spec"}, {"name": " x"}):
            with pytest.raises(ApiError) as err:
                client.list(**bad)
            assert err.value.status == 422, bad


def test_typed_errors_not_found_conflict_failed_cancelled(service: Service) -> None:
    with service.client() as client:
        with pytest.raises(NotFound):
            client.get("0" * 32)
        with pytest.raises(NotFound):
            client.cancel("f" * 32)
        keyed = service.job(sparsity=0.5, idempotency_key="release-7")
        with pytest.raises(Conflict):  # the same key with another spec
            client.submit({"sparsity": 0.6, "allocation": "evolutionary"}, idempotency_key="release-7")
        assert client.get(keyed).status == "QUEUED"

        failed = service.job()
        service.finish(failed, "FAILED", error="could not load model 'x'")
        with pytest.raises(JobFailed) as err:
            client.wait(failed, timeout=5)
        assert err.value.job.status == "FAILED" and "could not load model" in err.value.job.error
        assert client.wait(failed, raise_on_failure=False).status == "FAILED"

        cancelled = service.job()
        assert client.cancel(cancelled).status == "CANCELLED"  # a queued job is cancelled at once
        with pytest.raises(JobCancelled):
            client.wait(cancelled, timeout=5)


def test_a_damaged_download_is_a_checksum_error_and_leaves_nothing(service: Service, tmp_path: Path) -> None:
    job = service.job()
    service.finish(job, "SUCCEEDED", files={"report.json": b'{"ok": true}', "weights.bin": b"\x01" * 4096},
                   report={"global_sparsity": 0.5})
    with service.client() as client:
        arts = client.artifacts(job)
        assert all(isinstance(a, ArtifactOut) for a in arts) and {a.name for a in arts} == {"report.json", "weights.bin"}
        good = client.download(job, tmp_path / "good")
        assert (good / "weights.bin").read_bytes() == b"\x01" * 4096
        stored = next(Path(service.settings.data_dir, "store").rglob("weights.bin"))
        stored.write_bytes(b"\x02" * 4096)  # the stored file changes after its checksum was recorded
        with pytest.raises(ChecksumMismatch) as err:
            client.download(job, tmp_path / "bad")
        assert err.value.name == "weights.bin" and not isinstance(err.value, ApiError)
        assert not any(p.name.startswith("weights.bin") for p in (tmp_path / "bad").iterdir())


def test_retry_after_is_honoured_and_a_long_one_surfaces(tmp_path_factory) -> None:
    # One request per second, no burst: the second request of a pair gets 429 with Retry-After: 1.
    app, settings, token, team_id, redis_server = _start(tmp_path_factory, "client-429", rate_limit_per_s=1.0,
                                                         rate_limit_burst=1, max_queued_per_team=1)
    try:
        with LiveServer(app) as base:
            service = Service(settings, base, token, team_id)
            job = service.job()
            with Client(base, token) as client:
                client.get(job)
                t0 = time.monotonic()
                assert client.get(job).id == job  # waited out the 429, then succeeded
                assert time.monotonic() - t0 >= 0.8
            time.sleep(1.1)  # the bucket refills
            with Client(base, token, retries=0) as client:
                client.get(job)
                with pytest.raises(RateLimited) as err:
                    client.get(job)
                assert err.value.retry_after == 1
            time.sleep(1.1)
            with Client(base, token) as client:  # the queued-jobs cap answers Retry-After: 30: not waited out
                t0 = time.monotonic()
                with pytest.raises(RateLimited) as err:
                    client.submit({"sparsity": 0.5})
                assert err.value.retry_after == 30 and time.monotonic() - t0 < 5
    finally:
        redis_server.shutdown()


def test_the_async_twin(service: Service, tmp_path: Path) -> None:
    done = service.job(name="async-done")
    service.finish(done, "SUCCEEDED", generations=3, files={"report.json": b"{}"}, report={})
    failed = service.job()
    service.finish(failed, "FAILED", error="boom")

    async def run() -> None:
        async with AsyncClient(service.url, service.key) as client:
            job = await client.wait(done, timeout=5, poll_s=0.05)
            assert isinstance(job, JobOut) and job.status == "SUCCEEDED"
            assert [g.generation for g in await client.generations(done)] == [0, 1, 2]
            assert [j.id for j in (await client.list(name="async-done")).items] == [done]
            with pytest.raises(NotFound):
                await client.get("0" * 32)
            with pytest.raises(JobFailed):
                await client.wait(failed, timeout=5)
            out = await client.download(done, tmp_path / "a")
            assert (out / "report.json").read_bytes() == b"{}"

    asyncio.run(run())


def test_generations_export_as_csv(service: Service) -> None:
    job = service.job()
    service.finish(job, "SUCCEEDED", generations=4, report={"search": {"units": ["model.layers.0", "model.layers.1"]}})
    with service.client() as client:
        r = client.http.get(f"/v1/jobs/{job}/generations.csv")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
    assert f'filename="{job}-generations.csv"' in r.headers["content-disposition"]
    rows = list(csv.DictReader(io.StringIO(r.text)))
    assert [int(row["generation"]) for row in rows] == [0, 1, 2, 3]
    assert float(rows[1]["best"]) == 0.5 and float(rows[3]["mean"]) == 0.5
    assert rows[0]["model.layers.0"] == "0.4" and rows[0]["model.layers.1"] == "0.6"


# --- the CLI verbs ----------------------------------------------------------------------------------

def _cli(service: Service, capsys, *args: str) -> tuple[int, str, str]:
    rc = main([*args, "--server", service.url, "--key", service.key])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_cli_status_list_cancel_download_json(service: Service, capsys, tmp_path: Path) -> None:
    job = service.job(name="cli-done", labels={"pipeline": "release"})
    service.finish(job, "SUCCEEDED", generations=2, files={"report.json": b'{"a": 1}'}, report={})
    rc, out, _ = _cli(service, capsys, "status", job, "--json")
    assert rc == 0 and JobOut.model_validate(json.loads(out)).status == "SUCCEEDED"
    rc, out, _ = _cli(service, capsys, "list", "--label", "pipeline=release", "--json")
    assert rc == 0 and [j["id"] for j in json.loads(out)["items"]] == [job]
    rc, out, _ = _cli(service, capsys, "list", "--label", "pipeline=release")
    assert rc == 0 and job in out and "cli-done" in out
    rc, out, _ = _cli(service, capsys, "download", job, "--out", str(tmp_path / "d"), "--json")
    got = json.loads(out)
    assert rc == 0 and [f["name"] for f in got["files"]] == ["report.json"]
    assert (Path(got["out"]) / "report.json").read_bytes() == b'{"a": 1}'
    queued = service.job()
    rc, out, _ = _cli(service, capsys, "cancel", queued, "--json")
    assert rc == 0 and json.loads(out)["status"] == "CANCELLED"
    # an error is exit 2, with --json also a JSON object on stdout
    rc, out, err = _cli(service, capsys, "status", "0" * 32, "--json")
    assert rc == 2 and json.loads(out) == {"error": "HTTP 404: job not found", "http_status": 404}
    assert "job not found" in err
    rc, out, err = _cli(service, capsys, "download", queued, "--out", str(tmp_path / "x"))
    assert rc == 2 and "no artifacts" in err and out == ""


def test_cli_submit_spec_file_json_and_exit_codes(service: Service, capsys, tmp_path: Path) -> None:
    spec = tmp_path / "job.yaml"
    spec.write_text("sparsity: 0.5\nallocation: evolutionary\nname: from-yaml\nlabels: {team: nlp}\n"
                    "search: {generations: 7, offspring: 4}\n")
    # --spec gives the fields, a flag overrides one (nested models merge field by field)
    rc, out, _ = _cli(service, capsys, "submit", "--spec", str(spec), "--sparsity", "0.7", "--offspring", "6",
                      "--json")
    sub = Submitted.model_validate(json.loads(out))
    assert rc == 0 and sub.status == "QUEUED"
    with service.client() as client:
        job = client.get(sub.id)
    assert (job.name, job.labels, job.spec["sparsity"]) == ("from-yaml", {"team": "nlp"}, 0.7)
    assert (job.spec["search"]["generations"], job.spec["search"]["offspring"]) == (7, 6)
    # plain mode: stdout is the job id alone
    rc, out, _ = _cli(service, capsys, "submit", "--spec", str(spec), "--seed", "1")
    assert rc == 0 and len(out.strip()) == 32 and out.strip() == out.strip().split()[0]

    # --wait --timeout: exit 4; with --cancel-on-timeout the job is cancelled (nothing runs it here)
    rc, out, err = _cli(service, capsys, "submit", "--spec", str(spec), "--seed", "2", "--wait", "--timeout", "0.3",
                        "--cancel-on-timeout", "--json")
    assert rc == 4 and json.loads(out)["status"] == "CANCELLED" and "cancelled (--cancel-on-timeout)" in err
    rc, out, _ = _cli(service, capsys, "submit", "--spec", str(spec), "--seed", "3", "--wait", "--timeout", "0.3",
                      "--quiet")
    assert rc == 4
    with service.client() as client:
        assert client.get(out.strip()).status == "QUEUED"  # without --cancel-on-timeout it stays

    # --wait on a job that fails (the "worker" ends it while the CLI waits): exit 1, the job as JSON
    def fail_soon(seed: int, status: str) -> threading.Thread:
        def run() -> None:
            from evosparse.jobs.db import session_scope
            from evosparse.jobs.models import Job
            from sqlalchemy import select

            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                with session_scope(service.db) as db:
                    found = db.scalar(select(Job.id).where(Job.spec["seed"].as_integer() == seed))
                if found:
                    service.finish(found, status, error="out of memory" if status == "FAILED" else None)
                    return
                time.sleep(0.05)

        t = threading.Thread(target=run, daemon=True)
        t.start()
        return t

    t = fail_soon(4, "FAILED")
    rc, out, err = _cli(service, capsys, "submit", "--spec", str(spec), "--seed", "4", "--wait", "--json")
    t.join()
    assert rc == 1 and json.loads(out)["error"] == "out of memory" and "job failed: out of memory" in err
    t = fail_soon(5, "SUCCEEDED")
    rc, out, _ = _cli(service, capsys, "submit", "--spec", str(spec), "--seed", "5", "--wait", "--json")
    t.join()
    assert rc == 0 and json.loads(out)["status"] == "SUCCEEDED"
    # refused by the server: exit 2, one line
    rc, out, err = _cli(service, capsys, "submit", "/etc", "--sparsity", "0.5", "--json")
    assert rc == 2 and json.loads(out)["http_status"] == 400 and "accepts no local model paths" in err


# --- the command line itself (no server) -------------------------------------------------------------

def test_version_and_every_help_shows_the_defaults(capsys) -> None:
    import argparse

    from evosparse.cli.main import DefaultsFormatter, build_parser

    from evosparse import __version__

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"evosparse {__version__}"

    def parsers(p: argparse.ArgumentParser):  # noqa: ANN202 - every subcommand, nested ones too
        yield p
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for child in action.choices.values():
                    yield from parsers(child)

    checked = 0
    for p in parsers(build_parser()):
        assert p.formatter_class is DefaultsFormatter, p.prog
        text = " ".join(p.format_help().split())
        for action in p._actions:
            if DefaultsFormatter._names_default(action):
                assert f"(default: {action.default})" in text, (p.prog, action.dest)
                checked += 1
    assert checked >= 10  # serve, list, eval, keys ... (the spec flags are checked below)
    # the spec flags name their spec default themselves
    text = " ".join(build_parser()._subparsers._group_actions[0].choices["submit"].format_help().split())
    assert "(default: wanda)" in text and "--labels KEY=VALUE [KEY=VALUE ...]" in text


def test_spec_file_and_flags_build_one_jobspec(tmp_path: Path, capsys) -> None:
    from evosparse.cli.main import build_parser
    from evosparse.cli.spec_flags import build_spec

    parser = build_parser()
    spec = tmp_path / "job.json"
    spec.write_text(json.dumps({"model": "m", "sparsity": 0.5, "search": {"generations": 9}, "labels": {"a": "1"}}))
    for command in ("prune", "submit"):  # the same file, the same JobSpec
        built = build_spec(parser.parse_args([command, "--spec", str(spec), "--labels", "b=2", "--patience", "3"]))
        assert (built.model, built.sparsity, built.search.generations, built.search.patience) == ("m", 0.5, 9, 3)
        assert built.labels == {"b": "2"}  # a flag replaces the field, it does not merge dicts
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    assert main(["prune", "--spec", str(tmp_path / "list.yaml")]) == 2
    assert "expected a mapping" in capsys.readouterr().err
    assert main(["prune", "m"]) == 2
    # No target at all: the spec's own rule names both kinds (a sparsity or a bits-per-weight budget).
    assert "give sparsity (e.g. 0.6) or bits_per_weight" in capsys.readouterr().err
    assert main(["prune", "m", "--sparsity", "0.5", "--labels", "Bad=1"]) == 2
    assert "invalid --labels: label key 'Bad'" in capsys.readouterr().err

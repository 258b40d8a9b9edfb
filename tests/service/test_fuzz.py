"""A bounded property-based fuzz of the whole REST API from its own /openapi.json (schemathesis).

Only against 127.0.0.1: a real uvicorn server with a real database (SQLite and PostgreSQL) and a
real broker, a valid API key, and no worker (accepted jobs stay QUEUED; nothing runs). Every
operation gets generated requests, valid and invalid ("positive" and "negative" modes). It asserts
that no response is a 5xx, and that the only jobs created are those answered 202 -- a refused
request leaves no row behind. The counts are printed (pytest -s) for the record.
"""

from __future__ import annotations

import collections
import os
import uuid

import httpx
import pytest

schemathesis = pytest.importorskip("schemathesis", reason="pip install schemathesis (the [dev] extra)")

from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

EXAMPLES_PER_OPERATION = int(os.environ.get("EVOSPARSE_FUZZ_EXAMPLES", "60"))


@pytest.fixture(scope="module")
def fuzz_api(db_url, broker, model_root, tmp_path_factory):
    from evosparse.jobs.settings import Settings

    from tests.service.servers import ApiServer

    s = Settings(database_url=db_url, broker_url=broker, queue=f"fuzz-{uuid.uuid4().hex[:8]}",
                 data_dir=tmp_path_factory.mktemp("fuzz"), allowed_model_roots=[model_root],
                 allowed_data_roots=[model_root], rate_limit_per_s=0)
    api = ApiServer(s).start()
    assert api.url.startswith("http://127.0.0.1:")  # never anywhere else
    yield api, s
    api.stop()


def _table_counts(url: str) -> dict[str, int]:
    from evosparse.jobs.db import session_scope
    from evosparse.jobs.models import ApiKey, Artifact, Generation, Job, Team, WebhookDelivery
    from sqlalchemy import func, select

    with session_scope(url) as db:
        return {m.__tablename__: int(db.scalar(select(func.count()).select_from(m)) or 0)
                for m in (Job, Team, ApiKey, Generation, Artifact, WebhookDelivery)}


def test_fuzz_openapi_no_5xx_and_refused_requests_create_nothing(fuzz_api):
    from evosparse.jobs import repo
    from evosparse.jobs.db import session_scope

    api, s = fuzz_api
    with session_scope(s.resolved_database_url) as db:
        token, _ = repo.create_api_key(db, f"fuzz-{uuid.uuid4().hex[:6]}")
    auth = {"Authorization": f"Bearer {token}"}
    schema = schemathesis.openapi.from_url(f"{api.url}/openapi.json")
    before = _table_counts(s.resolved_database_url)
    statuses: collections.Counter[int] = collections.Counter()
    per_operation: collections.Counter[str] = collections.Counter()
    server_errors: list[str] = []
    accepted: set[str] = set()
    operations = [result.ok() for result in schema.get_all_operations()]
    assert any(op.path == "/v1/jobs" and op.method.upper() == "POST" for op in operations)
    # Real job ids, so that path operations reach the database and not only the 404 of a bad id.
    real = [httpx.post(f"{api.url}/v1/jobs", headers=auth, json={"sparsity": 0.5, "seed": i}).json()["id"]
            for i in range(2)]
    before["jobs"] += len(real)

    with httpx.Client(base_url=api.url, timeout=30) as http:
        for op in operations:
            strategy = st.tuples(
                st.one_of(op.as_strategy(generation_mode=schemathesis.GenerationMode.POSITIVE),
                          op.as_strategy(generation_mode=schemathesis.GenerationMode.NEGATIVE)),
                st.sampled_from([None, *real]), st.booleans())

            @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, database=None, derandomize=True,
                      phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
            @given(drawn=strategy)
            def run(drawn) -> None:  # noqa: ANN001
                case, job_id, builtin_model = drawn
                if job_id is not None and "job_id" in (case.path_parameters or {}):
                    case.path_parameters["job_id"] = job_id
                if builtin_model and isinstance(case.body, dict) and "model" in case.body:
                    case.body["model"] = "smollm2-135m"  # a model the server accepts: specs get further
                kwargs = case.as_transport_kwargs(base_url=api.url, headers=auth)
                kwargs.pop("base_url", None)
                method, url = kwargs.pop("method"), kwargs.pop("url")
                kwargs.pop("cookies", None)
                r = http.request(method, url, **{k: v for k, v in kwargs.items()
                                                 if k in ("params", "headers", "content", "json", "data")})
                statuses[r.status_code] += 1
                per_operation[f"{op.method.upper()} {op.path} {r.status_code}"] += 1  # noqa: B023 - run() is called at once
                if r.status_code >= 500:
                    server_errors.append(f"{method} {url} -> {r.status_code}: {r.text[:200]}")
                if r.status_code == 202 and method.upper() == "POST":
                    accepted.add(r.json()["id"])

            run()

    total = sum(statuses.values())
    four = sum(n for code, n in statuses.items() if 400 <= code < 500)
    five = sum(n for code, n in statuses.items() if code >= 500)
    print(f"\nfuzz ({s.resolved_database_url.split(':', 1)[0]}): {total} requests, {four} 4xx, {five} 5xx; "
          f"by status {dict(sorted(statuses.items()))}; {len(accepted)} jobs accepted")
    print("by operation:", dict(sorted(per_operation.items())))
    assert not server_errors, server_errors[:5]
    after = _table_counts(s.resolved_database_url)
    # Only the accepted submissions added rows; nothing else changed (no team, key, delivery...).
    assert after["jobs"] - before["jobs"] == len(accepted)
    assert {k: v for k, v in after.items() if k != "jobs"} == {k: v for k, v in before.items() if k != "jobs"}
    assert total >= EXAMPLES_PER_OPERATION  # the run really happened

"""The dashboard route: the page and its assets are served without auth, from this origin only."""

from __future__ import annotations

import re

import pytest
from fastapi.testclient import TestClient


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    from evosparse.api.main import create_app
    from evosparse.jobs.settings import Settings

    app = create_app(Settings(data_dir=tmp_path_factory.mktemp("dash-route")))
    with TestClient(app) as c:
        yield c


def test_page_needs_no_key_and_forbids_foreign_sources(client: TestClient) -> None:
    r = client.get("/")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/html")
    csp = r.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "script-src 'self'" in csp
    # every asset the page references is a local file the route serves
    refs = re.findall(r'(?:src|href)="([^"#]+)"', r.text)
    assert refs, "the page references no assets?"
    for ref in refs:
        if ref.startswith("data:"):
            continue
        assert not re.match(r"^[a-z]+://|^//", ref), f"external reference {ref}"
        asset = client.get("/" + ref.lstrip("/"))
        assert asset.status_code == 200, ref


@pytest.mark.parametrize(("name", "ctype"), [("app.js", "text/javascript"), ("charts.js", "text/javascript"),
                                             ("style.css", "text/css")])
def test_assets_have_their_types(client: TestClient, name: str, ctype: str) -> None:
    r = client.get(f"/static/{name}")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith(ctype)
    assert r.headers["x-content-type-options"] == "nosniff"


@pytest.mark.parametrize("name", ["..%2Fmain.py", "..%2Froutes%2Fdashboard.py", "missing.js", ".hidden.js",
                                  "index.py", "%2Fetc%2Fpasswd"])
def test_nothing_outside_the_static_folder(client: TestClient, name: str) -> None:
    assert client.get(f"/static/{name}").status_code == 404


def test_api_still_requires_a_key(client: TestClient) -> None:
    # the open page must not open the data behind it
    assert client.get("/v1/jobs").status_code == 401


def test_docs_work_offline_and_declare_the_bearer_key(client: TestClient) -> None:
    r = client.get("/docs")
    assert r.status_code == 200 and "SwaggerUIBundle" in r.text
    # nothing from another host: no absolute URL at all, and each asset it names is served here
    assert not re.search(r"[a-z]+://|//[a-z0-9.-]+\.[a-z]{2,}", r.text, re.I), r.text
    refs = re.findall(r'(?:src|href)="([^"]+)"', r.text) + re.findall(r"url: '([^']+)'", r.text)
    assert {"/docs/assets/swagger-ui-bundle.js", "/docs/assets/swagger-ui.css", "/openapi.json"} <= set(refs)
    for ref in refs:
        assert client.get(ref).status_code == 200, ref
    assert client.get("/docs/assets/../main.py").status_code == 404
    assert client.get("/redoc").status_code == 404  # ReDoc exists only as a CDN page: not offered
    schema = client.get("/openapi.json").json()
    [(name, scheme)] = schema["components"]["securitySchemes"].items()
    assert scheme == {**scheme, "type": "http", "scheme": "bearer"}
    for path, methods in schema["paths"].items():
        for method, op in methods.items():
            if path.startswith("/v1/"):  # every job route says it needs the key ("Authorize" in /docs sends it)
                assert op.get("security") == [{name: []}], (method, path)
    assert "security" not in schema["paths"]["/healthz"]["get"]

"""/docs without the internet: Swagger UI's script and styles are served by this API itself.

FastAPI's default /docs page loads Swagger UI from a CDN, which fails on an offline machine (and
tells a third party who reads the docs). The assets come from the ``swagger-ui-bundle-v2``
package (the [server] extra); without it, /docs is a short page pointing to /openapi.json and
the built-in dashboard. ReDoc (CDN-only) is not offered.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, HTTPException, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse

router = APIRouter(include_in_schema=False)
ASSETS = {"swagger-ui-bundle.js": "text/javascript; charset=utf-8", "swagger-ui.css": "text/css; charset=utf-8",
          "favicon-32x32.png": "image/png"}


def swagger_assets() -> Path | None:
    """The folder of the packaged Swagger UI, or None when swagger-ui-bundle-v2 is not installed."""
    try:
        from swagger_ui_bundle import swagger_ui_path
    except ImportError:
        return None
    path = Path(str(swagger_ui_path))
    return path if all((path / name).is_file() for name in ASSETS) else None


@router.get("/docs")
def docs_page(request: Request) -> HTMLResponse:
    # Relative URLs: the page also works behind a reverse-proxy prefix.
    root = request.scope.get("root_path", "").rstrip("/")
    if swagger_assets() is None:
        return HTMLResponse(
            "<!doctype html><title>evosparse API</title><h1>evosparse API</h1>"
            "<p>Swagger UI is not installed on this server (<code>pip install swagger-ui-bundle-v2</code>). "
            f'The API schema is at <a href="{root}/openapi.json">/openapi.json</a>; '
            f'the jobs are on the <a href="{root}/">dashboard</a>.</p>')
    return get_swagger_ui_html(
        openapi_url=f"{root}{request.app.openapi_url}", title="evosparse API",
        swagger_js_url=f"{root}/docs/assets/swagger-ui-bundle.js",
        swagger_css_url=f"{root}/docs/assets/swagger-ui.css",
        swagger_favicon_url=f"{root}/docs/assets/favicon-32x32.png",
        # validatorUrl null: Swagger UI would otherwise send the schema to validator.swagger.io.
        swagger_ui_parameters={"validatorUrl": None, "persistAuthorization": True})


@router.get("/docs/assets/{name}")
def docs_asset(name: str) -> FileResponse:
    folder = swagger_assets()
    if folder is None or name not in ASSETS:
        raise HTTPException(status_code=404, detail="not found")
    return FileResponse(folder / name, media_type=ASSETS[name], headers={"Cache-Control": "max-age=86400"})

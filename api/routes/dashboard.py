"""The dashboard: one static page (HTML + JS + CSS from api/static) served at ``/``.

The page itself needs no auth: it holds no data. It asks for an API key, keeps it in the
browser's localStorage and calls ``/v1`` with ``Authorization: Bearer``, so the dashboard sees
exactly what that team's key may see. No build step and no CDN: the service may run offline.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, HTTPException
from fastapi.responses import FileResponse

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
_MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
}
# Everything the page loads comes from this origin; inline scripts and third-party hosts are refused,
# which also guarantees the offline promise (a CDN reference would fail loudly in the browser test).
_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
)
_HEADERS = {
    "Content-Security-Policy": _CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # Small files that change with upgrades: revalidate every time rather than serve a stale page.
    "Cache-Control": "no-cache",
}

router = APIRouter(include_in_schema=False)


def _static_file(name: str) -> FileResponse:
    # Only plain files directly inside api/static with a known type: no '..', no sub-folders.
    path = STATIC_DIR / name
    suffix = path.suffix.lower()
    unsafe = "/" in name or "\\" in name or name.startswith(".")
    if unsafe or suffix not in _MEDIA_TYPES or not path.is_file():
        raise HTTPException(status_code=404, detail="not found")
    return FileResponse(path, media_type=_MEDIA_TYPES[suffix], headers=_HEADERS)


@router.get("/")
def dashboard_page() -> FileResponse:
    """The single-page dashboard."""
    return _static_file("index.html")


@router.get("/static/{name}")
def dashboard_asset(name: str) -> FileResponse:
    """The page's scripts and styles."""
    return _static_file(name)

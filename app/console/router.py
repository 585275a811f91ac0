"""Serves the console's static files. They are public (they hold no data; every call the console
makes goes to ``/v1`` with the user's key) and come with a strict Content-Security-Policy: scripts
and styles from this origin only, nothing inline, no framing, no third-party connections."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, RedirectResponse, Response

from app.core.errors import NotFound

STATIC = Path(__file__).resolve().parent / "static"

# blob: images are thumbnails and dropped files the console fetched or read itself (an <img> cannot
# send the Authorization header, so thumbnails are fetched and shown from object URLs).
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' blob:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    # Revalidated on every load (cheap: ETag), so a new version is picked up at once.
    "Cache-Control": "no-cache",
}
MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}
# The files, listed once at import: a request can only ever name one of these.
FILES = {p.name: p for p in STATIC.iterdir() if p.is_file() and p.suffix in MEDIA_TYPES}

router = APIRouter(include_in_schema=False)


def _file(name: str) -> FileResponse:
    path = FILES.get(name)
    if path is None:
        raise NotFound(f"no console file {name!r}", code="not_found")
    return FileResponse(path, media_type=MEDIA_TYPES[path.suffix], headers=HEADERS)


@router.get("/console")
def console_no_slash() -> Response:
    return RedirectResponse("/console/", status_code=308)


@router.get("/console/")
def console_index() -> FileResponse:
    return _file("index.html")


@router.get("/console/{name}")
def console_file(name: str) -> FileResponse:
    return _file(name)

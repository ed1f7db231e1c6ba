"""GET /ui: a small search page served by the service itself (static files in service/static, no CDN).

Type a query (text search needs a LiT model) or drop an image; results show each hit's thumbnail, id, score and
metadata. Thumbnails come from the item's metadata: `thumbnail` (a `data:image/...` URI stored in the index) or
`url` (an http(s) address the browser loads). The API key, when one is needed, is typed into the page and sent as
`Authorization: Bearer`. On by default; `ui_enabled=false` removes the routes.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import Response

__all__ = ["STATIC_DIR", "router"]

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
router = APIRouter(tags=["ui"], include_in_schema=False)

# The page runs only its own script; images may be data: thumbnails or item URLs anywhere.
_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src data: https: http:; "
    "connect-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'"
)
_TYPES = {"ui.html": "text/html; charset=utf-8", "app.js": "text/javascript", "app.css": "text/css"}


@cache
def _read(name: str) -> bytes:
    return (STATIC_DIR / name).read_bytes()


def _static(name: str) -> Response:
    headers = {"Content-Security-Policy": _CSP, "X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"}
    return Response(_read(name), media_type=_TYPES[name], headers=headers)


@router.get("/ui")
async def page() -> Response:
    return _static("ui.html")


@router.get("/ui/app.js")
async def script() -> Response:
    return _static("app.js")


@router.get("/ui/app.css")
async def style() -> Response:
    return _static("app.css")

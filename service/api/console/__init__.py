"""The web console: a single page at /ui/, served by the API process itself from static files (no build
step, nothing fetched at run time; uPlot for the curves is vendored under static/vendor/ with its licence).

The page holds no data: it signs in with an API key kept in the browser's session storage and reads
everything through the authenticated /v1 routes, as any client does. Its responses carry a
Content-Security-Policy that allows scripts, styles and connections only from this origin (no inline
script or style), images from here and blob: URLs (artifacts are fetched with the key, then shown).
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from starlette.responses import Response
from starlette.types import Scope

STATIC = Path(__file__).parent / "static"
POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob:; connect-src 'self'; "
          "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
HEADERS = {"Content-Security-Policy": POLICY, "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
           "X-Frame-Options": "DENY", "Cache-Control": "no-cache"}


class ConsoleFiles(StaticFiles):
    """The console's static files, each answer with the security headers."""

    async def get_response(self, path: str, scope: Scope) -> Response:
        response = await super().get_response(path, scope)
        response.headers.update(HEADERS)
        return response


def mount(app: FastAPI) -> None:
    """Serve the console at /ui/ (its files under /ui/static/), every answer with the security headers."""

    @app.get("/ui", include_in_schema=False)
    async def console_redirect() -> RedirectResponse:
        return RedirectResponse("/ui/", status_code=308, headers=HEADERS)

    @app.get("/ui/", include_in_schema=False)
    async def console_page() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html", headers=HEADERS)

    app.mount("/ui/static", ConsoleFiles(directory=STATIC), name="console")

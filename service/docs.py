"""``GET /docs``: Swagger UI served by the app itself, so that the API documentation works offline.

FastAPI's own page loads Swagger UI from a CDN, which fails without internet (and sends every reader's
browser to a third party). This is FastAPI's page pointed at the files of the ``swagger-ui-bundle-v2``
package (Swagger UI 5, which reads FastAPI's OpenAPI 3.1), served under ``/docs/assets``. The page has
its own Content-Security-Policy: the demo page's (everything from this server) plus the hash of its one
inline script, Swagger UI's start-up call, and ``data:`` images (the icons of Swagger UI's stylesheet).
"""

from __future__ import annotations

import base64
import hashlib
import re
from pathlib import Path

from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse
from swagger_ui_bundle import swagger_ui_path

from service.errors import ApiError

DOCS_URL = "/docs"
ASSETS_URL = "/docs/assets"
#: The two files the page loads; the package's other files (its petstore demo page among them) are not served.
ASSETS = {name: Path(str(swagger_ui_path)) / name for name in ("swagger-ui-bundle.js", "swagger-ui.css")}


def inline_script_hashes(html: str) -> list[str]:
    """CSP source expressions allowing exactly the page's inline scripts."""
    return [
        "'sha256-" + base64.b64encode(hashlib.sha256(body.encode()).digest()).decode() + "'"
        for body in re.findall(r"<script>(.*?)</script>", html, flags=re.DOTALL)
    ]


def install_docs(app: FastAPI, favicon_url: str) -> None:
    """Add ``GET /docs`` and its assets to ``app`` (made with ``docs_url=None, redoc_url=None``)."""
    assert app.openapi_url is not None
    page = get_swagger_ui_html(
        openapi_url=app.openapi_url,
        title=f"{app.title}: API",
        swagger_js_url=f"{ASSETS_URL}/swagger-ui-bundle.js",
        swagger_css_url=f"{ASSETS_URL}/swagger-ui.css",
        swagger_favicon_url=favicon_url,
        # No badge from the online validator: the page loads nothing from elsewhere.
        swagger_ui_parameters={"validatorUrl": None},
    )
    html = bytes(page.body).decode()
    headers = {
        "Content-Security-Policy": "default-src 'self'; script-src 'self' "
        + " ".join(inline_script_hashes(html))
        + "; img-src 'self' data:; object-src 'none'; base-uri 'none'; frame-ancestors 'none'",
        "X-Content-Type-Options": "nosniff",
    }

    @app.get(DOCS_URL, include_in_schema=False)
    async def docs_page() -> HTMLResponse:
        return HTMLResponse(html, headers=headers)

    @app.get(ASSETS_URL + "/{name}", include_in_schema=False)
    async def docs_asset(name: str) -> FileResponse:
        if name not in ASSETS:
            raise ApiError(404, f"no such file: {name}")
        return FileResponse(ASSETS[name], headers={"X-Content-Type-Options": "nosniff"})

"""The API's interactive documentation at /docs, served entirely from the package.

FastAPI's default page loads Swagger UI from a CDN: on an air-gapped cluster it is a blank page. Here
the Swagger UI assets (npm swagger-ui-dist 5.35.0, Apache-2.0; `static/swagger-ui/LICENSE`) ship inside
the wheel, the page names no host, and the validator badge (which would call validator.swagger.io) is
off. ReDoc is not offered (it would need its own bundle).

The OpenAPI document declares the API key as an HTTP bearer scheme on every operation that needs one, so
"Authorize" in the page sends it with "Try it out" (the auth dependencies read the header themselves and
keep it out of the generated schema).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

ASSETS = Path(__file__).parent / "static" / "swagger-ui"
PREFIX = "/static/swagger-ui"
SCHEME = "apiKey"
SECURITY_SCHEME = {"type": "http", "scheme": "bearer",
                   "description": "an API key (`Authorization: Bearer <key>`): a tenant's key, or the admin key "
                                  "(X-Switchboard-Tenant picks the tenant it acts for). Open mode needs none."}

PAGE = """<!doctype html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <title>{title} — API</title>
  <link rel="icon" type="image/png" href="{prefix}/favicon-32x32.png">
  <link rel="stylesheet" href="{prefix}/swagger-ui.css">
</head>
<body>
  <div id="swagger-ui"></div>
  <script src="{prefix}/swagger-ui-bundle.js"></script>
  <script>
    window.ui = SwaggerUIBundle({{url: "{openapi}", dom_id: "#swagger-ui", validatorUrl: null,
                                 deepLinking: true, persistAuthorization: true}});
  </script>
</body>
</html>
"""


def install_docs(app: FastAPI) -> None:
    """/docs (Swagger UI from the package) and its assets; the app must be built with docs_url=None."""
    app.mount(PREFIX, StaticFiles(directory=ASSETS), name="swagger-ui")
    page = PAGE.format(title=app.title, prefix=PREFIX, openapi=app.openapi_url)

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return HTMLResponse(page)

    app.openapi = _with_security(app.openapi)  # type: ignore[method-assign]


def _with_security(generate: Callable[[], dict[str, Any]]) -> Callable[[], dict[str, Any]]:
    """FastAPI's document plus the bearer scheme on every operation that can answer 401, i.e. every one
    guarded by an auth dependency (their `responses=ERRORS` declares it); /health, /metrics and the
    documents need no key and declare no 401."""

    def openapi() -> dict[str, Any]:
        doc = generate()
        schemes = doc.setdefault("components", {}).setdefault("securitySchemes", {})
        if SCHEME not in schemes:  # FastAPI caches the document: add to it once
            schemes[SCHEME] = SECURITY_SCHEME
            for item in doc.get("paths", {}).values():
                for operation in item.values():
                    if isinstance(operation, dict) and "401" in operation.get("responses", {}):
                        operation.setdefault("security", [{SCHEME: []}])
        return doc

    return openapi

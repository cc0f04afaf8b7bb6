"""The API's interactive documentation at /docs, served entirely from the package.

FastAPI's default page loads Swagger UI from a CDN: on an air-gapped cluster it is a blank page. Here
the Swagger UI assets (npm swagger-ui-dist 5.35.0, Apache-2.0; `static/swagger-ui/LICENSE`) ship inside
the wheel, the page names no host, and the validator badge (which would call validator.swagger.io) is
off. ReDoc is not offered (it would need its own bundle).
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

ASSETS = Path(__file__).parent / "static" / "swagger-ui"
PREFIX = "/static/swagger-ui"

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

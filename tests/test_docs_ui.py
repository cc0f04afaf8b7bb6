"""/docs works offline: Swagger UI from the package, no host named; rendered by a real headless Chromium."""

from __future__ import annotations

import re
import shutil
import subprocess
from html.parser import HTMLParser

import httpx
import pytest

from tests.server_fixture import serving_in_thread


class Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.urls += [v for k, v in attrs if k in ("src", "href") and v]


@pytest.fixture(scope="module")
def served(tiny_dir, tmp_path_factory):
    with serving_in_thread(tmp_path_factory.mktemp("data"), tiny_dir[1]) as (url, _):
        yield url


def test_the_docs_page_names_no_other_host_and_its_assets_are_served(served):
    r = httpx.get(f"{served}/docs")
    assert r.status_code == 200
    links = Links()
    links.feed(r.text)
    assert links.urls and all(u.startswith("/") and not u.startswith("//") for u in links.urls), links.urls
    assert not re.search(r"https?://", r.text), "the page names a host"
    assert "validatorUrl: null" in r.text
    for url in links.urls:
        asset = httpx.get(f"{served}{url}")
        assert asset.status_code == 200 and len(asset.content) > 100, url
    assert httpx.get(f"{served}/redoc").status_code == 404  # not offered: it would need a CDN
    assert "/static/swagger-ui/{path}" not in httpx.get(f"{served}/openapi.json").json()["paths"]


@pytest.mark.slow
def test_chromium_renders_the_operations_with_every_other_host_unreachable(served):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("Debian's chromium is not installed")
    port = served.rsplit(":", 1)[1]
    dom = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=15000",
                          "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
                          "--dump-dom", f"http://127.0.0.1:{port}/docs"],
                         capture_output=True, text=True, timeout=120).stdout
    assert "opblock" in dom, dom[-2000:]
    for path in ("/v1/classify", "/v1/embed", "/v1/tasks/{task}", "/v1/keys"):
        assert path in dom, f"{path} not rendered"

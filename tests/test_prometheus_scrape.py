"""A real Prometheus (Debian's) scrapes a running server: its query API returns the server's request
counter and the process collector's resident memory after a few requests."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from switchboard.clients.local_services import free_port
from tests.server_fixture import serving_in_thread


def query(prometheus: str, expr: str) -> list[dict]:
    r = httpx.get(f"{prometheus}/api/v1/query", params={"query": expr}, timeout=5)
    r.raise_for_status()
    return r.json()["data"]["result"]


def test_prometheus_scrapes_requests_and_process_metrics(tiny_dir, tmp_path: Path):
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("Prometheus is not installed (Debian: apt-get install prometheus)")
    with serving_in_thread(tmp_path / "data", tiny_dir[1]) as (url, _):
        for _ in range(3):
            httpx.get(f"{url}/v1/backbone")
        config = tmp_path / "prometheus.yml"
        config.write_text("global: {scrape_interval: 1s}\nscrape_configs:\n  - job_name: switchboard\n"
                          f"    static_configs: [{{targets: ['{url.removeprefix('http://')}']}}]\n")
        port = free_port()
        prometheus = f"http://127.0.0.1:{port}"
        proc = subprocess.Popen([binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                                 f"--web.listen-address=127.0.0.1:{port}"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    found = query(prometheus, 'switchboard_requests_total{endpoint="GET /v1/backbone"}')
                    if found:
                        break
                except httpx.HTTPError:
                    pass
                assert proc.poll() is None, "prometheus exited"
                assert time.monotonic() < deadline, "Prometheus never saw switchboard_requests_total"
                time.sleep(0.5)
            assert float(found[0]["value"][1]) >= 3
            assert found[0]["metric"]["job"] == "switchboard"
            assert float(query(prometheus, "process_resident_memory_bytes")[0]["value"][1]) > 10 << 20
            assert query(prometheus, "up")[0]["value"][1] == "1"
        finally:
            proc.terminate()
            proc.wait(20)
